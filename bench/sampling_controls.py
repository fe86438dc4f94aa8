"""What the sampling controls cost a decode step: `SamplingState.choose` on random logits with
none of them and with all of them (logit_bias, repetition, frequency and presence penalties,
min_tokens), greedy and sampled, at the tiny vocabulary and GPT-2's, 1 and 16 rows.

    python bench/sampling_controls.py --threads 1      # ~1 min on 2 cores

The step itself (the model's forward) is not included: compare with `bench/decode_speed.py`.
"""

from __future__ import annotations

import argparse
import time

import torch

from attnlm.generate import SamplingParams, SamplingState

CONTROLS = {
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "repetition_penalty": 1.2,
    "logit_bias": {5: 2.0},
    "min_tokens": 3,
}


def ms_per_choose(params: SamplingParams, rows: int, vocab: int, steps: int) -> float:
    prompt = torch.randint(0, vocab, (rows, 32))
    state = SamplingState(params, rows, steps + 10, torch.device("cpu"), prompt)
    logits = torch.randn(rows, vocab)
    for _ in range(10):  # the first step builds the state's buffers
        state.choose(logits)
    start = time.perf_counter()
    for _ in range(steps):
        state.choose(logits)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| vocab | rows | temperature | plain ms | all controls ms | ratio |")
    print("|--:|--:|--:|--:|--:|--:|")
    for vocab in (2048, 50257):
        for rows in (1, 16):
            for temperature in (0.0, 1.0):
                common = {"temperature": temperature, "seed": 0, "stop_token_ids": (0,)}
                plain = ms_per_choose(SamplingParams(**common), rows, vocab, args.steps)
                controls = SamplingParams(**common, **CONTROLS)
                adjusted = ms_per_choose(controls, rows, vocab, args.steps)
                print(
                    f"| {vocab} | {rows} | {temperature:g} | {plain:.3f} | {adjusted:.3f} "
                    f"| {adjusted / plain:.2f}x |"
                )


if __name__ == "__main__":
    main()
