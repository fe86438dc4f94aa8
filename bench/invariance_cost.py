"""What batch invariance costs (issue 19): `batch_invariant` off and on, side by side in one run.

Both modes run with configs/serve.yaml's application args (dtype, compile; the invariant mode
decodes eager whatever `compile` says), on the same artifact, in interleaved rounds (off, on,
off, on, ...): on this shared 2-core machine one mode's figure moves up to 2x between runs
minutes apart, so only a ratio measured in the same round means anything. Medians over rounds.

1. engine (no HTTP): next-token of 32 texts in one call, attention maps of the same 32 in one
   call, 32 seeded sampled completions (temperature 0.9, `--max-tokens` tokens) decoded together
   (32 threads), one such completion alone; throughput on / off;
2. HTTP (`--http`): Ray Serve on 127.0.0.1, the two modes deployed side by side (one replica
   each: / off, /inv on), next-token and completions at concurrency 1, 8, 32: requests/s, p50,
   p99; each round measures off then on (wrk when installed, else the httpx loop of
   bench/serve_load.py).

    .venv/bin/python bench/invariance_cost.py                      # small shape, engine only
    .venv/bin/python bench/invariance_cost.py --http --rounds 3    # and over HTTP
    .venv/bin/python bench/invariance_cost.py --shape tiny --json runs/invariance.json

Results: docs/benchmarks.md, "Batch invariance".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402  (also puts the repository on sys.path)

MODES = ("off", "on")


def engines(artifact: Path) -> dict:
    from serving.engine import Engine

    args = serve_load.serve_yaml_args()
    options = {"dtype": args.get("dtype"), "compile": args.get("compile", False)}
    return {
        mode: Engine(artifact, device="cpu", batch_invariant=mode == "on", **options)
        for mode in MODES
    }


def engine_work(engine, texts: list[str], max_tokens: int) -> dict:
    """name -> a function doing one unit of work, and the items it serves."""
    from serving.engine import AttentionOptions, CompletionParams

    def params(seed: int) -> CompletionParams:
        return CompletionParams(max_tokens=max_tokens, temperature=0.9, seed=seed)

    def together() -> None:
        threads = [
            threading.Thread(target=engine.complete, args=(text[:20], params(i)))
            for i, text in enumerate(texts)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return {
        "next_token_32": (lambda: engine.next_token(texts, 10), len(texts)),
        "attention_32": (lambda: engine.attention(texts, AttentionOptions()), len(texts)),
        "completions_32_together": (together, len(texts)),
        "completion_alone": (lambda: engine.complete(texts[0][:20], params(0)), 1),
    }


def bench_engine(artifact: Path, rounds: int, max_tokens: int) -> dict:
    texts = serve_load.texts_32()
    by_mode = {mode: engine_work(e, texts, max_tokens) for mode, e in engines(artifact).items()}
    times: dict = {name: {mode: [] for mode in MODES} for name in by_mode["off"]}
    for mode in MODES:  # warm-up
        for fn, _ in by_mode[mode].values():
            fn()
    for r in range(rounds):
        for name in times:
            for mode in MODES:
                fn, items = by_mode[mode][name]
                start = time.perf_counter()
                fn()
                times[name][mode].append(time.perf_counter() - start)
        print(f"  engine round {r + 1}/{rounds}", flush=True)
    out = {}
    for name, t in times.items():
        items = by_mode["off"][name][1]
        per_s = {mode: items / statistics.median(t[mode]) for mode in MODES}
        out[name] = {"items_per_s": per_s, "ratio_on_off": per_s["on"] / per_s["off"]}
    return out


def bench_http(artifact: Path, rounds: int, secs: float, max_tokens: int) -> dict:
    from ray import serve

    from serving.app import AttnLMServer

    os.environ["RAY_AUTH_MODE"] = "disabled"
    user_config = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005, "max_in_flight": 1000}
    routes = {"off": "", "on": "/inv"}
    bodies = {
        "next_token": ("/v1/next-token", {"text": serve_load.NEXT_TEXT, "top_k": 10}),
        "completions": (
            "/v1/completions",
            {
                "model": Path(artifact).resolve().name,
                "prompt": serve_load.COMPLETION_PROMPT,
                "max_tokens": max_tokens,
                "temperature": 0.9,
                "seed": 1,
            },
        ),
    }
    runs: dict = {}
    with serve_load.local_serve() as base:
        args = serve_load.serve_yaml_args()
        for mode, route in routes.items():
            app = AttnLMServer.options(
                name=f"AttnLM_{mode}",
                user_config=user_config,
                max_ongoing_requests=64,
                ray_actor_options={"num_cpus": 1},
            ).bind(str(artifact), **{**args, "batch_invariant": mode == "on"})
            serve.run(app, name=f"attnlm_{mode}", route_prefix=route or "/", blocking=False)
            serve_load.wait_healthy(base, f"{route}/health", tries=1200)
        load = serve_load.Loader(base, shutil.which("wrk") is not None, 120)
        runs["load_generator"] = "wrk" if load.use_wrk else "httpx"
        for r in range(rounds):
            for name, (path, body) in bodies.items():
                for c in (1, 8, 32):
                    for mode, route in routes.items():
                        key = f"{name}_c{c}"
                        result = load(
                            route + path, body, c, secs, 100 if name == "next_token" else 5
                        )
                        runs.setdefault(key, {m: [] for m in MODES})[mode].append(result)
            print(f"  http round {r + 1}/{rounds}", flush=True)
    out = {"load_generator": runs.pop("load_generator")}
    for key, by_mode in runs.items():
        out[key] = {
            mode: {
                stat: statistics.median(r[stat] for r in results)
                for stat in ("rps", "p50_ms", "p99_ms")
            }
            | {"errors": sum(r["errors"] for r in results)}
            for mode, results in by_mode.items()
        }
        out[key]["ratio_rps_on_off"] = out[key]["on"]["rps"] / out[key]["off"]["rps"]
    return out


def report(res: dict) -> list[str]:
    lines = [
        f"shape {res['shape']}, dtype {res['dtype']}, {res['rounds']} rounds, "
        f"load average {res['loadavg_start']:.1f} -> {res['loadavg_end']:.1f}, {res['cpu']}",
        "| engine, no HTTP | off (items/s) | on (items/s) | on / off |",
        "|---|--:|--:|--:|",
    ]
    for name, r in res["engine"].items():
        per_s = r["items_per_s"]
        lines.append(
            f"| {name} | {per_s['off']:.1f} | {per_s['on']:.1f} | {r['ratio_on_off']:.2f}x |"
        )
    if "http" in res:
        lines += [
            f"HTTP ({res['http']['load_generator']}), medians over rounds:",
            "| HTTP | off req/s | on req/s | on / off | off p50 / p99 ms | on p50 / p99 ms |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for key, r in res["http"].items():
            if key == "load_generator":
                continue
            off, on = r["off"], r["on"]
            lines.append(
                f"| {key} | {off['rps']:.1f} | {on['rps']:.1f} | {r['ratio_rps_on_off']:.2f}x | "
                f"{off['p50_ms']:.0f} / {off['p99_ms']:.0f} | {on['p50_ms']:.0f} / {on['p99_ms']:.0f} |"
            )
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifact", type=Path, default=None, help="default: build an untrained one"
    )
    parser.add_argument("--shape", choices=sorted(serve_load.SHAPES), default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--http", action="store_true", help="also measure over HTTP")
    parser.add_argument("--secs", type=float, default=5.0, help="seconds per HTTP load run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tmp = None
    try:
        if args.artifact is None:
            tmp = Path(tempfile.mkdtemp(prefix="invariance_cost_"))
            print(f"building an untrained {args.shape} artifact ...", flush=True)
            artifact = serve_load.build_artifact(tmp / args.shape, args.shape)
        else:
            artifact = args.artifact
        res: dict = {"shape": args.shape, "rounds": args.rounds, "cpu": cpu_model()}
        res["dtype"] = serve_load.serve_yaml_args().get("dtype", "default")
        res["loadavg_start"] = os.getloadavg()[0]
        print("1. engine ...", flush=True)
        res["engine"] = bench_engine(artifact, args.rounds, args.max_tokens)
        if args.http:
            print("2. HTTP ...", flush=True)
            res["http"] = bench_http(artifact, args.rounds, args.secs, args.max_tokens)
        res["loadavg_end"] = os.getloadavg()[0]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(report(res)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
