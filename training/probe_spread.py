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


def tables(study: Study, baseline: dict | None = None) -> list[Table]:
    """The report's tables: accuracy and margin by distance and by attractors, the cells of the
    shortest and of the farthest distances by attractors, the best head's attention to the
    subject. `baseline` (a result-like {"probe": ...}, e.g. the nearest-noun heuristic's) adds a
    row to the accuracy tables, named by its "name"."""
    out: list[Table] = []
    rows_of = [*study.items()]
    with_baseline = rows_of + ([(baseline["name"], [baseline])] if baseline else [])
    by = [("by_distance", BUCKETS, "d="), ("by_attractors", ATTRACTORS, "")]
    for field, what, scale, digits in (
        ("accuracy", "Agreement accuracy (%)", 100.0, 1),
        ("mean_margin_nats", "Mean margin log P(agreeing) - log P(other form), nats,", 1.0, 2),
    ):
        for table, keys, prefix in by:
            by_what = (
                "subject-verb distance in tokens"
                if table == "by_distance"
                else "number of attractors"
            )
            header = ["model", *(f"{prefix}{k}" for k in keys)]
            rows = [
                [name, *(_fmt(cell(runs, table, k, field), scale, digits) for k in keys)]
                for name, runs in (with_baseline if field == "accuracy" else rows_of)
            ]
            out.append((f"{what} by {by_what}", header, rows))
    near = [f"{b}|{k}" for b in BUCKETS[:2] for k in ATTRACTORS]
    far = [f"{BUCKETS[-1]}|{k}" for k in ATTRACTORS]
    for keys, title in (
        (
            near,
            f"Agreement accuracy (%) at the shortest distances ({_names(BUCKETS[:2])} tokens), by attractors",
        ),
        (far, f"Agreement accuracy (%) at {BUCKETS[-1]} tokens, by number of attractors"),
    ):
        keys = [
            k for k in keys if any(cell(runs, "by_distance_attractors", k) for _, runs in rows_of)
        ]
        header = ["model", *(k.replace("|", " tok, ") + " attr" for k in keys)]
        rows = [
            [name, *(_fmt(cell(runs, "by_distance_attractors", k), 100.0) for k in keys)]
            for name, runs in with_baseline
        ]
        out.append((title, header, rows))
    far = BUCKETS[-1]
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
    keys = [f"{b}|{k}" for b in BUCKETS for k in ATTRACTORS]  # ties keep this order
    means = {}
    for key in keys:
        spreads = [cell(runs, "by_distance_attractors", key) for runs in study.values()]
        if all(spreads):
            means[key] = sum(s.mean for s in spreads) / len(spreads)
    return sorted(means, key=means.get)[:count]


