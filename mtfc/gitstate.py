"""Which code is running: the git commit of mtfc's checkout and whether its tracked files differ from it.

Recorded in every artifact (:func:`mtfc.checkpoint.save_checkpoint`) and in the report's provenance, which
compares the two: a report says whether every artifact it used was produced by the code that wrote it.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any


def git_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding ``directory`` (dirty: tracked
    files differ from the commit, as ``git describe --dirty``); ``None`` outside a checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def code_state() -> dict[str, Any] | None:
    """:func:`git_state` of this mtfc, read once per process: the code a process runs is what it imported."""
    return git_state(Path(__file__).resolve().parent)
