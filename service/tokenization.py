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


def tokenize_texts(
    tokenizer: Any, lock: threading.Lock, texts: list[str], limit: int, truncate: bool, adapter: str
) -> tuple[list[list[int]], list[int]]:
    """``(ids cut to limit, tokens before the cut)`` per text, in one tokenizer call (plus one for long
    texts); with ``truncate=False`` a text over ``limit`` tokens is an ``InputTooLongError``."""
    with lock:
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
        limit = min(limit, getattr(tokenizer, "model_max_length", limit) or limit)
        return tokenize_texts(tokenizer, lock, texts, limit, truncate, adapter)

    def _for(self, base_model: str) -> tuple[Any, threading.Lock]:
        with self._lock:
            known = self._tokenizers.get(base_model)
        if known is not None:
            return known
        loaded = (load_tokenizer(base_model), threading.Lock())
        with self._lock:
            return self._tokenizers.setdefault(base_model, loaded)
