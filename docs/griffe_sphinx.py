"""Griffe extension: render the Sphinx markup our Google-style docstrings use.

The docstrings follow PyTorch's habit of Sphinx roles (``:func:`tt_svd```) and the
``.. math::`` directive, which read well in an editor. For the site, this rewrites them
into mkdocstrings' Markdown at load time, so the source stays the single copy:

- ``:func:`name```, ``:meth:``, ``:class:``, ``:attr:``, ``:mod:``, ``:exc:``, ``:data:``
  become autorefs cross-references ``[`name`][name]``, resolved by mkdocstrings' scoped
  cross-references (so ``:meth:`round``` inside ``TTLinear`` finds ``TTLinear.round``).
  A target that does not resolve is a warning, hence an error under ``mkdocs build --strict``.
  A private target (a ``_name`` anywhere in the path) is not in the reference and stays code.
  ``~prefix.name`` shows only ``name``, as in Sphinx.
- A ``.. math::`` directive and its indented block become a ``$$ ... $$`` display, rendered
  by MathJax through ``pymdownx.arithmatex``.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|attr|mod|exc|data|obj):`(~?)([\w.]+)(?:\(\))?`")


_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
        return f"`{shown}`"  # private names are not in the reference: code, not a link
    return f"[`{shown}`][{target}]"


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    k = 0
    while k < len(lines):
        line = lines[k]
        stripped = line.lstrip()
        if not stripped.startswith(".. math::"):
            out.append(line)
            k += 1
            continue
        indent = len(line) - len(stripped)
        body: list[str] = []
        inline = stripped[len(".. math::") :].strip()
        if inline:
            body.append(inline)
        k += 1
        while k < len(lines) and (
            not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) > indent
        ):
            body.append(lines[k])
            k += 1
        while body and not body[-1].strip():
            body.pop()  # the blank line after the block belongs to the text
        math = textwrap.dedent("\n".join(body)).strip("\n")
        pad = " " * indent
        out.extend([pad + "$$", *(pad + m for m in math.splitlines()), pad + "$$", ""])
    return "\n".join(out)


class SphinxMarkup(griffe.Extension):
    """Rewrite Sphinx roles and ``.. math::`` in every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        value = _ROLE.sub(_role, obj.docstring.value)
        # Google style's "Examples:" section renders ">>>" lines as code; our docstrings say
        # "Example:", which griffe would read as an admonition of Markdown text.
        value = _EXAMPLE.sub(r"\1Examples:", value)
        obj.docstring.value = _math_blocks(value)
