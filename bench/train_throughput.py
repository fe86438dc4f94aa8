"""Training throughput and MFU: the Lightning pipeline against a bare PyTorch loop.

Both pipelines train the same GPT (same init seed, same batches, AdamW with the same parameter
groups and hyperparameters, the same warmup-cosine LambdaLR schedule stepped every step, gradient
clipping at norm 1.0) on the same synthetic data: random token ids in a fixed in-memory tensor of
(block_size + 1)-token windows, served by a plain DataLoader over a TensorDataset, so data loading
costs both the same (and little).

- lightning: `Trainer(accelerator=<device>, devices=1, precision=..., logger=False,
  enable_checkpointing=False, enable_progress_bar=False, gradient_clip_val=1.0)` fitting
  `training.module.LanguageModel` with no validation (its training_step as it is: two `self.log`
  calls and a non-finite-loss check per step);
- bare: a plain loop over `attnlm.model.GPT`: forward under `torch.autocast(device, bfloat16)` for
  bf16-mixed (plain fp32 for 32-true), backward, `clip_grad_norm_`, `optimizer.step()`,
  `scheduler.step()`, `zero_grad(set_to_none=True)`.

Only the steady state is timed: the clock is read after every optimizer step (for Lightning in a
tiny Callback's `on_train_batch_end`), and tokens/s counts the steps after the first `warmup` ones
(timed window / steps). The median step time is reported too, with the ratios computed from it
("by median step"): on a shared machine it shrugs off bursts of contention that the window mean
takes in (with 2 OpenMP threads on 2 busy cores a whole run can be 10-40x slower: rerun then).
On CUDA the device is synchronized at the two ends of the timed window only, so the CPU may run
ahead of the GPU inside it as it would in real training. The pipelines alternate
(bare, lightning, then lightning, bare, ...) for `--repeats` rounds, fp32 and bf16 interleaved
within each round, so that machine noise hits both alike; the table reports the BEST round per
pipeline (noise only slows a run down) and lists every round.

MFU = tokens/s * flops_per_token(config, block_size) / peak. On the CPU the peak is the matmul
ceiling `training.callbacks.measure_matmul_peak` in that dtype, measured in this run (before and
after the pipelines; the higher of the two). On CUDA the peak is Lightning's spec-sheet value
(`get_available_flops`, falling back to the measured one for chips it does not know); the measured
matmul peak is reported beside it.

Run (from the repository root):

    .venv/bin/python bench/train_throughput.py                       # both shapes, 32-true + bf16-mixed
    .venv/bin/python bench/train_throughput.py --shapes nanogpt-cpu --repeats 3
    .venv/bin/python bench/train_throughput.py --shapes small --steps small=10 --warmup small=2
    .venv/bin/python bench/train_throughput.py --json runs/bench.json --plot runs/bench.png
    .venv/bin/python bench/train_throughput.py --device cuda --compile --float32-matmul-precision high

Options: --device (default cuda if available, else cpu), --shapes (nanogpt-cpu,small),
--precisions (32-true,bf16-mixed), --steps / --warmup / --batch-size / --vocab (one number for
every shape, or per shape as `nanogpt-cpu=300,small=20`), --repeats, --compile, --seed,
--float32-matmul-precision, --json PATH, --plot PATH.

Shapes: nanogpt-cpu = 4 layers, 4 heads, 128 wide, context 64, batch 12, vocab 512 (nanoGPT's
CPU example); small = 6 layers, 6 heads, 384 wide, context 256, vocab 4096 (configs/small.yaml),
batch 64 on a GPU but 8 on the CPU (to keep a step near a second there). Opt-in: gpt2-124m =
12 layers, 12 heads, 768 wide, context 1,024, vocab 50,257 (configs/gpt2-124m.yaml), batch 16 on
a GPU, 1 on the CPU with 1 warm-up + 2 timed steps (a step takes seconds there: enough to show
it runs and what MFU it reaches):

    .venv/bin/python bench/train_throughput.py --shapes gpt2-124m --repeats 1
    .venv/bin/python bench/train_throughput.py --device cuda --compile --shapes gpt2-124m \
        --precisions bf16-mixed --float32-matmul-precision high Opt-in diagnostic:
overhead = 1 layer, 32 wide, context 16, batch 2: so little compute that the difference of the
two pipelines' step times is Lightning's own per-step cost (printed as "lightning +X ms/step").

The targets printed under the table are informational; the exit code is 0 whatever they say.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import lightning as L  # noqa: E402
from lightning.fabric.utilities.throughput import get_available_flops  # noqa: E402

from attnlm.config import GPTConfig  # noqa: E402
from attnlm.model import GPT  # noqa: E402
from attnlm.networks import flops_per_token  # noqa: E402
from training.callbacks import measure_matmul_peak, precision_dtype  # noqa: E402
from training.module import LanguageModel, lr_factor  # noqa: E402

# the optimizer and schedule of LanguageModel (its defaults), shared by both pipelines
LEARNING_RATE = 1e-3
MIN_LR_RATIO = 0.1
LR_WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0

PIPELINES = ("bare", "lightning")
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed")

# Targets (informational): Lightning within 5% of bare; tiny fp32 MFU; bf16 speed-up at 384 wide
TARGET_LIGHTNING_RATIO = 0.95
TARGET_TINY_FP32_MFU = 0.45
TARGET_SMALL_BF16_SPEEDUP = 1.4
TARGET_124M_BF16_MFU = 0.40  # issue 14: GPT-2 124M, bf16-mixed + compile, one GPU


@dataclass(frozen=True)
class Shape:
    """A model shape with its per-device-type batch size, timed steps and warm-up steps."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    batch_size: dict[str, int]  # device type ("cpu", "cuda") -> sequences per step
    steps: dict[str, int]  # timed steps after warm-up
    warmup: dict[str, int]  # untimed steps first (compilation, allocator, caches)


