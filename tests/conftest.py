"""Shared pytest fixtures."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The scripts start with ``import _checkout`` (scripts/_checkout.py); tests that load a script
# by its path find it here. Appended, so that scripts/site.py never shadows the stdlib module.
sys.path.append(str(REPO_ROOT / "scripts"))

import pytest  # noqa: E402
from openalex_server import fake_openalex, openalex_url  # noqa: F401, E402  (fixtures of the fake OpenAlex)

import catalog  # noqa: E402


@pytest.fixture(scope="session")
def real_catalog() -> catalog.Catalog:
    """The committed catalog, loaded once per test session."""
    return catalog.load()


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A private copy of the committed ``catalog/data`` (taxonomy, works, fetched) to break at will."""
    dest = tmp_path / "data"
    shutil.copytree(catalog.DATA_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "works").mkdir(exist_ok=True)
    (dest / "fetched").mkdir(exist_ok=True)
    return dest


@pytest.fixture
def run_script():
    """Run ``python scripts/<name>.py ARGS...`` from the repository root; returns the finished process."""

    def run(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / f"{name}.py"), *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
