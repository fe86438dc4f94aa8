"""The probe study over seeds: tables with the mean and the spread (min-max) of every cell, the
two plots, and sentences stating what the numbers show.

A study is `{config name: [result of each seed]}`, the results being what `training.probe_study`
writes (`result.json`); config names end in their size (`dot-1m`, `lstm-2.5m`):

    study = {"dot-1m": [r1, r2, r3], "lstm-1m": [...], ...}
    markdown_tables(tables(study))          # the report's tables
    plot_by_distance(study, "docs/img/probe.png")
    plot_over_training(study, "docs/img/probe-training.png")
    findings(study)                          # Markdown bullets computed from the numbers

`scripts/probe_report.py` runs the study and writes docs/probe.md with these.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlm.probe import HARD_ATTRACTORS, HARD_DISTANCE_BUCKETS, bucket_label

Study = dict[str, list[dict[str, Any]]]
BUCKETS = [bucket_label(lo, hi) for lo, hi in HARD_DISTANCE_BUCKETS]
ATTRACTORS = [str(k) for k in HARD_ATTRACTORS]
Table = tuple[str, list[str], list[list[str]]]


@dataclass(frozen=True)
class Spread:
    """Mean, lowest and highest of one number over the seeds."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        v = [x for x in values if x is not None]
        return cls(sum(v) / len(v), min(v), max(v), len(v)) if v else None

    def below(self, other: Spread) -> bool:
        """Every seed of this one is under every seed of `other`: the ranges do not overlap."""
        return self.hi < other.lo

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        m, lo, hi = (f"{scale * x:.{digits}f}" for x in (self.mean, self.lo, self.hi))
        return m if self.n == 1 or lo == hi else f"{m} ({lo}-{hi})"


