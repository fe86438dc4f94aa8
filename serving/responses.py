"""OpenAI's response shapes the app writes beyond the engine's results: a completion stream's
chunks, a chat stream's chunks (the role in each choice's first chunk only), a completion's
body as a chat completion's (an attention map's fields: `serving.params.AttentionMap.body`).
"""

from __future__ import annotations

from typing import Any

from serving.params import CompletionDelta


def completion_chunk(delta: CompletionDelta, index: int, first: bool) -> tuple[str, dict]:
    """A completion stream's chunk object and choice of one delta."""
    choice = {
        "text": delta.text,
        "index": index,
        "logprobs": delta.logprobs,
        "finish_reason": delta.finish_reason,
    }
    return "text_completion", choice


def chat_chunk(delta: CompletionDelta, index: int, first: bool) -> tuple[str, dict]:
    """A chat stream's chunk object and choice of one delta: the role in a choice's first chunk
    only (as OpenAI sends it), an empty delta beside the finish_reason when no text is left."""
    message: dict[str, str] = {"role": "assistant"} if first else {}
    if delta.text or first:
        message["content"] = delta.text
    choice = {
        "index": index,
        "delta": message,
        "logprobs": None,
        "finish_reason": delta.finish_reason,
    }
    return "chat.completion.chunk", choice


def as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A completion's body as a chat completion's (OpenAI's `chat.completion`)."""
    choices = [
        {
            "index": c["index"],
            "message": {"role": "assistant", "content": c["text"]},
            "logprobs": None,
            "finish_reason": c["finish_reason"],
        }
        for c in body["choices"]
    ]
    return {**body, "object": "chat.completion", "choices": choices}
