"""Attention maps as the API returns them: the requested layers and heads of a model's map, per
head, as their mean or as attention rollout, encoded as JSON values or base64 float16 bytes; for
long texts only the rows, pooled overview or top keys asked for (`serving.attention_select`).

    attention_map(tokenizer, config, ids, options, att=att)             # from a whole map
    attention_map(tokenizer, config, ids, options, qk=qk, blocks=blocks)  # from kept q, k

`att` is one text's map (L, H, T, T) from the model's explicit attention path; `qk` one text's
queries and keys per layer ((H, T, hs) each, `GPT.forward(attention_sink=...)`), from which only
the layers, heads and rows asked for are computed, one layer at a time, with the layer's own
softmax (`CausalSelfAttention.probabilities`): never every layer's (H, T, T) map at once when less
was asked. Nothing here runs the model forward.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from attnlm.config import GPTConfig
from attnlm.tokenizer import Tokenizer
from serving.attention_select import (
    encode_keys,
    pool_block,
    pool_maps,
    pool_maps_rect,
    resolve_rows,
    top_keys,
)
from serving.limits import AGGREGATIONS, ENCODINGS
from serving.params import AttentionMap, AttentionOptions, EngineError, invalid

QK = tuple[torch.Tensor, torch.Tensor]  # one layer's q (H, T, hs) and k (H, T, hs)
POOL_CHUNK_ROWS = 256  # query rows a pooled overview computes at once


def rollout(att: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of att (L, H, T, T): per layer
    Â = 0.5·mean_heads(A) + 0.5·I with rows renormalised, R_l = Â_l @ R_{l-1} from layer 0 up.

    Returns:
        (L, T, T): R after each layer; every row sums to 1.
    """
    return rollout_of_means(att.mean(dim=1))


def rollout_of_means(means: torch.Tensor) -> torch.Tensor:
    """`rollout` from each layer's head mean (L, T, T) instead of every head's map."""
    T = means.size(-1)
    eye = torch.eye(T, dtype=means.dtype, device=means.device)  # (T, T)
    mixed = 0.5 * means + 0.5 * eye  # (L, T, T)
    mixed = mixed / mixed.sum(dim=-1, keepdim=True)
    result, maps = eye, []
    for layer_map in mixed:
        result = layer_map @ result  # (T, T)
        maps.append(result)
    return torch.stack(maps)  # (L, T, T)


def select_attention(
    att: torch.Tensor, layers: list[int], heads: list[int], aggregation: str
) -> torch.Tensor:
    """Selected part of one text's map att (L, H, T, T) (indices already checked).

    Returns:
        "none": (len(layers), len(heads), T, T); "mean" / "rollout": (len(layers), T, T), where
        rollout mixes the selected heads through every layer up to each selected one.
    """
    att = att[:, heads]  # (L, h, T, T)
    if aggregation == "none":
        return att[layers]
    if aggregation == "mean":
        return att.mean(dim=1)[layers]
    if aggregation == "rollout":
        return rollout(att[: max(layers) + 1])[layers]
    raise invalid(f"aggregation must be one of {', '.join(AGGREGATIONS)}", "aggregation")


def encode_array(t: torch.Tensor, encoding: str = "json", decimals: int = 4) -> dict:
    """{"encoding", "shape", "dtype", "data"}: "json" gives the values rounded to `decimals` as
    a C-contiguous float64 numpy array, which the server writes as nested JSON lists
    (`serving.app.JSON`, orjson: ~10x faster than nested Python lists through `json.dumps`);
    "base64" gives little-endian float16 bytes, row-major."""
    shape = list(t.shape)
    if encoding == "json":
        values = torch.round(t.detach().to("cpu", torch.float64), decimals=decimals)
        data = np.ascontiguousarray(values.numpy())
        return {"encoding": "json", "shape": shape, "dtype": "float32", "data": data}
    if encoding == "base64":
        raw = t.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2").tobytes()
        data = base64.b64encode(raw).decode("ascii")
        return {"encoding": "base64", "shape": shape, "dtype": "float16", "data": data}
    raise invalid(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}", "encoding")


def check_attention_options(config: GPTConfig, options: AttentionOptions, model_name: str) -> None:
    """EngineError for options the model cannot answer: no attention at all (code
    "attention_unavailable"), a layer or head it does not have (code "out_of_range")."""
    if not isinstance(options, AttentionOptions):
        raise invalid("attention options must be AttentionOptions", "attention")
    if not config.has_attention:
        raise EngineError(
            f"model {model_name!r} is an {config.arch.upper()}: it has no "
            "attention maps (next-token and completions without return_attention work)",
            param="return_attention",
            code="attention_unavailable",
        )
    for name, values, count in (
        ("layers", options.layers, config.n_layer),
        ("heads", options.heads, config.n_head),
    ):
        bad = [i for i in values or () if not 0 <= i < count]
        if bad:
            raise EngineError(
                f"{name} {bad} out of range: the model has {count} {name}, indices 0..{count - 1}",
                param=name,
                code="out_of_range",
            )


def layers_needed(options: AttentionOptions, n_layer: int) -> list[int]:
    """The layers whose q and k the selection needs, ascending: those asked for, and with
    rollout every layer below the last of them too."""
    chosen = range(n_layer) if options.layers is None else options.layers
    top = max(chosen) + 1 if options.aggregation == "rollout" else 0
    return sorted({*chosen, *range(top)})


