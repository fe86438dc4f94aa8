"""Decode speed: attnlm's decode step against transformers' `GPT2LMHeadModel.generate` on the
same weights, greedy, with the physical floor beside them.

For each shape (tiny: 4 layers x 128 wide, context 64; small: 6 x 384, context 256; vocab of
the untrained artifact's tokenizer, as bench/serve_load.py builds it), dtype (float32,
bfloat16) and batch (B = 1, 8 rows of one 8-token prompt each), new tokens = min(128,
context - 8), it times:

- `transformers`: `GPT2LMHeadModel.from_pretrained(artifact, dtype=...)` (the exported folder,
  loaded unchanged), `generate(prompt, do_sample=False, max_new_tokens=N)` with no end token;
- `attnlm generate`: `attnlm.generate.generate`, the reference KV-cache loop (eager);
- `attnlm eager` / `attnlm compiled`: `attnlm.batching.DecodeBatch`, the batched decode path
  serving uses (one request of B rows), on `attnlm.fastdecode.StaticDecoder` eager and compiled
  (inductor with frozen weights on CPU, CUDA graphs on CUDA); the compile (warm-up) is timed
  apart and not counted.

Each timing is the best of `--repeats` rounds in which all implementations run in turns (the
machine is shared: ratios within one run are what to trust). tokens/s counts every row's new
tokens; ms/step is the time per new token of a row (a step of B rows). The floor is a step that
only reads every weight once: weight bytes / the memory bandwidth measured here (a large copy;
a model that fits in the CPU's caches can beat it).

PASS/FAIL lines (informational, exit status 0): tiny B = 1 attnlm >= 5x transformers; small
B = 1 >= 2.5x (each side at its fastest dtype); compiled greedy tokens identical to the eager
path's (`attnlm generate`) in float32, and their agreement in bfloat16 reported; on CUDA also
small B = 1 CUDA graphs >= 5x the same step eager.

    .venv/bin/python bench/decode_speed.py                  # everything (~5 min on 2 cores)
    .venv/bin/python bench/decode_speed.py --quick          # B = 1, the auto dtype, 2 rounds
    .venv/bin/python bench/decode_speed.py --threads 1 --device cuda --json runs/decode.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.serve_load import SHAPES, build_artifact, print_results  # noqa: E402

PROMPT_TOKENS = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("transformers", "attnlm generate", "attnlm eager", "attnlm compiled")
QUICK_IMPLS = ("transformers", "attnlm generate", "attnlm compiled")  # --quick: no eager batch
TARGETS = {"tiny": 5.0, "small": 2.5}  # attnlm / transformers tokens/s at B = 1


def memory_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes per second of a large copy (read + write), best of 5."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """The implementations of one (shape, dtype) on one artifact: each `run(impl, B)` decodes
    N new tokens greedily after the same B-row prompt and returns (seconds, tokens (B, N))."""

    def __init__(self, artifact: Path, dtype: torch.dtype, device: torch.device, slots: int):
        import transformers

        from attnlm.artifact import load_artifact
        from attnlm.batching import DecodeBatch

        self.device = device
        loaded = load_artifact(artifact, device=device, dtype=dtype)
        self.model = loaded.model.eval()
        config = self.model.config
        self.new_tokens = min(128, config.block_size - PROMPT_TOKENS)
        generator = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(
            0, loaded.tokenizer.vocab_size, (1, PROMPT_TOKENS), generator=generator
        ).to(device)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.GPT2LMHeadModel.from_pretrained(artifact, dtype=dtype)
        self.hf = hf.to(device).eval()
        self.hf.generation_config.eos_token_id = None  # decode all N tokens, as ours
        self.hf.generation_config.pad_token_id = loaded.tokenizer.eot_id
        self.eager = DecodeBatch(self.model, slots)
        start = time.perf_counter()
        self.compiled = DecodeBatch(self.model, slots, compile=True)
        self.compile_s = time.perf_counter() - start
        self.mode = self.compiled.decoder.mode
        self.fallback = self.compiled.decoder.fallback

    @torch.inference_mode()
    def run(self, impl: str, rows: int) -> tuple[float, list[list[int]]]:
        from attnlm.generate import SamplingParams, generate

        prompt = self.prompt.expand(rows, -1).contiguous()
        params = SamplingParams(max_new_tokens=self.new_tokens, temperature=0)
        sync(self.device)
        start = time.perf_counter()
        if impl == "transformers":
            out = self.hf.generate(prompt, do_sample=False, max_new_tokens=self.new_tokens)
            tokens = out[:, PROMPT_TOKENS:].tolist()
        elif impl == "attnlm generate":
            tokens = generate(self.model, prompt, params).tokens
        else:
            batch = self.eager if impl == "attnlm eager" else self.compiled
            batch.add(prompt, params)
            steps = []
            while batch.requests:
                steps.extend(step.tokens for _, step in batch.step())
            tokens = torch.stack(steps, 1).tolist()  # (rows, N)
        sync(self.device)
        return time.perf_counter() - start, tokens


def bench(args, artifacts: dict[str, Path], device: torch.device, bandwidth: float) -> dict:
    results: dict = {"rows": [], "compile": []}
    batches = (1,) if args.quick else (1, 8)
    impls = QUICK_IMPLS if args.quick and device.type != "cuda" else IMPLS
    for shape, artifact in artifacts.items():
        for dtype_name in args.dtypes or default_dtypes(artifact, device, args.quick):
            print(f"  {shape} {dtype_name}: loading, compiling ...", flush=True)
            runner = Runner(artifact, DTYPES[dtype_name], device, max(batches))
            results["compile"].append(
                {
                    "shape": shape,
                    "dtype": dtype_name,
                    "seconds": runner.compile_s,
                    "mode": runner.mode,
                    "fallback": runner.fallback,
                }
            )
            for rows in batches:
                best = {impl: float("inf") for impl in impls}
                tokens = {}
                for impl in impls:  # warm-up, not timed
                    runner.run(impl, rows)
                for _ in range(args.repeats):
                    for impl in impls:
                        seconds, tokens[impl] = runner.run(impl, rows)
                        best[impl] = min(best[impl], seconds)
                step_floor = runner.weight_bytes / bandwidth
                for impl in impls:
                    n = runner.new_tokens
                    results["rows"].append(
                        {
                            "shape": shape,
                            "dtype": dtype_name,
                            "B": rows,
                            "impl": impl,
                            "seconds": best[impl],
                            "tokens_per_s": rows * n / best[impl],
                            "ms_per_step": 1e3 * best[impl] / n,
                            "floor_ms": 1e3 * step_floor,
                            "weight_mb": runner.weight_bytes / 1e6,
                            "same_as_eager": tokens[impl] == tokens["attnlm generate"],
                            "agreement": agreement(tokens[impl], tokens["attnlm generate"]),
                        }
                    )
            del runner
    return results


def default_dtypes(artifact: Path, device: torch.device, quick: bool) -> list[str]:
    """Both dtypes; with --quick only what `dtype: auto` serves this model in (float32 for the
    tiny shape; bfloat16 for the small one where the CPU has native bf16), each side at that
    dtype: every compile costs ~20-30 s on 2 cores, and --quick stays under a minute."""
    from attnlm.artifact import load_artifact
    from attnlm.fastdecode import preferred_dtype, weight_bytes

    if not quick:
        return list(DTYPES)
    auto = preferred_dtype(device, weight_bytes(load_artifact(artifact).model))
    return [next(k for k, v in DTYPES.items() if v == auto)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy decodes agree, up to the first difference per row
    (after one different token the rows continue from different text)."""
    same = 0
    for x, y in zip(a, b, strict=True):
        k = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        same += k
    return same / sum(len(x) for x in a)


