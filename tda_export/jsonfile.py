"""Versioned JSON files (calibrations, manifests): atomic writes, reads that name the file on error."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write via a temporary sibling and rename, so a reader never sees half a file.

    The file gets the permissions of any file this process creates (0666 less the umask), not the 0600 of
    a temporary file: calibrations and manifests are build outputs others read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=1)
        tmp.write("\n")
    os.chmod(tmp.name, 0o666 & ~_umask())
    os.replace(tmp.name, path)
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def read_versioned(path: str | os.PathLike, fmt: str, error: type[Exception], what: str) -> dict:
    """The object in `path`, which must carry "format": fmt; `error(message)` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{what} {path}: not JSON ({e})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != fmt:
        raise error(f"{what} {path}: format {found!r}, expected {fmt!r}")
    return data