def _fmt(s: Spread | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if s is None else s.format(scale, digits)


def size_of(name: str) -> str:
    return name.rsplit("-", 1)[-1]


def arch_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def sizes(study: Study) -> list[str]:
    return list(dict.fromkeys(size_of(n) for n in study))


def has_attention(runs: list[dict]) -> bool:
    return runs[0]["probe"].get("best_head") is not None


def cell(runs: list[dict], table: str, key: str, field: str = "accuracy") -> Spread | None:
    """The spread over seeds of `field` of group `key` in the probe's `table` (by_distance,
    by_attractors, by_distance_attractors); seeds where the group is empty are left out."""
    return Spread.of(r["probe"][table].get(key, {}).get(field) for r in runs)


def tables(study: Study) -> list[Table]:
    """The report's tables: accuracy and margin by distance and by attractors, the farthest
    cells, the best head's attention to the subject."""
    out: list[Table] = []
    by = [("by_distance", BUCKETS, "d="), ("by_attractors", ATTRACTORS, "")]
    for field, what, scale, digits in (
        ("accuracy", "Agreement accuracy (%)", 100.0, 1),
        ("mean_margin_nats", "Mean margin log P(agreeing) - log P(other form), nats,", 1.0, 2),
    ):
        for table, keys, prefix in by:
            title = f"{what} by {'subject-verb distance in tokens' if table == 'by_distance' else 'number of attractors'}"
            header = ["model", *(f"{prefix}{k}" for k in keys)]
            rows = [
                [name, *(_fmt(cell(runs, table, k, field), scale, digits) for k in keys)]
                for name, runs in study.items()
            ]
            out.append((title, header, rows))
    far = BUCKETS[-1]
    header = ["model", *(f"{k} attractors" for k in ATTRACTORS)]
    rows = [
        [
            name,
            *(_fmt(cell(runs, "by_distance_attractors", f"{far}|{k}"), 100.0) for k in ATTRACTORS),
        ]
        for name, runs in study.items()
    ]
    out.append((f"Agreement accuracy (%) at {far} tokens, by number of attractors", header, rows))
    attention = {n: r for n, r in study.items() if has_attention(r)}
    if attention:
        header = ["model", "best head (per seed)", *(f"d={b}" for b in BUCKETS), "uniform"]
        rows = []
        for name, runs in attention.items():
            heads = ", ".join(
                f"L{r['probe']['best_head'][0]} H{r['probe']['best_head'][1]}" for r in runs
            )
            uniform = Spread.of(
                r["probe"]["by_distance"].get(far, {}).get("uniform_attention") for r in runs
            )
            rows.append(
                [name, heads]
                + [
                    _fmt(cell(runs, "by_distance", b, "best_head_attention"), 1.0, 2)
                    for b in BUCKETS
                ]
                + [f"{_fmt(uniform, 1.0, 3)} at {far}"]
            )
        out.append(
            ("Best head: attention from the verb-predicting position to the subject", header, rows)
        )
    return out


def worst_cells(study: Study, count: int = 5) -> list[str]:
    """The `count` (distance, attractors) cells of the lowest accuracy averaged over every model
    of the study (cells that every model has), as keys of by_distance_attractors."""
    keys = {
        k for runs in study.values() for r in runs for k in r["probe"]["by_distance_attractors"]
    }
    means = {}
    for key in keys:
        spreads = [cell(runs, "by_distance_attractors", key) for runs in study.values()]
        if all(spreads):
            means[key] = sum(s.mean for s in spreads) / len(spreads)
    return sorted(means, key=means.get)[:count]


def hardest_cells(study: Study, count: int = 5) -> Table:
    """The table of `worst_cells`: each model's spread there."""
    worst = worst_cells(study, count)
    header = ["distance, attractors", *study]
    rows = [
        [_cell_label(key)]
        + [_fmt(cell(runs, "by_distance_attractors", key), 100.0) for runs in study.values()]
        for key in worst
    ]
    return (f"The {len(worst)} hardest cells (lowest accuracy over all models), %", header, rows)


def _cell_label(key: str) -> str:
    """'151-200|4' -> '151-200 tokens, 4 attractors'."""
    distance, count = key.split("|")
    return f"{distance} tokens, {count} attractors"


# -- plots ------------------------------------------------------------------------------------------
def _axes_grid(rows: int, cols: int, width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        rows, cols, figsize=(width, height), constrained_layout=True, squeeze=False
    )
    return plt, fig, axes


def _line(ax, xs: Sequence, spreads: Sequence[Spread | None], scale: float, **kw) -> None:
    """The mean over seeds as a line, min-max as a band."""
    pts = [(x, s) for x, s in zip(xs, spreads, strict=True) if s is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    ax.plot(x, [scale * s.mean for _, s in pts], marker="o", ms=3, **kw)
    ax.fill_between(
        x, [scale * s.lo for _, s in pts], [scale * s.hi for _, s in pts], alpha=0.2, lw=0
    )


def _save(plt, fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_by_distance(study: Study, path: str | os.PathLike) -> Path:
    """One row per size: accuracy and margin vs distance bucket, accuracy vs attractors; a line
    per architecture (mean over seeds) with the min-max band."""
    groups = sizes(study)
    plt, fig, axes = _axes_grid(len(groups), 3, 15, 3.8 * len(groups))
    for row, size in zip(axes, groups, strict=True):
        for name, runs in study.items():
            if size_of(name) != size:
                continue
            x = list(range(len(BUCKETS)))
            _line(row[0], x, [cell(runs, "by_distance", b) for b in BUCKETS], 100, label=name)
            margins = [cell(runs, "by_distance", b, "mean_margin_nats") for b in BUCKETS]
            _line(row[1], x, margins, 1.0, label=name)
            counts = [int(k) for k in ATTRACTORS]
            accs = [cell(runs, "by_attractors", k) for k in ATTRACTORS]
            _line(row[2], counts, accs, 100, label=name)
        for ax in row[:2]:
            ax.set_xticks(range(len(BUCKETS)), BUCKETS)
            ax.set_xlabel("tokens from subject to verb")
        row[0].set(ylabel="agreement accuracy (%)", ylim=(0, 102), title=f"{size}: accuracy")
        row[0].axhline(50, color="grey", lw=0.8, ls=":")
        row[1].set(ylabel="log P(agreeing) - log P(other), nats", title=f"{size}: margin")
        row[1].axhline(0, color="grey", lw=0.8, ls=":")
        row[2].set(
            xlabel="attractors (nouns of the other number in between)",
            ylabel="agreement accuracy (%)",
            ylim=(0, 102),
            title=f"{size}: accuracy by attractors (all distances)",
        )
        row[2].axhline(50, color="grey", lw=0.8, ls=":")
        row[0].legend(fontsize=8, loc="lower left")
    return _save(plt, fig, path)


def history_spread(runs: list[dict], field: str) -> tuple[list[int], list[Spread | None]]:
    """Steps probed during training and the spread over seeds of `field` at each."""
    steps = sorted({h["step"] for r in runs for h in r["history"]})
    at = [{h["step"]: h.get(field) for h in r["history"]} for r in runs]
    return steps, [Spread.of(a.get(s) for a in at) for s in steps]


def plot_over_training(study: Study, path: str | os.PathLike) -> Path:
    """One row per size: probe accuracy (all models) and the best head's attention to the
    subject (attention models) against the training step, mean over seeds with min-max band."""
    groups = sizes(study)
    plt, fig, axes = _axes_grid(len(groups), 2, 12, 3.6 * len(groups))
    for (left, right), size in zip(axes, groups, strict=True):
        for name, runs in study.items():
            if size_of(name) != size:
                continue
            steps, accuracy = history_spread(runs, "accuracy")
            _line(left, steps, accuracy, 100, label=name)
            if has_attention(runs):
                steps, attention = history_spread(runs, "subject_attention")
                _line(right, steps, attention, 1.0, label=name)
        left.set(
            xlabel="training step",
            ylabel="agreement accuracy (%)",
            ylim=(0, 102),
            title=f"{size}: probe accuracy during training",
        )
        left.axhline(50, color="grey", lw=0.8, ls=":")
        left.legend(fontsize=8, loc="lower right")
        right.set(
            xlabel="training step",
            ylabel="attention weight on the subject",
            ylim=(0, 1.02),
            title=f"{size}: best head's attention to the subject",
        )
        right.legend(fontsize=8, loc="upper left")
    return _save(plt, fig, path)


# -- what the numbers show ------------------------------------------------------------------------
def _pct(s: Spread | None) -> str:
    return _fmt(s, 100.0) + " %"


def _names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def separations(study: Study, size: str, table: str, keys: Sequence[str]) -> list[str]:
    """For each key, the pairs of models of `size` whose seed ranges do not overlap ("a < b"),
    or nothing where every range overlaps another's."""
    names = [n for n in study if size_of(n) == size]
    out = []
    for key in keys:
        spreads = {n: cell(study[n], table, key) for n in names}
        pairs = [
            f"{a} < {b}"
            for a in names
            for b in names
            if spreads[a] and spreads[b] and spreads[a].below(spreads[b])
        ]
        out.append("; ".join(pairs))
    return out


def findings(study: Study) -> list[str]:
    """Markdown bullets stating what the tables show, computed from them: the ceiling, the fall
    with distance and with attractors, where the architectures' seed ranges separate and where
    they do not, size, the best head, and training."""
    lines = []
    near, far = BUCKETS[0], BUCKETS[-1]
    for key in worst_cells(study, 1):
        spreads = {n: cell(runs, "by_distance_attractors", key) for n, runs in study.items()}
        ranked = sorted(spreads, key=lambda n: spreads[n].mean)
        lines.append(
            f"- **The hardest cell** ({_cell_label(key)}): "
            + "; ".join(f"{n} {_pct(spreads[n])}" for n in ranked)
            + "."
        )
    for size in sizes(study):
        names = [n for n in study if size_of(n) == size]
        falls = []
        for n in names:
            a, b = cell(study[n], "by_distance", near), cell(study[n], "by_distance", far)
            falls.append(f"{n} {_pct(a)} at {near} tokens, {_pct(b)} at {far}")
        lines.append(f"- **Distance, {size}.** " + "; ".join(falls) + ".")
        drops = []
        for n in names:
            a = cell(study[n], "by_attractors", ATTRACTORS[0])
            b = cell(study[n], "by_attractors", ATTRACTORS[-1])
            drops.append(f"{n} {_pct(a)} with none, {_pct(b)} with {ATTRACTORS[-1]}")
        lines.append(
            f"- **Attractors, {size}** (all distances together). " + "; ".join(drops) + "."
        )
        for label, table, keys in (
            ("distance bucket", "by_distance", BUCKETS),
            ("attractor count", "by_attractors", ATTRACTORS),
        ):
            seps = separations(study, size, table, keys)
            apart = [f"{k}: {s}" for k, s in zip(keys, seps, strict=True) if s]
            together = [k for k, s in zip(keys, seps, strict=True) if not s]
            text = f"- **Where the {size} architectures differ, by {label}** (no overlap of the seeds' min-max ranges). "
            text += ("; ".join(apart) + ". ") if apart else "Nowhere. "
            if together:
                text += f"No separation at {_names(together)}: every range overlaps another."
            lines.append(text)
    archs = list(dict.fromkeys(arch_of(n) for n in study))
    if len(sizes(study)) > 1:
        small, big = sizes(study)[0], sizes(study)[-1]
        parts = []
        for arch in archs:
            a, b = study.get(f"{arch}-{small}"), study.get(f"{arch}-{big}")
            if a and b:
                sa, sb = cell(a, "by_distance", far), cell(b, "by_distance", far)
                parts.append(f"{arch} {_pct(sa)} ({small}) vs {_pct(sb)} ({big})")
        lines.append(f"- **Size**, at {far} tokens: " + "; ".join(parts) + ".")
    for name, runs in study.items():
        if not has_attention(runs):
            continue
        a = cell(runs, "by_distance", near, "best_head_attention")
        b = cell(runs, "by_distance", far, "best_head_attention")
        u = Spread.of(r["probe"]["by_distance"].get(far, {}).get("uniform_attention") for r in runs)
        steps, history = history_spread(runs, "subject_attention")
        lines.append(
            f"- **{name}'s best head** puts {_fmt(a, 1, 2)} of its attention on the subject at "
            f"{near} tokens and {_fmt(b, 1, 2)} at {far} (uniform attention: {_fmt(u, 1, 3)}); "
            f"during training it went from {_fmt(history[0], 1, 2)} at step {steps[0]} to "
            f"{_fmt(history[-1], 1, 2)} at step {steps[-1]}."
        )
    return lines
