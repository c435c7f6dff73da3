"""API keys: who holds which key, which adapters it may see and use, at what rate; hashed at rest.

The key file (``COGALORA_KEY_FILE``; TOML, or JSON when its name ends in ``.json``) maps key ids to
entries. The id is what logs, metrics and audit lines show; the key itself is stored only as its
SHA-256::

    [keys.alice]
    sha256 = "<64 hex digits: SHA-256 of the key>"
    adapters = ["alice-*", "sst2"]    # fnmatch patterns: the adapters this key sees and uses
    requests_per_second = 5           # optional: token-bucket rates (service/ratelimit.py)
    rows_per_second = 100
    burst_seconds = 2                 # optional: how many seconds of its rates a key may spend at once (1)
    admin = false                     # optional: true also opens the routes that change what is served

Keys are random 256-bit strings made by ``python -m service.keys new ID``, so one unsalted SHA-256
is as strong as a slow salted hash would be (nothing to guess), and finding the key of a request is
one digest compared with every entry in constant time, not one slow hash per entry. A person-chosen
password must not be used as a key.

The keys in force, those of the settings and of this file, re-read when it changes, are a
:class:`~service.keyring.KeyRing`. ``python -m service.keys`` makes keys and checks key files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from service.ratelimit import RateLimits

#: Key ids: what logs and metric labels show (bounded, printable, and bare keys in TOML).
KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
#: Ids of the keys that come from settings rather than the key file, and of requests without a key.
API_KEY_ID, ADMIN_KEY_ID, ANONYMOUS_ID = "api_key", "admin_key", "anonymous"
RESERVED_IDS = frozenset({API_KEY_ID, ADMIN_KEY_ID, ANONYMOUS_ID})


class KeyFileError(ValueError):
    """The key file is missing, unreadable or invalid; the message names the file and the field."""


@dataclass(frozen=True)
class Principal:
    """Who a request is: a key id, the adapters it may see and use, whether it is an admin, its rates."""

    key_id: str
    adapters: tuple[str, ...] = ("*",)
    """fnmatch patterns (case-sensitive) of adapter names."""
    admin: bool = False
    limits: RateLimits | None = None
    keyed: bool = True
    """False for requests without a key where none is needed."""

    def may_use(self, adapter: str) -> bool:
        return any(fnmatchcase(adapter, pattern) for pattern in self.adapters)


ANONYMOUS = Principal(ANONYMOUS_ID, keyed=False)

Pattern = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class KeyEntry(BaseModel):
    """One ``[keys.<id>]`` entry of the key file."""

    model_config = ConfigDict(extra="forbid")

    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] = Field(
        description="Hex SHA-256 of the key (python -m service.keys new makes both)."
    )
    adapters: list[Pattern] | None = Field(
        None, description='fnmatch patterns of the adapters the key may see and use; ["*"]: all. Required unless admin.'
    )
    admin: bool = Field(False, description="Also opens the routes that change what is served.")
    requests_per_second: float | None = Field(None, gt=0, description="Token-bucket rate of requests.")
    rows_per_second: float | None = Field(None, gt=0, description="Token-bucket rate of inputs (rows).")
    burst_seconds: float = Field(1.0, gt=0, description="Seconds of its rates a key may spend at once.")

    @model_validator(mode="after")
    def _scope_is_explicit(self) -> KeyEntry:
        if self.adapters is None and not self.admin:
            raise ValueError('"adapters" is required (["*"] for every adapter)')
        return self

    def principal(self, key_id: str) -> Principal:
        limits = None
        if self.requests_per_second is not None or self.rows_per_second is not None:
            limits = RateLimits(self.requests_per_second, self.rows_per_second, self.burst_seconds)
        adapters = tuple(self.adapters) if self.adapters is not None else ("*",)
        return Principal(key_id, adapters, self.admin, limits)


KeyId = Annotated[str, StringConstraints(pattern=KEY_ID_PATTERN)]


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[KeyId, KeyEntry] = Field(description="Key id -> entry.")


def _message(error: dict) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


def digest(key: str) -> bytes:
    """The stored form of a key: its SHA-256."""
    return hashlib.sha256(key.encode("utf-8", "replace")).digest()


Entries = tuple[tuple[bytes, Principal], ...]


def read_key_file(path: Path) -> Entries:
    """Every (digest, principal) of the key file; raises KeyFileError naming the file and the field."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"key file {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise KeyFileError(f"key file {path}: not valid {kind}: {exc}") from None
    try:
        parsed = KeyFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'file'}: {_message(err)}" for err in exc.errors()[:5]
        )
        raise KeyFileError(f"key file {path}: {problems}") from None
    entries: list[tuple[bytes, Principal]] = []
    seen: dict[bytes, str] = {}
    for key_id, entry in parsed.keys.items():
        if key_id in RESERVED_IDS:
            raise KeyFileError(f"key file {path}: keys.{key_id}: the id {key_id!r} is reserved")
        key_digest = bytes.fromhex(entry.sha256)
        if key_digest in seen:
            raise KeyFileError(f"key file {path}: keys.{key_id}: the same key as keys.{seen[key_digest]}")
        seen[key_digest] = key_id
        entries.append((key_digest, entry.principal(key_id)))
    return tuple(entries)


