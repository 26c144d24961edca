"""The layout's rules, read from the source: imports run downward only, Flower stays at the
edge, and an import inside a function says why it is lazy."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the installed package name of each top-level source folder (pyproject's package-dir)
FOLDERS = {
    "fedlora": "fedlora",
    "strategies": "fedlora.strategies",
    "server": "fedlora.server",
    "client": "fedlora.client",
}
# lowest first; a module may import its own layer and the ones below it
LAYERS = [
    ("base", ("fedlora", "fedlora.errors", "fedlora.untrusted")),
    ("config", ("fedlora.config",)),
    ("ml", ("fedlora.ml",)),
    ("strategies", ("fedlora.strategies",)),
    ("io", ("fedlora.io",)),
    ("flower edge", ("fedlora.flower", "fedlora.server", "fedlora.client")),
    ("deploy", ("fedlora.deploy",)),
    ("cli", ("fedlora.cli",)),
]
FLOWER_FROM = "flower edge"  # the lowest layer that may import flwr


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if folder == "fedlora" and name.split(".")[1:2] in (["strategies"], ["server"], ["client"]):
                continue
            found[name] = path
    return found


def layer_of(module: str) -> int:
    best, index = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index >= 0, f"{module} is in no layer"
    return index


def imports(path: Path) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, imported module, inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((child, alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = (
                    [f"{child.module}.{a.name}" for a in child.names] if child.module == "fedlora" else [child.module]
                )
                found.extend((child, name, nested) for name in names)
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_module_sits_in_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_run_downward_only():
    upward = []
    for name, path in modules().items():
        own = layer_of(name)
        for stmt, target, _ in imports(path):
            if target.startswith("fedlora") and layer_of(target) > own:
                upward.append(
                    f"{path.relative_to(ROOT)}:{stmt.lineno} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "\n".join(upward)


def test_flower_is_imported_at_the_edge_only():
    edge = [i for i, (label, _) in enumerate(LAYERS) if label == FLOWER_FROM][0]
    inside = []
    for name, path in modules().items():
        if layer_of(name) < edge:
            inside += [
                f"{path.relative_to(ROOT)}:{s.lineno}"
                for s, target, _ in imports(path)
                if target.split(".")[0] == "flwr"
            ]
    assert not inside, "flwr imported below the Flower edge: " + ", ".join(inside)


def test_an_import_inside_a_function_says_why():
    silent = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        for stmt, _, nested in imports(path):
            text = " ".join(lines[stmt.lineno - 2 : stmt.end_lineno])
            if nested and "# lazy:" not in text:
                silent.append(f"{path.relative_to(ROOT)}:{stmt.lineno}")
    assert not silent, "imports inside functions without a '# lazy: why' comment: " + ", ".join(sorted(set(silent)))


def test_the_checker_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from fedlora.cli import main  # lazy: test\n")
    found = imports(probe)
    assert [(t, n) for _, t, n in found] == [("os", False), ("fedlora.cli", True)]
    assert layer_of("fedlora.cli") > layer_of("fedlora.ml.training") > layer_of("fedlora.config")


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these: " + ", ".join(long)
