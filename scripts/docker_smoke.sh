#!/usr/bin/env bash
# Build docker/serve.Dockerfile for real and smoke-test it: GET /health and one /v1/completions
# through a port published on 127.0.0.1, with an exported model mounted read-only.
#
# Where Docker Hub cannot be reached (the machines this project is developed on), the CUDA base
# image cannot be pulled either, so a stand-in base is made locally, once, and kept:
#   1. apt: podman buildah runc debootstrap (if missing)
#   2. debootstrap --variant=minbase bookworm -> `podman import` -> $DEBIAN_IMAGE
#   3. docker/smoke-base.Containerfile FROM it: Debian's Python 3.11 in a venv on PATH with the CPU
#      build of torch ($TORCH, resolved by the host's pip, as `make install` does) -> $BASE_IMAGE
# then, on every run:
#   4. podman build -f docker/serve.Dockerfile --build-arg BASE_IMAGE=$BASE_IMAGE -> $SERVE_IMAGE
#   5. podman run -p 127.0.0.1:$PORT:8000 -v ARTIFACT:/artifacts/model:ro; wait for /health,
#      read the model name from /v1/models, POST one completion, run the image's HEALTHCHECK
#   6. (SMOKE_TRAIN=1) build docker/train.Dockerfile from the same base and run `attnlm --help`
# The container is always removed at the end. Each phase prints its wall time.
#
# Usage: scripts/docker_smoke.sh [ARTIFACT_DIR]      (or: make docker-smoke)
#   ARTIFACT_DIR  an `attnlm export` folder; default artifacts/tiny if exported, else an untrained
#                 tiny model exported with .venv/bin/python (enough to exercise serving)
# Environment: BASE_IMAGE (use your own base; skips steps 1-3 when it exists), DEBIAN_IMAGE,
#   SERVE_IMAGE, TRAIN_IMAGE, PORT (default: a free one), HEALTH_TIMEOUT (s, default 180),
#   SMOKE_TRAIN=1, REBUILD_BASE=1 (remake steps 2-3), SMOKE_DIR (scratch, default
#   /var/tmp/attnlm-docker-smoke), TORCH (default torch==2.13.0), DEBIAN_MIRROR, VENV.
# Exit status: 0 passed; 3 no container engine can be installed or run here; other: a failure.
#
# Machine-specific pieces stay here, not in the Dockerfiles: podman's runtime is runc with explicit
# ulimits (crun fails on this kernel's cgroup setup), and pip inside the builds reaches the index
# through an intercepting proxy, so the host's CA bundle and a pip.conf naming it are mounted into
# the builds (never baked in).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
VENV=${VENV:-.venv}
SMOKE_DIR=${SMOKE_DIR:-/var/tmp/attnlm-docker-smoke}
TORCH=${TORCH:-torch==2.13.0}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_IMAGE=${DEBIAN_IMAGE:-localhost/attnlm-debian:bookworm}
BASE_GIVEN=${BASE_IMAGE:+1}
BASE_IMAGE=${BASE_IMAGE:-localhost/attnlm-pybase:${TORCH//[^a-zA-Z0-9.]/}-cpu}
SERVE_IMAGE=${SERVE_IMAGE:-localhost/attnlm-serve:smoke}
TRAIN_IMAGE=${TRAIN_IMAGE:-localhost/attnlm-train:smoke}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-180}
SMOKE_TRAIN=${SMOKE_TRAIN:-0}
REBUILD_BASE=${REBUILD_BASE:-0}
NAME=attnlm-smoke-$$
RUN_DIR=$SMOKE_DIR/run-$$
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
EXIT_NO_ENGINE=3

log() { printf '[docker-smoke] %s\n' "$*"; }
die() { log "FAILED: $*" >&2; exit 1; }
no_engine() { log "NO CONTAINER ENGINE: $*" >&2; exit "$EXIT_NO_ENGINE"; }

TIMINGS=()
phase_start=0
begin() { phase_start=$(date +%s.%N); log "== $1"; }
end() {
  local secs
  secs=$(awk -v a="$phase_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  TIMINGS+=("$(printf '%-44s %7s s' "$1" "$secs")")
  log "   $1: ${secs} s"
}
summary() {
  ((${#TIMINGS[@]})) || return 0
  log "timings (wall):"
  printf '  %s\n' "${TIMINGS[@]}"
}

image_id() { podman image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
# After a rebuild, drop the image the tag pointed to before (and its untagged layers), so that
# repeated runs do not pile up gigabytes of dangling images; the build cache of the new one stays.
drop_replaced() {
  local old=$2
  [[ -n $old && $old != "$(image_id "$1")" ]] || return 0
  podman rmi "$old" >/dev/null 2>&1 || true
}

cleanup() {
  local rc=$?
  set +e
  if [[ -n ${ENGINE_READY:-} ]] && podman container exists "$NAME" 2>/dev/null; then
    if ((rc != 0)); then
      log "last lines of the container's log:" >&2
      podman logs --tail 40 "$NAME" 2>&1 | sed 's/^/  | /' >&2
    fi
    podman rm -f -t 5 "$NAME" >/dev/null 2>&1 && log "removed container $NAME"
  fi
  rm -rf "$RUN_DIR" "$SMOKE_DIR/rootfs" "$SMOKE_DIR/wheels"
  summary
  if ((rc == 0)); then log "PASSED"; else log "exit status $rc"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$SMOKE_DIR" "$RUN_DIR"

# ---- 1. engine ---------------------------------------------------------------------------------
begin "apt (podman buildah runc debootstrap)"
need=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  ((EUID == 0)) || no_engine "missing ${need[*]} and not root: cannot apt-get install them"
  command -v apt-get >/dev/null || no_engine "missing ${need[*]} and no apt-get"
  log "installing ${need[*]}"
  apt-get update -qq >"$SMOKE_DIR/apt.log" 2>&1 || no_engine "apt-get update failed (see $SMOKE_DIR/apt.log)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman buildah runc debootstrap >>"$SMOKE_DIR/apt.log" 2>&1 ||
    no_engine "apt-get install podman buildah runc debootstrap failed (see $SMOKE_DIR/apt.log)"
else
  log "already installed"
fi
((EUID == 0)) || no_engine "this script runs podman rootful (debootstrap, bind mounts into builds): run it as root"
end "apt (podman buildah runc debootstrap)"

# crun, podman's default runtime, fails here (cgroup hybrid mode, RLIMIT_NOFILE); runc works.
export CONTAINERS_CONF=$SMOKE_DIR/containers.conf
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
podman info >"$SMOKE_DIR/podman-info.log" 2>&1 || no_engine "podman info failed (see $SMOKE_DIR/podman-info.log)"
ENGINE_READY=1

# pip inside the builds: the host's CA bundle, named by a mounted /etc/pip.conf (the image's own
# /etc/ssl/certs stays Debian's). Nothing of this is baked into an image.
printf '[global]\ncert = /etc/attnlm-host-ca.crt\n' >"$SMOKE_DIR/pip.conf"
BUILD_MOUNTS=(-v "$SMOKE_DIR/pip.conf:/etc/pip.conf:ro")
[[ -f $CA_BUNDLE ]] && BUILD_MOUNTS+=(-v "$CA_BUNDLE:/etc/attnlm-host-ca.crt:ro")

# ---- 2-3. local base image -------------------------------------------------------------------
if ((REBUILD_BASE)); then
  for image in "$BASE_IMAGE" "$DEBIAN_IMAGE"; do
    [[ $image == localhost/* ]] && { podman rmi -f "$image" >/dev/null 2>&1 || true; }
  done
fi
if podman image exists "$BASE_IMAGE"; then
  log "base image $BASE_IMAGE present (REBUILD_BASE=1 remakes it)"
elif [[ -n $BASE_GIVEN && $BASE_IMAGE != localhost/* ]]; then
  log "base image $BASE_IMAGE not present: the build will try to pull it"
else
  if podman image exists "$DEBIAN_IMAGE"; then
    log "debian image $DEBIAN_IMAGE present"
  else
    begin "debootstrap + podman import"
    rm -rf "$SMOKE_DIR/rootfs"
    debootstrap --variant=minbase bookworm "$SMOKE_DIR/rootfs" "$DEBIAN_MIRROR" \
      >"$SMOKE_DIR/debootstrap.log" 2>&1 || die "debootstrap failed (see $SMOKE_DIR/debootstrap.log)"
    rm -rf "$SMOKE_DIR"/rootfs/var/cache/apt/archives/*.deb "$SMOKE_DIR"/rootfs/var/lib/apt/lists/*
    tar -C "$SMOKE_DIR/rootfs" -c . | podman import - "$DEBIAN_IMAGE" >>"$SMOKE_DIR/debootstrap.log" 2>&1
    rm -rf "$SMOKE_DIR/rootfs"
    podman run --rm "$DEBIAN_IMAGE" true || no_engine "podman cannot run a container from $DEBIAN_IMAGE"
    end "debootstrap + podman import"
  fi

  begin "base image build (python + $TORCH)"
  # Resolve the torch pin with the host's pip, as `make install` does (here: the CPU build on this
  # machine's disk); the wheel folder is mounted at /wheels as find-links.
  mkdir -p "$SMOKE_DIR/wheels"
  [[ -x $VENV/bin/pip ]] || die "$VENV/bin/pip missing: run make install first"
  "$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$SMOKE_DIR/wheels" "$TORCH" ||
    die "pip download $TORCH failed"
  log "torch wheel: $(basename "$(ls "$SMOKE_DIR"/wheels/torch-*.whl)")"
  podman build --format docker -f docker/smoke-base.Containerfile \
    --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" --build-arg TORCH="$TORCH" \
    -v "$SMOKE_DIR/wheels:/wheels:ro" "${BUILD_MOUNTS[@]}" \
    -t "$BASE_IMAGE" docker >"$SMOKE_DIR/base-build.log" 2>&1 ||
    { tail -30 "$SMOKE_DIR/base-build.log" >&2; die "base image build failed (see $SMOKE_DIR/base-build.log)"; }
  rm -rf "$SMOKE_DIR/wheels"
  end "base image build (python + $TORCH)"
fi

# ---- 4. serve image -----------------------------------------------------------------------------
begin "serve image build"
old_serve=$(image_id "$SERVE_IMAGE")
podman build --format docker -f docker/serve.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
  "${BUILD_MOUNTS[@]}" -t "$SERVE_IMAGE" . >"$SMOKE_DIR/serve-build.log" 2>&1 ||
  { tail -30 "$SMOKE_DIR/serve-build.log" >&2; die "serve image build failed (see $SMOKE_DIR/serve-build.log)"; }
grep -E '^torch [0-9]' "$SMOKE_DIR/serve-build.log" | tail -1 | sed 's/^/  in the image: /' || true
drop_replaced "$SERVE_IMAGE" "$old_serve"
end "serve image build"

# ---- 5. run and probe ---------------------------------------------------------------------------
ARTIFACT=${1:-${ARTIFACT:-}}
if [[ -z $ARTIFACT ]]; then
  if [[ -f artifacts/tiny/model.safetensors ]]; then
    ARTIFACT=artifacts/tiny
  else
    log "no artifact given and none in artifacts/tiny: exporting an untrained tiny model"
    ARTIFACT=$RUN_DIR/untrained
    "$VENV/bin/python" -c "import sys; from pathlib import Path; \
from tests.integration.helpers import build_tiny_artifact; build_tiny_artifact(Path(sys.argv[1]))" \
      "$ARTIFACT" || die "exporting a tiny artifact failed"
  fi
fi
[[ -f $ARTIFACT/model.safetensors ]] || die "$ARTIFACT is not an exported model (no model.safetensors)"
# The image runs as uid 1000, and `attnlm export` leaves the folder 0700 / the weights 0600: mount
# a world-readable copy so the smoke test does not depend on who owns the export.
cp -r "$ARTIFACT" "$RUN_DIR/model"
chmod -R a+rX "$RUN_DIR/model"
log "artifact: $ARTIFACT"

PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT

begin "container start -> /health 200"
podman run -d --name "$NAME" --shm-size 2g -p "127.0.0.1:$PORT:8000" \
  -v "$RUN_DIR/model:/artifacts/model:ro" "$SERVE_IMAGE" >/dev/null 2>"$RUN_DIR/run.err" ||
  { cat "$RUN_DIR/run.err" >&2; die "podman run failed"; }
deadline=$((SECONDS + HEALTH_TIMEOUT))
until curl -sf --max-time 3 "$URL/health" >"$RUN_DIR/health.json" 2>/dev/null; do
  [[ $(podman inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null) == true ]] ||
    die "the container exited ($(podman inspect -f '{{.State.ExitCode}}' "$NAME" 2>/dev/null))"
  ((SECONDS < deadline)) || die "no 200 from $URL/health within ${HEALTH_TIMEOUT} s"
  sleep 1
done
log "GET /health -> $(cat "$RUN_DIR/health.json")"
end "container start -> /health 200"

begin "GET /v1/models + POST /v1/completions"
MODEL=$(curl -sf --max-time 10 "$URL/v1/models" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])') ||
  die "GET /v1/models failed"
BODY=$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": "The cat", "max_tokens": 5}))' "$MODEL")
curl -sf --max-time 60 "$URL/v1/completions" -H 'content-type: application/json' -d "$BODY" \
  >"$RUN_DIR/completion.json" || die "POST /v1/completions failed"
python3 - "$RUN_DIR/completion.json" <<'EOF' || die "unexpected completion response: $(cat "$RUN_DIR/completion.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["object"] == "text_completion", r
text = r["choices"][0]["text"]
assert isinstance(text, str) and text, r
print(f"[docker-smoke] model {r['model']!r}: 'The cat' -> {text!r} (usage {r.get('usage')})")
EOF
end "GET /v1/models + POST /v1/completions"

# The image's HEALTHCHECK (urllib inside the container). Without systemd, podman does not schedule
# it, so run it once by hand.
if [[ $(podman inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$NAME" 2>/dev/null) == yes ]]; then
  podman healthcheck run "$NAME" >/dev/null 2>&1 || die "the image's HEALTHCHECK failed"
  log "HEALTHCHECK: $(podman inspect -f '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo passed)"
else
  log "HEALTHCHECK: not in the image config (built without --format docker?)"
fi

# ---- 6. train image (optional) ------------------------------------------------------------------
if ((SMOKE_TRAIN)); then
  begin "train image build"
  old_train=$(image_id "$TRAIN_IMAGE")
  podman build --format docker -f docker/train.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
    "${BUILD_MOUNTS[@]}" -t "$TRAIN_IMAGE" . >"$SMOKE_DIR/train-build.log" 2>&1 ||
    { tail -30 "$SMOKE_DIR/train-build.log" >&2; die "train image build failed (see $SMOKE_DIR/train-build.log)"; }
  drop_replaced "$TRAIN_IMAGE" "$old_train"
  end "train image build"
  begin "train image: attnlm --help"
  podman run --rm "$TRAIN_IMAGE" --help >"$RUN_DIR/train-help.txt" 2>&1 ||
    { cat "$RUN_DIR/train-help.txt" >&2; die "attnlm --help failed in $TRAIN_IMAGE"; }
  head -3 "$RUN_DIR/train-help.txt" | sed 's/^/  | /'
  podman run --rm --entrypoint gcc "$TRAIN_IMAGE" --version | head -1 | sed 's/^/  | /'
  end "train image: attnlm --help"
fi
