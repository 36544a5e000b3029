"""Skip marks for tests of features that need a newer torch than the package's floor (2.5).

Eager use is tested down to torch 2.5. Two integrations need more (the suite was run with
torch 2.5.1, 2.9.1, 2.12.1, 2.13.0 and 2.14.1 on 2026-11-28, earlier with 2.4.1, 2.6.0 and
2.11.0; ``bash scripts/torch_versions.sh 2.5.1 2.14.1`` repeats such runs). Torch 2.4 was
dropped: hooks do not stop its ``nn.TransformerEncoderLayer`` from running its fused kernel
in eval mode (pytorch/pytorch#128413, fixed in 2.5). The marks test for the functions the
package uses, not for version numbers, so that versions between those tested and
development builds run what they can:

- A TTLinear that chooses its plan in one Dynamo graph (``torch.compile(fullgraph=True)``,
  strict ``torch.export``) needs ``symbolic_shapes.optimization_hint`` (torch 2.12), which
  reads the example value of a symbolic batch size, the size the plan is chosen for. Before,
  Dynamo breaks the graph there; ``torch.compile`` without ``fullgraph`` still gives the
  eager results, and a layer given an explicit ``plan=`` compiles whole.
- Non-strict ``torch.export`` with a dynamic batch (and ONNX's exporter through it) needs
  ``torch.compiler.is_exporting``: present in 2.9, absent in 2.6.
"""

import pytest
import torch
from torch.fx.experimental import symbolic_shapes


def needs(present: bool, what: str, feature: str) -> pytest.MarkDecorator:
    """Skip unless ``present``, naming what needs which torch feature."""
    return pytest.mark.skipif(not present, reason=f"{what} needs {feature}")


needs_whole_graph = needs(
    hasattr(symbolic_shapes, "optimization_hint"),
    "TTLinear in one Dynamo graph (fullgraph, strict export)",
    "torch.fx.experimental.symbolic_shapes.optimization_hint (torch >= 2.12)",
)
needs_export = needs(
    hasattr(torch.compiler, "is_exporting"),
    "non-strict torch.export of TTLinear with a dynamic batch",
    "torch.compiler.is_exporting (torch >= 2.9)",
)
