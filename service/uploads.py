"""Adapters added and removed at runtime: archive checks, Hugging Face Hub downloads, atomic installs.

An install is staged in a hidden folder inside the model directory (``.staging-<name>-<token>``),
checked completely there (every member and size, what a scan checks, and a load into a weightless
copy of the base model), and only then renamed to ``<name>`` and loaded: the folder is complete or
absent, never half-written, and no request sees it before it is checked. Replacing first renames
the old folder aside (``.replaced-<name>-<token>``); removing renames the folder to
``.removed-<name>-<token>`` before deleting it. :func:`recover_interrupted` (run by every scan, so
at every start) finishes or undoes what a crash interrupted: a missing folder gets its set-aside
copy back, every other leftover is deleted.

What an archive (``.tar.gz``, ``.tar`` or ``.zip``) may hold: regular files named like
``adapter_config.json`` with a JSON, safetensors or markdown suffix, at its top or in one top
folder. Anything else refuses the whole archive before a byte is written under the adapter's name:
other suffixes (pickled ``.bin`` weights), links, devices, nested folders, names escaping the folder
(``..``, absolute paths), more than :data:`MAX_FILES` files, more bytes than the limit (declared in
the archive or really unpacked). The metadata macOS adds (``__MACOSX/``, ``._*``, ``.DS_Store``) is
skipped.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import re
import secrets
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from cogalora.checkpoint import CONFIG_FILE, PEFT_CONFIG_FILE, CheckpointError, looks_like_checkpoint
from service.errors import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterSourceNotFoundError,
    AdapterSourceUnavailableError,
    InvalidArchiveError,
    InvalidRequestError,
    ModelDirReadOnlyError,
    PayloadTooLargeError,
    ServiceError,
    UnknownAdapterError,
)
from service.types import AdapterDescription

if TYPE_CHECKING:
    from service.lifecycle import Service

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
_STAGING, _REPLACED, _REMOVED = ".staging-", ".replaced-", ".removed-"
_TOKEN_LENGTH = 12


class InstallTarget(Protocol):
    """What an install needs of the repository (``service.repository.ModelRepository``)."""

    def validate(self, directory: Path) -> Any: ...
    def load(self, name: str, replace: bool = False) -> AdapterDescription: ...
    def unload(self, name: str) -> None: ...


@dataclass(frozen=True)
class Installed:
    """The answer of an install: the adapter as the catalogue describes it, and the revision a hub gave."""

    description: AdapterDescription
    revision: str | None = None


async def install(
    service: Service,
    repository: InstallTarget,
    name: str,
    replace: bool,
    *,
    archive: bytes | None = None,
    source: str | None = None,
    revision: str | None = None,
) -> Installed:
    """Stage, check and install the adapter ``name`` from an ``archive`` (the bytes of a ``.tar.gz``,
    ``.tar`` or ``.zip``), or from a hub ``source`` (``hf://org/name``) at ``revision``."""
    installer = Installer(service.settings.model_dir, service.settings.max_upload_bytes)
    if source is not None:
        staged, revision = await asyncio.to_thread(installer.stage_hub, name, source, revision)
    else:
        staged = await asyncio.to_thread(installer.stage_archive, name, archive or b"")
    try:
        await asyncio.to_thread(installer.check, name, staged, repository.validate)
        async with service.admin_lock:
            description = await asyncio.to_thread(installer.commit, name, staged, replace, repository)
    finally:
        await asyncio.to_thread(installer.discard, staged)
    logger.info("installed adapter %r%s", name, f" (revision {revision})" if revision else "")
    return Installed(description=description, revision=revision)


async def remove(service: Service, repository: InstallTarget, name: str) -> None:
    """Unload ``name`` and delete its folder from the model directory."""
    installer = Installer(service.settings.model_dir, service.settings.max_upload_bytes)
    async with service.admin_lock:
        await asyncio.to_thread(installer.remove, name, repository.unload)


def recover_interrupted(model_dir: Path) -> None:
    """Finish or undo installs and removals a crash interrupted (see the module's docstring)."""
    for path in sorted(model_dir.iterdir()):
        kind = next((prefix for prefix in (_STAGING, _REPLACED, _REMOVED) if path.name.startswith(prefix)), None)
        if kind is None:
            continue
        name = path.name[len(kind) : -(_TOKEN_LENGTH + 1)]
        live = model_dir / name
        try:
            if kind == _REPLACED and name and not os.path.lexists(live):
                os.rename(path, live)
                logger.warning("restored adapter folder %r after an interrupted replacement", name)
            else:
                _delete(path)
                logger.info("removed %s left by an interrupted install or removal", path.name)
        except OSError as exc:  # another process recovering at the same time, or a read-only directory
            logger.warning("could not clean up %s: %s", path.name, exc)


@dataclass
class _Members:
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


@dataclass
class Installer:
    """Staging, checking, installing and removing adapter folders in one model directory."""

    model_dir: Path
    max_bytes: int

    # ---- staging --------------------------------------------------------------------------------

    def stage_archive(self, name: str, data: bytes) -> Path:
        """Unpack a ``.tar.gz`` / ``.tar`` / ``.zip`` archive into a new staging folder."""
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(f"the archive has more than {self.max_bytes} bytes")
        if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            unpack = self._unzip
        elif data[:2] == b"\x1f\x8b" or data[257:262] == b"ustar":
            unpack = self._untar
        else:
            raise InvalidArchiveError(
                "the body is not a .tar.gz, .tar or .zip archive; send the adapter folder packed as one "
                "(content type application/gzip, application/x-tar or application/zip), or JSON naming a source"
            )
        staged = self._new_folder(_STAGING, name)
        try:
            unpack(data, staged, _Members(self.max_bytes))
            _require_adapter_files(staged)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def _untar(self, data: bytes, staged: Path, members: _Members) -> None:
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
                        self._write(staged / file, source, member.size, members)
        except ServiceError:
            raise
        except Exception as exc:  # what a decoder raises on a hostile or cut archive varies (TarError, zlib ...)
            raise _damaged(exc) from None

    def _unzip(self, data: bytes, staged: Path, members: _Members) -> None:
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
                        self._write(staged / file, source, info.file_size, members)
        except ServiceError:
            raise
        except Exception as exc:  # BadZipFile, zlib.error, a negative seek, a name that is not UTF-8 ...
            raise _damaged(exc) from None

    def stage_hub(self, name: str, source: str, revision: str | None) -> tuple[Path, str]:
        """Download ``hf://org/name`` (or take it from the local Hugging Face cache) into a staging folder.

        Returns the folder and the commit the revision resolved to.
        """
        repo_id = source.removeprefix(HUB_SCHEME)
        if not source.startswith(HUB_SCHEME) or not _HUB_ID.match(repo_id):
            raise InvalidRequestError(f"source must look like '{HUB_SCHEME}org/name', got {source[:120]!r}")
        if revision is not None and (not _REVISION.match(revision) or ".." in revision):
            raise InvalidRequestError(f"revision {revision[:64]!r} is not a branch, tag or commit name")
        snapshot = _download(source, repo_id, revision)
        staged = self._new_folder(_STAGING, name)
        try:
            members = _Members(self.max_bytes)
            cache = snapshot.parent.parent.resolve()  # the repository's folder in the cache
            for path in sorted(snapshot.iterdir()):
                real = path.resolve()
                if path.name not in HUB_FILES or not path.is_file() or not real.is_relative_to(cache):
                    continue  # an adapter's files at the snapshot's top, as the cache itself links them
                file = members.admit(path.name, "file", real.stat().st_size)
                if file is not None:
                    with open(real, "rb") as data:
                        self._write(staged / file, data, real.stat().st_size, members)
            _require_adapter_files(staged)
        except BaseException:
            self.discard(staged)
            raise
        return staged, snapshot.name

    def _write(self, path: Path, source: IO[bytes], declared: int, members: _Members) -> None:
        written = 0
        with self._writing(), open(path, "xb") as out:
            while chunk := source.read(1 << 20):
                written += len(chunk)
                members.written += len(chunk)
                if written > declared:
                    raise InvalidArchiveError(f"member {path.name!r} holds more bytes than the archive declares")
                if members.written > self.max_bytes:
                    raise PayloadTooLargeError(f"the archive unpacks to more than {self.max_bytes} bytes")
                out.write(chunk)

    # ---- checking -------------------------------------------------------------------------------

    def check(self, name: str, staged: Path, validate: Callable[[Path], Any]) -> None:
        """What a scan checks (``validate``), then a load into a weightless copy of the base model."""
        from cogalora.pretrained import verify_adapter

        try:
            validate(staged)
            verify_adapter(staged)
        except ServiceError:
            raise
        except Exception as exc:
            if not isinstance(exc, CheckpointError | ValueError | OSError):
                logger.exception("unexpected error checking the upload of %r", name)
            message = str(exc).replace(str(staged), name).replace(staged.name, name)
            message = message.replace(str(self.model_dir.resolve()), ".").replace(str(self.model_dir), ".")
            raise AdapterLoadError(f"adapter {name!r} cannot be served: {message}") from None

    # ---- installing and removing ----------------------------------------------------------------

    def commit(self, name: str, staged: Path, replace: bool, repository: InstallTarget) -> AdapterDescription:
        """Rename the checked folder to ``name`` (the old one aside when replacing) and load it.

        If the load fails, the folders are put back as they were and the old adapter is loaded again.
        """
        target = self.model_dir / name
        exists = os.path.lexists(target)
        if exists and not replace:
            raise AdapterConflictError(f"adapter {name!r} already exists; send replace=true to replace it")
        aside = self._new_name(_REPLACED, name) if exists else None
        with self._writing():
            if aside is not None:
                os.rename(target, aside)
            os.rename(staged, target)
        try:
            return repository.load(name, replace=True)
        except BaseException:
            with self._writing():
                os.rename(target, staged)
                if aside is not None:
                    os.rename(aside, target)
            try:  # the previous version back in service, or no trace of the failed one
                repository.load(name, replace=True) if aside is not None else repository.unload(name)
            except ServiceError as exc:
                logger.warning("adapter %r after a failed install: %s", name, exc.message)
            raise
        finally:
            if aside is not None and os.path.lexists(aside):
                _delete(aside)

    def remove(self, name: str, unload: Callable[[str], None]) -> None:
        """Unload ``name`` (if it is served or listed unavailable) and delete its folder."""
        target = self.model_dir / name
        on_disk = os.path.lexists(target) and (target.is_symlink() or looks_like_checkpoint(target))
        try:
            unload(name)
        except UnknownAdapterError:
            if not on_disk:
                raise UnknownAdapterError(f"no adapter named {name!r}") from None
        if on_disk:
            aside = self._new_name(_REMOVED, name)
            with self._writing():
                os.rename(target, aside)
            _delete(aside)

    def discard(self, staged: Path) -> None:
        """Delete a staging folder (nothing to do once it was installed)."""
        if os.path.lexists(staged):
            _delete(staged)

    # ---- helpers --------------------------------------------------------------------------------

    def _new_name(self, prefix: str, name: str) -> Path:
        return self.model_dir / f"{prefix}{name}-{secrets.token_hex(_TOKEN_LENGTH // 2)}"

    def _new_folder(self, prefix: str, name: str) -> Path:
        path = self._new_name(prefix, name)
        with self._writing():
            path.mkdir(mode=0o755)
        return path

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """File-system errors as the client's errors: a read-only model directory, a full disk."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise ModelDirReadOnlyError(
                    "the service cannot write to its model directory; make it writable to add or remove "
                    "adapters at runtime"
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


def _delete(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)
