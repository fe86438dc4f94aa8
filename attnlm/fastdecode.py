"""Fast decoding: one decode step over a preallocated KV cache, of shapes the host knows, compiled
once.

    decoder = StaticDecoder(model, slots=32, compile=True)   # compiled and warmed up here
    logits = decoder.prefill(prompt, rows)                     # (n, T) ids into rows (n,)
    decoder.tokens[:2] = next_ids                              # (slots,) buffers, written in place
    decoder.positions[:2] = where_they_go
    logits = decoder.step(width=2, key_length=12)              # (2, V) float32
    decoder.mode, decoder.fallback     # "inductor" | "cuda-graphs" | "eager", and why not compiled

`attnlm.batching.DecodeBatch` drives it (prefill, sampling, slots). A step feeds one token per
row, row b at positions[b], writes its key and value into the cache and attends over cache
positions 0..key_length-1 (`GPT.forward(key_length=...)`: each row's later positions are
masked). Nothing in it reads a tensor's value on the host and its shapes follow `width` and
`key_length` only, which the caller knows without asking the device, so it compiles to code
without Python or synchronisation inside:

- CPU: `torch.compile` (inductor) with frozen weights and the C++ wrapper, dynamic in width and
  key length: one graph, compiled by the warm-up at construction (a step of one row runs two, as
  dynamo would specialise size 1 into a second graph). A step then calls its graph as a plain
  function, the bytecode dynamo generated for it (`_direct_calls`): no frame evaluation, no
  guards, no stance per step; its inputs are always views of the decoder's own buffers, in
  inference mode, over the range of rows and key spans the warm-up compiled. Where that
  bytecode cannot be found, the step goes through dynamo, evaluating only the guards telling
  the two graphs apart (`skip_guard_eval_unsafe`); a recompile is refused and that call runs
  eager (logged). The key length follows the
  rows: reading the whole cache (32 rows x 256 positions at the small shape, 150 MB in fp32)
  every step doubled a step's time. The weights are frozen into the graph: changing them
  afterwards goes unseen. A model under CPU_BF16_MIN_BYTES compiles its kernels single-threaded.
  The prompt's forward (`prefill`: keys and values written straight into the request's rows, the
  last position's logits) is compiled too, one graph for one row of 2+ tokens (others eager).
- CUDA: one CUDA graph per width bucket (1, 2, 4, ..., slots) over the whole cache (GPU memory
  is fast enough to read it all), captured at construction; `step` replays the bucket that holds
  `width` rows. Idle rows of the bucket feed token 0 at position 0, as idle slots always do.
- anything else, or a compiler that fails: the same step eager, with the reason in `fallback`.

`preferred_dtype` is what `dtype: auto` means for serving: bfloat16 where the hardware computes
it natively and the model is large enough for it to pay (measured: docs/benchmarks.md, "Decode
speed").
"""

from __future__ import annotations

import bisect
import copy
import itertools
import logging
from pathlib import Path

import torch
import torch.nn as nn

from attnlm.model import GPT, KVCache

log = logging.getLogger(__name__)

MODES = ("eager", "inductor", "cuda-graphs")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
# float32 weights from which a CPU decode step reads its weights from memory rather than from
# the caches (docs/benchmarks.md, "Decode speed": the tiny shape, 3.7 MB, vs the small one, 44 MB):
# from there bfloat16 pays (half the bytes) and the compiled kernels take torch's threads; below,
# float32 is faster and the kernels run on one thread (OpenMP's fork/join costs more than the work)
CPU_BF16_MIN_BYTES = 16 * 2**20


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    for line in lines:
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def preferred_dtype(device: torch.device | str, weight_bytes: int | None = None) -> torch.dtype:
    """The dtype that decodes fastest here, for a model of `weight_bytes` bytes of float32
    weights (None: a large one). bfloat16 on CUDA. On CPUs with native bf16 arithmetic (AVX-512
    bf16, AMX), bfloat16 from CPU_BF16_MIN_BYTES of weights, where a step reads its weights
    from memory and half the bytes pay; below, where they stay in the caches and per-op work
    sets a step's time, float32 (bf16 is slower there). Elsewhere float32 (bf16 is emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_flags() & set(CPU_BF16_FLAGS):
        if weight_bytes is None or weight_bytes >= CPU_BF16_MIN_BYTES:
            return torch.bfloat16
    return torch.float32


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters in float32."""
    return 4 * sum(p.numel() for p in model.parameters())


