"""The README's Python examples run as written, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index: int, capsys) -> None:
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1] == "make test"
    assert "make test    # run the whole test suite" in README.read_text(encoding="utf-8")


def test_the_readme_work_example_is_a_valid_curated_work() -> None:
    import yaml

    from catalog.models import Work

    (block,) = [
        b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S) if "slug:" in b
    ]
    work = Work.model_validate(yaml.safe_load(block))
    assert work.authors and work.venue == "arXiv" and set(work.sources) >= {"title", "authors", "code"}


def test_the_readme_expert_parallel_example_is_the_tested_one() -> None:
    """The README's torchrun example is the site's, which tests/test_site_routers.py runs on 2 processes."""
    from scripts.sitegen.pages_parallel import EXAMPLE, SIMULATE

    text = README.read_text(encoding="utf-8")
    assert f"```py\n{EXAMPLE}```" in text
    assert f"```python\n{SIMULATE}```" in text
