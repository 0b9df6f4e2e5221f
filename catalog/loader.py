"""Reading the catalog from disk and checking it as a whole.

Layout under the data directory (default ``catalog/data``)::

    taxonomy.yaml          # list of taxonomy nodes, in survey order
    works/<slug>.yaml      # one curated work per file (a new paper = one new small file)
    fetched/<slug>.json    # OpenAlex layer, written only by scripts/refresh.py
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from catalog.errors import Problem
from catalog.models import FetchedRecord, TaxonomyNode, Work

DATA_DIR = Path(__file__).resolve().parent / "data"

try:  # the C loader is ~10x faster; fall back where libyaml is missing
    _BaseLoader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _BaseLoader = yaml.SafeLoader


class _Loader(_BaseLoader):
    """Safe loader that rejects duplicate mapping keys (YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ``TextFileError`` says why not, with the line of a bad byte."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TextFileError(f"cannot read file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.start + 1].hex()
        raise TextFileError(
            f"not UTF-8 text: byte 0x{bad} at line {line}, column {column} (save the file as UTF-8)",
            line=line,
        ) from None


class TextFileError(Exception):
    """A file that cannot be read as UTF-8 text; ``line`` is set for a bad byte."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def _read_yaml(path: Path, problems: list[Problem]) -> tuple[Any, str]:
    """Parsed document and source text; the document is ``None`` after a reported problem."""
    try:
        text = read_text(path)
    except TextFileError as exc:
        problems.append(Problem(path, str(exc), line=exc.line))
        return None, ""
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or str(exc)
        problems.append(Problem(path, f"malformed YAML: {what}", line=line))
        return None, text
    if raw is None:
        problems.append(Problem(path, "file is empty"))
    return raw, text


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the value at ``loc`` in a YAML text (of the nearest ancestor found)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def locate(problem: Problem) -> Problem:
    """The problem with its line filled in from its field path, where the file is YAML and has it."""
    if problem.line is not None or not problem.field or problem.file.suffix != ".yaml":
        return problem
    try:
        text = problem.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return problem
    loc = tuple(int(part) if part.isdigit() else part for part in problem.field.split("."))
    line = _line_of(text, loc)
    return problem if line is None else dataclasses.replace(problem, line=line)


def _validation_problems(
    path: Path, exc: ValidationError, prefix: tuple[Any, ...] = (), text: str = ""
) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        field = ".".join(str(p) for p in loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        line = _line_of(text, loc) if text and loc else None
        out.append(Problem(path, msg, field=field, line=line))
    return out


def _parse(
    model: type[BaseModel],
    data: Any,
    path: Path,
    problems: list[Problem],
    prefix: tuple[Any, ...] = (),
    text: str = "",
) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(_validation_problems(path, exc, prefix, text))
        return None


def read_taxonomy(data_dir: Path, problems: list[Problem]) -> list[TaxonomyNode]:
    path = data_dir / "taxonomy.yaml"
    raw, text = _read_yaml(path, problems)
    if raw is None:
        return []
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list):
        problems.append(Problem(path, "expected a mapping with a 'nodes' list", field="nodes"))
        return []
    nodes = []
    for i, item in enumerate(raw["nodes"]):
        node = _parse(TaxonomyNode, item, path, problems, prefix=("nodes", i), text=text)
        if node is not None:
            nodes.append(node)
    return nodes


WORK_SUFFIX = ".yaml"


def read_works(data_dir: Path, problems: list[Problem]) -> dict[Path, Work]:
    works = {}
    folder = data_dir / "works"
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError as exc:
        problems.append(Problem(folder, f"cannot list the folder: {exc.strerror or exc}"))
        entries = []
    for path in entries:
        if path.name.startswith(".") or path.suffix == WORK_SUFFIX:
            continue
        hint = f"rename it to {path.stem}{WORK_SUFFIX}" if path.suffix == ".yml" else "move it elsewhere"
        problems.append(
            Problem(path, f"not a work file: works/ holds only <slug>{WORK_SUFFIX} files ({hint})")
        )
    for path in (p for p in entries if p.suffix == WORK_SUFFIX and not p.name.startswith(".")):
        raw, text = _read_yaml(path, problems)
        if raw is None:
            continue
        work = _parse(Work, raw, path, problems, text=text)
        if work is None:
            continue
        if work.slug != path.stem:
            problems.append(
                Problem(
                    path,
                    f"slug {work.slug!r} differs from the file name",
                    field="slug",
                    line=_line_of(text, ("slug",)),
                )
            )
        works[path] = work
    return works


def read_fetched(data_dir: Path, problems: list[Problem]) -> dict[Path, FetchedRecord]:
    records = {}
    for path in sorted((data_dir / "fetched").glob("*.json")):
        try:
            raw = json.loads(read_text(path))
        except TextFileError as exc:
            problems.append(Problem(path, str(exc), line=exc.line))
            continue
        except json.JSONDecodeError as exc:
            problems.append(Problem(path, f"malformed JSON: {exc.msg}", line=exc.lineno))
            continue
        rec = _parse(FetchedRecord, raw, path, problems)
        if rec is None:
            continue
        if rec.slug != path.stem:
            problems.append(Problem(path, f"slug {rec.slug!r} differs from the file name", field="slug"))
        records[path] = rec
    return records
