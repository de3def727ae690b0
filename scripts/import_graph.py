"""The import graph of src/pagedattn, checked against the layering in docs/DEVELOPING.md.

    python scripts/import_graph.py            # print each module's imports, then the problems
    python scripts/import_graph.py --check    # only the problems; exit 1 if there are any

Reads the source with `ast` (imports nothing). Two checks:
- no circles among module-level imports (an import inside a function or an `if __name__ == "__main__"`
  block is deliberate laziness and is left out of the circle check, but not of the layer check);
- every import points down the layers: a module may import its own layer or lower ones, never higher.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "pagedattn"

# Lowest first. A module (or a package, by prefix) may import modules of its own layer or below.
LAYERS = [
    ("base", ["errors", "text", "tolerances", "_env"]),
    ("config", ["config", "poison"]),
    ("kernels", ["kernels"]),
    ("validation", ["validate", "options"]),
    ("data", ["batch", "checks", "cache", "reference"]),
    ("planning", ["dispatch", "planner", "platforms", "shared_prefix"]),
    ("entry points", ["attention", "ops", "compat"]),
    ("diagnosis", ["forensics", "diagnosis"]),
    ("harness", ["testing", "verify", "scenarios", "catalogue", "catalogue_run"]),
    ("tools", ["bench", "tools", "integrations"]),
    ("cli", ["cli", "__main__", "__init__"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> int | None:
    """The index of the module's layer in LAYERS; None for a module in no layer."""
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return i
    return None


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions) of pagedattn modules, as module names."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    top, lazy = set(), set()
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = package[: len(package) - node.level + 1]
            stem = ".".join(base + ([node.module] if node.module else []))
        elif node.module and node.module.startswith("pagedattn"):
            stem = node.module.removeprefix("pagedattn").lstrip(".")
        else:
            return []
        out = []
        for alias in node.names:
            sub = f"{stem}.{alias.name}" if stem else alias.name
            out.append(sub if sub in known else stem)
        return [m for m in out if m]

    def visit(node, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            # a function body or an `if __name__ == "__main__":` block runs after the module is imported
            main_block = isinstance(child, ast.If) and "__main__" in ast.unparse(child.test)
            func = in_function or main_block or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            typing_only = in_type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names: list[str] = []
            if isinstance(child, ast.ImportFrom):
                names = resolve(child)
            elif isinstance(child, ast.Import):
                names = [a.name.removeprefix("pagedattn.") for a in child.names if a.name.startswith("pagedattn.")]
            if not typing_only:
                (lazy if func else top).update(n for n in names if n != me)
            visit(child, func, typing_only)

    visit(tree, False, False)
    return top, lazy


def graph() -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def circles(g: dict[str, tuple[set[str], set[str]]]) -> list[list[str]]:
    """Each circle among module-level imports, once (Tarjan's strongly connected components)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, (set(), set()))[0]:
            if w not in g:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            strong(v)
    return out


def upward(g: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    """'a (layer) -> b (higher layer)' for every import that points up."""
    out = []
    for a, (top, lazy) in g.items():
        if layer_of(a) is None:
            continue
        for b in sorted(top | lazy):
            if b in g and layer_of(b) is not None and layer_of(b) > layer_of(a):
                how = "" if b in top else " (inside a function)"
                out.append(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]}){how}")
    return out


def problems() -> list[str]:
    g = graph()
    unlayered = [f"no layer: {m} (add it to LAYERS here and to docs/DEVELOPING.md)" for m in g if layer_of(m) is None]
    return unlayered + [f"circle: {' <-> '.join(c)}" for c in circles(g)] + [f"upward: {u}" for u in upward(g)]


def main(argv: list[str]) -> int:
    if "--check" not in argv:
        for module, (top, lazy) in graph().items():
            layer = layer_of(module)
            print(
                f"{module:28} [{'?' if layer is None else LAYERS[layer][0]}] -> {', '.join(sorted(top)) or '-'}"
                + (f"; lazily {', '.join(sorted(lazy - top))}" if lazy - top else "")
            )
    found = problems()
    for p in found:
        print(p)
    print(f"{len(found)} layering problem(s)" if found else "layering ok: no circles, every import points down")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