class _Step(nn.Module):
    """The decode step as a module, so that compiling with frozen weights sees the model's
    parameters as its own (constants), and the cache buffers as the inputs it mutates."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, key_length: int):
        out = self.model(tokens[:, None], row_positions=positions, key_length=key_length)
        return out.logits[:, 0].float()  # (B, V)


class StaticDecoder:
    """A KV cache of `slots` rows x the whole context, its token and position buffers, and the
    decode step over them: eager, or compiled (see the module doc).

    Args:
        model: a GPT with attention, in the dtype and on the device to decode in.
        slots: rows of the cache.
        compile: compile the step (inductor on CPU, CUDA graphs on CUDA) and warm it up now;
            where that is not possible the step stays eager and `fallback` says why.

    The eager step puts the cache into `model` for each forward and takes it out again (the
    caller holds whatever lock keeps other users of the model's cache apart). The compiled one
    runs on a copy of the model's modules that shares its weights and keeps this cache: nothing
    to install per step, nothing another thread's forward can disturb.
    """

    def __init__(self, model: GPT, slots: int, compile: bool = False) -> None:
        if not model.config.has_attention:
            raise ValueError("a decode step over slots needs per-row positions: attention")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        config, weight = model.config, model.lm_head.weight
        self.model = model
        self.slots = slots
        self.length = config.block_size  # positions a row holds
        # one spare position: every key span is shorter than the cache (a span of all of it
        # would be a contiguous view, one more compiled graph)
        shape = (slots, config.n_head, self.length + 1, config.head_size)
        self.cache = [KVCache(*shape, weight.device, weight.dtype) for _ in range(config.n_layer)]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=weight.device)  # (slots,)
        self.positions = torch.zeros(slots, dtype=torch.long, device=weight.device)  # (slots,)
        self.mode = "eager"
        self.fallback: str | None = None if compile else "compile off"
        self._step = _Step(model)
        self._run = self._run_eager  # the step of this mode
        self._compiled = None  # inductor: the compiled _Step of the model's copy
        self._direct: tuple = ()  # inductor: its graphs as plain functions (_direct_calls)
        self._own: _Step | None = None  # the _Step they run on
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket ->
        self._buckets: list[int] = []
        # the prompt's forward writes straight into the cache's rows (a copy of the model's
        # modules with _SlotWriters for caches); compiled beside the step on CPU
        self._prefill = _Prefill(_sharing_weights(model), self.cache)
        self._prefill_compiled = None
        self._prefill_rows = 0  # the compiled prefill takes prompts of up to this many rows
        self._prompt = torch.zeros(slots, self.length, dtype=torch.long, device=weight.device)
        self._rows = torch.zeros(slots, dtype=torch.long, device=weight.device)
        if compile:
            self._compile()

    def step(self, width: int, key_length: int) -> torch.Tensor:
        """Feed rows 0..width-1 their `tokens` at their `positions` (each < key_length) and
        return their next-token logits (width, V) float32, attending over cache positions
        0..key_length-1."""
        if not 1 <= width <= self.slots or not 1 <= key_length <= self.length:
            raise ValueError(
                f"step over {width} rows and {key_length} keys; the decoder has {self.slots} "
                f"slots of {self.length} positions"
            )
        if not torch.is_inference_mode_enabled():  # (DecodeBatch calls it in inference mode)
            with torch.inference_mode():
                return self._run(width, key_length)
        return self._run(width, key_length)

    def prefill(self, prompt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write the keys and values of `prompt` (n, T), positions 0..T-1, into rows `rows` (n,)
        of the cache and return the next-token logits after it (n, V) float32. Positions past
        T in those rows keep whatever they held: a step masks them until it writes them."""
        n, T = prompt.shape
        if (
            rows.shape != (n,)
            or not 1 <= T <= self.length
            or n < 1
            or not 0 <= int(rows.min()) <= int(rows.max()) < self.slots
        ):
            raise ValueError(
                f"prefill of a {tuple(prompt.shape)} prompt into {tuple(rows.shape)} rows; "
                f"the decoder has {self.slots} slots of {self.length} positions"
            )
        with torch.inference_mode():
            if self._prefill_compiled is not None and T > 1 and n <= self._prefill_rows:
                # the graph's inputs are this decoder's own buffers, whatever the caller's
                # tensors are (inference tensors or not, strides): no guard tells them apart
                self._prompt[:n, :T] = prompt
                self._rows[:n] = rows
                try:
                    with torch.compiler.set_stance("fail_on_recompile"):
                        return self._prefill_compiled(self._prompt[:n, :T], self._rows[:n])
                except Exception as err:  # a shape the warm-up did not compile: eager
                    log.warning("prefill of %d x %d tokens eager: %s", n, T, _reason(err))
            return self._prefill(prompt, rows)

    def _run_eager(self, width: int, key_length: int) -> torch.Tensor:
        self.model.load_kv_cache_state(self.cache)
        try:
            return self._step(self.tokens[:width], self.positions[:width], key_length)
        finally:
            self.model.clear_kv_cache()

    def _run_direct(self, width: int, key_length: int) -> torch.Tensor:
        # the compiled graph of rows 1 or 2+ through the bytecode dynamo generated for it,
        # called as a plain function (see _direct_calls); the key span as in _run_inductor
        call = self._direct[0] if width == 1 else self._direct[1]
        return call(self._own, self.tokens[:width], self.positions[:width], max(key_length, 2))

    def _run_inductor(self, width: int, key_length: int) -> torch.Tensor:
        # Only the guards telling the warmed graphs apart are evaluated (one row or more): the
        # inputs are always views of this decoder's own buffers (same dtype, device, strides),
        # inference mode is on, the weights are frozen into the graphs, and a key span is
        # >= 2 and <= the cache (a span of 1 reads 2: the extra key is masked), the range
        # the warm-up compiled; a call that would recompile is refused and runs eager.
        try:
            with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
                return self._compiled(
                    self.tokens[:width], self.positions[:width], max(key_length, 2)
                )
        except Exception as err:  # a shape the warm-up did not compile: this call eager
            log.warning("decode step of %d x %d keys eager: %s", width, key_length, _reason(err))
        return self._run_eager(width, key_length)

    def _run_cuda_graphs(self, width: int, key_length: int) -> torch.Tensor:
        graph, logits = self._graphs[self._buckets[bisect.bisect_left(self._buckets, width)]]
        graph.replay()
        return logits[:width].clone()  # the graph's output is overwritten by the next replay

    # -- compilation ------------------------------------------------------------------------------
    def _compile(self) -> None:
        device = self.tokens.device.type
        try:
            own = _Step(_sharing_weights(self.model))  # the model's copy, this cache installed
            own.model.load_kv_cache_state(self.cache)
            if device == "cpu":
                self._compile_inductor(own)
            elif device == "cuda":
                self._capture_cuda_graphs(own)
            else:
                raise RuntimeError(f"no compiled decode step for device {device!r}")
        except Exception as err:
            self.mode, self.fallback, self._run = "eager", _reason(err), self._run_eager
            self._compiled, self._graphs, self._buckets = None, {}, []
            log.warning("decode step not compiled, eager instead: %s", self.fallback)
        if self.mode == "inductor":
            try:
                self._compile_prefill()
            except Exception as err:
                self._prefill_compiled, self._prefill_rows = None, 0
                log.warning("prefill not compiled, eager instead: %s", _reason(err))
        self._clear()

    @torch.inference_mode()
    def _compile_inductor(self, own: _Step) -> None:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(own, dynamic=True, fullgraph=True)
        for widths, options in self._inductor_options():
            # frozen weights must be on while dynamo traces, not only inside inductor
            with inductor_config.patch(freezing=True, cpp_wrapper=True, **options):
                for width in widths:
                    for key_length in sorted({2, self.length}):
                        compiled(self.tokens[:width], self.positions[:width], key_length)
        with torch.compiler.set_stance("fail_on_recompile"):  # a new shape needs no new graph
            width = max(self.slots - 1, 1)
            compiled(self.tokens[:width], self.positions[:width], max(self.length - 1, 2))
        self._compiled, self.mode, self.fallback = compiled, "inductor", None
        self._run = self._run_inductor
        try:
            self._direct, self._own = self._direct_calls(own), own
            self._run = self._run_direct
        except Exception as err:  # the dynamo-dispatched call above still works
            log.info("decode step called through dynamo: %s", _reason(err))

    def _direct_calls(self, own: _Step) -> tuple:
        """The warmed graphs (one row; 2+ rows) as plain functions of (own, tokens, positions,
        key_length): the bytecode dynamo generated for each cache entry of _Step.forward, which
        calls the compiled graph with its inputs, found by evaluating the entries' guards once
        here on the corners of the range each graph serves. A call then skips dynamo's frame
        evaluation, cache lookup and stance (20-30 us of the tiny shape's ~150 us step:
        docs/benchmarks.md), exact: the same compiled code runs. Shapes past the warmed ranges
        never reach it (`step` checks them) and the weights are frozen into the graphs."""
        import types

        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(_Step.forward.__code__)
        calls = []
        for widths in ([1], sorted({min(2, self.slots), self.slots})):
            corners = [
                {"self": own, "tokens": self.tokens[:w], "positions": self.positions[:w],
                 "key_length": k}
                for w in widths for k in sorted({2, self.length})
            ]  # fmt: skip
            entry = next(
                (e for e in entries if all(e.guard_manager.check(c) for c in corners)), None
            )
            if entry is None:
                raise RuntimeError(f"no compiled graph serves {widths} rows")
            calls.append(types.FunctionType(entry.code, _Step.forward.__globals__))
        return tuple(calls)

    @torch.inference_mode()
    def _compile_prefill(self) -> None:
        """Inductor for the prompt's forward: one graph for one row and 2..length tokens
        (prompts of one token, and of several rows, prefill eager)."""
        import torch._inductor.config as inductor_config

        compiled = torch.compile(self._prefill, dynamic=True, fullgraph=True)
        with inductor_config.patch(freezing=True, cpp_wrapper=True, **self._kernel_threads()):
            for T in sorted({2, self.length}):
                compiled(self._prompt[:1, :T], self._rows[:1])
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(self._prompt[:1, : max(self.length - 1, 2)], self._rows[:1])
        self._prefill_compiled, self._prefill_rows = compiled, 1

    def _inductor_options(self) -> list[tuple[list[int], dict]]:
        """The widths of each graph and the inductor options it compiles with. The one-row
        graph of fp32 weights multiplies through inductor's own C++ GEMM template, not oneDNN:
        2.2x faster at the small shape and 1.4x at the tiny one (a matrix-vector product), but
        slower for more rows and for bf16 weights on AVX-512 (2x at the small shape)."""
        common = self._kernel_threads()
        gemv = dict(common)
        if self.cache[0].k.dtype == torch.float32:
            gemv |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}
        more = sorted({min(2, self.slots), self.slots} - {1})
        return [([1], gemv)] + ([(more, common)] if more else [])

    def _kernel_threads(self) -> dict:
        """Inductor's C++ kernels of a model under CPU_BF16_MIN_BYTES run on one thread: the tiny
        shape's step took 0.13 ms on one thread and 1.3 ms on two (2 cores shared with other
        work; docs/benchmarks.md). Larger ones take torch's threads when compiled."""
        return {"cpp.threads": 1} if weight_bytes(self.model) < CPU_BF16_MIN_BYTES else {}

    @torch.inference_mode()
    def _capture_cuda_graphs(self, own: _Step) -> None:
        buckets = sorted({min(2**i, self.slots) for i in range(self.slots.bit_length() + 1)})
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as capture needs
            for width in buckets:
                for _ in range(2):
                    own(self.tokens[:width], self.positions[:width], self.length)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for width in buckets:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = own(self.tokens[:width], self.positions[:width], self.length)
            self._graphs[width] = (graph, logits)
        self._buckets = buckets
        self.mode, self.fallback, self._run = "cuda-graphs", None, self._run_cuda_graphs
        torch.cuda.synchronize()

    def _clear(self) -> None:
        """Back to an empty cache after the warm-up wrote into it."""
        with torch.inference_mode():
            for cache in self.cache:
                cache.k.zero_()
                cache.v.zero_()
            self.tokens.zero_()
            self.positions.zero_()


