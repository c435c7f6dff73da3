"""Texts to token ids for one adapter: its base model's tokenizer, cut to its ``max_length``.

The API process tokenizes (so the engine process only runs forwards); :class:`Tokenizers` keeps one
tokenizer per base model. Fast tokenizers must not be called from two threads at once: each comes
with its lock.
"""

from __future__ import annotations

import threading
from typing import Any

from cogalora import load_tokenizer
from service.errors import InputTooLongError

#: Requests of up to this many characters may be tokenized on the API process's event loop: handing
#: one sentence to the tokenizer thread and back cost more CPU than tokenizing it (py-spy of the API
#: process under wrk: the thread pool's hand-off about a fifth of its samples, the tokenizer a
#: sixteenth), and a request this short holds the loop for well under a millisecond.
INLINE_CHARS = 2000


def tokenize_texts(
    tokenizer: Any, lock: threading.Lock, texts: list[str], limit: int, truncate: bool, adapter: str
) -> tuple[list[list[int]], list[int]]:
    """``(ids cut to limit, tokens before the cut)`` per text, in one tokenizer call (plus one for long
    texts); with ``truncate=False`` a text over ``limit`` tokens is an ``InputTooLongError``."""
    with lock:
        return _tokenize_locked(tokenizer, texts, limit, truncate, adapter)


def _tokenize_locked(
    tokenizer: Any, texts: list[str], limit: int, truncate: bool, adapter: str
) -> tuple[list[list[int]], list[int]]:
    """:func:`tokenize_texts` with the tokenizer's lock held."""
    ids = tokenizer(texts, truncation=False)["input_ids"]
    too_long = [i for i, row in enumerate(ids) if len(row) > limit]
    if too_long and not truncate:
        first = too_long[0]
        raise InputTooLongError(
            f"input {first} has {len(ids[first])} tokens; adapter {adapter!r} accepts at most {limit} "
            "(shorten it or send truncate=true)"
        )
    cut = []
    if too_long:
        cut = tokenizer([texts[i] for i in too_long], truncation=True, max_length=limit)["input_ids"]
    input_tokens = [len(row) for row in ids]
    for i, row in zip(too_long, cut, strict=True):
        ids[i] = row
    return ids, input_tokens


class Tokenizers:
    """One tokenizer per base model, loaded on first use; thread-safe."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, tuple[Any, threading.Lock]] = {}
        self._lock = threading.Lock()

    def tokenize(
        self, base_model: str, texts: list[str], limit: int, truncate: bool, adapter: str
    ) -> tuple[list[list[int]], list[int]]:
        tokenizer, lock = self._for(base_model)
        return tokenize_texts(tokenizer, lock, texts, _limit(tokenizer, limit), truncate, adapter)

    def tokenize_now(
        self, base_model: str, texts: list[str], limit: int, truncate: bool, adapter: str
    ) -> tuple[list[list[int]], list[int]] | None:
        """:meth:`tokenize` on the calling thread, or ``None`` where that could block it: a request over
        :data:`INLINE_CHARS`, a tokenizer not loaded yet, or one busy on another thread."""
        if sum(len(text) for text in texts) > INLINE_CHARS:
            return None
        with self._lock:
            known = self._tokenizers.get(base_model)
        if known is None:
            return None
        tokenizer, lock = known
        if not lock.acquire(blocking=False):
            return None
        try:
            return _tokenize_locked(tokenizer, texts, _limit(tokenizer, limit), truncate, adapter)
        finally:
            lock.release()

    def _for(self, base_model: str) -> tuple[Any, threading.Lock]:
        with self._lock:
            known = self._tokenizers.get(base_model)
        if known is not None:
            return known
        loaded = (load_tokenizer(base_model), threading.Lock())
        with self._lock:
            return self._tokenizers.setdefault(base_model, loaded)


def _limit(tokenizer: Any, limit: int) -> int:
    """An adapter's token limit, within what its tokenizer accepts."""
    return min(limit, getattr(tokenizer, "model_max_length", limit) or limit)