SHAPES = {
    "nanogpt-cpu": Shape(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        vocab_size=512,
        batch_size={"cpu": 12, "cuda": 12},
        steps={"cpu": 250, "cuda": 500},
        warmup={"cpu": 5, "cuda": 20},
    ),
    # opt-in: so little compute that a step's time is the framework's per-step overhead
    "overhead": Shape(
        n_layer=1,
        n_head=1,
        n_embd=32,
        block_size=16,
        vocab_size=512,
        batch_size={"cpu": 2, "cuda": 2},
        steps={"cpu": 500, "cuda": 500},
        warmup={"cpu": 20, "cuda": 20},
    ),
    "small": Shape(
        n_layer=6,
        n_head=6,
        n_embd=384,
        block_size=256,
        vocab_size=4096,
        batch_size={"cpu": 8, "cuda": 64},
        steps={"cpu": 20, "cuda": 200},
        warmup={"cpu": 3, "cuda": 10},
    ),
    # opt-in: GPT-2 124M (configs/gpt2-124m.yaml); on the CPU a few steps show it runs
    "gpt2-124m": Shape(
        n_layer=12,
        n_head=12,
        n_embd=768,
        block_size=1024,
        vocab_size=50257,
        batch_size={"cpu": 1, "cuda": 16},
        steps={"cpu": 2, "cuda": 30},
        warmup={"cpu": 1, "cuda": 10},
    ),
}
DEFAULT_SHAPES = ("nanogpt-cpu", "small")


@dataclass(frozen=True)
class Workload:
    """One shape resolved for this run's device and command-line overrides."""

    shape: str
    config: GPTConfig
    batch_size: int
    steps: int
    warmup: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.config.block_size

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


# -- timing ------------------------------------------------------------------------------------


class StepClock:
    """perf_counter() after every optimizer step; on CUDA the device is synchronized only at
    the two ends of the timed window (after the last warm-up step and after the last step)."""

    def __init__(self, device: torch.device, warmup: int, total: int) -> None:
        self.device = device
        self.sync_steps = {warmup - 1, total - 1}
        self.times: list[float] = []

    def tick(self) -> None:
        if self.device.type == "cuda" and len(self.times) in self.sync_steps:
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())


