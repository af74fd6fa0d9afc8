"""manifest.json of an exported model directory: write it, read it, verify every file's hash.

Shared by the exporter (writes), `tda-export inspect` and the runtime (read and verify),
so a directory is trusted only when every file it lists is exactly what was built.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .jsonfile import read_versioned, write_atomic

NAME = "manifest.json"
FORMAT = "tda-export-manifest/1"


class ManifestError(ValueError):
    """A missing, malformed or mismatching manifest; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def write(directory: Path, data: dict) -> Path:
    """Hash every file already in `directory` into data["files"], then write the manifest last."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != NAME:
            files[p.relative_to(directory).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return write_atomic(directory / NAME, dict(data, format=FORMAT, files=files))


def read(directory: Path) -> dict:
    path = Path(directory) / NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no such file (not an exported model directory?)")
    data = read_versioned(path, FORMAT, ManifestError, "manifest")
    if not isinstance(data.get("files"), dict):
        raise ManifestError(f"{path}: field 'files' missing")
    return data


def verify(directory: Path, data: dict | None = None) -> dict:
    """Read (unless given) and check sizes and sha256 of every listed file; raises naming the first bad file."""
    directory = Path(directory)
    data = data if data is not None else read(directory)
    for rel, entry in data["files"].items():
        p = directory / rel
        if not p.is_file():
            raise ManifestError(f"{p}: listed in {NAME} but missing")
        if p.stat().st_size != entry["bytes"]:
            raise ManifestError(f"{p}: {p.stat().st_size} bytes, {NAME} says {entry['bytes']}")
        if sha256_file(p) != entry["sha256"]:
            raise ManifestError(f"{p}: sha256 does not match {NAME} (file changed after the build)")
    return data
