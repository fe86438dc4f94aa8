"""Additive (Bahdanau) attention against dot-product: training step time and peak memory.

Three variants of the same GPT (the probe study's tiny shape, `configs/tiny.yaml` /
`configs/tiny-additive.yaml`: 4 layers, 4 heads, 128 wide) train on the same random batches:

- dot-product: SDPA, as `configs/tiny.yaml` trains;
- additive, blockwise: `attnlm.additive` (query blocks over the keys each can see, the backward
  pass recomputing each block's tanh), what `attention: additive` runs now;
- additive, direct: the (B, nh, T, T_k, hs) tanh built at once, as before 2026-12-06, for
  comparison (defined here only).

A step is forward, backward and an AdamW step, in fp32 (the tiny configs' `32-true`). The variants
take turns for `--repeats` rounds (noise hits each alike); the table gives the best round's median
step time, the ratio to dot-product, and the peak memory the step allocated (tracemalloc is blind
to torch's allocator, so it is the process's peak RSS growth while the variant ran: measured in a
child process per variant and context).

    .venv/bin/python bench/additive_attention.py                 # T = 64 (batch 32) and 256 (batch 8)
    .venv/bin/python bench/additive_attention.py --quick         # fewer steps

Target (issue 13): additive at most 2x slower than dot-product at the tiny shape, and a 256-token
context that trains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("dot_product", "additive", "additive_direct")


def direct_scores(self, q, k):
    """The direct form: every (query, key, hs) tanh at once (kept by autograd for backward)."""
    import torch

    qa = torch.einsum("bhtd,hde->bhte", q, self.add_q.to(q.dtype))  # (B, nh, T, hs)
    ka = torch.einsum("bhtd,hde->bhte", k, self.add_k.to(k.dtype))  # (B, nh, T_k, hs)
    hidden = torch.tanh(qa.unsqueeze(3) + ka.unsqueeze(2))  # (B, nh, T, T_k, hs)
    return torch.einsum("bhtke,he->bhtk", hidden, self.add_v.to(hidden.dtype)).float()


def run_variant(variant: str, block: int, batch: int, steps: int, warmup: int) -> dict:
    """Train `steps` steps in this process; the median step time (s) after `warmup` steps and
    the peak RSS growth (MiB) over the process's RSS before the first step."""
    import torch

    from attnlm.config import GPTConfig
    from attnlm.model import GPT, CausalSelfAttention

    if variant == "additive_direct":
        CausalSelfAttention.additive_scores = direct_scores
    torch.manual_seed(0)
    attention = "dot_product" if variant == "dot_product" else "additive"
    config = GPTConfig(
        vocab_size=1024, block_size=block, n_layer=4, n_head=4, n_embd=128, attention=attention
    )
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 1024, (batch, block + 1))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(data[:, :-1], targets=data[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times[warmup:]), "peak_growth_mib": peak - rss0}


def child(variant: str, block: int, batch: int, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(block), str(batch), str(steps)]
    cmd.append(str(warmup))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if args.child:
        variant, *nums = args.child
        print(json.dumps(run_variant(variant, *map(int, nums))))
        return 0
    steps, warmup, repeats = (4, 1, 1) if args.quick else (10, 2, args.repeats)
    contexts = [(64, 32), (256, 8)]  # (context, batch): the tiny configs' batch, then 4x longer
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in os.popen("lscpu") if ln.startswith("Model name")),
        platform.processor(),
    )
    print(f"CPU: {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    results: dict = {}
    for block, batch in contexts:
        for r in range(repeats):
            for variant in VARIANTS:
                got = child(variant, block, batch, steps, warmup)
                key = f"{variant}@{block}"
                best = results.get(key)
                if best is None or got["step_s"] < best["step_s"]:
                    results[key] = got
                print(f"  round {r + 1}: {key} {1e3 * got['step_s']:.1f} ms", flush=True)
    print("\n| context x batch | variant | ms/step | vs dot-product | peak RSS growth (MiB) |")
    print("|---|---|--:|--:|--:|")
    checks = []
    for block, batch in contexts:
        base = results[f"dot_product@{block}"]["step_s"]
        for variant in VARIANTS:
            got = results[f"{variant}@{block}"]
            ratio = got["step_s"] / base
            print(
                f"| {block} x {batch} | {variant} | {1e3 * got['step_s']:.1f} | {ratio:.2f}x "
                f"| {got['peak_growth_mib']:.0f} |"
            )
            if variant == "additive" and block == 64:
                checks.append(
                    (ratio <= 2.0, f"additive vs dot-product at T=64: {ratio:.2f}x (<= 2x)")
                )
    for ok, line in checks:
        print(f"{'PASS' if ok else 'FAIL'} {line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
