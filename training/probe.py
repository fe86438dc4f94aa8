"""`attnlm probe`: the long-range agreement probe on exported models, as a table and a plot.

    attnlm probe artifacts/tiny artifacts/tiny-lstm --plot runs/probe.png
    attnlm probe artifacts/probe/* --json probe.json --per-cell 200

For each model: agreement accuracy (does it prefer " jumps" over " jump" after "The cat that was
sitting on the mat which was next to the dogs") by clause depth, by token distance and with or
without an attractor; for attention models, the head whose attention from the verb-predicting
position lands most on the subject, and how that weight holds up with distance. The probe set is
generated (seeded) and excludes the sentences of the built-in training corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from attnlm.artifact import Artifact, load_artifact
from attnlm.probe import (
    PROBE_SEED,
    ProbeItem,
    ProbeSummary,
    probe_set,
    score_items,
    summarize,
    training_sentences,
)


@dataclass
class ModelProbe:
    name: str
    label: str  # e.g. "transformer (dot_product)", "lstm"
    params: int
    summary: ProbeSummary
    seconds: float


def model_label(artifact: Artifact) -> str:
    cfg = artifact.config
    return "lstm" if cfg.arch == "lstm" else f"transformer, {cfg.attention.replace('_', '-')}"


def probe_artifact(
    artifact: Artifact, items_by_tokenizer: dict[str, list[ProbeItem]], args: argparse.Namespace
) -> ModelProbe:
    tokenizer = artifact.tokenizer
    key = tokenizer.to_json_str()
    if key not in items_by_tokenizer:  # models trained on the same data share one probe set
        exclude = (
            training_sentences(args.train_sentences, args.train_seed)
            if args.train_sentences
            else ()
        )
        items_by_tokenizer[key] = probe_set(
            tokenizer,
            per_cell=args.per_cell,
            seed=args.seed,
            max_depth=args.max_depth,
            block_size=artifact.config.block_size,
            exclude=exclude,
        )
    items = items_by_tokenizer[key]
    start = time.perf_counter()
    scores = score_items(artifact.model, items, tokenizer.eot_id, vocab_size=tokenizer.vocab_size)
    return ModelProbe(
        name=artifact.path.name,
        label=model_label(artifact),
        params=sum(p.numel() for p in artifact.model.parameters()),
        summary=summarize(items, scores),
        seconds=time.perf_counter() - start,
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def tables(results: list[ModelProbe]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the report's tables."""
    depths = sorted({d for r in results for d in r.summary.by_depth})
    buckets = list(dict.fromkeys(b for r in results for b in r.summary.by_distance))
    out = []
    header = ["model", "arch", "params", "n", "accuracy %", *[f"depth {d}" for d in depths]]
    header += ["no attractor", "attractor"]
    rows = []
    for r in results:
        s = r.summary
        rows.append(
            [r.name, r.label, f"{r.params:,}", str(s.n), _pct(s.accuracy)]
            + [_pct(s.by_depth[d].accuracy) if d in s.by_depth else "-" for d in depths]
            + [
                _pct(s.by_attractor[k].accuracy) if k in s.by_attractor else "-"
                for k in (False, True)
            ]
        )
    out.append(("Agreement accuracy (%) by clause depth and attractor", header, rows))
    header = ["model", *[f"d={b}" for b in buckets]]
    rows = [
        [r.name]
        + [
            _pct(r.summary.by_distance[b].accuracy) if b in r.summary.by_distance else "-"
            for b in buckets
        ]
        for r in results
    ]
    out.append(("Agreement accuracy (%) by token distance subject -> verb", header, rows))
    rows = [
        [r.name]
        + [
            f"{r.summary.by_distance[b].mean_margin:.2f}" if b in r.summary.by_distance else "-"
            for b in buckets
        ]
        for r in results
    ]
    out.append(
        (
            "Mean margin log P(agreeing form) - log P(other form), nats, by token distance",
            header,
            rows,
        )
    )
    header_depth = ["model", *[f"depth {d}" for d in depths]]
    rows = [
        [r.name]
        + [
            f"{r.summary.by_depth[d].mean_margin:.2f}" if d in r.summary.by_depth else "-"
            for d in depths
        ]
        for r in results
    ]
    out.append(("Mean margin (nats) by clause depth", header_depth, rows))
    attention = [r for r in results if r.summary.best_head is not None]
    if attention:
        header = ["model", "best head", *[f"d={b}" for b in buckets], "uniform d=11-15"]
        rows = []
        for r in attention:
            layer, head = r.summary.best_head
            by = r.summary.by_distance
            rows.append(
                [r.name, f"L{layer} H{head}"]
                + [f"{by[b].mean_attention:.2f}" if b in by else "-" for b in buckets]
                + [f"{by['11-15'].mean_uniform:.2f}" if "11-15" in by else "-"]
            )
        out.append(
            (
                "Attention to the subject from the verb-predicting position, best head",
                header,
                rows,
            )
        )
    return out


