"""MkDocs hook: generate the body of ``docs/api.md`` from the package's ``__all__`` lists.

The API reference is rendered by mkdocstrings from the docstrings; this hook only decides
*what* to render, so that a new public name or module shows up without editing the page:

- a table of ``ttlayers.__all__``, each name linked to its entry;
- one section per public module (``ttlayers.<name>``, no leading underscore), with the
  module docstring and every name in the module's ``__all__``.

Modules come in reading order (``_ORDER``), then any others alphabetically. Registered in
``mkdocs.yml`` under ``hooks:``; ``api.md`` holds the marker ``<!-- api-reference -->``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from typing import Any

MARKER = "<!-- api-reference -->"
_ORDER = (
    "linear",
    "surgery",
    "decomposition",
    "calibration",
    "capture",
    "budget",
    "contraction",
    "planner",
    "autograd",
    "shapes",
    "init",
)


def _modules() -> list[str]:
    import ttlayers

    found = [m.name for m in pkgutil.iter_modules(ttlayers.__path__) if not m.name.startswith("_")]
    known = [name for name in _ORDER if name in found]
    return known + sorted(set(found) - set(known))


_ROLE = re.compile(r":[a-z]+:`~?([\w.]+)`")


def _summary(obj: object) -> str:
    """The first paragraph of the docstring, one line, Sphinx roles shown as code."""
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return _ROLE.sub(r"`\1`", first).replace("|", "\\|")


def api_reference() -> str:
    """The Markdown that replaces the marker: the export table and one section per module."""
    import ttlayers

    lines = ["| Name | What it is |", "| --- | --- |"]
    for name in ttlayers.__all__:
        if name == "__version__":
            continue
        obj = getattr(ttlayers, name)
        lines.append(f"| [`ttlayers.{name}`][ttlayers.{name}] | {_summary(obj)} |")
    lines.append("")
    for name in _modules():
        module = importlib.import_module(f"ttlayers.{name}")
        members = [m for m in getattr(module, "__all__", []) if not m.startswith("_")]
        lines += [
            f"::: ttlayers.{name}",
            "    options:",
            f"      members: [{', '.join(members)}]" if members else "      members: false",
            "",
        ]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Expand the marker on the API page."""
    if page.file.src_uri == "api.md":
        return markdown.replace(MARKER, api_reference())
    return markdown
