"""The keys in force: those of the settings and those of the key file, re-read when the file changes.

:class:`KeyRing` holds the keys of the settings (``COGALORA_API_KEY``, ``COGALORA_ADMIN_KEY``) and of
the key file (``service.keys`` reads it). It re-reads the file when its size, time or inode change
(checked at most once a second) and on :meth:`KeyRing.reload` (SIGHUP); a file that no longer parses
is reported and the keys already loaded stay in force. Keys are compared as SHA-256 digests, every
entry in constant time.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path

from service.keys import ADMIN_KEY_ID, API_KEY_ID, Entries, KeyFileError, Principal, digest, read_key_file
from service.logs import AUDIT_LOGGER

log = logging.getLogger(AUDIT_LOGGER)
#: How often the key file's size, time and inode are looked at for a change.
CHECK_INTERVAL_S = 1.0


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


class KeyRing:
    """Every valid key: those of the settings and those of the key file (re-read when it changes)."""

    def __init__(
        self,
        api_key: str | None = None,
        admin_key: str | None = None,
        key_file: Path | None = None,
        *,
        on_reload: Callable[[bool], None] = lambda ok: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        fixed: list[tuple[bytes, Principal]] = []
        if api_key:
            fixed.append((digest(api_key), Principal(API_KEY_ID)))
        if admin_key:
            if api_key and hmac.compare_digest(api_key.encode(), admin_key.encode()):
                raise KeyFileError("COGALORA_ADMIN_KEY must differ from COGALORA_API_KEY (it never opens admin routes)")
            fixed.append((digest(admin_key), Principal(ADMIN_KEY_ID, admin=True)))
        self._fixed = tuple(fixed)
        self.key_file = key_file
        self.on_reload = on_reload
        """Called with True after each reload of the key file, False when it was invalid (the metric)."""
        self._clock = clock
        self._entries: Entries = self._fixed
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        if key_file is not None:
            self._stamp = _stamp(key_file)
            self._entries = self._checked(read_key_file(key_file))
            self._next_check = clock() + CHECK_INTERVAL_S

    @property
    def requires_key(self) -> bool:
        """Whether classification and catalogue routes need a key (an API key or a key file is set)."""
        return self.key_file is not None or any(p.key_id == API_KEY_ID for _, p in self._fixed)

    def principals(self) -> list[Principal]:
        self.refresh()
        return [principal for _, principal in self._entries]

    def has_admin(self) -> bool:
        """Whether any key opens the admin routes (else they are closed to everyone)."""
        return any(principal.admin for principal in self.principals())

    def identify(self, key: str) -> Principal | None:
        """The principal of ``key``, or None. Every entry is compared, in constant time each."""
        self.refresh()
        offered = digest(key)
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(offered, known):
                found = principal
        return found

    def reload(self) -> bool:
        """Re-read the key file now (SIGHUP); False, with the keys in force kept, when it is invalid."""
        if self.key_file is None:
            return True
        self._stamp = _stamp(self.key_file)
        self._next_check = self._clock() + CHECK_INTERVAL_S
        try:
            entries = self._checked(read_key_file(self.key_file))
        except KeyFileError as exc:
            log.error("key file not reloaded; the keys in force stay: %s", exc)
            self.on_reload(False)
            return False
        before = {principal.key_id for _, principal in self._entries}
        after = {principal.key_id for _, principal in entries}
        self._entries = entries
        log.info(
            "key file reloaded",
            extra={"keys": len(after), "added": sorted(after - before), "removed": sorted(before - after)},
        )
        self.on_reload(True)
        return True

    def refresh(self) -> None:
        """Reload the key file if it changed (looked at no more than once a second)."""
        if self.key_file is None or self._clock() < self._next_check:
            return
        self._next_check = self._clock() + CHECK_INTERVAL_S
        if _stamp(self.key_file) != self._stamp:
            self.reload()

    def _checked(self, entries: Entries) -> Entries:
        for key_digest, principal in entries:
            for fixed_digest, fixed in self._fixed:
                if hmac.compare_digest(key_digest, fixed_digest):
                    raise KeyFileError(
                        f"key file {self.key_file}: keys.{principal.key_id}: the same key as "
                        f"COGALORA_{fixed.key_id.upper()}"
                    )
        return self._fixed + entries
