"""Attention of long texts at GPT-2 124M's shape: what each kind of attention request costs
against a next-token forward of the same text, in time, answer bytes and peak memory.

A GPT with gpt2's shape (12 layers, 12 heads, 768 wide, 1,024 positions, vocab 50,257; random
weights, a synthetic GPT-2-shaped tokenizer: nothing is downloaded) is exported and served by
`serving.engine.Engine` in process (no HTTP). For each length T (256, 512, 1,024 tokens of random
ids) it times, each on a text the engine has not seen (a cold request: one forward) unless said:

- next-token: `engine.next_token` (the reference: one SDPA forward);
- one head: layer 11, head 0, the whole T x T map;
- pooled-64: every layer and head, each map average-pooled to at most 64 x 64;
- last row: the last query row of every head;
- top-16: every row of every head, its 16 largest weights and their key positions;
- cache hit: another head (layer 0, head 5) of the text "one head" just asked for: computed
  from the q and k the engine's cache kept, no forward;
- complete: a greedy completion of 8 tokens after a prompt of T - 9 tokens, without maps (the
  reference of the next three); "+ one head" and "+ pooled-64" the same with `return_attention`
  of layer 11, head 0, or every head pooled (the decode keeps the q and k of the layers asked
  for, every layer through SDPA); "+ head, old" the one-head completion as completions made it
  before: every layer's explicit path in the prefill and every decode step
  (`attnlm.generate.generate(..., return_attention=True)`), the whole map assembled, then
  selected.

Attention answers are base64 (float16 weights, int32 keys); bytes are those of the JSON body the
server writes (`serving.http.dumps`). Peak RSS growth is sampled every 2 ms during each request
against the RSS before it. Each timing is the best of `--repeats` rounds, the kinds taken in
turns within a round (the machine is shared: ratios within one run are what to trust).

PASS/FAIL lines at the longest T (exit status 0): one head (cold) <= 1.3x next-token; pooled-64
<= 1.5x next-token and <= 2 MB; a cache hit <= 5 % of the cold one-head request; pooled-64's
peak RSS growth <= 300 MB over next-token's; a completion with one head's map <= 1.3x the same
completion without maps. A last line gives the one-head completion's time and peak RSS against
the old way's.

    .venv/bin/python bench/attention_scale.py                 # T = 256, 512, 1,024 (~3-5 min)
    .venv/bin/python bench/attention_scale.py --quick         # 6 layers x 384, T = 256 (<60 s)
    .venv/bin/python bench/attention_scale.py --lengths 1024 --repeats 2 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from attnlm.artifact import save_artifact  # noqa: E402
from attnlm.config import GPTConfig  # noqa: E402
from attnlm.generate import SamplingParams, generate  # noqa: E402
from attnlm.model import GPT  # noqa: E402
from attnlm.tokenizer import Tokenizer  # noqa: E402
from serving.attention_maps import attention_map  # noqa: E402
from serving.engine import AttentionMap, AttentionOptions, CompletionParams, Engine  # noqa: E402
from serving.http import dumps  # noqa: E402

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
QUICK = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}
B64 = {"encoding": "base64"}
KINDS = {  # name -> AttentionOptions (None: next-token); the hit follows "one head"
    "next-token": None,
    "one head": lambda L: AttentionOptions(layers=[L - 1], heads=[0], **B64),
    "pooled-64": lambda L: AttentionOptions(pool=64, **B64),
    "last row": lambda L: AttentionOptions(rows="last", **B64),
    "top-16": lambda L: AttentionOptions(top_keys=16, **B64),
}
HIT = "cache hit"
COMPLETION_TOKENS = 8
COMPLETIONS = {  # name -> AttentionOptions of return_attention (None: no maps)
    "complete": None,
    "+ one head": KINDS["one head"],
    "+ pooled-64": KINDS["pooled-64"],
}
OLD = "+ head, old"  # "+ one head" as completions made it before (`explicit_completion`)


def build_engine(shape: dict, folder: Path, device: str, dtype: str) -> Engine:
    from tests.integration.test_gpt2_folder import gpt2_shaped_tokenizer

    tokenizer = Tokenizer(gpt2_shaped_tokenizer())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **shape))
    save_artifact(model, tokenizer, folder)
    del model
    return Engine(folder, device=device, dtype=dtype)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn) -> tuple[object, float, int]:
    """fn()'s result, seconds, and peak RSS growth (bytes) sampled every 2 ms while it ran."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes() - base)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return result, seconds, max(peak[0], rss_bytes() - base)


def explicit_completion(engine: Engine, ids: list[int], options: AttentionOptions) -> AttentionMap:
    """A greedy completion's map as completions made it before they kept q and k: every
    layer's explicit path in the prefill and in every decode step, the whole (L, H, T, T) map
    assembled from the prefill map and the steps' rows, then the selection taken from it."""
    params = SamplingParams(
        max_new_tokens=COMPLETION_TOKENS, temperature=0, stop_token_ids=(engine.tokenizer.eot_id,)
    )
    with torch.inference_mode():
        prompt = torch.tensor([ids], device=engine.device)
        result = generate(engine.model, prompt, params, return_attention=True)
        ids = ids + result.tokens[0]
        full = result.attention[:, 0, :, : len(ids), : len(ids)]  # (L, H, T, T)
        return attention_map(engine.tokenizer, engine.config, ids, options, att=full)


