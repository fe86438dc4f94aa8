"""What the API takes as text, and what it answers for the rest: the rules written once.

Every text field (`text` of next-token, attention and probe; completion prompts; stop strings;
the probe's `subject` and `verb`) is a JSON string, and prompts may also be token ids:

- empty: 400 (the schema's `minLength: 1`); a token-id prompt `[]` likewise (`minItems: 1`);
- a lone surrogate escape (`"ab\\ud800cd"`: valid JSON, but no Unicode text, so it cannot be
  tokenized or written back): 400 `invalid_text`, naming the field and the position;
- NUL and other control characters: accepted. Byte-level BPE encodes every byte, so they are
  tokens like any other, and answers give them back (JSON-escaped);
- a very long text (one long "word" or many): over the context window it is a 400
  `context_length_exceeded`. A text with more characters than the context holds even in the
  longest tokens (`max_text_chars`) is answered so without being tokenized, so a 1 MiB body
  costs microseconds, not the ~1 s its tokenization takes;
- zero tokens: a non-empty text never tokenizes to zero tokens (every byte is a token);
- token ids: integers in 0..vocabulary-1, else a 400 naming the id.

`serving.schemas` checks the first two for every field (`unicode_error`), the engine
(`Engine.encode`) checks them again for its own callers, and the rest needs the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnlm.tokenizer import Tokenizer
from serving.params import EngineError, invalid, is_int


def unicode_error(text: str) -> str | None:
    """Why `text` is not Unicode text (a lone surrogate, which UTF-8 cannot encode), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"must be valid Unicode text: a lone surrogate (U+{ord(text[err.start]):04X}) at "
            f"character {err.start}"
        )
    return None


def check_text(text: object, param: str) -> None:
    """EngineError unless `text` is a non-empty string of valid Unicode."""
    if not isinstance(text, str):
        raise invalid(f"{param} must be a string", param)
    if not text:
        raise EngineError(f"{param} must not be empty", param=param, code="empty_text")
    error = unicode_error(text)
    if error is not None:
        raise EngineError(f"{param} {error}", param=param, code="invalid_text")


def check_token_ids(ids: Sequence[object], vocab_size: int, param: str) -> list[int]:
    """The token ids of a prompt given as ids; EngineError naming the first bad one."""
    if not ids:
        raise EngineError(f"{param} must not be an empty list", param=param, code="empty_text")
    for i, token in enumerate(ids):
        if not is_int(token) or not 0 <= token < vocab_size:
            raise EngineError(
                f"{param}[{i}]: token id {token!r} is out of range; the vocabulary has "
                f"{vocab_size} ids, 0..{vocab_size - 1}",
                param=param,
                code="invalid_token_id",
            )
    return list(ids)


def max_text_chars(tokenizer: Tokenizer, context: int) -> int:
    """The most characters a text of at most `context` tokens can have: `context` times the
    bytes of the longest token (a character is at least one byte; a token decoded alone writes
    each incomplete character as U+FFFD, 3 bytes, so this bounds its bytes from above)."""
    strings = tokenizer.token_strings(range(tokenizer.vocab_size))
    return context * max(len(s.encode("utf-8")) for s in strings)


def context_exceeded(param: str, n_tokens: int | None, n_chars: int, context: int) -> EngineError:
    """The 400 for a text over the context (`n_tokens` None: not tokenized, surely over)."""
    if n_tokens is None:
        length = f"{n_chars} characters, more than {context} tokens can hold"
    else:
        length = f"{n_tokens} tokens"
    return EngineError(
        f"{param} is {length}; the context window is {context} tokens",
        param=param,
        code="context_length_exceeded",
    )
