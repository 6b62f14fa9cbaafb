"""The project's structure as rules that fail: imports point one way (`learner → rollout, rewards → cluster`), no two
project modules import each other (directly or round a circle), and only `cluster/` hands Ray actor options.

Every import counts, also one inside a function; relative imports are resolved; `from pkg import name` counts as an
import of the submodule `pkg.name` when that is a module, else of `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "rollout", "rewards", "learner")
# Which packages each package may import besides itself; bench/ scripts sit above all of them.
ALLOWED = {"cluster": set(), "rollout": {"cluster"}, "rewards": {"cluster"},
           "learner": {"rollout", "rewards", "cluster"}}
SCANNED = PACKAGES + ("bench",)
# Calls that hand Ray an actor's resources, restarts, name or placement: only cluster/ makes them.
RAY_OPTION_CALLS = ("ray.remote", "ray.actor", ".options")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the packages and bench/."""
    found = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imported(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, project module) of every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package_of(module, path).split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import a.b.c` of a module a.b: the deepest module named
                name = name.rpartition(".")[0]
            if name.split(".")[0] in PACKAGES:
                out.append((node.lineno, name))
    return out


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_imports_point_one_way():
    wrong = []
    for module, imports in GRAPH.items():
        top = module.split(".")[0]
        if top not in ALLOWED:
            continue
        for line, target in imports:
            other = target.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                wrong.append(f"{_where(module, line)}: {module} imports {target} ({top} may import "
                             f"{', '.join(sorted(ALLOWED[top])) or 'no other package'})")
    assert not wrong, "imports against learner -> rollout, rewards -> cluster:\n" + "\n".join(wrong)


def _circles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for _, target in GRAPH[module]:
            if target == module:
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    return found


def test_no_import_circles_between_project_modules():
    described = []
    for component in _circles():
        members = set(component)
        edges = sorted({f"  {_where(m, line)}: {m} -> {t}" for m in component for line, t in GRAPH[m] if t in members})
        described.append(f"{' <-> '.join(component)}:\n" + "\n".join(edges))
    assert not described, "import circles:\n" + "\n".join(described)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_only_cluster_hands_ray_actor_options():
    found = []
    for module, path in MODULES.items():
        if module.split(".")[0] == "cluster":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            target = node.func if isinstance(node, ast.Call) else node
            name = _dotted(target)
            if not name:
                continue
            for call in RAY_OPTION_CALLS:
                if name == call or (call.startswith(".") and name.endswith(call) and isinstance(node, ast.Call)):
                    found.append(f"{_where(module, node.lineno)}: {name}")
    found = sorted(set(found))
    assert not found, "Ray actor options outside cluster/ (use cluster.pools):\n" + "\n".join(found)


def test_the_rules_see_what_they_check():
    # The scan itself: it finds the packages' modules and their imports, also those inside functions.
    assert {"cluster.config", "learner.main", "rewards.service"} <= set(MODULES)
    assert any(target == "cluster.config" for _, target in GRAPH["learner.main"])
    nested = [t for _, t in GRAPH["learner.main"] if t.startswith("learner.driver.preflight")]
    assert nested, "learner.main imports learner.driver.preflight inside a function"
