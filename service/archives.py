"""What an adapter archive or hub snapshot may hold, and copying it into a folder member by member.

What an archive (``.tar.gz``, ``.tar`` or ``.zip``) may hold: regular files named like
``adapter_config.json`` with a JSON, safetensors or markdown suffix, at its top or in one top
folder. Anything else refuses the whole archive: other suffixes (pickled ``.bin`` weights), links,
devices, nested folders, names escaping the folder (``..``, absolute paths), more than
:data:`MAX_FILES` files, more bytes than the limit (declared in the archive or really unpacked). The
metadata macOS adds (``__MACOSX/``, ``._*``, ``.DS_Store``) is skipped. A Hugging Face Hub snapshot
gives the files of :data:`HUB_FILES`, under the same rules. Where the folder goes and how it is
installed is ``service.uploads``'s business.
"""

from __future__ import annotations

import errno
import io
import logging
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cogalora.checkpoint import CONFIG_FILE, PEFT_CONFIG_FILE
from service.errors import (
    AdapterSourceNotFoundError,
    AdapterSourceUnavailableError,
    InvalidArchiveError,
    InvalidRequestError,
    ModelDirReadOnlyError,
    PayloadTooLargeError,
    ServiceError,
)

logger = logging.getLogger(__name__)

ALLOWED_SUFFIXES = (".json", ".safetensors", ".md")
MAX_FILES = 32
#: The files an adapter folder can have: what a hub download fetches (nothing else is downloaded).
HUB_FILES = (
    PEFT_CONFIG_FILE,
    "adapter_model.safetensors",
    CONFIG_FILE,
    "routers.safetensors",
    "config.json",
    "serving.json",
    "README.md",
)
HUB_SCHEME = "hf://"
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MACOS_METADATA = re.compile(r"(^|/)(__MACOSX(/|$)|\._|\.DS_Store$)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")


@dataclass
class Members:
    """What an archive has admitted so far: the names, their bytes, and the folder they sit in."""

    max_bytes: int
    names: set[str] = field(default_factory=set)
    declared: int = 0
    written: int = 0
    top: str | None = None
    """``""``: files at the archive's top; a name: every file in that one folder."""

    def admit(self, raw: str, kind: str, size: int) -> str | None:
        """The file name to write ``raw`` as, or None for a folder or skipped metadata; raises on anything else.

        ``kind``: ``file``, ``dir``, or what else the member is (``symlink``, ``device`` ...).
        """
        shown = repr(raw[:80])
        if _MACOS_METADATA.search(raw):
            return None
        if raw.startswith("/") or "\\" in raw or re.match(r"^[A-Za-z]:", raw) or "\x00" in raw:
            raise InvalidArchiveError(f"member {shown} has an absolute or non-portable path")
        parts = [part for part in raw.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise InvalidArchiveError(f"member {shown} points outside the adapter folder")
        if kind == "dir":
            if len(parts) > 1:
                raise InvalidArchiveError(f"member {shown} is a nested folder; an adapter folder has files only")
            return None
        if kind != "file":
            raise InvalidArchiveError(f"member {shown} is a {kind}; only regular files are accepted")
        if not parts or len(parts) > 2:
            raise InvalidArchiveError(f"member {shown} is nested too deep; put the files at the top or in one folder")
        top = parts[0] if len(parts) == 2 else ""
        if self.top is not None and top != self.top:
            raise InvalidArchiveError("the archive's files must all be at its top or all in one folder")
        self.top = top
        name = parts[-1]
        if not _FILE_NAME.match(name) or not name.endswith(ALLOWED_SUFFIXES):
            raise InvalidArchiveError(
                f"member {shown}: only JSON, safetensors and markdown files are accepted "
                f"({', '.join(ALLOWED_SUFFIXES)}); pickled weights (.bin, .pt, .pkl) are never read"
            )
        if name in self.names:
            raise InvalidArchiveError(f"member {shown} appears twice")
        self.names.add(name)
        if len(self.names) > MAX_FILES:
            raise InvalidArchiveError(f"more than {MAX_FILES} files; an adapter folder has a handful")
        self.declared += max(size, 0)
        if self.declared > self.max_bytes:
            raise PayloadTooLargeError(f"the archive's files add up to more than {self.max_bytes} bytes")
        return name


def archive_format(data: bytes, max_bytes: int) -> str:
    """``"zip"`` or ``"tar"`` (compressed or not); refuses a body over ``max_bytes`` or of any other kind."""
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"the archive has more than {max_bytes} bytes")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:2] == b"\x1f\x8b" or data[257:262] == b"ustar":
        return "tar"
    raise InvalidArchiveError(
        "the body is not a .tar.gz, .tar or .zip archive; send the adapter folder packed as one "
        "(content type application/gzip, application/x-tar or application/zip), or JSON naming a source"
    )


def unpack_archive(data: bytes, folder: Path, max_bytes: int) -> None:
    """Unpack an archive into the empty ``folder``, every member checked before it is written."""
    unpack = _unzip if archive_format(data, max_bytes) == "zip" else _untar
    unpack(data, folder, Members(max_bytes))
    _require_adapter_files(folder)


