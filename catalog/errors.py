"""Problems found while loading the catalog, each tied to a file (and field or line when known)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One problem in the catalog files."""

    file: Path
    message: str
    field: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f" [{self.field}]"
        return f"{where}: {self.message}"


class CatalogError(Exception):
    """Raised by ``catalog.load()`` when the files do not form a valid catalog.

    ``problems`` lists every problem found, not just the first.
    """

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the catalog:\n{lines}")
