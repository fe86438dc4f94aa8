"""One run of the probe study (docs/probe.md): fit a config with one seed while
`ProbeOverTraining` probes it every N steps, export it, run the full hard probe on the artifact,
and write everything the report needs to `OUT/result.json`.

    python -m training.probe_study --config configs/probe/dot-1m.yaml --seed 2 \
        --out runs/probe/dot-1m/seed2 --artifact artifacts/probe/dot-1m-seed2 \
        --per-cell 30 --probe-every 25 --probe-per-cell 2 -- --trainer.max_steps 120

Everything after `--` goes to `attnlm fit` as it is. `scripts/probe_report.py` starts one such
process per (config, seed), a few at a time; one process does fit, export and probe so that torch
and Lightning are imported once. The hard probe set (`attnlm.probe.hard_probe_set`, distances
1-200 tokens, 0-4 attractors) is held out from the run's training sentences and made with the
run's tokenizer: runs on the same data probe the same sentences.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from attnlm.artifact import load_artifact
from attnlm.atomic import atomic_write
from attnlm.probe import (
    ProbeItem,
    hard_buckets,
    hard_probe_set,
    score_items,
    summarize,
    training_sentences,
)
from attnlm.tokenizer import Tokenizer
from training.probe import model_label

RESULT_FILE = "result.json"
CALLBACK = "training.probe_callback.ProbeOverTraining"


def fit_stats(log_dir: Path) -> dict[str, Any]:
    """Tokens/s (mean of the logged windows after the first) and the last validation loss of a
    run, from its metrics.csv."""
    with (log_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    speeds = [float(r["tokens_per_sec"]) for r in rows if r.get("tokens_per_sec")][1:]
    val = [r for r in rows if r.get("val_loss")]
    return {
        "tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
        "val_loss": float(val[-1]["val_loss"]) if val else None,
    }


def hard_items(
    tokenizer: Tokenizer, block: int, data: dict[str, Any], per_cell: int, strict: bool
) -> tuple[list[ProbeItem], tuple[tuple[int, int], ...]]:
    """The study's hard probe set for a `block`-token model trained on the `data` settings'
    built-in corpus (held out from its sentences), and the distance buckets it covers."""
    buckets = hard_buckets(block)
    exclude = training_sentences(data["corpus_sentences"], data["seed"])
    items = hard_probe_set(
        tokenizer, per_cell, block_size=block, buckets=buckets, exclude=exclude, strict=strict
    )
    return items, buckets


def hard_probe(artifact_path: Path, data: dict[str, Any], per_cell: int, strict: bool) -> dict:
    """The full hard probe of an exported model: its summary by distance bucket, by number of
    attractors and by cell."""
    artifact = load_artifact(artifact_path, dtype=torch.float32)
    tokenizer = artifact.tokenizer
    items, buckets = hard_items(tokenizer, artifact.config.block_size, data, per_cell, strict)
    start = time.perf_counter()
    scores = score_items(artifact.model, items, tokenizer.eot_id, vocab_size=tokenizer.vocab_size)
    summary = summarize(items, scores, buckets)
    return {
        "arch": model_label(artifact),
        "params": sum(p.numel() for p in artifact.model.parameters()),
        "probe_seconds": time.perf_counter() - start,
        "probe": summary.to_dict(),
    }


def run(args: argparse.Namespace, fit_args: list[str]) -> dict[str, Any]:
    from training.cli import main as attnlm
    from training.export import export_checkpoint

    out = Path(args.out)
    fit = [
        "fit", "--config", args.config, "--seed_everything", str(args.seed),
        "--trainer.default_root_dir", str(out),
        "--trainer.callbacks+", CALLBACK,
        "--trainer.callbacks.every_n_steps", str(args.probe_every),
        "--trainer.callbacks.per_cell", str(args.probe_per_cell),
        *fit_args,
    ]  # fmt: skip
    started = time.perf_counter()
    if attnlm(fit) != 0:
        raise RuntimeError(f"attnlm fit failed: {' '.join(fit)}")
    fit_seconds = time.perf_counter() - started
    (log_dir,) = sorted(out.glob("logs/version_*"))[-1:]
    config = yaml.safe_load((log_dir / "config.yaml").read_text(encoding="utf-8"))
    export_checkpoint(out / "checkpoints" / "best.ckpt", args.artifact)
    probed = hard_probe(Path(args.artifact), config["data"], args.per_cell, not args.lenient)
    history = json.loads((log_dir / "probe_history.json").read_text(encoding="utf-8"))
    return {
        "config": Path(args.config).stem,
        "seed": args.seed,
        "settings": args.settings,
        "fit_seconds": fit_seconds,
        "steps": config["trainer"]["max_steps"],
        "tokens": config["trainer"]["max_steps"]
        * config["data"]["batch_size"]
        * config["model"]["block_size"],
        **fit_stats(log_dir),
        **probed,
        "history": history,
        "threads": torch.get_num_threads(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.probe_study", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, required=True, help="seed_everything of the fit")
    parser.add_argument("--out", required=True, help="the run's folder (default_root_dir)")
    parser.add_argument("--artifact", required=True, help="where to export the model")
    parser.add_argument("--per-cell", type=int, default=30, help="hard probe sentences per cell")
    parser.add_argument(
        "--probe-every", type=int, default=25, help="probe during fit every N steps"
    )
    parser.add_argument("--probe-per-cell", type=int, default=2, help="...on this many per cell")
    parser.add_argument(
        "--lenient", action="store_true",
        help="keep the sentences found where a cell cannot be filled (small vocabularies)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--settings", type=json.loads, default={},
        help="JSON recorded in result.json (what the report reuses a run for)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args, argv[split + 1 :])
    with atomic_write(Path(args.out) / RESULT_FILE, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(args.out, RESULT_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
