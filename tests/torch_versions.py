"""Skip marks for tests of features that need a newer torch than the package's floor (2.4).

Eager use is tested down to torch 2.4. Two integrations need more (the suite was run with
torch 2.4.1, 2.9.1, 2.11.0, 2.12.1 and 2.13.0, its compile and export tests with 2.6.0):

- A TTLinear that chooses its plan in one Dynamo graph (``torch.compile(fullgraph=True)``,
  strict ``torch.export``) needs torch 2.12: the plan is chosen for the example value of a
  symbolic batch size, which Dynamo can read from 2.12 on (``optimization_hint``). Before,
  Dynamo breaks the graph there; ``torch.compile`` without ``fullgraph`` still gives the
  eager results, and a layer given an explicit ``plan=`` compiles whole.
- Non-strict ``torch.export`` with a dynamic batch (and ONNX's exporter through it) needs
  ``torch.compiler.is_exporting``: present in 2.9, absent in 2.6 (2.7 and 2.8 untested, so
  skipped).
"""

import pytest
import torch


def _version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def needs_torch(major: int, minor: int, what: str) -> pytest.MarkDecorator:
    """Skip unless torch is at least ``major.minor``, naming what needs it."""
    return pytest.mark.skipif(
        _version() < (major, minor), reason=f"{what} needs torch >= {major}.{minor}"
    )


needs_whole_graph = needs_torch(2, 12, "TTLinear in one Dynamo graph (fullgraph, strict export)")
needs_export = needs_torch(2, 9, "non-strict torch.export of TTLinear (is_exporting)")
