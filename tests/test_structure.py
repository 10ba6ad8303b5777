"""The package's shape: no module imports another that imports it back, directly or through a loop."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"tada_dist": REPO / "tada_dist", "tada_kernels": REPO / "kernels"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def lazy_exports(tree: ast.Module) -> dict[str, str]:
    """A package's `_EXPORTS`/`_LAZY` table: name -> relative submodule it is read from on first use."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("_EXPORTS", "_LAZY") for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def import_graph() -> dict[str, set[str]]:
    """Every import statement of every module (in functions too), resolved to the module it loads."""
    files = module_files()
    trees = {name: ast.parse(path.read_text()) for name, path in files.items()}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def resolve(package: str, name: str) -> str | None:
        """`from package import name`: a submodule, a lazily exported name's submodule, or the package."""
        if f"{package}.{name}" in files:
            return f"{package}.{name}"
        exports = lazy_exports(trees[package]) if package in trees else {}
        if name in exports:
            return package + exports[name]  # relative: ".domain" -> "tada_dist.data.domain"
        return package if package in files else None

    for name, tree in trees.items():
        is_package = files[name].name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [resolve(base, alias.name) for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_back_a_module_that_imports_it():
    graph = import_graph()
    assert "tada_dist.build" in graph["tada_dist.trainer"] and "tada_dist.evaluation" in graph["tada_dist.analysis"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
