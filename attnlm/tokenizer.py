"""Byte-level BPE tokenizer (GPT-2 style) shared by training and serving.

A thin wrapper around a HF `tokenizers.Tokenizer`: a ByteLevel pre-tokenizer (no prefix space), a BPE
model whose alphabet holds all 256 bytes (so any string encodes, nothing is unknown), a ByteLevel
decoder, and one special token, `EOT_TOKEN`, appended after every document when the training data
is packed. Encoding then decoding gives back the exact input string. The whole state lives in one
`tokenizer.json`, the file format of HF tokenizers.

Example:
    >>> from attnlm.tokenizer import Tokenizer
    >>> tok = Tokenizer.train(["The cat sits.", "The cats sit."] * 100, vocab_size=300)
    >>> tok.decode(tok.encode(" The cat sits."))
    ' The cat sits.'
    >>> tok.token_strings(tok.encode("The cat"))[-1]
    ' cat'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from attnlm.atomic import atomic_write

EOT_TOKEN = "<|endoftext|>"
NUM_BYTES = 256  # the byte alphabet every byte-level BPE vocabulary starts from


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, read, or used as asked."""


class Tokenizer:
    """Thin wrapper around tokenizers.Tokenizer: byte-level BPE (GPT-2 style), EOT special token.

    Ids are `0 .. vocab_size - 1`. Text containing the literal string `EOT_TOKEN` encodes it as
    `eot_id` (and decodes it back), so round trips stay exact.
    """

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        if not isinstance(inner, tokenizers.Tokenizer):
            raise TokenizerError(f"expected a tokenizers.Tokenizer, got {type(inner).__name__}")
        eot_id = inner.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise TokenizerError(f"tokenizer has no {EOT_TOKEN!r} token")
        self._inner = inner
        self._eot_id: int = eot_id
        self._vocab_size: int = inner.get_vocab_size(with_added_tokens=True)
        self._strings: list[str] | None = None  # token_strings' table, built on first use

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | Iterable[list[str]],
        vocab_size: int,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer.

        Args:
            texts: strings, or batches (lists) of strings, e.g. batches of a `datasets` column.
            vocab_size: the most tokens, counting the 256 bytes and `EOT_TOKEN` (>= 257). On a small
                corpus BPE can run out of pairs to merge; the result is then smaller.
            min_frequency: how often a pair must occur to be merged.
            show_progress: show the trainer's progress bar.
        """
        if not isinstance(vocab_size, int) or vocab_size < NUM_BYTES + 1:
            raise TokenizerError(
                f"vocab_size must be an int >= {NUM_BYTES + 1} (256 bytes + {EOT_TOKEN}), "
                f"got {vocab_size!r}"
            )
        if not isinstance(min_frequency, int) or min_frequency < 0:
            raise TokenizerError(f"min_frequency must be an int >= 0, got {min_frequency!r}")
        inner = tokenizers.Tokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[EOT_TOKEN],
            show_progress=show_progress,
        )
        inner.train_from_iterator(texts, trainer=trainer)
        return cls(inner)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` written by `save` (or any HF tokenizer file with `EOT_TOKEN`)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e
        try:
            return cls.from_json_str(text)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from e

    @classmethod
    def from_json_str(cls, text: str) -> Tokenizer:
        """Build from the JSON string of a `tokenizer.json` (what `to_json_str` returns)."""
        try:
            inner = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception with a serde message
            raise TokenizerError(f"not a valid tokenizer.json: {e}") from e
        return cls(inner)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` to `path` atomically (a temporary file, then `os.replace`)."""
        path = Path(path)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_str())
        return path

    def to_json_str(self) -> str:
        """The `tokenizer.json` contents."""
        return self._inner.to_str(pretty=True)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        """Id of `EOT_TOKEN`."""
        return self._eot_id

    @property
    def inner(self) -> tokenizers.Tokenizer:
        """The wrapped HF tokenizer."""
        return self._inner

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self._inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; parallel over the texts in Rust."""
        encode = getattr(self._inner, "encode_batch_fast", self._inner.encode_batch)  # no offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; `EOT_TOKEN` is kept. Raises TokenizerError for ids out of range."""
        ids = self._check_ids(ids)
        return self._inner.decode(ids, skip_special_tokens=False)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """One human-readable string per id, for labels: each id decoded alone ("Ġcat" -> " cat").

        A token holding part of a multi-byte UTF-8 character decodes to U+FFFD (the replacement
        character) in place of the incomplete bytes.
        """
        ids = self._check_ids(ids)
        if self._strings is None:  # every id decoded alone, once: a lookup from then on
            self._strings = self._inner.decode_batch(
                [[i] for i in range(self._vocab_size)], skip_special_tokens=False
            )
        return [self._strings[i] for i in ids]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:  # HF would silently drop unknown ids
            raise TokenizerError(
                f"token ids out of range [0, {self._vocab_size}): {bad[:8]}"
                + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
            )
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"
