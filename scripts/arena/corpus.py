"""The arena's corpus: real text in three domains, from Debian packages, split by document.

=======  ========================  ==================================================  =========
domain   Debian package            files                                               document
=======  ========================  ==================================================  =========
``en``   ``fortunes``              ``usr/share/games/fortunes/*`` (English)            one entry
``de``   ``fortunes-de``           ``usr/share/games/fortunes/de/*`` (German)          one entry
``py``   ``libpython3.11-stdlib``  ``usr/lib/python3.11/**/*.py`` (Python source)      one file
=======  ========================  ==================================================  =========

A fortune file holds entries separated by lines that are a lone ``%``. A document goes to the
validation split when the first byte of ``sha256(domain/path#index)`` is below 26 (about 10%),
so the split is fixed by the documents themselves, not by their order or a random state.

The model reads **bytes** (a 256-symbol vocabulary): no tokenizer to train, store or version,
bits per byte are exact and comparable across domains, and the hash router's "token id" is the
byte, which the paper's premise (a fixed map from input symbols) allows. The cost is longer
sequences for the same text than a subword vocabulary would need.

``prepare()`` downloads the packages with ``apt-get download``, extracts them with
``dpkg-deb -x``, and writes ``<domain>.train.bin`` / ``<domain>.val.bin`` (documents joined by a
blank line) and ``manifest.json`` (each package's version and sha256, each file's path, sha256,
document counts, the split rule) into the corpus directory. ``Corpus`` reads such a directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from catalog.fetched_store import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    domain: str
    package: str
    pattern: str
    kind: str  # "fortune": entries split on "%" lines; "file": the whole file is one document


SOURCES = (
    Source("en", "fortunes", "usr/share/games/fortunes/*", "fortune"),
    Source("de", "fortunes-de", "usr/share/games/fortunes/de/*", "fortune"),
    Source("py", "libpython3.11-stdlib", "usr/lib/python3.11/**.py", "file"),
)
DOMAINS = tuple(s.domain for s in SOURCES)
SEPARATOR = b"\n\n"
VALIDATION_BELOW = 26  # first sha256 byte < 26 of 256: about 10% of the documents


def is_validation(domain: str, doc_id: str) -> bool:
    return hashlib.sha256(f"{domain}/{doc_id}".encode()).digest()[0] < VALIDATION_BELOW


def fortune_entries(data: bytes) -> list[bytes]:
    """The entries of a fortune file: text between lines holding a lone ``%``."""
    entries, current = [], []
    for line in data.splitlines(keepends=True):
        if line.rstrip(b"\r\n") == b"%":
            entries.append(b"".join(current))
            current = []
        else:
            current.append(line)
    entries.append(b"".join(current))
    return [e.strip() for e in entries if e.strip()]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _matches(rel: str, pattern: str) -> bool:
    if "**" in pattern:
        head, tail = pattern.split("**", 1)
        return rel.startswith(head) and fnmatch.fnmatch(rel[len(head) :].rsplit("/", 1)[-1], "*" + tail)
    return fnmatch.fnmatch(rel, pattern) and "/" not in rel[len(pattern.rsplit("/", 1)[0]) + 1 :]


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(
            f"{cmd[0]} not found: the corpus is built from Debian packages (apt, dpkg)"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(cmd)} failed: {exc.stderr.strip() or exc}") from None


def prepare(out_dir: Path, debs_dir: Path | None = None) -> dict:
    """Download, extract and split the corpus into ``out_dir``; return the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        debs = debs_dir or tmp / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        packages, files = [], []
        parts: dict[str, dict[str, list[bytes]]] = {d: {"train": [], "val": []} for d in DOMAINS}
        for src in SOURCES:
            found = sorted(debs.glob(f"{src.package}_*.deb"))
            if not found:
                log.info("downloading %s", src.package)
                _run(["apt-get", "download", src.package], debs)
                found = sorted(debs.glob(f"{src.package}_*.deb"))
            if len(found) != 1:
                raise RuntimeError(f"expected one {src.package}_*.deb in {debs}, found {len(found)}")
            deb = found[0]
            version = deb.name.split("_")[1].replace("%3a", ":")
            packages.append(
                {"package": src.package, "version": version, "deb": deb.name, "sha256": _sha256(deb)}
            )
            root = tmp / src.package
            _run(["dpkg-deb", "-x", str(deb), str(root)], tmp)
            for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
                rel = path.relative_to(root).as_posix()
                if not _matches(rel, src.pattern) or rel.endswith(".dat"):
                    continue
                data = path.read_bytes()
                docs = fortune_entries(data) if src.kind == "fortune" else [data.strip()]
                counts = {"train": 0, "val": 0}
                for i, doc in enumerate(docs):
                    split = "val" if is_validation(src.domain, f"{rel}#{i}") else "train"
                    parts[src.domain][split].append(doc)
                    counts[split] += 1
                files.append(
                    {"domain": src.domain, "path": rel, "sha256": hashlib.sha256(data).hexdigest(), **counts}
                )
        sizes = {}
        for domain, splits in parts.items():
            for split, docs in splits.items():
                blob = SEPARATOR.join(docs)
                write_atomic(out_dir / f"{domain}.{split}.bin", blob)
                sizes[f"{domain}.{split}"] = {"documents": len(docs), "bytes": len(blob)}
    manifest = {
        "sources": [dataclasses.asdict(s) for s in SOURCES],
        "packages": packages,
        "files": files,
        "split": f"validation when sha256('<domain>/<path>#<index>')[0] < {VALIDATION_BELOW}",
        "separator": SEPARATOR.decode(),
        "sizes": sizes,
    }
    manifest["manifest_sha256"] = manifest_hash(manifest)
    write_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_sample(corpus: Path, out_dir: Path, train_bytes: int = 6000, val_bytes: int = 2000) -> dict:
    """A few-KB slice of a prepared corpus (the first bytes of each split) for the tests."""
    src = json.loads((corpus / "manifest.json").read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for domain in DOMAINS:
        for split, n in (("train", train_bytes), ("val", val_bytes)):
            blob = (corpus / f"{domain}.{split}.bin").read_bytes()[:n]
            write_atomic(out_dir / f"{domain}.{split}.bin", blob)
            sizes[f"{domain}.{split}"] = {"bytes": len(blob)}
    manifest = {
        "sample_of": src["manifest_sha256"],
        "packages": src["packages"],
        "rule": f"the first {train_bytes} bytes of each train split and {val_bytes} of each validation split",
        "sizes": sizes,
    }
    manifest["manifest_sha256"] = manifest_hash(manifest)
    write_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


class CorpusError(ValueError):
    """A corpus directory is missing or incomplete (the message names the file)."""


@dataclass
class Corpus:
    """A prepared corpus directory: per-domain byte arrays and the manifest."""

    root: Path
    manifest: dict
    train: dict[str, bytes]
    val: dict[str, bytes]

    @classmethod
    def load(cls, root: Path) -> Corpus:
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise CorpusError(f"{path}: no corpus manifest (run scripts/arena_corpus.py first)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorpusError(f"{path}: unreadable manifest: {exc}") from None
        train, val = {}, {}
        for domain in DOMAINS:
            for split, into in (("train", train), ("val", val)):
                f = root / f"{domain}.{split}.bin"
                if not f.is_file():
                    raise CorpusError(f"{f}: missing (the corpus is incomplete)")
                into[domain] = f.read_bytes()
        return cls(root, manifest, train, val)

    @property
    def manifest_sha256(self) -> str:
        return self.manifest.get("manifest_sha256", "")


def copy_sample_to(sample: Path, dest: Path) -> None:
    """Copy a committed sample (tests use it on a temporary copy)."""
    shutil.copytree(sample, dest, dirs_exist_ok=True)
