"""Adapter archives for the upload tests (no tests here): good ones packed from a folder, hostile ones
built member by member, each with the status the service must answer."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

TWO_GB = 2 << 30


def pack(folder: Path, fmt: str = "tar.gz", top: str | None = None) -> bytes:
    """``folder``'s files as a ``tar.gz`` or ``zip``, at the archive's top or in the folder ``top``."""
    files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    prefix = f"{top}/" if top else ""
    if fmt == "zip":
        return _zip({prefix + name: data for name, data in files.items()})
    return _tar([(prefix + name, data) for name, data in files.items()])


def _tar(members: list[tuple[str, bytes]], edit: Callable[[tarfile.TarInfo], None] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if edit is not None:
                edit(info)
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _zip(members: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    """A zip of ``members``; ``modes``: the Unix file mode some of them declare (e.g. a symlink's)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if modes and name in modes:
                info.external_attr = modes[name] << 16
            archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _with_member(folder: Path, name: str, data: bytes = b"{}", **tar_fields) -> bytes:
    """A good archive of ``folder`` plus one more member ``name`` (a tar member with ``tar_fields`` set)."""
    members = [(path.name, path.read_bytes()) for path in sorted(folder.iterdir()) if path.is_file()]

    def edit(info: tarfile.TarInfo) -> None:
        if info.name == name:
            for field, value in tar_fields.items():
                setattr(info, field, value)

    return _tar([*members, (name, data)], edit)


def _declared_2gb_tar(folder: Path) -> bytes:
    """A tar whose member header declares 2 GB; only the header is there (a bomb is refused unread)."""
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.size = TWO_GB
    return gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096)


def _declared_2gb_zip(folder: Path) -> bytes:
    """A zip whose directory says its member unpacks to 2 GB."""
    data = bytearray(pack(folder, "zip"))
    central = data.find(b"PK\x01\x02")
    data[central + 24 : central + 28] = TWO_GB.to_bytes(4, "little")
    return bytes(data)


def _truncated(fmt: str) -> Callable[[Path], bytes]:
    def build(folder: Path) -> bytes:
        data = pack(folder, fmt)
        return data[: len(data) // 2]

    return build


def _zip_member(name: str, mode: int | None = None) -> Callable[[Path], bytes]:
    """A good zip of the folder plus the member ``name`` (declaring the Unix ``mode``, if given)."""

    def build(folder: Path) -> bytes:
        files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
        return _zip({**files, name: b"{}"}, {name: mode} if mode is not None else None)

    return build


#: name -> (build the archive from a good adapter folder, the HTTP status it must get)
HOSTILE: dict[str, tuple[Callable[[Path], bytes], int]] = {
    "zip-slip": (_zip_member("../evil.json"), 422),
    "zip-slip-nested": (_zip_member("adapter/../../evil.json"), 422),
    "zip-absolute-path": (_zip_member("/tmp/evil.json"), 422),
    "zip-backslash": (_zip_member("..\\evil.json"), 422),
    "zip-symlink": (_zip_member("evil.json", stat.S_IFLNK | 0o777), 422),
    "tar-absolute-path": (lambda folder: _with_member(folder, "/tmp/evil.json"), 422),
    "tar-dot-dot": (lambda folder: _with_member(folder, "../evil.json"), 422),
    "tar-symlink": (
        lambda folder: _with_member(folder, "evil.json", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        422,
    ),
    "tar-hard-link": (
        lambda folder: _with_member(folder, "evil.json", b"", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
        422,
    ),
    "tar-device": (lambda folder: _with_member(folder, "evil.json", b"", type=tarfile.CHRTYPE), 422),
    "pickle-file": (lambda folder: _with_member(folder, "adapter_model.bin", b"\x80\x04K\x01."), 422),
    "nested-folder": (lambda folder: _with_member(folder, "deep/er/evil.json"), 422),
    "declared-2gb-tar": (_declared_2gb_tar, 413),
    "declared-2gb-zip": (_declared_2gb_zip, 413),
    "truncated-tar-gz": (_truncated("tar.gz"), 422),
    "truncated-zip": (_truncated("zip"), 422),
    "not-an-archive": (lambda folder: b"just some text, not an archive", 422),
    "no-adapter-in-it": (lambda folder: _tar([("README.md", b"# hello\n")]), 422),
}
