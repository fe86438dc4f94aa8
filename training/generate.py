"""`attnlm generate`: sample text from an exported artifact (no Lightning involved).

    attnlm generate --artifact artifacts/tiny --prompt "The cat that was sitting on the mat" \
        --max_new_tokens 40 --temperature 0.8 --top_k 50 --num_samples 3 --seed 0
"""

from __future__ import annotations

import argparse
import sys

import torch

from attnlm.artifact import load_artifact
from attnlm.generate import SamplingParams, generate


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnlm generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", required=True, help="folder written by `attnlm export`")
    parser.add_argument(
        "--prompt", action="append", required=True, help="repeat for several prompts"
    )
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--no_stop", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num_samples must be >= 1")

    artifact = load_artifact(args.artifact, device=args.device)
    tokenizer = artifact.tokenizer
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_token_ids=() if args.no_stop else (tokenizer.eot_id,),
        seed=args.seed,
    )
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for prompt in args.prompt:
        ids = tokenizer.encode(prompt)
        if not ids:
            parser.error("--prompt must not be empty")
        batch = torch.tensor([ids] * args.num_samples, device=args.device)
        result = generate(artifact.model, batch, params)
        for i, tokens in enumerate(result.tokens):
            label = f"[{i + 1}/{args.num_samples}] " if args.num_samples > 1 else ""
            print(
                f"{label}{prompt}{bold}{tokenizer.decode(tokens)}{plain} ({result.finish_reasons[i]})"
            )
    return 0
