"""Writing files the way a careful user would expect: complete or absent, umask modes, never through a link.

`write_atomic(path, data)` writes a new file next to `path` and renames it into place: a reader (or a crash)
sees the old content or the new one, never half a file, and a symbolic link at `path` is replaced by the
file instead of having its target overwritten. The file gets the mode any new file gets (0666 minus the umask).

`publish_into(folder)` does the same for writers that only take a folder or a path (safetensors' `save_file`,
Hugging Face's `save_pretrained`): they write into a private staging folder inside `folder`, and when the block
ends without error every file is given the umask mode (safetensors creates 0600 files) and renamed into place.
On error the staging folder is removed and `folder` is untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` through a new file renamed into place, fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: a name someone planted (even a dangling link) is never opened; 0o666 lets the umask decide.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file_mode(folder: Path) -> int:
    """The permission bits a new file gets in `folder` (0666 minus the umask, default ACLs included)."""
    probe = folder / f".mode-probe-{secrets.token_hex(6)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def _real_folder(path: Path) -> None:
    """Create `path` if needed; refuse a symbolic link where a folder of ours belongs."""
    if path.is_symlink():
        raise FileExistsError(f"refusing to write into {path}: it is a symbolic link")
    path.mkdir(exist_ok=True)


@contextlib.contextmanager
def publish_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a private staging folder inside `folder`; its files replace those of `folder` when the block succeeds.

    Existing files (or links) with the same names are replaced by rename, never opened; other files in `folder`
    are left alone.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        yield staging
        mode = _new_file_mode(staging)
        moves = []
        for parent, dirs, files in os.walk(staging):
            relative = Path(parent).relative_to(staging)
            for name in dirs:
                _real_folder(folder / relative / name)
            for name in files:
                source = Path(parent) / name
                fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, mode)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                moves.append((source, folder / relative / name))
        for source, target in moves:
            os.replace(source, target)
        for parent in {target.parent for _, target in moves}:
            fsync_dir(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