def maps_from_qk(
    blocks: Sequence[nn.Module],
    qk: Sequence[QK | None],
    layers: list[int],
    heads: list[int],
    aggregation: str,
    rows: list[int] | None,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """The selected maps of one text, one selected layer at a time, from its kept q and k
    (converted to `dtype`, the model's compute dtype). Yields (h, R, T) per layer ("none") or
    (R, T) ("mean", "rollout"), R the rows asked for (default all T)."""
    q0 = next(pair[0] for pair in qk if pair is not None)
    T, device = q0.size(1), q0.device
    keys = torch.arange(T, device=device)  # (T,)
    subset = None if heads == list(range(q0.size(0))) else heads

    def probabilities(layer: int, query_rows: list[int] | None) -> torch.Tensor:
        q, k = qk[layer]
        q, k = q[heads].to(dtype), k[heads].to(dtype)  # (h, T, hs)
        attn = blocks[layer].attn
        if query_rows is not None and attn.additive:  # its blocks take the queries in order
            every = attn.probabilities(q[None], k[None], keys <= keys[:, None], subset)[0]
            return every[:, query_rows]  # (h, R, T)
        positions = keys if query_rows is None else torch.tensor(query_rows, device=device)
        if query_rows is not None:
            q = q[:, query_rows]  # (h, R, hs)
        allowed = keys <= positions[:, None]  # (R, T)
        return attn.probabilities(q[None], k[None], allowed, subset)[0]  # (h, R, T)

    if aggregation == "rollout":  # every layer up to the last asked, whole maps
        means = [probabilities(i, None).mean(dim=0) for i in range(max(layers) + 1)]
        mixed = rollout_of_means(torch.stack(means))  # (L', T, T)
        for layer in layers:
            yield mixed[layer] if rows is None else mixed[layer][rows]
        return
    for layer in layers:
        maps = probabilities(layer, rows)  # (h, R, T)
        yield maps.mean(dim=0) if aggregation == "mean" else maps


def pooled_from_qk(
    blocks: Sequence[nn.Module],
    qk: Sequence[QK | None],
    layers: list[int],
    heads: list[int],
    aggregation: str,
    size: int,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """`pool_maps` of the selected maps ("none" or "mean") of one text, from its kept q and k,
    one selected layer at a time: (h, n, n) or (n, n). Computed a few hundred query rows at a
    time over the keys they see only (causal: about half of each map), never a whole map."""
    q0 = next(pair[0] for pair in qk if pair is not None)
    T, device = q0.size(1), q0.device
    block = pool_block(T, size)
    n = math.ceil(T / block)
    chunk = block * max(1, POOL_CHUNK_ROWS // block)  # query rows per step, whole blocks
    keys = torch.arange(T, device=device)  # (T,)
    subset = None if heads == list(range(q0.size(0))) else heads
    for layer in layers:
        q, k = qk[layer]
        q, k = q[heads].to(dtype), k[heads].to(dtype)  # (h, T, hs)
        pooled = torch.zeros(len(heads), n, n, device=device)  # (h, n, n)
        for start in range(0, T, chunk):
            end = min(start + chunk, T)
            allowed = keys[:end] <= keys[start:end, None]  # (c, end)
            attn = blocks[layer].attn
            part = attn.probabilities(q[None, :, start:end], k[None, :, :end], allowed, subset)
            cells = pool_maps_rect(part[0], block)  # (h, c / block, end / block)
            pooled[:, start // block : start // block + cells.size(-2), : cells.size(-1)] = cells
        yield pooled.mean(dim=0) if aggregation == "mean" else pooled


def stacked(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """The layers' maps along a new first axis (one layer: a view, no copy of its map)."""
    return per_layer[0][None] if len(per_layer) == 1 else torch.stack(per_layer)


def attention_map(
    tokenizer: Tokenizer,
    config: GPTConfig,
    token_ids: list[int],
    options: AttentionOptions,
    *,
    att: torch.Tensor | None = None,
    qk: Sequence[QK | None] | None = None,
    blocks: Sequence[nn.Module] | None = None,
    dtype: torch.dtype = torch.float32,
    cache: str | None = None,
) -> AttentionMap:
    """The selected, aggregated, reduced (rows, pool, top keys) and encoded map of one text
    (options checked), from its whole map att (L, H, T, T) or from its kept q, k (`qk`, with
    the model's `blocks` and compute `dtype`: see `maps_from_qk`)."""
    layers = list(range(config.n_layer)) if options.layers is None else options.layers
    heads = list(range(config.n_head)) if options.heads is None else options.heads
    rows = resolve_rows(options.rows, len(token_ids))
    block, pooled = None, False  # with pool: tokens per side of a cell; pooled already
    if att is not None:
        selected = select_attention(att, layers, heads, options.aggregation)
        per_layer = iter(selected if rows is None else selected[..., rows, :])
    elif options.pool is not None and options.aggregation != "rollout":
        # straight to the pooled cells, from the causal half of each map only
        args = (layers, heads, options.aggregation, options.pool, dtype)
        per_layer = pooled_from_qk(blocks, qk, *args)
        block, pooled = pool_block(len(token_ids), options.pool), True
    else:
        per_layer = maps_from_qk(blocks, qk, layers, heads, options.aggregation, rows, dtype)
    values, keys = [], []
    for maps in per_layer:  # reduced layer by layer: one layer's maps at a time
        if options.pool is not None and not pooled:
            maps, block = pool_maps(maps, options.pool)
        elif options.top_keys is not None:
            maps, positions = top_keys(maps, options.top_keys)
            keys.append(positions)
        values.append(maps)
    return AttentionMap(
        tokens=tokenizer.token_strings(token_ids),
        token_ids=list(token_ids),
        n_layers=config.n_layer,
        n_heads=config.n_head,
        layers=list(layers),
        heads=list(heads),
        aggregation=options.aggregation,
        attention=encode_array(stacked(values), options.encoding, options.decimals),
        rows=rows,
        pool_block=block,
        keys=encode_keys(stacked(keys), options.encoding) if keys else None,
        cache=cache,
    )
