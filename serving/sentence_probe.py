"""The agreement probe on one sentence, as `POST /v1/probe` reports it (docs/serving.md).

`attnlm.probe` finds the subject and the main verb and scores the model's preference between the
verb's two forms; this adds the request's checks (named words, the context window) and rounds
what the endpoint returns: the verdict, both logprobs, each head's attention to the subject and
the head that attends to it most.
"""

from __future__ import annotations

import torch

from attnlm.lstm import LSTMLM
from attnlm.model import GPT
from attnlm.probe import ProbeError, analyze, score_items
from attnlm.tokenizer import Tokenizer
from serving.params import EngineError, ProbeResult, invalid


@torch.inference_mode()
def probe_sentence(
    model: GPT | LSTMLM,
    tokenizer: Tokenizer,
    max_context: int,
    text: str,
    ids: list[int],
    subject: str | None = None,
    verb: str | None = None,
) -> ProbeResult:
    """The probe on `text` (token ids `ids`, already checked), its subject and main verb found
    or named; EngineError naming `subject`, `verb` or `text` when that fails."""
    for name, word in (("subject", subject), ("verb", verb)):
        if word is not None and (not isinstance(word, str) or not word.strip()):
            raise invalid(f"{name} must be a non-empty string or null", name)
    try:
        item = analyze(tokenizer, text, subject, verb)
    except ProbeError as err:
        raise EngineError(str(err), param=err.param or "text", code="probe_failed") from err
    needed = 1 + len(item.prefix_ids) + max(len(item.verb_ids), len(item.wrong_ids or []))
    if needed > max_context:
        raise EngineError(
            f"text up to the verb with its forms is {needed} tokens (with the end-of-text "
            f"token before it); the context window is {max_context} tokens",
            param="text",
            code="context_length_exceeded",
        )
    score = score_items(model, [item], tokenizer.eot_id, vocab_size=tokenizer.vocab_size)[0]
    best = None
    att = score.attention_to_subject
    if att is not None:
        layer, head = divmod(int(att.argmax()), att.size(1))
        best = {"layer": layer, "head": head, "weight": round(float(att[layer, head]), 4)}
    verdict = None if score.correct is None else ("correct" if score.correct else "wrong")
    return ProbeResult(
        tokens=tokenizer.token_strings(ids),
        token_ids=ids,
        subject={"text": item.subject, "token_positions": item.subject_positions},
        verb={
            "as_written": item.written_verb,
            "correct": item.verb,
            "wrong": item.wrong_verb,
            "token_position": item.verb_position,
        },
        number=item.number,
        distance=item.distance,
        agreement={
            "verdict": verdict,
            "correct_logprob": round(score.correct_logprob, 4),
            "wrong_logprob": None if score.wrong_logprob is None else round(score.wrong_logprob, 4),
        },
        attention_to_subject=None
        if att is None
        else [[round(float(x), 4) for x in row] for row in att],
        best_head=best,
    )