def _untar(data: bytes, staged: Path, members: Members) -> None:
    try:
        # Stream mode: members are checked one by one as they come, so a header declaring a huge
        # member is refused before its data is decompressed.
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
            for member in archive:
                kind = "file" if member.isreg() and not member.issparse() else _tar_kind(member)
                file = members.admit(member.name, kind, member.size)
                if file is not None:
                    source = archive.extractfile(member)
                    assert source is not None  # a regular file always has data
                    _write(staged / file, source, member.size, members)
    except ServiceError:
        raise
    except Exception as exc:  # what a decoder raises on a hostile or cut archive varies (TarError, zlib ...)
        raise _damaged(exc) from None


def _unzip(data: bytes, staged: Path, members: Members) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            admitted = []
            for info in archive.infolist():  # the whole directory is checked before anything is written
                if info.flag_bits & 0x1:
                    raise InvalidArchiveError(f"member {info.filename[:80]!r} is encrypted")
                file = members.admit(info.filename, _zip_kind(info), info.file_size)
                if file is not None:
                    admitted.append((info, file))
            for info, file in admitted:
                with archive.open(info) as source:
                    _write(staged / file, source, info.file_size, members)
    except ServiceError:
        raise
    except Exception as exc:  # BadZipFile, zlib.error, a negative seek, a name that is not UTF-8 ...
        raise _damaged(exc) from None


def hub_snapshot(source: str, revision: str | None) -> Path:
    """The local snapshot of ``hf://org/name`` at ``revision`` (downloaded, or from the local cache)."""
    repo_id = source.removeprefix(HUB_SCHEME)
    if not source.startswith(HUB_SCHEME) or not _HUB_ID.match(repo_id):
        raise InvalidRequestError(f"source must look like '{HUB_SCHEME}org/name', got {source[:120]!r}")
    if revision is not None and (not _REVISION.match(revision) or ".." in revision):
        raise InvalidRequestError(f"revision {revision[:64]!r} is not a branch, tag or commit name")
    return _download(source, repo_id, revision)


def copy_snapshot(snapshot: Path, folder: Path, max_bytes: int) -> None:
    """Copy an adapter's files from a hub snapshot into the empty ``folder``, under the archive rules."""
    members = Members(max_bytes)
    cache = snapshot.parent.parent.resolve()  # the repository's folder in the cache
    for path in sorted(snapshot.iterdir()):
        real = path.resolve()
        if path.name not in HUB_FILES or not path.is_file() or not real.is_relative_to(cache):
            continue  # an adapter's files at the snapshot's top, as the cache itself links them
        file = members.admit(path.name, "file", real.stat().st_size)
        if file is not None:
            with open(real, "rb") as data:
                _write(folder / file, data, real.stat().st_size, members)
    _require_adapter_files(folder)


def _write(path: Path, source: IO[bytes], declared: int, members: Members) -> None:
    written = 0
    with writing(), open(path, "xb") as out:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            members.written += len(chunk)
            if written > declared:
                raise InvalidArchiveError(f"member {path.name!r} holds more bytes than the archive declares")
            if members.written > members.max_bytes:
                raise PayloadTooLargeError(f"the archive unpacks to more than {members.max_bytes} bytes")
            out.write(chunk)


@contextmanager
def writing() -> Iterator[None]:
    """File-system errors as the client's errors: a read-only model directory, a full disk."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ModelDirReadOnlyError(
                "the service cannot write to its model directory; make it writable to add or remove adapters at runtime"
            ) from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PayloadTooLargeError("no space left in the model directory for this adapter") from None
        raise


def _download(source: str, repo_id: str, revision: str | None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` in the local Hugging Face cache, fetched if needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = f"{source} (revision {revision or 'main'})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES)))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
        raise AdapterSourceNotFoundError(
            f"{shown}: no such adapter on the Hugging Face Hub, or no access to it"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as exc:
        logger.info("hub download of %s failed: %s", shown, exc)
        raise AdapterSourceUnavailableError(
            f"{shown}: the Hugging Face Hub cannot be reached from the service and its local cache "
            "(HF_HUB_CACHE) has no copy; upload the adapter folder as an archive instead"
        ) from None


def _damaged(exc: Exception) -> InvalidArchiveError:
    logger.debug("unreadable archive: %r", exc)
    return InvalidArchiveError(f"the archive is damaged or truncated ({type(exc).__name__})")


def _require_adapter_files(staged: Path) -> None:
    if not (staged / PEFT_CONFIG_FILE).is_file() and not (staged / CONFIG_FILE).is_file():
        raise InvalidArchiveError(
            f"no adapter in it: expected {PEFT_CONFIG_FILE} (a PEFT folder) or {CONFIG_FILE} (a CoGaLoRA "
            "checkpoint) at its top or in one folder"
        )


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "dir"
    if member.issym() or member.islnk():
        return "link"
    if member.issparse():
        return "sparse file"
    return "device or special file"


def _zip_kind(info: zipfile.ZipInfo) -> str:
    file_type = stat.S_IFMT(info.external_attr >> 16)  # 0: the writer recorded permissions only
    if info.is_dir():
        return "dir"
    if file_type == stat.S_IFLNK:
        return "link"
    if file_type not in (0, stat.S_IFREG):
        return "device or special file"
    return "file"