class ClockCallback(L.Callback):
    """Reads the StepClock at the end of each training batch (after the optimizer step) and
    keeps the last loss and the thread count seen inside fit."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.last_loss: torch.Tensor | None = None
        self.threads_in_fit: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.threads_in_fit = torch.get_num_threads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick()
        self.last_loss = outputs["loss"].detach() if isinstance(outputs, dict) else outputs


def synthetic_loader(work: Workload, seed: int, pin_memory: bool) -> DataLoader:
    """`total_steps` batches of random token windows: x = w[:, :-1], y = w[:, 1:], both (B, T)."""
    generator = torch.Generator().manual_seed(seed)
    n = work.batch_size * work.total_steps
    windows = torch.randint(
        work.config.vocab_size, (n, work.config.block_size + 1), generator=generator
    )  # (N, T + 1) int64
    dataset = TensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
    return DataLoader(
        dataset, batch_size=work.batch_size, shuffle=False, drop_last=True, pin_memory=pin_memory
    )


def summarize(work: Workload, clock: StepClock) -> dict[str, float]:
    times = clock.times
    if len(times) != work.total_steps:
        raise RuntimeError(f"expected {work.total_steps} steps, the clock saw {len(times)}")
    elapsed = times[-1] - times[work.warmup - 1]
    step_times = [
        b - a for a, b in zip(times[work.warmup - 1 : -1], times[work.warmup :], strict=True)
    ]
    median = statistics.median(step_times)
    return {
        "tokens_per_s": work.tokens_per_step * work.steps / elapsed,
        "step_ms": 1e3 * elapsed / work.steps,
        "median_step_ms": 1e3 * median,
        "median_tokens_per_s": work.tokens_per_step / median,
        "elapsed_s": elapsed,
    }


# -- the two pipelines -------------------------------------------------------------------------


def run_bare(
    work: Workload, precision: str, device: torch.device, compile: bool, seed: int
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = GPT(work.config).to(device)
    model.train()
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(WEIGHT_DECAY),
        lr=LEARNING_RATE,
        betas=BETAS,
        # as LanguageModel.configure_optimizers: fused unless mixed precision with clipping
        fused=device.type in ("cuda", "cpu") and not precision.endswith("-mixed"),
    )
    # the optimizer's parameter order, as Lightning clips: the norm sums in the same order
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = work.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, LR_WARMUP_STEPS, total, MIN_LR_RATIO)
    )
    dtype = precision_dtype(precision)
    mixed = precision.endswith("-mixed")
    loader = synthetic_loader(work, seed, pin_memory=device.type == "cuda")
    clock = StepClock(device, work.warmup, total)
    loss = None
    for x, y in loader:
        x = x.to(device, non_blocking=True)  # (B, T)
        y = y.to(device, non_blocking=True)  # (B, T)
        autocast = torch.autocast(device.type, dtype=dtype) if mixed else contextlib.nullcontext()
        with autocast:
            loss = forward(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return {**summarize(work, clock), "final_loss": float(loss.detach()), "threads_in_fit": None}


def run_lightning(
    work: Workload, precision: str, device: torch.device, compile: bool, seed: int
) -> dict[str, Any]:
    cfg = work.config
    torch.manual_seed(seed)
    module = LanguageModel(
        vocab_size=cfg.vocab_size,
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        dropout=cfg.dropout,
        bias=cfg.bias,
        learning_rate=LEARNING_RATE,
        min_lr_ratio=MIN_LR_RATIO,
        warmup_steps=LR_WARMUP_STEPS,
        weight_decay=WEIGHT_DECAY,
        betas=BETAS,
        compile=compile,
    )
    clock = StepClock(device, work.warmup, work.total_steps)
    callback = ClockCallback(clock)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=[device.index] if device.index is not None else 1,
        precision=precision,
        max_steps=work.total_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=GRAD_CLIP,
        callbacks=[callback],
    )
    loader = synthetic_loader(work, seed, pin_memory=device.type == "cuda")
    trainer.fit(module, train_dataloaders=loader)
    return {
        **summarize(work, clock),
        "final_loss": float(callback.last_loss),
        "threads_in_fit": callback.threads_in_fit,
    }


RUNNERS = {"bare": run_bare, "lightning": run_lightning}


def release(device: torch.device, compile: bool) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if compile:
        torch._dynamo.reset()  # a fresh compile per run: no recompile limit, same cost for both


# -- peaks -------------------------------------------------------------------------------------


def measure_peaks(device: torch.device, dtypes: list[torch.dtype]) -> dict[str, float]:
    size = 8192 if device.type == "cuda" else 2048
    return {str(d): measure_matmul_peak(d, device, size=size) for d in dtypes}


def spec_peaks(device: torch.device, dtypes: list[torch.dtype]) -> dict[str, float | None]:
    if device.type != "cuda":
        return {str(d): None for d in dtypes}
    return {str(d): get_available_flops(device, d) for d in dtypes}


# -- report ------------------------------------------------------------------------------------


def format_table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def aggregate(
    runs: list[dict[str, Any]],
    works: dict[str, Workload],
    peaks: dict[str, float],
    measured: dict[str, float],
) -> list[dict[str, Any]]:
    """Best round per (shape, precision, pipeline), with MFU."""
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    rounds: dict[tuple[str, str, str], list[float]] = {}
    medians: dict[tuple[str, str, str], list[float]] = {}
    for r in runs:
        key = (r["shape"], r["precision"], r["pipeline"])
        rounds.setdefault(key, []).append(r["tokens_per_s"])
        medians.setdefault(key, []).append(r["median_tokens_per_s"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    results = []
    for key, r in best.items():
        work = works[key[0]]
        dtype = str(precision_dtype(key[1]))
        model_flops = r["tokens_per_s"] * flops_per_token(work.config, work.config.block_size)
        peak = peaks.get(dtype)
        results.append(
            {
                **r,
                "rounds_tokens_per_s": rounds[key],
                "best_median_tokens_per_s": max(medians[key]),
                "model_flops_per_s": model_flops,
                "mfu": model_flops / peak if peak else None,
                "mfu_vs_measured_peak": model_flops / measured[dtype]
                if measured.get(dtype)
                else None,
            }
        )
    return results


def report(results: list[dict[str, Any]], device: torch.device) -> tuple[str, dict[str, Any]]:
    by_key = {(r["shape"], r["precision"], r["pipeline"]): r for r in results}
    cuda = device.type == "cuda"
    header = [
        "shape",
        "precision",
        "pipeline",
        "batch",
        "tokens/s",
        "step ms",
        "median ms",
        "MFU %",
    ]
    header += ["MFU % (meas.)"] if cuda else []
    header += ["final loss", "all rounds tokens/s"]
    rows = [header]
    for r in results:
        row = [
            r["shape"],
            r["precision"],
            r["pipeline"],
            str(r["batch_size"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_ms']:.2f}",
            f"{r['median_step_ms']:.2f}",
            f"{100 * r['mfu']:.1f}" if r["mfu"] is not None else "n/a",
        ]
        if cuda:
            m = r["mfu_vs_measured_peak"]
            row.append(f"{100 * m:.1f}" if m is not None else "n/a")
        row += [f"{r['final_loss']:.4f}", " ".join(f"{t:,.0f}" for t in r["rounds_tokens_per_s"])]
        rows.append(row)
    text = [format_table(rows, right={3, 4, 5, 6, 7, 8} | ({9} if cuda else set()))]

    ratios: dict[str, Any] = {
        "lightning_over_bare": {},
        "lightning_over_bare_by_median_step": {},
        "bf16_over_fp32": {},
    }
    targets: list[dict[str, Any]] = []
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    precisions = list(dict.fromkeys(r["precision"] for r in results))
    work_tokens = {r["shape"]: r["batch_size"] * r["block_size"] for r in results}
    text.append("")
    text.append("lightning / bare tokens/s:")
    for shape in shapes:
        for precision in precisions:
            bare, light = (
                by_key.get((shape, precision, "bare")),
                by_key.get((shape, precision, "lightning")),
            )
            if not (bare and light):
                continue
            ratio = light["tokens_per_s"] / bare["tokens_per_s"]
            by_median = light["best_median_tokens_per_s"] / bare["best_median_tokens_per_s"]
            ratios["lightning_over_bare"][f"{shape}/{precision}"] = ratio
            ratios["lightning_over_bare_by_median_step"][f"{shape}/{precision}"] = by_median
            extra_ms = (
                work_tokens[shape] / light["best_median_tokens_per_s"]
                - work_tokens[shape] / bare["best_median_tokens_per_s"]
            ) * 1e3
            text.append(
                f"  {shape:<12} {precision:<11} {ratio:.3f}   (by median step: {by_median:.3f}; "
                f"lightning {extra_ms:+.2f} ms/step)"
            )
            if shape not in DEFAULT_SHAPES:
                continue  # a diagnostic shape: no target
            targets.append(
                {
                    "target": f"{shape} {precision}: lightning within 5% of bare tokens/s",
                    "value": ratio,
                    "pass": ratio >= TARGET_LIGHTNING_RATIO,
                    "detail": f"lightning/bare = {ratio:.3f}, by median step {by_median:.3f}",
                }
            )
    fp32 = [p for p in precisions if precision_dtype(p) == torch.float32]
    bf16 = [p for p in precisions if precision_dtype(p) == torch.bfloat16]
    if fp32 and bf16:
        text.append("")
        text.append(f"{bf16[0]} / {fp32[0]} tokens/s:")
        for shape in shapes:
            for pipeline in PIPELINES:
                a, b = (
                    by_key.get((shape, bf16[0], pipeline)),
                    by_key.get((shape, fp32[0], pipeline)),
                )
                if not (a and b):
                    continue
                ratio = a["tokens_per_s"] / b["tokens_per_s"]
                by_median = a["best_median_tokens_per_s"] / b["best_median_tokens_per_s"]
                ratios["bf16_over_fp32"][f"{shape}/{pipeline}"] = ratio
                text.append(
                    f"  {shape:<12} {pipeline:<11} {ratio:.3f}   (by median step: {by_median:.3f})"
                )
                if shape == "small":
                    targets.append(
                        {
                            "target": f"small {pipeline}: bf16-mixed >= {TARGET_SMALL_BF16_SPEEDUP}x fp32 tokens/s",
                            "value": ratio,
                            "pass": ratio >= TARGET_SMALL_BF16_SPEEDUP,
                            "detail": f"bf16/fp32 = {ratio:.3f}, by median step {by_median:.3f}",
                        }
                    )
    for pipeline in PIPELINES:
        for p in fp32:
            r = by_key.get(("nanogpt-cpu", p, pipeline))
            if r is None:
                continue
            name = f"nanogpt-cpu {p} {pipeline}: MFU >= {100 * TARGET_TINY_FP32_MFU:.0f}% of the fp32 matmul peak"
            mfu = r["mfu_vs_measured_peak"]
            if device.type != "cpu" or mfu is None:
                targets.append({"target": name, "value": mfu, "pass": None, "detail": "CPU target"})
            else:
                targets.append(
                    {
                        "target": name,
                        "value": mfu,
                        "pass": mfu >= TARGET_TINY_FP32_MFU,
                        "detail": f"MFU = {100 * mfu:.1f}%",
                    }
                )
    for pipeline in PIPELINES:
        for p in bf16:
            r = by_key.get(("gpt2-124m", p, pipeline))
            if r is None:
                continue
            name = (
                f"gpt2-124m {p} {pipeline}: MFU >= {100 * TARGET_124M_BF16_MFU:.0f}% of the "
                "measured bf16 matmul peak (one GPU)"
            )
            mfu = r["mfu_vs_measured_peak"]
            if device.type != "cuda" or mfu is None:
                detail = "GPU target" + (f"; here {100 * mfu:.1f}%" if mfu is not None else "")
                targets.append({"target": name, "value": mfu, "pass": None, "detail": detail})
            else:
                targets.append(
                    {
                        "target": name,
                        "value": mfu,
                        "pass": mfu >= TARGET_124M_BF16_MFU,
                        "detail": f"MFU = {100 * mfu:.1f}%",
                    }
                )
    text.append("")
    text.append("targets (informational):")
    for t in targets:
        verdict = "SKIP" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        text.append(f"  {verdict}  {t['target']}  [{t['detail']}]")
    return "\n".join(text), {"ratios": ratios, "targets": targets}


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in results))
    precisions = list(dict.fromkeys(r["precision"] for r in results))
    by_key = {(r["shape"], r["precision"], r["pipeline"]): r for r in results}
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), dpi=110, squeeze=False)
    width = 0.38
    for ax, shape in zip(axes[0], shapes, strict=True):
        for k, pipeline in enumerate(PIPELINES):
            xs, ys = [], []
            for i, precision in enumerate(precisions):
                r = by_key.get((shape, precision, pipeline))
                if r:
                    xs.append(i + (k - 0.5) * width)
                    ys.append(r["tokens_per_s"])
            bars = ax.bar(xs, ys, width, label=pipeline)
            ax.bar_label(bars, labels=[si(y) for y in ys], fontsize=8)
        ax.set_xticks(range(len(precisions)), precisions)
        ax.set_title(shape)
        ax.set_ylabel("tokens/s (best round)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, width=70 * len(shapes)), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------


def per_shape(value: str | None, shapes: list[str], option: str) -> dict[str, int]:
    """'300' -> every shape 300; 'nanogpt-cpu=300,small=20' -> per shape; None -> {}."""
    if value is None:
        return {}
    if "=" not in value:
        return dict.fromkeys(shapes, int(value))
    out = {}
    for item in value.split(","):
        name, _, number = item.partition("=")
        if name not in SHAPES:
            raise SystemExit(f"{option}: unknown shape {name!r} (known: {', '.join(SHAPES)})")
        out[name] = int(number)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = "; ".join(
        f"{name}: batch {s.batch_size['cpu']}/{s.batch_size['cuda']}, "
        f"warm-up {s.warmup['cpu']}/{s.warmup['cuda']}, steps {s.steps['cpu']}/{s.steps['cuda']}"
        for name, s in SHAPES.items()
    )
    parser = argparse.ArgumentParser(
        description="Training tokens/s and MFU: Lightning pipeline vs a bare PyTorch loop.",
        epilog=f"Per-shape defaults (cpu/cuda) -- {defaults}.",
    )
    parser.add_argument("--device", default=default_device, help=f"default: {default_device}")
    parser.add_argument(
        "--shapes",
        default=",".join(DEFAULT_SHAPES),
        help=f"comma-separated, from {', '.join(SHAPES)} (default: {','.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--precisions",
        default=",".join(SUPPORTED_PRECISIONS),
        help=f"comma-separated Lightning precisions (default: {','.join(SUPPORTED_PRECISIONS)})",
    )
    parser.add_argument("--steps", help="timed steps: N, or per shape as shape=N,...")
    parser.add_argument("--warmup", help="untimed first steps: N, or per shape as shape=N,...")
    parser.add_argument("--batch-size", help="sequences per step: N, or per shape as shape=N,...")
    parser.add_argument("--vocab", help="vocabulary size: N, or per shape as shape=N,...")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds; the best one is reported (default: 2)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model in both pipelines"
    )
    parser.add_argument("--seed", type=int, default=1337, help="init and data seed (default: 1337)")
    parser.add_argument(
        "--float32-matmul-precision",
        choices=["highest", "high", "medium"],
        help="torch.set_float32_matmul_precision (TF32 on CUDA with 'high'); default: untouched",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart of tokens/s here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def resolve_workloads(args: argparse.Namespace, device: torch.device) -> dict[str, Workload]:
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    kind = "cuda" if device.type == "cuda" else "cpu"
    steps = per_shape(args.steps, shapes, "--steps")
    warmup = per_shape(args.warmup, shapes, "--warmup")
    batch = per_shape(args.batch_size, shapes, "--batch-size")
    vocab = per_shape(args.vocab, shapes, "--vocab")
    works = {}
    for name in shapes:
        s = SHAPES[name]
        work = Workload(
            shape=name,
            config=GPTConfig(
                vocab_size=vocab.get(name, s.vocab_size),
                block_size=s.block_size,
                n_layer=s.n_layer,
                n_head=s.n_head,
                n_embd=s.n_embd,
                dropout=0.0,
            ),
            batch_size=batch.get(name, s.batch_size[kind]),
            steps=steps.get(name, s.steps[kind]),
            warmup=warmup.get(name, s.warmup[kind]),
        )
        if work.warmup < 1 or work.steps < 1:
            raise SystemExit(f"{name}: --warmup and --steps must be >= 1")
        works[name] = work
    return works


def cpu_description() -> str:
    """Model name and the matmul-relevant ISA flags (AVX-512 bf16, AMX) from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}; {' '.join(isa) or 'no AVX-512'}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Tensor Cores.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning()
    device = torch.device(args.device)
    if args.float32_matmul_precision:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    works = resolve_workloads(args, device)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unsupported = [p for p in precisions if p not in SUPPORTED_PRECISIONS]
    if unsupported:
        # fp16 would need a GradScaler in the bare loop (and is pathologically slow on CPUs)
        raise SystemExit(
            f"--precisions: {', '.join(unsupported)} not supported; use {', '.join(SUPPORTED_PRECISIONS)}"
        )
    dtypes = list(dict.fromkeys(precision_dtype(p) for p in precisions))

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else cpu_description(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "compile": args.compile,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    print(
        f"device {env['device']} ({env['device_name']}), torch {env['torch']}, lightning "
        f"{env['lightning']}, torch threads {env['threads']} of {env['cpu_count']} CPUs, "
        f"float32 matmul precision {env['float32_matmul_precision']}, compile {args.compile}"
    )
    for w in works.values():
        c = w.config
        print(
            f"shape {w.shape}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context "
            f"{c.block_size}, vocab {c.vocab_size}, batch {w.batch_size}; {w.warmup} warm-up + "
            f"{w.steps} timed steps; {flops_per_token(c, c.block_size) / 1e6:.1f} MFLOP/token"
        )
    sys.stdout.flush()

    measured_before = measure_peaks(device, dtypes)
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for work in works.values():
        for round_ in range(args.repeats):
            order = PIPELINES if round_ % 2 == 0 else PIPELINES[::-1]
            for precision in precisions:
                for pipeline in order:
                    release(device, args.compile)
                    r = RUNNERS[pipeline](work, precision, device, args.compile, args.seed)
                    r.update(
                        shape=work.shape,
                        precision=precision,
                        pipeline=pipeline,
                        round=round_,
                        batch_size=work.batch_size,
                        block_size=work.config.block_size,
                        steps=work.steps,
                        warmup=work.warmup,
                    )
                    runs.append(r)
                    print(
                        f"  [{time.perf_counter() - start:6.1f}s] {work.shape} {precision} "
                        f"{pipeline:<9} round {round_}: {r['tokens_per_s']:,.0f} tokens/s, "
                        f"{r['step_ms']:.2f} ms/step, loss {r['final_loss']:.4f}"
                        + (
                            f", threads in fit {r['threads_in_fit']}"
                            if r["threads_in_fit"] not in (None, env["threads"])
                            else ""
                        ),
                        flush=True,
                    )
    measured_after = measure_peaks(device, dtypes)
    measured = {d: max(measured_before[d], measured_after[d]) for d in measured_before}
    spec = spec_peaks(device, dtypes)
    peaks = {d: spec[d] or measured[d] for d in measured}

    print()
    for d in measured:
        line = (
            f"matmul peak {d}: measured {measured[d] / 1e9:,.0f} GFLOP/s (before "
            f"{measured_before[d] / 1e9:,.0f}, after {measured_after[d] / 1e9:,.0f})"
        )
        if device.type == "cuda":
            line += (
                f"; spec {spec[d] / 1e12:,.0f} TFLOP/s (Lightning's table)"
                if spec[d]
                else "; no spec value from Lightning: MFU uses the measured peak"
            )
        print(line)
    print(
        f"MFU % is against the {'spec' if device.type == 'cuda' else 'measured matmul'} peak of "
        "the precision's dtype; step ms = timed window / steps; best of "
        f"{args.repeats} round(s) per pipeline"
    )
    print()
    results = aggregate(runs, works, peaks, measured)
    text, extra = report(results, device)
    print(text)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": env,
            "workloads": {
                k: {
                    **asdict(w.config),
                    "batch_size": w.batch_size,
                    "steps": w.steps,
                    "warmup": w.warmup,
                }
                for k, w in works.items()
            },
            "peaks": {
                "measured": measured,
                "measured_before": measured_before,
                "measured_after": measured_after,
                "spec": spec,
                "used_for_mfu": peaks,
            },
            "results": results,
            "runs": runs,
            **extra,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\njson: {args.json}")
    if args.plot:
        title = (
            f"attnlm training throughput, {env['device']}: {env['device_name']}; "
            f"torch {env['torch']}, lightning {env['lightning']}, {env['threads']} threads, "
            f"compile {args.compile}"
        )
        plot(results, args.plot, title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
