"""The project's structure as rules that fail: imports point one way (`learner → rollout, rewards → cluster`; inside
learner/, the driver process → the learner ranks → the objectives), nothing but an entry point imports the driver, no
two project modules import each other (directly or round a circle), only `cluster/` hands Ray actor options, and no
code outside the objectives' registry compares an objective's name.

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
# Inside learner/: which folders each may import besides itself (learner.main is the entry point above them all).
LEARNER_PARTS = ("learner.driver", "learner.ranks", "learner.objectives")
LEARNER_ALLOWED = {"learner.driver": {"learner.ranks", "learner.objectives"},
                   "learner.ranks": {"learner.objectives"}, "learner.objectives": set()}
ENTRY_POINTS = ("learner.main", "bench")  # modules run as programs: they may import the driver
REGISTRY = "learner.objectives.registry"
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


def _part(module: str) -> str | None:
    """The learner folder a module belongs to (learner.driver, learner.ranks, learner.objectives), else None."""
    return next((part for part in LEARNER_PARTS if module == part or module.startswith(part + ".")), None)


def test_inside_learner_the_driver_imports_the_ranks_and_the_ranks_the_objectives_never_the_reverse():
    wrong = []
    for module, imports in GRAPH.items():
        own = _part(module)
        if own is None:
            continue
        for line, target in imports:
            other = _part(target)
            if target.split(".")[0] == "learner" and other is None:
                wrong.append(f"{_where(module, line)}: {module} imports {target} (an entry point)")
            elif other is not None and other != own and other not in LEARNER_ALLOWED[own]:
                wrong.append(f"{_where(module, line)}: {module} imports {target} ({own} may import "
                             f"{', '.join(sorted(LEARNER_ALLOWED[own])) or 'no other learner folder'})")
    assert not wrong, "imports against learner.driver -> learner.ranks -> learner.objectives:\n" + "\n".join(wrong)


def test_nothing_but_an_entry_point_imports_the_driver():
    wrong = [f"{_where(module, line)}: {module} imports {target}"
             for module, imports in GRAPH.items() for line, target in imports
             if _part(target) == "learner.driver" and _part(module) != "learner.driver"
             and not any(module == e or module.startswith(e + ".") for e in ENTRY_POINTS)]
    assert not wrong, "only entry points (learner.main, bench/) import learner.driver:\n" + "\n".join(wrong)


def _name_comparisons(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines of comparisons with an objective's name: a name literal (also inside a tuple, list or set) or an
    `.objective` attribute on either side of ==, !=, in, not in."""
    def mentions(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and node.value in names:
            return True
        if isinstance(node, ast.Attribute) and node.attr == "objective":
            return True
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(mentions(e) for e in node.elts)

    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(mentions(side) for side in (node.left, *node.comparators))]


def test_no_comparison_with_an_objective_name_outside_the_registry():
    from learner.objectives.registry import OBJECTIVES

    found = [f"{_where(module, line)}" for module, path in MODULES.items() if module != REGISTRY
             for line in _name_comparisons(ast.parse(path.read_text(), filename=str(path)), set(OBJECTIVES))]
    assert not found, ("an objective's name compared outside learner/objectives/registry.py (give the objective "
                       "class a property instead):\n" + "\n".join(found))


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
    assert _part("learner.ranks.actor") == "learner.ranks" and _part("learner.main") is None
    # the name scan finds each form of comparison it looks for, and nothing else
    code = ("a = cfg.learner.objective == 'x'\nb = name in ('grpo', 'z')\nc = 'awm' != kind\n"
            "d = {'nft': 1}\ne = f'{cfg.learner.objective}'\n")
    assert _name_comparisons(ast.parse(code), {"grpo", "nft", "awm"}) == [1, 2, 3]