class _SlotWriter(nn.Module):
    """A layer's KV cache in a prompt's forward (`model(prompt, input_pos=0)`): writes the
    keys and values of positions 0..T-1 of the prompt's n rows into rows `rows[:n]` of the
    decoder's cache (no cache of the prompt's own, nothing to copy) and attends over them."""

    def __init__(self, cache: KVCache, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", cache.k, persistent=False)
        self.register_buffer("v", cache.v, persistent=False)
        self.register_buffer("rows", rows, persistent=False)  # (slots,), _Prefill's

    def update(
        self, input_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k.shape
        rows = self.rows[:B]
        self.k[rows, :, :T] = k.to(self.k.dtype)
        self.v[rows, :, :T] = v.to(self.v.dtype)
        return k, v


class _Prefill(nn.Module):
    """The prompt's forward as a module (compiled like _Step): a model whose caches are
    _SlotWriters into the decoder's cache; returns the last position's logits (n, V) float32."""

    def __init__(self, model: GPT, cache: list[KVCache]) -> None:
        super().__init__()
        rows = torch.zeros(cache[0].k.size(0), dtype=torch.long, device=cache[0].k.device)
        self.register_buffer("rows", rows, persistent=False)
        self.model = model
        model.load_kv_cache_state([_SlotWriter(layer, rows) for layer in cache])

    def forward(self, prompt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.rows[: rows.size(0)] = rows  # written here: the graph reads it (not a constant)
        return self.model(prompt, input_pos=0).logits[:, -1].float()  # (n, V)


def _sharing_weights(model: GPT) -> GPT:
    """A copy of the model's modules holding the very same parameter and buffer tensors."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