# ---- command line: make a key and its entry -----------------------------------------------------------


def new_entry(key_id: str, adapters: list[str], admin: bool, rates: RateLimits, json_format: bool) -> tuple[str, str]:
    """A fresh random key and its key-file entry (TOML table or JSON member)."""
    key = secrets.token_urlsafe(32)  # 256 random bits
    fields: dict[str, object] = {"sha256": digest(key).hex()}
    if adapters:
        fields["adapters"] = adapters
    if admin:
        fields["admin"] = True
    for name in ("requests_per_second", "rows_per_second"):
        if getattr(rates, name) is not None:
            fields[name] = getattr(rates, name)
    if rates.burst_seconds != 1.0:
        fields["burst_seconds"] = rates.burst_seconds
    if key_id in RESERVED_IDS:
        raise KeyFileError(f"the id {key_id!r} is reserved")
    KeyFile.model_validate({"keys": {key_id: fields}})  # the same checks as loading the file
    if json_format:
        return key, f"{json.dumps(key_id)}: {json.dumps(fields)}"
    lines = ["", f"[keys.{key_id}]"] + [f"{name} = {json.dumps(value)}" for name, value in fields.items()]
    return key, "\n".join(lines) + "\n"


def describe(principal: Principal) -> str:
    """One line about a key, without its hash: id, adapters, admin, rates."""
    parts = [f"{principal.key_id}: adapters {' '.join(principal.adapters)}"]
    if principal.admin:
        parts.append("admin")
    limits = principal.limits
    if limits is not None:
        for rate, unit in ((limits.requests_per_second, "requests/s"), (limits.rows_per_second, "rows/s")):
            if rate is not None:
                parts.append(f"{rate:g} {unit}")
        parts.append(f"burst {limits.burst_seconds:g} s")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.keys",
        description="Make API keys for the key file (COGALORA_KEY_FILE), or check a key file. Keys are stored "
        "only as their SHA-256: the key is printed once, on stderr, and the entry on stdout.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser(
        "new",
        help="make a random key; print its entry (append it to the key file) and the key",
        description="Example: python -m service.keys new alice --adapters 'alice-*' >> keys.toml",
    )
    new.add_argument("key_id", help="the id logs, metrics and audit lines show, e.g. a team or customer name")
    new.add_argument("--adapters", nargs="+", default=[], help="fnmatch patterns of the adapters it may use")
    new.add_argument("--admin", action="store_true", help="may also load and unload adapters")
    new.add_argument("--requests-per-second", type=float, default=None, help="token-bucket rate of requests")
    new.add_argument("--rows-per-second", type=float, default=None, help="token-bucket rate of inputs")
    new.add_argument("--burst-seconds", type=float, default=1.0, help="seconds of its rates it may spend at once")
    new.add_argument("--json", action="store_true", help='print a JSON member ("id": {...}) instead of TOML')
    check = commands.add_parser("check", help="validate a key file and list its keys (ids, scopes, rates)")
    check.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            for _, principal in read_key_file(args.path):
                print(describe(principal))
            return 0
        rates = RateLimits(args.requests_per_second, args.rows_per_second, args.burst_seconds)
        key, entry = new_entry(args.key_id, args.adapters, args.admin, rates, args.json)
    except (KeyFileError, ValidationError) as exc:
        message = exc if isinstance(exc, KeyFileError) else "; ".join(_message(err) for err in exc.errors())
        print(f"python -m service.keys: {message}", file=sys.stderr)
        return 2
    print(f"key for {args.key_id!r} (shown once; give it to its holder): {key}", file=sys.stderr)
    sys.stdout.write(entry)
    if args.json:
        sys.stdout.write(os.linesep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
