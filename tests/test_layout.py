"""The package's layout: wings in pipeline order, no lower wing importing a higher one, no circles.

Every `import` statement counts, including those inside functions (a circle that only closes at
call time is still a circle). The package root (`rlhf/__init__.py`) is the public facade over all
wings and is left out; importing `__version__` from it is allowed anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rlhf

PACKAGE = Path(rlhf.__file__).parent

# Pipeline order: a module may import from its own rank or a lower one.
RANKS = {
    "rlhf.errors": 0,
    "rlhf.machine": 0,
    "rlhf.core": 0,
    "rlhf.data": 0,
    "rlhf.text_stats": 0,
    "rlhf.tracking": 0,
    "rlhf.trackers": 0,
    "rlhf.models": 1,
    "rlhf.task": 2,
    "rlhf.reward": 3,
    "rlhf.sft": 3,
    "rlhf.rl": 4,
    "rlhf.analysis": 5,
    "rlhf.pipeline": 6,
    "rlhf.cli": 7,
    "rlhf.cli_options": 7,
    "rlhf.cli_config": 7,
    "rlhf.__main__": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANKS[prefix]
    raise AssertionError(f"{module} belongs to no wing; add it to RANKS in this test")


def internal_imports(path: Path) -> set[str]:
    """The rlhf modules that `path` imports (`from . import x` counts as module `.x` if it is one)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rlhf"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "rlhf":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or (
                    PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
                ).exists():
                    found.add(sub)
                elif not (target == "rlhf" and alias.name == "__version__"):
                    found.add(target)
    found.discard("rlhf")
    return found


def graph() -> dict[str, set[str]]:
    return {
        module_name(p): internal_imports(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if p != PACKAGE / "__init__.py"
    }


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{mod} (rank {rank(mod)}) imports {dep} (rank {rank(dep)})"
        for mod, deps in edges.items()
        for dep in sorted(deps)
        if rank(dep) > rank(mod)
    ]


def import_circles(edges: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first search, as the circle it closes."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join(trail[trail.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return circles


def test_every_module_belongs_to_a_wing_and_imports_only_downward():
    assert not upward_imports(graph()), "\n".join(upward_imports(graph()))


def test_no_import_circles():
    assert not import_circles(graph()), "\n".join(import_circles(graph()))


def test_the_checks_catch_a_planted_upward_import_and_circle():
    edges = graph()
    assert "rlhf.models.forward" in edges["rlhf.models.policy"]  # the parser sees real imports
    planted = {**edges, "rlhf.models.forward": edges["rlhf.models.forward"] | {"rlhf.rl.trainer"}}
    assert upward_imports(planted) == [
        "rlhf.models.forward (rank 1) imports rlhf.rl.trainer (rank 4)"
    ]
    # rl.trainer imports models.forward, so the planted edge also closes a circle.
    assert any("rlhf.models.forward -> rlhf.rl.trainer" in c for c in import_circles(planted))
