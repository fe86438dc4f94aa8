"""Incremental detokenization of sampled tokens: each sample's text as its tokens arrive, cut
before the first stop string, handed out only where final; logprobs in OpenAI's legacy shape.

    row = Row(tokenizer, stops=["."], end_id=tokenizer.eot_id)
    row.add(token_id, record)              # per sampled token
    text, records, offsets = row.take()    # what became final since the last take
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnlm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 character decodes to


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class Row:
    """One sample of a completion as its tokens arrive: its text, cut before the first stop
    string; what of it is safe to hand out (no incomplete UTF-8 character at the end, nothing that
    may yet turn into a stop string); one logprob record and text offset per token of the text.

    Decoding is incremental: only the tokens after the last complete character are decoded again
    (byte-level BPE: the text of ids[:k] followed by that of ids[k:] is the text of ids when the
    former ends on a character boundary), so a row costs linear, not quadratic, time.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stops: Sequence[str] = (),
        end_id: int | None = None,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.min_tokens = min_tokens  # stop strings count from this many sampled tokens on
        self.end_id = end_id  # the token that ends the row (end-of-text), excluded from the text
        self.generated: list[int] = []  # every sampled id: end-of-text and stop-string ones too
        self.ids: list[int] = []  # ids whose text makes up the completion
        self.offsets: list[int] = []  # where each id's text starts in `text`
        self.records: list[tuple | None] = []  # (token string, logprob, {token: logprob})
        self.text = ""
        self.finish_reason: str | None = None
        self.cut = False  # a stop string cut the text (tokens past the cut are not reported)
        self.emitted = 0  # characters of text handed out
        self.emitted_tokens = 0  # records handed out
        self.closed = False  # the last delta (with finish_reason) went out
        self.logprob_sum = 0.0  # of every sampled token (best_of ranks rows by its mean)
        self._clean = 0  # ids[:_clean] decode to _clean_text, which ends on a whole character
        self._clean_text = ""
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    def add(self, token_id: int, record: tuple | None = None) -> None:
        self.generated.append(token_id)
        if token_id == self.end_id:  # not in the text; in logprobs (as vLLM reports it)
            self.finish_reason = "stop"
            if record is not None:
                self.records.append(record)
                self.offsets.append(len(self.text))
            return
        previous, shared = self.text, len(self._clean_text)
        self.ids.append(token_id)
        self.records.append(record)
        tail = self.tokenizer.decode(self.ids[self._clean :])
        self.text = self._clean_text + tail
        if not tail.endswith(REPLACEMENT):
            self._clean, self._clean_text = len(self.ids), self.text
        # the token's text starts where the old and new texts part; a token that completes a
        # character started by earlier ones moves their offsets back to that character
        limit = min(len(previous), len(self.text))
        while shared < limit and previous[shared] == self.text[shared]:
            shared += 1
        for j in range(len(self.offsets) - 1, -1, -1):
            if self.offsets[j] <= shared:
                break
            self.offsets[j] = shared
        self.offsets.append(shared)
        if self.stops and len(self.generated) >= self.min_tokens:
            start = max(0, len(previous.rstrip(REPLACEMENT)) - self._longest_stop + 1)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.finish_reason, self.cut = "stop", True

    def take(self) -> tuple[str, list[tuple], list[int]]:
        """The text newly safe to hand out, and the records and offsets of the tokens whose text
        starts in it (all that is left once the row has finished)."""
        if self.finish_reason is not None:
            limit = len(self.text)
        else:
            limit = len(self.text.rstrip(REPLACEMENT))
            limit -= stop_prefix_length(self.text[:limit], self.stops)
        limit = max(limit, self.emitted)
        text = self.text[self.emitted : limit]
        if self.finish_reason is not None and not self.cut:
            n_tokens = len(self.offsets)
        else:  # tokens starting at or past a stop string's cut are not reported
            n_tokens = max(bisect.bisect_left(self.offsets, limit), self.emitted_tokens)
        records = self.records[self.emitted_tokens : n_tokens]
        offsets = self.offsets[self.emitted_tokens : n_tokens]
        self.emitted, self.emitted_tokens = limit, n_tokens
        return text, records, offsets


def logprobs_dict(records: Sequence[tuple | None], offsets: Sequence[int], base: int) -> dict:
    """OpenAI legacy-completions logprobs of tokens; text offsets shifted by `base`."""
    return {
        "tokens": [r[0] for r in records],
        "token_logprobs": [r[1] for r in records],
        "top_logprobs": [r[2] for r in records],
        "text_offset": [base + o for o in offsets],
    }


def join_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in second}


@torch.inference_mode()
def token_records(
    tokenizer: Tokenizer, tokens: torch.Tensor, logits: torch.Tensor, k: int | None
) -> list[tuple | None]:
    """Per row of tokens (n,) sampled from logits (n, V): (the token's string, its logprob,
    {string: logprob} of the top k and the chosen one), or None without logprobs (k None)."""
    if k is None:
        return [None] * tokens.size(0)
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()  # (n,)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # (n, k)
    top_logprobs, top_ids = top_logprobs.tolist(), top_ids.tolist()
    ids = tokens.tolist()
    strings = tokenizer.token_strings(ids + [i for row in top_ids for i in row])
    records = []
    for b in range(len(ids)):
        token_string = strings[b]
        start = len(ids) + b * k
        top = dict(zip(strings[start : start + k], top_logprobs[b], strict=True))
        top.setdefault(token_string, chosen[b])
        records.append((token_string, chosen[b], top))
    return records


@torch.inference_mode()
def prompt_logprobs(tokenizer: Tokenizer, ids: list[int], logits: torch.Tensor, k: int) -> dict:
    """Logprobs of the prompt's tokens ids (T,) from the logits (T, V) of its forward, the first
    token having none (echo with logprobs)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (T, V)
    records: list[tuple | None] = [None] * len(ids)
    for i in range(1, len(ids)):
        records[i] = token_records(
            tokenizer, torch.tensor([ids[i]], device=logprobs.device), logprobs[i - 1 : i], k
        )[0]
    prompt_row = Row(tokenizer)
    for token in ids:
        prompt_row.add(token)
    return {
        "tokens": tokenizer.token_strings(ids),
        "token_logprobs": [None if r is None else r[1] for r in records],
        "top_logprobs": [None if r is None else r[2] for r in records],
        "text_offset": prompt_row.offsets,
    }
