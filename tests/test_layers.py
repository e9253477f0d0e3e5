"""The package's layers point one way: read every import (module level and inside functions)
with `ast`, then fail on any import cycle between ringctl's modules, and on any module outside
`ringctl/commands/`, `ringctl/cli.py` and `ringctl/__main__.py` (the CLI) importing the CLI layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ringctl": ROOT / "ringctl", "ringctl_kernels": ROOT / "kernels" / "ringctl_kernels"}
PLUGIN = ROOT / "hydra_plugins" / "ringctl_launcher"


def _module_name(path: Path, package: str, base: Path) -> str:
    parts = [package, *path.relative_to(base).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            found[_module_name(path, package, base)] = path
    for path in sorted(PLUGIN.glob("*.py")):
        found[_module_name(path, "hydra_plugins.ringctl_launcher", PLUGIN)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Known modules `name` imports anywhere in its file (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` also imports a.b and a
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package_init_edge(src: str, dst: str) -> bool:
    """A package's __init__ re-exporting its own submodules is not a layering cycle."""
    return dst.startswith(src + ".")


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "ringctl.plan" in graph and "ringctl.ring.attention" in graph
    assert "ringctl.plan" in graph["ringctl.ring.schedule"]  # one known edge, so the parser works


def test_no_import_cycles() -> None:
    graph = _graph()
    pruned = {src: {dst for dst in dsts if not _is_package_init_edge(src, dst)} for src, dsts in graph.items()}
    assert _cycles(pruned) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("cli", ["ringctl.commands", "ringctl.cli"])
def test_only_the_cli_imports_the_cli(cli: str) -> None:
    graph = _graph()
    allowed = ("ringctl.commands", "ringctl.cli", "ringctl.__main__")  # the entry points
    offenders = sorted(
        src for src, dsts in graph.items()
        if not src.startswith(allowed) and any(d == cli or d.startswith(cli + ".") for d in dsts)
    )
    assert offenders == []


def test_the_planner_has_no_torch_import() -> None:
    for module in ("ringctl.plan", "ringctl.topology", "ringctl.errors"):
        tree = ast.parse(_modules()[module].read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(n == "torch" or n.startswith("torch.") for n in names), module
