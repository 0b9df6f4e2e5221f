"""Escaping and linking helpers shared by every page writer.

Text that comes from curated files or from OpenAlex is never trusted as markup:

* ``md()`` escapes it for Markdown *and* HTML, so a title such as ``<script>`` or ``*x*`` shows
  as typed and no tag, emphasis, link or math is created;
* ``h()`` escapes it for raw HTML (element text and quoted attribute values).

Links between generated pages are written as relative ``.md`` paths in Markdown (MkDocs checks
them in strict mode) and, inside raw HTML, as relative directory URLs (``href()``).
"""

from __future__ import annotations

import functools
import html
import posixpath
import re

# Characters with a meaning in Markdown or an extension (tables "|", arithmatex "$" and "\(",
# attr_list "{}", tilde/caret/mark "~^="). They are written as numeric character references, not
# backslash escapes: arithmatex reads an escaped "\(" as the start of inline math.
_MD_SPECIAL = re.compile(r"[\\`*_{}\[\]#+\-!|$~^=]")
_LEADING_NUMBER = re.compile(r"^(\d+)\.")
_WS = re.compile(r"\s+")
# Bidirectional embedding, override and isolate controls (and the directional marks): in fetched
# text they could reorder what follows them on the page (a title that reads backwards, a spoofed
# link text), so every writer removes them.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(text: object) -> str:
    """``text`` as a string without bidirectional control characters."""
    return _BIDI.sub("", str(text))


def h(text: object) -> str:
    """Escape for raw HTML text or a double-quoted attribute value."""
    return html.escape(plain(text), quote=True)


@functools.lru_cache(maxsize=1 << 17)
def _md(text: str) -> str:
    s = html.escape(_WS.sub(" ", text).strip(), quote=False)
    s = _MD_SPECIAL.sub(lambda m: f"&#{ord(m.group())};", s)
    return _LEADING_NUMBER.sub(r"\1&#46;", s)  # "1." would start a list


def md(text: object) -> str:
    """Escape for inline Markdown: the result renders as exactly ``text``, on one line.

    ``& < >`` become entities first (so ``&lt;`` in a title stays visible as typed), then every
    character Markdown or an enabled extension could interpret becomes a character reference.
    """
    return _md(plain(text))


def code(text: object) -> str:
    """An inline code span showing ``text`` verbatim (Markdown escapes its HTML itself)."""
    s = " ".join(plain(text).split())
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def fence(text: str, lang: str = "", attrs: str = "") -> str:
    """A fenced code block holding ``text`` verbatim, whatever backtick runs it contains."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    head = f"{ticks}{lang}" + (f" {attrs}" if attrs else "")
    return f"{head}\n{text.rstrip()}\n{ticks}"


def excerpt(text: str, limit: int = 300) -> str:
    """First ``limit`` characters of ``text`` cut at a word boundary, with an ellipsis if cut."""
    s = _WS.sub(" ", plain(text)).strip()
    if len(s) <= limit:
        return s
    cut = s[:limit].rsplit(" ", 1)[0].rstrip(",;:.-")
    return cut + "…"


@functools.lru_cache(maxsize=65536)
def _relpath(target: str, start: str) -> str:
    """``posixpath.relpath`` for clean docs-relative paths, without touching the file system."""
    t = [p for p in target.split("/") if p]
    s = [p for p in start.split("/") if p]
    common = 0
    while common < min(len(t), len(s)) and t[common] == s[common]:
        common += 1
    parts = [".."] * (len(s) - common) + t[common:]
    return "/".join(parts) or "."


def rel(from_doc: str, to_doc: str) -> str:
    """Relative Markdown link from one docs-relative ``.md`` path to another."""
    return _relpath(to_doc, posixpath.dirname(from_doc))


def page_url(doc: str) -> str:
    """Directory URL of a docs-relative ``.md`` path (``use_directory_urls: true``)."""
    stem = doc[: -len(".md")] if doc.endswith(".md") else doc
    if stem == "index":
        return ""
    if stem.endswith("/index"):
        return stem[: -len("index")]
    return stem + "/"


def href(from_doc: str, to: str) -> str:
    """Relative URL, for raw HTML, from the page of ``from_doc`` to a page or file.

    ``to`` is a docs-relative ``.md`` path (a page) or any other docs-relative path (a file).
    """
    base = page_url(from_doc) or "."
    target = page_url(to) if to.endswith(".md") else to
    out = _relpath(target, "" if base == "." else base)
    if to.endswith(".md"):
        out = "./" if out == "." else out + "/"
    return out
