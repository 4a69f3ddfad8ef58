"""The layout's rules, read from the source: imports go one way, no cycles, no hidden imports.

Layers, lowest first (docs/ARCHITECTURE.md explains each). A module may import its own layer or lower
ones, never a higher one; within a layer the import graph must still be acyclic. ``lorakit/__init__.py``
re-exports the public names and ``__main__.py`` starts the CLI, so both stand outside the order.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
LAYERS = [
    ["errors"],
    ["config", "module_paths", "peft_names"],   # peft_names: PEFT's field names and default targets
    ["layers"],
    ["modules_to_save", "state"],
    ["targeting", "plan"],
    ["inject", "adapters"],
    ["io"],
    ["tools", "hf"],     # hf: the transformers Trainer / TRL integration (reads and writes adapters)
    ["methods", "quant", "models"],
    ["train", "generate", "plotting"],   # plotting: matplotlib on first use, one way to save a figure
    ["tasks"],
    ["report"],
    ["experiments", "finetune"],
    ["serve"],
    ["cli"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
OUTSIDE = {"lorakit", "lorakit.__main__"}
CORE = ["errors", "config", "module_paths", "peft_names", "layers", "modules_to_save", "state", "targeting", "plan",
        "inject", "adapters", "io"]
DEFERRED = "deferred: heavy optional dependency"


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def lorakit_imports(tree: ast.AST, name: str, is_package: bool) -> list[tuple[str, ast.AST]]:
    """(imported lorakit module, node) for every import statement anywhere in the file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names if alias.name.startswith("lorakit")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:                            # relative import: resolve against this module
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([module] if module else []))
            if module.startswith("lorakit"):
                out += [(f"{module}.{alias.name}", node) for alias in node.names]
    return out


def resolve(target: str, known: dict) -> str:
    """The module a dotted import name refers to (``lorakit.io.save_adapter`` -> ``lorakit.io``)."""
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def top(name: str) -> str:
    return name.split(".")[1] if name.count(".") else name


@pytest.fixture(scope="module")
def graph():
    known = modules()
    edges = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        found = lorakit_imports(tree, name, path.name == "__init__.py")
        edges[name] = [(resolve(target, known), node, path) for target, node in found]
    return known, edges


def test_every_top_level_module_has_a_layer(graph):
    known, _ = graph
    missing = sorted({top(n) for n in known if n not in OUTSIDE} - set(RANK))
    assert not missing, f"add {missing} to LAYERS in this test and to docs/ARCHITECTURE.md"


def test_imports_go_one_way(graph):
    _, edges = graph
    wrong = [f"{src} (layer {RANK[top(src)]}) imports {dst} (layer {RANK[top(dst)]})"
             for src, targets in edges.items() if src not in OUTSIDE
             for dst, _, _ in targets if dst not in OUTSIDE and RANK[top(dst)] > RANK[top(src)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    _, edges = graph
    adjacency = {src: sorted({d for d, _, _ in targets if d != src and d not in OUTSIDE})
                 for src, targets in edges.items() if src not in OUTSIDE}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in adjacency.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(adjacency):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_lorakit_imports_are_at_module_top(graph):
    """An import inside a function hides a dependency (and often a cycle): only the module top."""
    _, edges = graph
    hidden = [f"{path.relative_to(SRC.parent)}:{node.lineno} imports {dst}"
              for src, targets in edges.items() for dst, node, path in targets
              if node.col_offset > 0]
    assert not hidden, "\n".join(hidden)


def test_function_level_imports_only_defer_heavy_dependencies():
    bad = []
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                window = " ".join(lines[max(node.lineno - 3, 0):node.end_lineno])
                if DEFERRED not in window:
                    bad.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    assert not bad, f"imports inside functions without '# {DEFERRED}': {bad}"


def test_core_files_are_short():
    long = [f"{p.relative_to(SRC.parent)} ({n} lines)" for p in SRC.rglob("*.py")
            if top(".".join(p.relative_to(SRC.parent).with_suffix("").parts)) in CORE
            for n in [len(p.read_text().splitlines())] if n > 400]
    assert not long, f"core files over 400 lines: {long}"

