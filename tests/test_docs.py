"""The documentation cannot rot: its code runs in the test suite.

- Every ```` ```python ```` block of ``docs/*.md`` and ``README.md`` runs. The blocks of one
  page run in order in one fresh namespace (a page reads as one script), with the torch seed
  set and a temporary working directory. To show Python that must not run (keep it rare), put
  the HTML comment ``<!-- docs-test: skip -->`` on the line right before the fence; it renders
  as nothing. Other fences (``bash``, ``text``) are not run.
- Every ``>>>`` example in the docstrings of the ``ttlayers`` modules passes as a doctest.
- The core-chain figure is what ``docs/gen_core_chain.py`` draws now.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import runpy
import textwrap
from pathlib import Path

import pytest
import torch
from torch_versions import needs_export

import ttlayers

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("**/*.md")), ROOT / "README.md"]
SKIP = "<!-- docs-test: skip -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each runnable ```` ```python ```` block, in page order."""
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    k = 0
    while k < len(lines):
        match = FENCE.match(lines[k])
        if not match:
            k += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].split()
        start = k + 1
        end = start
        while end < len(lines) and not re.match(
            rf"^{indent}{fence[0]}{{{len(fence)},}}\s*$", lines[end]
        ):
            end += 1
        language = info[0].lstrip(".").lower() if info else ""
        skipped = k > 0 and lines[k - 1].strip() == SKIP
        if language in ("python", "py") and not skipped:
            code = textwrap.dedent("\n".join(lines[start:end]))
            blocks.append((start + 1, code))
        k = end + 1
    return blocks


def test_python_blocks_are_found() -> None:
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            SKIP,
            "```python",
            "raise SystemExit",
            "```",
            "```bash",
            "exit 1",
            "```",
            "!!! note",
            "    ```python",
            "    b = a + 1",
            "    ```",
        ]
    )
    assert [code for _, code in python_blocks(text)] == ["a = 1", "b = a + 1"]


# The quick start exports a model with a dynamic batch.
PAGE_PARAMS = [
    pytest.param(page, marks=needs_export) if page.name == "quickstart.md" else page
    for page in PAGES
]


@pytest.mark.parametrize("page", PAGE_PARAMS, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks:
        name = f"{page.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, name, "exec"), namespace)  # the docs' own code
        except Exception as error:
            raise AssertionError(f"the python block at {name} failed: {error!r}") from error


MODULES = sorted(
    f"ttlayers.{m.name}"
    for m in pkgutil.iter_modules(ttlayers.__path__)
    if not m.name.startswith("_")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    report: list[str] = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, module_name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_core_chain_figure_is_current() -> None:
    script = runpy.run_path(str(ROOT / "docs" / "gen_core_chain.py"))
    expected = (ROOT / "docs" / "img" / "core-chain.svg").read_text(encoding="utf-8")
    assert script["draw"]() == expected, "rerun: python docs/gen_core_chain.py"
