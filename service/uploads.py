"""Adapters added and removed at runtime: staged, checked, then installed atomically.

An install is staged in a hidden folder inside the model directory (``.staging-<name>-<token>``),
checked completely there (every member and size, what a scan checks, and a load into a weightless
copy of the base model), and only then renamed to ``<name>`` and loaded: the folder is complete or
absent, never half-written, and no request sees it before it is checked. Replacing first renames
the old folder aside (``.replaced-<name>-<token>``); removing renames the folder to
``.removed-<name>-<token>`` before deleting it. :func:`recover_interrupted` (run by every scan, so
at every start) finishes or undoes what a crash interrupted: a missing folder gets its set-aside
copy back, every other leftover is deleted.

What an archive or a Hugging Face Hub snapshot may hold, and how it is unpacked member by member, is
``service.archives``: anything it refuses is refused before a byte is written under the adapter's name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cogalora.checkpoint import CheckpointError, looks_like_checkpoint
from service.archives import archive_format, copy_snapshot, hub_snapshot, unpack_archive, writing
from service.errors import (
    AdapterConflictError,
    AdapterLoadError,
    ServiceError,
    UnknownAdapterError,
)
from service.types import AdapterDescription

if TYPE_CHECKING:
    from service.lifecycle import Service

logger = logging.getLogger(__name__)

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
class Installer:
    """Staging, checking, installing and removing adapter folders in one model directory."""

    model_dir: Path
    max_bytes: int

    # ---- staging --------------------------------------------------------------------------------

    def stage_archive(self, name: str, data: bytes) -> Path:
        """Unpack a ``.tar.gz`` / ``.tar`` / ``.zip`` archive into a new staging folder (``service.archives``)."""
        archive_format(data, self.max_bytes)  # refused before anything is written
        staged = self._new_folder(_STAGING, name)
        try:
            unpack_archive(data, staged, self.max_bytes)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def stage_hub(self, name: str, source: str, revision: str | None) -> tuple[Path, str]:
        """Download ``hf://org/name`` (or take it from the local Hugging Face cache) into a staging folder.

        Returns the folder and the commit the revision resolved to.
        """
        snapshot = hub_snapshot(source, revision)
        staged = self._new_folder(_STAGING, name)
        try:
            copy_snapshot(snapshot, staged, self.max_bytes)
        except BaseException:
            self.discard(staged)
            raise
        return staged, snapshot.name

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
        with writing():
            if aside is not None:
                os.rename(target, aside)
            os.rename(staged, target)
        try:
            return repository.load(name, replace=True)
        except BaseException:
            with writing():
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
            with writing():
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
        with writing():
            path.mkdir(mode=0o755)
        return path


def _delete(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)
