"""Bind the scripts to the checkout they sit in.

``import _checkout`` (first, before any project import) puts this repository's root at the front
of ``sys.path``, so ``catalog`` and ``impls`` are this checkout's packages, and their default
data directory is this checkout's ``catalog/data`` — never another copy that an editable
install, ``PYTHONPATH`` or site-packages would otherwise provide. ``--data-dir`` stays the
explicit override. Importing a project package from elsewhere before this point is an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("catalog", "impls")


def commit() -> str:
    """This checkout's ``HEAD`` commit, ``+dirty`` when the working tree differs from it (``unknown``
    outside git): the provenance stamp of every measurement a script writes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def bind() -> None:
    root = str(ROOT)
    sys.path[:] = [root, *(p for p in sys.path if p != root)]
    for name in PACKAGES:
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None)
        if where is not None and not Path(where).resolve().is_relative_to(ROOT):
            raise ImportError(f"{name} was imported from {where}, not from this checkout ({ROOT})")


bind()
