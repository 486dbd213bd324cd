"""mkdocs hook: the API page rendered from the OpenAPI document of the app itself, made at
build time (no running site: the app is assembled around a stand-in that has only settings),
and the document published beside it as ``openapi.json``. Nothing to keep in sync by hand.

Also: sections included from deploy/README.md link to each other by anchor (``#backup-and-restore``);
here those sections live on different pages, so such links are pointed at the page that has them."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]

MARKER = "<!-- openapi -->"
_doc: dict | None = None


class _Anything:
    """Whatever the app asks a stand-in site for while it is assembled (never while serving:
    the document is all that is used)."""

    def __getattr__(self, name: str) -> "_Anything":
        return _Anything()

    def __call__(self, *args, **kwargs) -> "_Anything":
        return _Anything()


class _StandIn(_Anything):
    def __init__(self, **known) -> None:
        self.__dict__.update(known)


def _openapi() -> dict:
    global _doc
    if _doc is None:
        with warnings.catch_warnings():  # libraries' deprecation notes are not the reader's business
            warnings.simplefilter("ignore")
            # the odst of this checkout, whatever environment runs mkdocs (not at import time:
            # mkdocs takes its own sys.path entry for the hook back off the front afterwards)
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            from odst.config import Settings
            from odst.gateway.app import create_app

            app = create_app(_StandIn(settings=Settings(), id="docs"))
            _doc = app.openapi_schema.to_schema()
    return _doc


def on_files(files, config):
    files.append(File.generated(config, "openapi.json", content=json.dumps(_openapi(), indent=2)))
    return files


def _cell(text: str) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _render(doc: dict) -> str:
    out = [f"Generated from **{doc['info']['title']} {doc['info']['version']}** "
           f"(OpenAPI {doc['openapi']}); the whole document: [openapi.json](openapi.json). "
           "A running site serves the same at `/schema/openapi.json`.", ""]
    groups: dict[str, list[tuple[str, str, dict]]] = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method in ("get", "put", "post", "patch", "delete", "head"):
                tag = (op.get("tags") or [path.split("/")[3] if path.startswith("/api/v1/") else "site"])[0]
                groups.setdefault(tag, []).append((method.upper(), path, op))
    for tag in sorted(groups):
        out += [f"### {tag}", "", "| method | path | operation | answers | what |", "|---|---|---|---|---|"]
        for method, path, op in sorted(groups[tag], key=lambda r: (r[1], r[0])):
            codes = ", ".join(sorted(op.get("responses", {})))
            what = op.get("summary") or op.get("description") or ""
            out.append(f"| {method} | `{path}` | `{op.get('operationId', '')}` | {codes} | {_cell(what)} |")
        out.append("")
    return "\n".join(out)


# anchor of an included section -> the page that includes it
ANCHOR_PAGES = {
    "nats-permissions": "security.md",
    "recovery-from-peers-no-backup-key-kept": "backup.md",
    "backup-and-restore": "backup.md",
    "single-linux-server": "install.md",
    "docker-compose": "install.md",
    "several-sites": "sites.md",
}


INCLUDE = re.compile(r'^--8<-- "([^":]+)(?::([a-z][-_0-9a-z]*))?"$', re.M)
SECTION_MARK = re.compile(r"^.*--8<-- \[(start|end):([a-z][-_0-9a-z]*)\].*\n?", re.M)


def _include(m: re.Match, root: Path) -> str:
    """``--8<-- "FILE"`` or ``--8<-- "FILE:section"`` (between ``--8<-- [start:section]`` and
    ``[end:section]`` lines of FILE, relative to the repository): the text, markers removed.
    Done here rather than by pymdownx.snippets so the included links can be pointed (below)."""
    path, section = root / m.group(1), m.group(2)
    if not path.is_file():
        raise PluginError(f"included file not found: {m.group(1)}")
    text = path.read_text(encoding="utf-8")
    if section:
        start, end = f"--8<-- [start:{section}]", f"--8<-- [end:{section}]"
        if start not in text or end not in text:
            raise PluginError(f"section {section!r} not found in {m.group(1)}")
        text = text.split(start, 1)[1].split("\n", 1)[1].split(end, 1)[0].rsplit("\n", 1)[0]
    return SECTION_MARK.sub("", text).strip("\n")


def on_page_markdown(markdown, page, config, files):
    root = Path(config["config_file_path"]).parent
    markdown = INCLUDE.sub(lambda m: _include(m, root), markdown)
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _render(_openapi()))

    def point(m: re.Match) -> str:
        target = ANCHOR_PAGES.get(m.group(1))
        if target is None or target == page.file.src_uri:
            return m.group(0)
        return f"]({target}#{m.group(1)})"
    return re.sub(r"\]\(#([a-z0-9-]+)\)", point, markdown)
