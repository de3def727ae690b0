"""The import graph of src/pagedattn has no circles and points down the layers of docs/DEVELOPING.md
(scripts/import_graph.py reads the source; nothing is imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"
# being removed (the kernels' launch parameters move out of dispatch); delete an entry once it is gone
KNOWN = {"upward: kernels.write (kernels) -> dispatch (planning) (inside a function)"}


def load():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_circles_and_every_import_points_down():
    assert [p for p in load().problems() if p not in KNOWN] == []


def test_every_module_has_a_layer():
    g = load()
    assert [m for m in g.graph() if g.layer_of(m) is None] == []