def report(res: dict) -> list[str]:
    lines = [
        f"device {res['device']} ({res['cpu']}), torch {res['torch']}, transformers "
        f"{res['transformers']}, {res['threads']} threads, memory bandwidth "
        f"{res['bandwidth'] / 1e9:.1f} GB/s (copy), load average {res['loadavg']:.1f}",
        "",
        "| shape | dtype | B | implementation | tokens/s | ms/step | floor ms/step "
        "(weights / bandwidth) | x transformers | greedy = eager |",
        "|---|---|--:|---|--:|--:|--:|--:|---|",
    ]
    for row in res["rows"]:
        hf = next(
            r["tokens_per_s"]
            for r in res["rows"]
            if r["impl"] == "transformers"
            and (r["shape"], r["dtype"], r["B"]) == (row["shape"], row["dtype"], row["B"])
        )
        same = "yes" if row["same_as_eager"] else f"no ({100 * row['agreement']:.0f} %)"
        lines.append(
            f"| {row['shape']} | {row['dtype']} | {row['B']} | {row['impl']} | "
            f"{row['tokens_per_s']:,.0f} | {row['ms_per_step']:.3f} | "
            f"{row['floor_ms']:.3f} ({row['weight_mb']:.1f} MB) | "
            f"{row['tokens_per_s'] / hf:.2f} | {same} |"
        )
    lines.append("")
    for c in res["compile"]:
        why = f" ({c['fallback']})" if c["fallback"] else ""
        lines.append(f"compile {c['shape']} {c['dtype']}: {c['mode']}{why}, {c['seconds']:.1f} s")
    return lines


