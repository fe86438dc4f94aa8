"""Forwards over whole texts (no KV cache) for next-token and attention: many texts in few
forwards, packed side by side in rows, or in length buckets for a model that cannot pack.

    forwards = TextForwards(model, tokenizer.vocab_size, max_context=64, device="cpu")
    for placements, out in forwards.batches(rows, return_attention=True):
        ...  # (i, r, s): rows[i] is row r of `out` from position s
    placements = forwards.keep_qk(rows, layers, sink)  # q, k of those layers; no logits

Logits come cut to the tokenizer's vocabulary (the model's may be padded past it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from attnlm.invariance import padded_length
from attnlm.lstm import LSTMLM
from attnlm.model import GPT, AttentionSink, GPTOutput

MAX_PADDING = 0.2  # a length bucket may be this fraction padding (models that cannot pack)
PACK_TOKENS = 64  # packed rows hold this many tokens (or the longest text, if longer)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices packed into rows of at most `capacity` tokens, first fit by decreasing length
    (a text longer than `capacity` gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(capacity - lengths[i], 0))
    return rows


def length_buckets(lengths: list[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices grouped into buckets of similar length (longest first), each padded to its
    longest row with at most `max_padding` of its tokens being padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            bucket = buckets[-1]
            longest = lengths[bucket[0]]
            real = sum(lengths[j] for j in bucket) + lengths[i]
            if 1 - real / (longest * (len(bucket) + 1)) <= max_padding:
                bucket.append(i)
                continue
        buckets.append([i])
    return buckets


class _Kept(Exception):
    """Raised by `TextForwards.keep_qk`'s sink once it has every layer's q and k it wants."""


class TextForwards:
    """The model's forwards over token rows of whole texts, on one device."""

    def __init__(
        self,
        model: GPT | LSTMLM,
        vocab_size: int,
        max_context: int,
        device: torch.device,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size  # the tokenizer's: logits past it are cut off
        self.max_context = max_context
        self.device = device
        self.batch_invariant = batch_invariant  # padded as `attnlm.invariance` says, not packed

    def padded(self, rows: list[list[int]], return_attention: bool = False) -> GPTOutput:
        """One forward over right-padded rows; logits cut to the tokenizer's vocabulary."""
        width = max(len(r) for r in rows)
        if self.batch_invariant:  # the next multiple of 16 positions (attnlm.invariance)
            width = padded_length(width, self.max_context)
        idx = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
        for b, ids in enumerate(rows):
            idx[b, : len(ids)] = torch.tensor(ids)
        out = self.model(idx.to(self.device), return_attention=return_attention)
        return out._replace(logits=out.logits[..., : self.vocab_size])

    def last_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """The next-token logits after each of `rows` (len(rows), V) float32. Packed rows of an
        attention model run the output head on each text's last position only
        (`GPT.forward(logits_at=...)`); padded ones (the LSTM, batch-invariant mode, whose
        numbers must not depend on the batch) take it from the whole forward's logits."""

        def last(placements: list[tuple[int, int, int]]) -> torch.Tensor:  # (n, 2) (r, pos)
            at = [(r, s + len(rows[i]) - 1) for i, r, s in placements]
            return torch.tensor(at, device=self.device)

        logits = torch.empty(len(rows), self.vocab_size, device=self.device)  # (B, V)
        if self.model.has_attention and not self.batch_invariant:
            placements, idx, segments = self._packed(rows)
            out = self.model(idx, segments=segments, logits_at=last(placements))
            logits[[i for i, _, _ in placements]] = out.logits[:, : self.vocab_size].float()
            return logits
        for placements, out in self.batches(rows):
            at = last(placements)
            logits[[i for i, _, _ in placements]] = out.logits[at[:, 0], at[:, 1]].float()
        return logits

    def keep_qk(
        self, rows: list[list[int]], layers: list[int], sink: AttentionSink
    ) -> list[tuple[int, int, int]]:
        """Hand `sink(layer, q, k)` the q and k (B, H, T, hs) of `layers` (ascending) for the
        packed `rows` of an attention model, and stop the forward there: the layers above, the
        last one's attention and MLP and the output head (a GPT-2 vocabulary's logits are over
        a third of a 1,024-token forward) would be thrown away. Returns the placements
        (i, r, s), as `batches`; the whole packed batch is one forward."""
        last = layers[-1]

        def keep(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
            sink(layer, q, k)
            if layer == last:
                raise _Kept

        if self.batch_invariant:  # rows of one padded length (`groups`), right-padded
            placements, segments = [(i, i, 0) for i in range(len(rows))], None
            width = padded_length(max(len(r) for r in rows), self.max_context)
            idx = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
            for b, ids in enumerate(rows):
                idx[b, : len(ids)] = torch.tensor(ids)
            idx = idx.to(self.device)
        else:
            placements, idx, segments = self._packed(rows)
        try:
            self.model(idx, segments=segments, attention_layers=layers, attention_sink=keep)
        except _Kept:
            return placements
        raise AssertionError(f"the forward went past layer {last}'s q and k")

    def groups(self, rows: list[list[int]]) -> list[list[int]]:
        """Indices of `rows` that share a forward: all of them, or in batch-invariant mode those
        of one padded length (`attnlm.invariance.padded_length`), longest first."""
        if not self.batch_invariant:
            return [list(range(len(rows)))]
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(rows):
            by_length.setdefault(padded_length(len(ids), self.max_context), []).append(i)
        return [group for _, group in sorted(by_length.items(), reverse=True)]

    def batches(
        self, rows: list[list[int]], return_attention: bool = False
    ) -> Iterator[tuple[list[tuple[int, int, int]], GPTOutput]]:
        """Batched forwards over `rows`: yields (placements, GPTOutput), where a placement
        (i, r, s) says that rows[i] sits in row r of the output from position s.

        Attention models pack: texts side by side in rows of `PACK_TOKENS`, each with its own
        positions and attending only to itself (`segments`), so one forward of nearly no padding
        serves them all (texts of 4 to 27 tokens: 1.5x faster than length buckets). A model
        without attention (the LSTM) cannot: rows sorted by length are cut into buckets whose
        right padding stays under `MAX_PADDING` of their tokens. Batch-invariant
        (`attnlm.invariance`): each text right-padded to the next multiple of 16 positions, one
        forward per padded length, so a text's shapes are its own whatever the others are (32
        texts of 4-27 tokens, small shape, bf16: 1.2x faster than packed rows, 1.5x than length
        buckets: docs/benchmarks.md).
        """
        lengths = [len(r) for r in rows]
        if self.batch_invariant:  # one forward per padded length
            for group in self.groups(rows):
                placements = [(i, b, 0) for b, i in enumerate(group)]
                yield placements, self.padded([rows[i] for i in group], return_attention)
            return
        if not self.model.has_attention:
            for bucket in length_buckets(lengths, MAX_PADDING):
                placements = [(i, b, 0) for b, i in enumerate(bucket)]
                yield placements, self.padded([rows[i] for i in bucket], return_attention)
            return
        placements, idx, segments = self._packed(rows)
        out = self.model(idx, return_attention=return_attention, segments=segments)
        yield placements, out._replace(logits=out.logits[..., : self.vocab_size])

    def _packed(
        self, rows: list[list[int]]
    ) -> tuple[list[tuple[int, int, int]], torch.Tensor, torch.Tensor]:
        """`rows` packed side by side (`pack_rows`): placements (i, r, s), token ids (B, T) and
        segment ids (B, T) (padding: -1, its own) on the device."""
        lengths = [len(r) for r in rows]
        packed = pack_rows(lengths, min(max(max(lengths), PACK_TOKENS), self.max_context))
        width = max(sum(lengths[i] for i in row) for row in packed)
        idx = torch.zeros(len(packed), width, dtype=torch.long)  # (B, T)
        segments = torch.full((len(packed), width), -1, dtype=torch.long)  # padding: its own
        placements = []
        for r, row in enumerate(packed):
            start = 0
            for i in row:
                n = lengths[i]
                idx[r, start : start + n] = torch.tensor(rows[i])
                segments[r, start : start + n] = i
                placements.append((i, r, start))
                start += n
        return placements, idx.to(self.device), segments.to(self.device)
