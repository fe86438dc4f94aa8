"""A replica's cache of recent texts' attention inputs: every layer's q and k in float16, least
recently used first out, bounded in bytes.

    cache = QKCache(max_bytes=256 << 20)
    entry = cache.get(token_ids)            # list of (q, k) per layer, each (H, T, hs), or None
    cache.put(token_ids, [(q, k), ...])     # stored as float16 copies

Why q and k rather than maps: every map of a 1,024-token text at GPT-2 124M's shape is 302 MB in
float16, its q and k 38 MB; any layer, head, rows, pool or top keys of a cached text is then a
few (T x hs) @ (hs x T) products, milliseconds instead of a forward
(/work/shared/DESIGN-NOTES.md). Thread-safe: the engine answers from the event loop and from
worker threads; two concurrent misses of one text both compute it and store the same entry.
Each replica (each `Engine`) has its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

QK = tuple[torch.Tensor, torch.Tensor]  # q (H, T, hs), k (H, T, hs) of one layer


def entry_bytes(entry: Sequence[QK]) -> int:
    return sum(q.numel() * q.element_size() + k.numel() * k.element_size() for q, k in entry)


class QKCache:
    """Texts (their token ids) -> every layer's (q, k) in float16; at most `max_bytes` held
    (0: off; an entry larger than the whole budget is not kept)."""

    def __init__(self, max_bytes: int) -> None:
        self._entries: OrderedDict[tuple[int, ...], list[QK]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.resize(max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, max_bytes: int) -> None:
        """A new budget; the least recently used entries go until the rest fits."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"attention_cache_bytes must be an integer >= 0, got {max_bytes!r}")
        with self._lock:
            self.max_bytes = max_bytes
            self._evict(0)

    def get(self, token_ids: Sequence[int]) -> list[QK] | None:
        """The text's entry (now the most recently used), or None; counts a hit or a miss."""
        key = tuple(token_ids)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, token_ids: Sequence[int], entry: Sequence[QK]) -> bool:
        """Keep float16 copies of `entry` (every layer's q, k); False when it is larger than
        the whole budget (or the cache is off), so not kept."""
        stored = [
            (q.to(torch.float16).contiguous(), k.to(torch.float16).contiguous()) for q, k in entry
        ]
        size = entry_bytes(stored)
        key = tuple(token_ids)
        with self._lock:
            if size > self.max_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= entry_bytes(old)
            self._evict(size)
            self._entries[key] = stored
            self.bytes += size
            return True

    def _evict(self, room: int) -> None:
        """Drop least recently used entries until `room` more bytes fit (lock held)."""
        while self._entries and self.bytes + room > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(old)