def targets(res: dict) -> list[tuple[str, bool]]:
    checks = []
    for shape, factor in TARGETS.items():
        rows = [r for r in res["rows"] if r["shape"] == shape and r["B"] == 1]
        if not rows:
            continue
        ours = max((r for r in rows if r["impl"] == "attnlm compiled"), key=tps)
        theirs = max((r for r in rows if r["impl"] == "transformers"), key=tps)
        ratio = tps(ours) / tps(theirs)
        checks.append(
            (
                f"{shape} B=1: attnlm compiled {tps(ours):,.0f} tokens/s ({ours['dtype']}) "
                f">= {factor}x transformers {tps(theirs):,.0f} ({theirs['dtype']}): {ratio:.2f}x",
                ratio >= factor,
            )
        )
    if res["device"].startswith("cuda"):  # CUDA graphs against the same step eager
        for r in res["rows"]:
            if (r["shape"], r["B"], r["impl"]) == ("small", 1, "attnlm compiled"):
                eager = next(
                    e
                    for e in res["rows"]
                    if (e["shape"], e["dtype"], e["B"], e["impl"])
                    == ("small", r["dtype"], 1, "attnlm eager")
                )
                ratio = tps(r) / tps(eager)
                checks.append(
                    (f"small B=1 {r['dtype']}: CUDA graphs >= 5x eager: {ratio:.2f}x", ratio >= 5)
                )
    fp32 = [r for r in res["rows"] if r["impl"] == "attnlm compiled" and r["dtype"] == "float32"]
    if fp32:
        same = all(r["same_as_eager"] for r in fp32)
        checks.append(("greedy tokens of the compiled path identical to eager, float32", same))
    for r in res["rows"]:
        if r["impl"] == "attnlm compiled" and r["dtype"] != "float32":
            print(
                f"note: {r['shape']} {r['dtype']} B={r['B']}: compiled greedy tokens agree with "
                f"eager on {100 * r['agreement']:.0f} % of positions (up to the first difference)"
            )
    return checks


def tps(row: dict) -> float:
    return row["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 1, the auto dtype, 2 rounds")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "small"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import transformers

    from attnlm.fastdecode import cpu_flags

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    wall0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="decode_speed_"))
    try:
        artifacts = {}
        for shape in args.shapes:
            print(f"building an untrained {shape} artifact ...", flush=True)
            artifacts[shape] = build_artifact(tmp / shape, shape)
        flags = cpu_flags()
        cpu = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        res = {
            "device": str(device),
            "cpu": cpu or "no AVX-512",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()[0],
            "bandwidth": memory_bandwidth(device),
        }
        res.update(bench(args, artifacts, device, res["bandwidth"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - wall0
    print_results(res, report, targets, args.json)


if __name__ == "__main__":
    main()
