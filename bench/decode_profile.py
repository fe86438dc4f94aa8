"""Where a decode step's time goes: torch.profiler over `attnlm.batching.DecodeBatch` decoding
one request greedily on the compiled step (the path serving and bench/decode_speed.py's
"attnlm compiled" take), untrained model of bench/serve_load.py's shapes.

Prints ms per step and the profiler's table (self CPU time by op, top rows); the parts of a
step are marked with record_function: `sample` (SamplingState.choose: argmax, budget),
`decode step` (StaticDecoder.step: the call into the compiled graph and the graph itself),
`prefill` (the prompt's forward, once per request). Then the step's graph called directly, as the
decoder calls it, against the same graph dispatched through dynamo, in turns.

    .venv/bin/python bench/decode_profile.py --shape tiny --dtype float32
    .venv/bin/python bench/decode_profile.py --shape small --dtype bfloat16 --rows 25
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench.serve_load import SHAPES, build_artifact  # noqa: E402


def decode(batch, prompt: torch.Tensor, new_tokens: int) -> None:
    from attnlm.generate import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    with record_function("prefill"):
        batch.add(prompt, params)
    while batch.requests:
        request = batch.requests[0]
        with record_function("sample"):
            step, last = request.sampling.choose(request.logits)
        if last:
            batch.remove(request)
            break
        batch.decoder.tokens[request.rows] = step.tokens
        batch.decoder.positions[request.rows] = request.position
        with record_function("decode step"):
            request.logits = batch.decoder.step(1, request.position + 1)
        request.position += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=20, help="rows of the profiler table")
    args = parser.parse_args()

    from attnlm.artifact import load_artifact
    from attnlm.batching import DecodeBatch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_artifact(
            build_artifact(Path(tmp) / args.shape, args.shape), dtype=getattr(torch, args.dtype)
        )
    model = loaded.model.eval()
    batch = DecodeBatch(model, 1, compile=True)
    new_tokens = min(128, model.config.block_size - 8)
    prompt = torch.randint(0, loaded.tokenizer.vocab_size, (1, 8))
    with torch.inference_mode():
        decode(batch, prompt, new_tokens)  # warm
        start = time.perf_counter()
        for _ in range(3):
            decode(batch, prompt, new_tokens)
        ms = 1e3 * (time.perf_counter() - start) / (3 * new_tokens)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(batch, prompt, new_tokens)
    print(
        f"{args.shape} {args.dtype}, {torch.get_num_threads()} threads, {batch.decoder.mode}, "
        f"load average {os.getloadavg()[0]:.1f}: {ms:.3f} ms a token (prefill included), "
        f"{new_tokens} tokens"
    )
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    print(call_overhead(batch.decoder, new_tokens // 2))


def call_overhead(decoder, key_length: int, calls: int = 2000, rounds: int = 5) -> str:
    """One row's step called as the decoder calls it (the warmed graph as a plain function,
    `StaticDecoder._direct_calls`) against the same graph dispatched by dynamo (frame
    evaluation, cache lookup, stance): best of `rounds` of `calls` each, in turns."""
    if decoder.mode != "inductor" or not decoder._direct:
        return f"no direct call to compare ({decoder.mode}, {decoder.fallback})"
    ways = {"direct": decoder._run_direct, "through dynamo": decoder._run_inductor}
    best = dict.fromkeys(ways, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in ways.items():
                start = time.perf_counter()
                for _ in range(calls):
                    run(1, key_length)
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
    direct, dynamo = best["direct"], best["through dynamo"]
    return (
        f"a one-row step of {key_length} keys: direct {1e6 * direct:.1f} us, through dynamo "
        f"{1e6 * dynamo:.1f} us ({1e6 * (dynamo - direct):.1f} us a call saved, "
        f"best of {rounds} x {calls} calls in turns)"
    )


if __name__ == "__main__":
    main()
