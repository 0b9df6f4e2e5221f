#!/usr/bin/env python3
"""Build or serve the MoE Atlas site.

  build   generate the catalog and router pages (site/generated/) and build the site (public/)
  serve   build, then serve the built site on http://127.0.0.1:8000 until Ctrl-C

Examples:
  python scripts/site.py build
  python scripts/site.py serve --port 8001
  python scripts/site.py build --data-dir tests/site_fixtures/tiny --out /tmp/site --staging /tmp/docs
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import functools
import http.server
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("site")


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="catalog data folder (default: catalog/data)")
    p.add_argument("--out", type=Path, default=REPO / "public", help="output folder (default: public/)")
    p.add_argument(
        "--staging",
        type=Path,
        default=None,
        help="build from a copy of site/ in this folder instead of writing site/generated/ "
        "(lets several builds run at once)",
    )
    p.add_argument(
        "--no-measure", action="store_true", help="skip running the routers for 'measured behaviour'"
    )
    p.add_argument("--no-strict", action="store_true", help="do not fail on MkDocs warnings")
    p.add_argument("-v", "--verbose", action="store_true", help="show MkDocs' debug messages")


def _build(args: argparse.Namespace) -> Path:
    import catalog
    from scripts.sitegen.build import build_site, stage

    try:
        cat = catalog.load(args.data_dir)
    except catalog.CatalogError as exc:
        raise SystemExit(f"error: cannot build the site: {exc}") from None
    docs_dir = stage(args.staging) if args.staging else None
    result = build_site(
        cat,
        site_dir=args.out.resolve(),
        docs_dir=docs_dir,
        strict=not args.no_strict,
        measure=not args.no_measure,
        progress=sys.stderr.isatty(),
    )
    log.info(
        "built %d generated pages into %s (routers %.1f s, generation %.1f s, MkDocs %.1f s)",
        sum(f.endswith(".md") for f in result.generated.files),
        result.site_dir,
        result.routers_s,
        result.generate_s,
        result.mkdocs_s,
    )
    return result.site_dir


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.debug(format, *args)


def _serve(site_dir: Path, host: str, port: int) -> None:
    handler = functools.partial(_QuietHandler, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer((host, port), handler)
    url = f"http://{host}:{server.server_address[1]}/"
    print(f"MoE Atlas is served at {url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="site.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate the pages and build the site")
    _add_build_args(b)
    s = sub.add_parser("serve", help="build, then serve the built site on 127.0.0.1")
    _add_build_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    s.add_argument("--no-build", action="store_true", help="serve the existing output without rebuilding")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)-7s - %(message)s",
    )
    if not args.verbose:
        for noisy in ("mkdocs.plugins", "mkdocs.structure", "mkdocs_autorefs", "markdown_exec"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    from mkdocs.exceptions import Abort

    try:
        if args.command == "serve" and args.no_build:
            if not (args.out / "index.html").exists():
                raise SystemExit(f"error: {args.out} holds no built site; run without --no-build")
            site_dir = args.out
        else:
            site_dir = _build(args)
    except Abort as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:  # disk full, permission denied, a symlink loop: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        log.error("cannot build the site: %s%s", where, exc.strerror or exc)
        return 1
    if args.command == "serve":
        _serve(site_dir, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