def hardest_cells(study: Study, count: int = 5, baseline: dict | None = None) -> Table:
    """The table of `worst_cells`: each model's spread there (and the `baseline`'s accuracy)."""
    worst = worst_cells(study, count)
    columns = [*study.values()] + ([[baseline]] if baseline else [])
    header = ["distance, attractors", *study] + ([baseline["name"]] if baseline else [])
    rows = [
        [_cell_label(key)]
        + [_fmt(cell(runs, "by_distance_attractors", key), 100.0) for runs in columns]
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
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_by_distance(study: Study, path: str | os.PathLike, baseline: dict | None = None) -> Path:
    """One row per size: accuracy and margin vs distance bucket, accuracy vs attractors; a line
    per architecture (mean over seeds) with the min-max band, and the `baseline`'s accuracy
    dashed."""
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
        if baseline is not None:
            dashed = {"color": "grey", "ls": "--", "lw": 1, "label": baseline["name"]}
            at = [cell([baseline], "by_distance", b) for b in BUCKETS]
            _line(row[0], list(range(len(BUCKETS))), at, 100, **dashed)
            at = [cell([baseline], "by_attractors", k) for k in ATTRACTORS]
            _line(row[2], [int(k) for k in ATTRACTORS], at, 100, **dashed)
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
            ylim=(0, None),
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


def findings(
    study: Study,
    trained_max: int | None = None,
    baseline: dict | None = None,
    modifiers: dict[str, tuple[float, int, int]] | None = None,
) -> list[str]:
    """Markdown bullets stating what the tables show, computed from them: the hardest cell, what
    each model goes by at short distances (against the `baseline` heuristic), the distances seen
    in training (`trained_max`: the longest subject-verb distance of the training sentences)
    against longer ones and what the far buckets hold (`modifiers`: mean, min, max per bucket),
    the fall with distance and with attractors, where the architectures' seed ranges separate
    and where they do not, size, the best head, training."""
    lines = []
    near, far = BUCKETS[0], BUCKETS[-1]
    if baseline is not None:
        lines += [_goes_by(study, name, baseline) for name in study]
    if trained_max is not None:
        lines += _seen_and_unseen(study, trained_max)
    if baseline is not None and modifiers and far in modifiers:
        mean, lo, hi = modifiers[far]
        b = cell([baseline], "by_distance", far)
        lines.append(
            f"- **What the far buckets reward.** A sentence of the {far} bucket nests {mean:.0f} "
            f"modifiers on average ({lo}-{hi}), each with a noun, and at most "
            f"{ATTRACTORS[-1]} of them have the other number: the {baseline['name']} heuristic, "
            f"which never looks at the subject, is right on {_pct(b)} of them. Accuracy there "
            "says little about finding the subject; the short distances with attractors do."
        )
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
        steps, accuracy = history_spread(runs, "accuracy")
        if not has_attention(runs):
            lines.append(
                f"- **{name}** has no attention; its probe accuracy during training went from "
                f"{_pct(accuracy[0])} at step {steps[0]} to {_pct(accuracy[-1])} at step "
                f"{steps[-1]}."
            )
            continue
        a = cell(runs, "by_distance", near, "best_head_attention")
        b = cell(runs, "by_distance", far, "best_head_attention")
        u = Spread.of(r["probe"]["by_distance"].get(far, {}).get("uniform_attention") for r in runs)
        steps, history = history_spread(runs, "subject_attention")
        lines.append(
            f"- **{name}'s best head** puts {_fmt(a, 1, 2)} of its attention on the subject at "
            f"{near} tokens and {_fmt(b, 1, 2)} at {far} (uniform attention: {_fmt(u, 1, 3)}); "
            f"during training it went from {_fmt(history[0], 1, 2)} at step {steps[0]} to "
            f"{_fmt(history[-1], 1, 2)} at step {steps[-1]}{_half_way(steps, history)}, and the "
            f"probe accuracy from {_pct(accuracy[0])} to {_pct(accuracy[-1])}."
        )
    return lines


def _half_way(steps: list[int], history: list[Spread | None]) -> str:
    """', past half of that at step S' for a mean that rises, else ''."""
    means = [h.mean if h else 0.0 for h in history]
    start, end = means[0], means[-1]
    if end - start < 0.02:
        return ""
    step = next(s for s, m in zip(steps, means, strict=True) if m >= start + (end - start) / 2)
    return f" (half of the rise by step {step})"


def _seen_and_unseen(study: Study, trained_max: int) -> list[str]:
    """The distance buckets inside the training sentences' range against those past it."""
    seen = [
        b for (lo, hi), b in zip(HARD_DISTANCE_BUCKETS, BUCKETS, strict=True) if hi <= trained_max
    ]
    unseen = [
        b for (lo, _), b in zip(HARD_DISTANCE_BUCKETS, BUCKETS, strict=True) if lo > trained_max
    ]
    if not seen or not unseen:
        return []
    inside = {n: [cell(r, "by_distance", b) for b in seen] for n, r in study.items()}
    past = {n: [cell(r, "by_distance", b) for b in unseen] for n, r in study.items()}
    lows = [(s.mean, n, b) for n, v in inside.items() for s, b in zip(v, seen, strict=True) if s]
    highs = [(s.mean, n, b) for n, v in past.items() for s, b in zip(v, unseen, strict=True) if s]
    if not lows or not highs:
        return []
    low, high = min(lows), max(highs)
    return [
        f"- **Inside and past the training distances.** No training sentence has its verb more "
        f"than {trained_max} tokens after its subject. In the buckets inside that "
        f"({_names(seen)} tokens) the lowest mean accuracy is {100 * low[0]:.1f} % ({low[1]} at "
        f"{low[2]}); in the buckets wholly past it ({_names(unseen)}) the highest is "
        f"{100 * high[0]:.1f} % ({high[1]} at {high[2]}), with 50 % for chance."
    ]


def finds_subject(runs: list[dict], threshold: float = 0.75) -> bool:
    """Whether a model is right on `threshold` of the sentences, on average over seeds, in the
    cell with the most attractors of each of the two shortest distance buckets."""
    worst = []
    for b in BUCKETS[:2]:
        counts = [k for k in ATTRACTORS if cell(runs, "by_distance_attractors", f"{b}|{k}")]
        if counts:
            worst.append(cell(runs, "by_distance_attractors", f"{b}|{counts[-1]}").mean)
    return bool(worst) and min(worst) >= threshold


def in_short(study: Study, baseline: dict | None = None) -> str:
    """The findings in a few sentences: which models find the subject at short distances, and
    how those hold up at the farthest distance."""
    near, far = BUCKETS[0], BUCKETS[-1]
    finders = [n for n, runs in study.items() if finds_subject(runs)]
    others = [n for n in study if n not in finders]
    tokens = next(iter(study.values()))[0]["tokens"]
    if not finders:
        return (
            f"With {tokens:,} training tokens each, no model finds the subject at short "
            "distances when nouns of the other number stand between: the probe is below its "
            "ceiling everywhere, and what it shows is which shortcut each model took."
        )
    text = (
        f"With the same {tokens:,} training tokens, {_names(finders)} "
        f"{'finds' if len(finders) == 1 else 'find'} the subject at short distances even with "
        f"attractors in between; {_names(others) if others else 'no other model'} "
        f"{'does' if len(others) == 1 else 'do'} not. "
    )
    falls = [
        f"{n} {_pct(cell(study[n], 'by_distance', near))} at {near} tokens and "
        f"{_pct(cell(study[n], 'by_distance', far))} at {far}"
        for n in finders
    ]
    text += "Past the training distances that does not hold: " + "; ".join(falls)
    if baseline is not None:
        text += (
            f", where the {baseline['name']} heuristic alone scores "
            f"{_pct(cell([baseline], 'by_distance', far))}"
        )
    text += "."
    attention = [n for n, runs in study.items() if has_attention(runs)]
    if attention and not set(attention) & set(finders):
        heads = "; ".join(
            f"{n} {_fmt(cell(study[n], 'by_distance', near, 'best_head_attention'), 1, 2)}"
            for n in attention
        )
        text += (
            " So at this budget the probe does not show attention's advantage: the recurrent "
            "model is the one that found the subject, while the attention models have a head "
            f"that attends to it at {near} tokens (weight {heads}) but do not yet use it for "
            "the verb's number."
        )
    return text


def _goes_by(study: Study, name: str, baseline: dict) -> str:
    """What a model follows at the two shortest distances: the subject (right with the most
    attractors there), the nouns in between (right without attractors, below chance with the
    most), or neither."""
    runs = study[name]
    none, most = [], []
    for b in BUCKETS[:2]:
        counts = [k for k in ATTRACTORS if cell(runs, "by_distance_attractors", f"{b}|{k}")]
        if counts:
            none.append(f"{b}|{counts[0]}")
            most.append(f"{b}|{counts[-1]}")
    a0 = [cell(runs, "by_distance_attractors", k) for k in none]
    ak = [cell(runs, "by_distance_attractors", k) for k in most]
    h = [cell([baseline], "by_distance_attractors", k) for k in most]
    said = "; ".join(
        f"{_cell_label(k0)} {_pct(x)}, {_cell_label(k)} {_pct(y)}"
        for k0, x, k, y in zip(none, a0, most, ak, strict=True)
    )
    if finds_subject(runs):
        verdict = "finds the subject"
    elif min(x.mean for x in a0) >= 0.65 and max(y.mean for y in ak) < 0.5:
        verdict = (
            "goes by the nouns in between, not the subject (below chance where they disagree; "
            f"the {baseline['name']} heuristic scores {', '.join(_pct(x) for x in h)} there)"
        )
    else:
        verdict = "neither clearly finds the subject nor follows the nouns in between"
    return f"- **{name} {verdict}**: {said}."