def run_length(engine: Engine, T: int, repeats: int, seed: int) -> dict[str, dict]:
    """Best time, answer bytes and worst RSS growth of each kind at length T."""
    L, vocab = engine.config.n_layer, engine.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(seed)
    best: dict[str, dict] = {}

    def keep(name: str, seconds: float, size: int, rss: int) -> None:
        row = best.setdefault(name, {"s": seconds, "bytes": size, "rss": rss})
        row["s"], row["rss"] = min(row["s"], seconds), max(row["rss"], rss)

    for _ in range(repeats):
        for name, options in KINDS.items():
            ids = torch.randint(0, vocab - 1, (T,), generator=gen).tolist()  # a new text: cold
            if options is None:
                (result,), s, rss = measured(lambda ids=ids: engine.next_token([ids], top_k=10))
                keep(name, s, len(dumps({"top": result.top})), rss)
                continue
            opts = options(L)
            (att,), s, rss = measured(lambda ids=ids, o=opts: engine.attention([ids], o))
            assert att.cache == "miss", att.cache
            keep(name, s, len(dumps(att.body())), rss)
            if name == "one head":  # another head of the same text
                other = AttentionOptions(layers=[0], heads=[min(5, L - 1)], **B64)
                (hit,), s, rss = measured(lambda ids=ids, o=other: engine.attention([ids], o))
                assert hit.cache == "hit", hit.cache
                keep(HIT, s, len(dumps(hit.body())), rss)
        prompt_length = T - COMPLETION_TOKENS - 1
        for name, options in [*COMPLETIONS.items(), (OLD, KINDS["one head"])]:
            ids = torch.randint(0, vocab - 1, (prompt_length,), generator=gen).tolist()
            opts = None if options is None else options(L)
            if name == OLD:
                att, s, rss = measured(lambda ids=ids, o=opts: explicit_completion(engine, ids, o))
                keep(name, s, len(dumps(att.body())), rss)
                continue
            params = CompletionParams(max_tokens=COMPLETION_TOKENS, temperature=0, attention=opts)
            result, s, rss = measured(lambda ids=ids, p=params: engine.complete(ids, p))
            choice = result.choices[0]
            keep(name, s, len(dumps({"text": choice.text, "attention": choice.attention})), rss)
    return best


def report(results: dict[int, dict[str, dict]]) -> list[str]:
    lines = [
        f"{'T':>5}  {'request':<12} {'ms':>9} {'x next-token':>12} {'bytes':>12} {'peak RSS +MiB':>14}"
    ]
    for T, rows in results.items():
        ref = rows["next-token"]["s"]
        for name, row in rows.items():
            lines.append(
                f"{T:>5}  {name:<12} {1e3 * row['s']:>9.1f} {row['s'] / ref:>12.2f} "
                f"{row['bytes']:>12,} {row['rss'] / 2**20:>14.0f}"
            )
    return lines


def checks(rows: dict[str, dict], T: int) -> list[tuple[str, bool]]:
    ref = rows["next-token"]
    one, pooled, hit = rows["one head"], rows["pooled-64"], rows[HIT]
    growth = (pooled["rss"] - ref["rss"]) / 2**20
    plain, head = rows["complete"], rows["+ one head"]
    return [
        (f"one head (cold) {one['s'] / ref['s']:.2f}x next-token at T={T} (<= 1.3x)",
         one["s"] <= 1.3 * ref["s"]),
        (f"pooled-64 {pooled['s'] / ref['s']:.2f}x next-token and {pooled['bytes'] / 1e6:.2f} MB "
         f"at T={T} (<= 1.5x, <= 2 MB)", pooled["s"] <= 1.5 * ref["s"] and pooled["bytes"] <= 2e6),
        (f"cache hit {1e3 * hit['s']:.1f} ms = {100 * hit['s'] / one['s']:.1f} % of a cold "
         f"forward (one head) at T={T} (<= 5 %)", hit["s"] <= 0.05 * one["s"]),
        (f"pooled-64 peak RSS growth {growth:+.0f} MiB over next-token's at T={T} (<= 300 MB)",
         growth * 2**20 <= 300e6),
        (f"completion + one head {head['s'] / plain['s']:.2f}x the completion without maps at "
         f"T={T} (<= 1.3x)", head["s"] <= 1.3 * plain["s"]),
    ]  # fmt: skip


def gain(rows: dict[str, dict], T: int) -> str:
    """The one-head completion against the old way (every layer explicit), in this run."""
    head, old = rows["+ one head"], rows[OLD]
    return (
        f"completion + one head at T={T}: {head['s'] / old['s']:.2f}x the time of every layer's "
        f"explicit path (before), peak RSS +{head['rss'] / 2**20:.0f} MiB against "
        f"+{old['rss'] / 2**20:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 layers x 384 wide, T = 256")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 2; quick 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | auto (the engine's default)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else GPT2_124M
    lengths = args.lengths or ([256] if args.quick else [256, 512, 1024])
    repeats = args.repeats or (1 if args.quick else 2)
    if max(lengths) > shape["block_size"] or min(lengths) < 1:
        parser.error(f"--lengths must be in 1..{shape['block_size']} for this shape")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attention-scale-") as tmp:
        engine = build_engine(shape, Path(tmp) / "gpt", args.device, args.dtype)
        print(
            f"shape {shape}, vocab {engine.tokenizer.vocab_size}, {engine.device} "
            f"{str(engine.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}"
        )
        engine.next_token([[1, 2, 3]])  # warm-up, and the batched decode's thread started
        engine.complete([1, 2, 3], CompletionParams(max_tokens=2, temperature=0))
        results = {T: run_length(engine, T, repeats, seed=T) for T in lengths}
    print()
    print("\n".join(report(results)))
    print()
    for text, ok in checks(results[max(lengths)], max(lengths)):
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(gain(results[max(lengths)], max(lengths)))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