def format_text(results: list[ModelProbe]) -> str:
    lines = []
    for title, header, rows in tables(results):
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines += [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.append("")
    return "\n".join(lines)


def format_markdown(results: list[ModelProbe]) -> str:
    return markdown_tables(tables(results))


def markdown_tables(titled: list[tuple[str, list[str], list[list[str]]]]) -> str:
    """(title, header, rows) tables as Markdown, each under its title in bold."""
    parts = []
    for title, header, rows in titled:
        parts.append(f"**{title}**\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("")
    return "\n".join(parts)


def plot(results: list[ModelProbe], path: str | os.PathLike) -> Path:
    """Left: accuracy vs token distance, one line per model. Middle: the mean log-prob margin of
    the agreeing form. Right: the best head's attention to the subject vs distance, per attention
    model, with what uniform attention would give."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    for r in results:
        by = r.summary.by_distance
        keys = list(by)
        left.plot(
            keys, [100 * by[k].accuracy for k in keys], marker="o", label=f"{r.name} ({r.label})"
        )
    left.axhline(50, color="grey", lw=0.8, ls=":")
    left.set(
        xlabel="tokens from subject to verb",
        ylabel="agreement accuracy (%)",
        title="Prefers the verb form that agrees with the subject",
        ylim=(0, 102),
    )
    left.legend(fontsize=8, loc="lower left")
    for r in results:
        by = r.summary.by_distance
        keys = list(by)
        middle.plot(keys, [by[k].mean_margin for k in keys], marker="o", label=r.name)
    middle.axhline(0, color="grey", lw=0.8, ls=":")
    middle.set(
        xlabel="tokens from subject to verb",
        ylabel="log P(agreeing) - log P(other), nats",
        title="How sure: mean margin of the agreeing form",
    )
    middle.legend(fontsize=8)
    uniform_drawn = False
    for r in results:
        if r.summary.best_head is None:
            continue
        by = r.summary.by_distance
        keys = list(by)
        layer, head = r.summary.best_head
        right.plot(
            keys,
            [by[k].mean_attention for k in keys],
            marker="o",
            label=f"{r.name} L{layer} H{head}",
        )
        if not uniform_drawn:
            right.plot(
                keys,
                [by[k].mean_uniform for k in keys],
                color="grey",
                ls="--",
                label="uniform attention",
            )
            uniform_drawn = True
    right.set(
        xlabel="tokens from subject to verb",
        ylabel="attention weight on the subject",
        title="Best head: attention from the verb position to the subject",
        ylim=(0, 1.02),
    )
    if uniform_drawn:
        right.legend(fontsize=8, loc="lower left")
    else:
        right.text(0.5, 0.5, "no attention model", ha="center", transform=right.transAxes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlm probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", help="folders written by `attnlm export`")
    parser.add_argument(
        "--per-cell", type=int, default=100, help="sentences per (depth, attractor) cell"
    )
    parser.add_argument("--max-depth", type=int, default=3, help="deepest clause nesting probed")
    parser.add_argument("--seed", type=int, default=PROBE_SEED, help="seed of the probe sentences")
    parser.add_argument(
        "--train-sentences", type=int, default=100_000,
        help="size of the built-in training corpus to hold out (0: hold nothing out)",
    )  # fmt: skip
    parser.add_argument("--train-seed", type=int, default=1337, help="its seed (data.seed)")
    parser.add_argument("--plot", default=None, help="write the PNG plot here")
    parser.add_argument("--json", default=None, help="write the full results as JSON here")
    parser.add_argument("--device", default="cpu")
    return parser


def run(args: argparse.Namespace) -> list[ModelProbe]:
    if args.per_cell < 1:
        raise ValueError("--per-cell must be >= 1")
    if args.max_depth < 0:
        raise ValueError("--max-depth must be >= 0")
    items_by_tokenizer: dict[str, list[ProbeItem]] = {}
    results = []
    for path in args.artifacts:
        artifact = load_artifact(path, device=args.device, dtype=torch.float32)
        results.append(probe_artifact(artifact, items_by_tokenizer, args))
    return results


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    print(format_text(results), end="")
    if args.plot:
        print(f"plot: {plot(results, args.plot)}")
    if args.json:
        data = [
            {
                "name": r.name,
                "arch": r.label,
                "params": r.params,
                "seconds": r.seconds,
                **r.summary.to_dict(),
            }
            for r in results
        ]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0
