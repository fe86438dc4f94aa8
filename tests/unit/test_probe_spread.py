"""training.probe_spread: the study's tables, spreads, plots and sentences on made-up results."""

from __future__ import annotations

import pytest

from training.probe import markdown_tables
from training.probe_spread import (
    ATTRACTORS,
    BUCKETS,
    Spread,
    findings,
    hardest_cells,
    plot_by_distance,
    plot_over_training,
    separations,
    tables,
    worst_cells,
)


def group(accuracy: float, attention: float | None = None) -> dict:
    return {
        "n": 10,
        "accuracy": accuracy,
        "mean_margin_nats": 4 * (accuracy - 0.5),
        "best_head_attention": attention,
        "uniform_attention": None if attention is None else 0.01,
    }


def result(config: str, seed: int, far_accuracy: float, attention: bool = True) -> dict:
    """A run that is right everywhere but falls linearly to `far_accuracy` over the buckets, and
    loses 2 points per attractor."""
    steps = len(BUCKETS) - 1
    acc = {b: 1.0 - (1.0 - far_accuracy) * i / steps for i, b in enumerate(BUCKETS)}
    att = 0.5 if attention else None
    return {
        "config": config,
        "seed": seed,
        "arch": "lstm" if not attention else "transformer, dot-product",
        "params": 1000,
        "tokens": 4096,
        "tokens_per_sec": 100.0,
        "fit_seconds": 60.0,
        "val_loss": 2.0,
        "probe": {
            "n": 100,
            "accuracy": sum(acc.values()) / len(acc),
            "by_distance": {b: group(a, att) for b, a in acc.items()},
            "by_attractors": {k: group(0.9 - 0.02 * int(k), att) for k in ATTRACTORS},
            "by_distance_attractors": {
                f"{b}|{k}": group(a - 0.02 * int(k), att)
                for b, a in acc.items()
                for k in ATTRACTORS
            },
            "best_head": [1, 2] if attention else None,
        },
        "history": [
            {"step": s, "accuracy": 0.5 + 0.1 * s / 100, "subject_attention": 0.1 * s / 100}
            if attention
            else {"step": s, "accuracy": 0.5 + 0.1 * s / 100}
            for s in (100, 200, 300)
        ],
    }


@pytest.fixture
def study() -> dict:
    """dot-1m far above lstm-1m at the far end in every seed; their near ends are equal."""
    return {
        "dot-1m": [result("dot-1m", s, 0.80 + 0.01 * s) for s in (1, 2, 3)],
        "lstm-1m": [result("lstm-1m", s, 0.55 + 0.01 * s, attention=False) for s in (1, 2, 3)],
    }


def test_spread_and_its_format():
    s = Spread.of([0.5, None, 0.7, 0.6])
    assert (s.mean, s.lo, s.hi, s.n) == pytest.approx((0.6, 0.5, 0.7, 3))
    assert s.format(100.0) == "60.0 (50.0-70.0)"
    assert Spread.of([0.25]).format(100.0) == "25.0" and Spread.of([None]) is None
    assert Spread.of([1, 2]).below(Spread.of([3, 4])) and not Spread.of([1, 3]).below(
        Spread.of([3, 4])
    )


def test_tables_hold_mean_and_min_max_per_cell(study):
    titled = tables(study)
    by_distance = titled[0]
    assert by_distance[1] == ["model", *(f"d={b}" for b in BUCKETS)]
    dot = by_distance[2][0]
    assert dot[0] == "dot-1m" and dot[1] == "100.0" and dot[-1] == "82.0 (81.0-83.0)"
    far = next(t for t in titled if t[0].startswith("Agreement accuracy (%) at 151-200"))
    assert far[2][0][1:] == [f"{82 - 2 * k}.0 ({81 - 2 * k}.0-{83 - 2 * k}.0)" for k in range(5)]
    heads = titled[-1]
    assert heads[2] == [
        ["dot-1m", "L1 H2, L1 H2, L1 H2", *["0.50"] * len(BUCKETS), "0.010 at 151-200"]
    ]
    assert "| dot-1m | 100.0 |" in markdown_tables(titled)


def test_hardest_cells_and_separations(study):
    assert worst_cells(study, 1) == ["151-200|4"]
    title, header, rows = hardest_cells(study, 2)
    assert header == ["distance, attractors", "dot-1m", "lstm-1m"]
    assert rows[0][0] == "151-200 tokens, 4 attractors"
    assert separations(study, "1m", "by_distance", BUCKETS) == [""] + ["lstm-1m < dot-1m"] * 5


def test_findings_state_the_numbers_and_where_models_do_not_differ(study):
    text = "\n".join(findings(study))
    assert "The hardest cell** (151-200 tokens, 4 attractors): lstm-1m 49.0 (48.0-50.0) %" in text
    assert "No separation at 1-10" in text
    assert "1-10: lstm" not in text and "151-200: lstm-1m < dot-1m" in text
    assert (
        "dot-1m's best head** puts 0.50" in text
        and "from 0.10 at step 100 to 0.30 at step 300" in text
    )
    assert "lstm-1m's best head" not in text


def test_plots_are_written(study, tmp_path):
    for plot in (plot_by_distance, plot_over_training):
        path = plot(study, tmp_path / f"{plot.__name__}.png")
        assert path.stat().st_size > 10_000
