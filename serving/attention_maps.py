"""Attention maps as the API returns them: the requested layers and heads of a model's map, per
head, as their mean or as attention rollout, encoded as JSON values or base64 float16 bytes.

    attention_map(tokenizer, config, ids, att, AttentionOptions(aggregation="rollout"))

`att` is one text's map (L, H, T, T) from the model's explicit attention path; nothing here runs
the model.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from attnlm.config import GPTConfig
from attnlm.tokenizer import Tokenizer
from serving.limits import AGGREGATIONS, ENCODINGS
from serving.params import AttentionMap, AttentionOptions, EngineError, invalid


def rollout(att: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of att (L, H, T, T): per layer
    Â = 0.5·mean_heads(A) + 0.5·I with rows renormalised, R_l = Â_l @ R_{l-1} from layer 0 up.

    Returns:
        (L, T, T): R after each layer; every row sums to 1.
    """
    T = att.size(-1)
    eye = torch.eye(T, dtype=att.dtype, device=att.device)  # (T, T)
    mixed = 0.5 * att.mean(dim=1) + 0.5 * eye  # (L, T, T)
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


def attention_map(
    tokenizer: Tokenizer,
    config: GPTConfig,
    token_ids: list[int],
    att: torch.Tensor,
    options: AttentionOptions,
) -> AttentionMap:
    """The selected, aggregated and encoded map of one text's att (L, H, T, T) (options checked)."""
    layers = list(range(config.n_layer)) if options.layers is None else options.layers
    heads = list(range(config.n_head)) if options.heads is None else options.heads
    data = select_attention(att, layers, heads, options.aggregation)
    return AttentionMap(
        tokens=tokenizer.token_strings(token_ids),
        token_ids=list(token_ids),
        n_layers=config.n_layer,
        n_heads=config.n_head,
        layers=list(layers),
        heads=list(heads),
        aggregation=options.aggregation,
        attention=encode_array(data, options.encoding, options.decimals),
    )
