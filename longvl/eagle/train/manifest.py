"""A checkpoint's manifest: every file's name, size and SHA-256, written at save time, checked before loading.

Resume reads nothing of a checkpoint (DCP's `.metadata` and shards are pickles) before its files match the
manifest, so a truncated or missing shard, a corrupt `trainer.json`, a missing rank file or a file replaced
after the save is named and refused instead of failing deep inside a loader, or running planted code. The
manifest itself is JSON: reading it runs nothing. It does not make a folder someone else can write trustworthy:
whoever can replace a file can rewrite the manifest too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from longvl.eagle.train.atomic_files import write_atomic

MANIFEST = "manifest.json"
FORMAT = 1


class ManifestError(ValueError):
    """A checkpoint's files do not match its manifest (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    files: dict[str, FileRecord]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "files": {name: dataclasses.asdict(record)
                                                       for name, record in sorted(self.files.items())}}, indent=1)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()   # releases the GIL: threads hash in parallel


def _hash_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def build_manifest(folder: Path, names: list[str]) -> Manifest:
    """Size and SHA-256 of `names` in `folder`."""
    with ThreadPoolExecutor(_hash_threads()) as pool:
        digests = list(pool.map(lambda name: _sha256(folder / name), names))
    return Manifest({name: FileRecord((folder / name).stat().st_size, digest) for name, digest in zip(names, digests)})


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_atomic(folder / MANIFEST, manifest.to_json())


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name
            and "\\" not in name and "\0" not in name)


def read_manifest(folder: Path) -> Manifest:
    """Parse `folder`'s manifest; ManifestError names what is wrong with it."""
    path = folder / MANIFEST
    try:
        tree = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{MANIFEST} is missing (a checkpoint written by an older version, or not by this "
                            f"trainer, cannot be checked)") from None
    except (OSError, ValueError) as error:
        raise ManifestError(f"{MANIFEST} is unreadable: {error}") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT or not isinstance(tree.get("files"), dict):
        raise ManifestError(f"{MANIFEST} is not a format-{FORMAT} manifest")
    files = {}
    for name, record in tree["files"].items():
        if not _plain_name(name):
            raise ManifestError(f"{MANIFEST} lists {name!r}, which is not a plain file name")
        if not (isinstance(record, dict) and isinstance(record.get("size"), int) and record["size"] >= 0
                and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64):
            raise ManifestError(f"{MANIFEST} has a malformed entry for {name}")
        files[name] = FileRecord(record["size"], record["sha256"])
    return Manifest(files)


def check_file(folder: Path, name: str, record: FileRecord) -> str | None:
    """None when `folder/name` matches `record`, else why not (starting with the file's name)."""
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{name} is missing"
    if stat.S_ISLNK(info.st_mode):
        return f"{name} is a symbolic link, not a file this trainer wrote"
    if not stat.S_ISREG(info.st_mode):
        return f"{name} is not a regular file"
    if info.st_size != record.size:
        return f"{name} has {info.st_size:,} bytes, the manifest says {record.size:,} (truncated or replaced)"
    try:
        digest = _sha256(path)
    except OSError as error:
        return f"{name} cannot be read: {error}"
    if digest != record.sha256:
        return f"{name} does not match its SHA-256 in the manifest (corrupt or replaced)"
    return None


def check_files(folder: Path, manifest: Manifest, names: list[str]) -> str | None:
    """The first problem among `names` (all listed in `manifest`), or None when every one matches."""
    with ThreadPoolExecutor(_hash_threads()) as pool:
        problems = pool.map(lambda name: check_file(folder, name, manifest.files[name]), names)
        return next((problem for problem in problems if problem is not None), None)
