"""What a request selects of a long text's attention, and what the answer would weigh.

    rows = resolve_rows("last", T)                    # [T - 1]; [-1, 0] -> [T - 1, 0]
    pooled, block = pool_maps(maps, 64)               # (..., T, T) -> (..., <=64, <=64)
    values, keys = top_keys(maps, 16)                 # (..., R, T) -> (..., R, 16) twice
    check_answer_size(options, T, n_layer, n_head, limit)   # 400 answer_too_large over it

Options (`serving.params.AttentionOptions`): `rows` keeps the query rows asked for (positions,
negative from the end, or "last"); `pool: N` average-pools each map into square blocks of
`ceil(T / N)` tokens so its side is at most N (the last block may be smaller; each cell is the
mean of the weights it covers, future positions' zeros included); `top_keys: k` keeps, per query
row, the k largest weights with their key positions. Nothing here runs the model
(`serving.attention_maps` computes the maps).
"""

from __future__ import annotations

import base64
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from serving.params import AttentionOptions, EngineError

KEYS_ENCODING = {"json": "nested lists of integers", "base64": "little-endian int32 bytes"}


def resolve_rows(rows: list[int] | str | None, T: int, param: str = "rows") -> list[int] | None:
    """The query positions of `rows` in a text of T tokens (negative: from the end), in the
    order asked; EngineError (code "out_of_range") for a position the text does not have."""
    if rows is None:
        return None
    if rows == "last":
        return [T - 1]
    bad = [i for i in rows if not -T <= i < T]
    if bad:
        raise EngineError(
            f"rows {bad[:8]} out of range: the text has {T} tokens, positions "
            f"{-T}..{T - 1} (negative counts from the end)",
            param=param,
            code="out_of_range",
        )
    return [i % T for i in rows]


def pool_block(T: int, size: int) -> int:
    """Tokens per side of a pooled cell: the smallest block that leaves at most `size` cells."""
    return max(1, math.ceil(T / size))


def pool_maps(maps: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """Average-pool the last two axes of maps (..., T, T) into blocks of `pool_block(T, size)`
    tokens per side: (..., n, n) with n = ceil(T / block) <= size, and the block."""
    block = pool_block(maps.size(-1), size)
    return pool_maps_rect(maps, block), block


def pool_maps_rect(maps: torch.Tensor, block: int) -> torch.Tensor:
    """Average-pool the last two axes of maps (..., R, C) in square blocks of `block` cells:
    (..., ceil(R / block), ceil(C / block)), a partial last block averaged over its cells."""
    R, C = maps.shape[-2:]
    pooled = F.avg_pool2d(maps.reshape(-1, 1, R, C), block, ceil_mode=True)  # (N, 1, r, c)
    return pooled.reshape(*maps.shape[:-2], *pooled.shape[-2:])


def top_keys(maps: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, T) largest weights of each row of maps (..., R, T), largest first, and their
    key positions (int32); a row that sees fewer keys than k ends with zero weights."""
    values, keys = maps.topk(min(k, maps.size(-1)), dim=-1)  # (..., R, k)
    return values, keys.to(torch.int32)


def encode_keys(keys: torch.Tensor, encoding: str) -> dict:
    """{"encoding", "shape", "dtype": "int32", "data"}: nested lists ("json") or base64 of
    little-endian int32 ("base64")."""
    array = np.ascontiguousarray(keys.detach().to("cpu").numpy().astype("<i4"))
    shape = list(array.shape)
    if encoding == "base64":
        data = base64.b64encode(array.tobytes()).decode("ascii")
        return {"encoding": "base64", "shape": shape, "dtype": "int32", "data": data}
    return {"encoding": "json", "shape": shape, "dtype": "int32", "data": array}


# -- the size of an answer, before any work ---------------------------------------------------------
def answer_shape(options: AttentionOptions, T: int, n_layer: int, n_head: int) -> list[int]:
    """The shape of the answer's weights for a text of T tokens (its key positions, with
    `top_keys`, have the same)."""
    layers = n_layer if options.layers is None else len(options.layers)
    heads = [n_head if options.heads is None else len(options.heads)]
    shape = [layers, *(heads if options.aggregation == "none" else [])]
    rows = T if options.rows is None else (1 if options.rows == "last" else len(options.rows))
    if options.pool is not None:
        side = math.ceil(T / pool_block(T, options.pool))
        return [*shape, side, side]
    return [*shape, rows, T if options.top_keys is None else min(options.top_keys, T)]


def answer_bytes(options: AttentionOptions, T: int, n_layer: int, n_head: int) -> int:
    """An upper estimate of the bytes of the answer's maps: "json" writes a weight in at most
    decimals + 3 characters ("0.1234,"), a key in its digits and a comma, and brackets around
    each row (4 per row bound every level's); "base64" 2 (weight, float16) or 4 (key, int32)
    bytes in 4 characters per 3 bytes."""
    shape = answer_shape(options, T, n_layer, n_head)
    values = math.prod(shape)
    keys = values if options.top_keys is not None else 0
    if options.encoding == "base64":
        return 4 * math.ceil(values * 2 / 3) + 2 + (4 * math.ceil(keys * 4 / 3) + 2 if keys else 0)
    brackets = 4 * (values // shape[-1]) + 2
    size = values * (options.decimals + 3) + brackets
    return size + (keys * (len(str(max(T - 1, 0))) + 1) + brackets if keys else 0)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def check_answer_size(
    options: AttentionOptions, T: int, n_layer: int, n_head: int, limit: int, param: str
) -> None:
    """EngineError 400 (code "answer_too_large") when the answer for a text of T tokens would
    be over `limit` bytes, naming selections of the same text that would fit."""
    size = answer_bytes(options, T, n_layer, n_head)
    if size <= limit:
        return
    base = dataclasses.replace(options, rows=None, pool=None, top_keys=None)
    candidates = [
        ('"pool": 64', dataclasses.replace(base, pool=64)),
        ('"rows": "last"', dataclasses.replace(base, rows="last")),
        ('"top_keys": 16', dataclasses.replace(base, top_keys=16)),
        ('"layers": [0], "heads": [0]', dataclasses.replace(options, layers=[0], heads=[0])),
        ('"encoding": "base64"', dataclasses.replace(options, encoding="base64")),
    ]
    fits = []
    for text, candidate in candidates:
        if candidate == options:
            continue
        need = answer_bytes(candidate, T, n_layer, n_head)
        if need <= limit:
            fits.append(f"{text} ({_megabytes(need)})")
    advice = (
        "; these would fit: " + ", ".join(fits)
        if fits
        else "; ask for fewer layers and heads, rows, pool or top_keys"
    )
    raise EngineError(
        f"the attention answer for this text of {T} tokens would be about {_megabytes(size)}, "
        f"over the server's limit of {_megabytes(limit)} (max_attention_bytes){advice}",
        param=param,
        code="answer_too_large",
    )
