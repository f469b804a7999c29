"""The import graph flows one way: no cycles between the project's modules, ``launch`` (the
shared ground floor) imports no stage package (pretrain, finetune, baselines), and the stages
import each other only downwards (``LAYERS``).

Every ``import`` / ``from ... import`` of every ``.py`` file is read with ``ast``, the ones
inside functions included (they are how cycles hide). An edge ``a -> b`` is "on a cycle" when
``b`` also reaches ``a``. There are no exceptions: ``docs/architecture.md`` shows the graph.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "pretrain", "finetune", "baselines", "benchmarks")
STAGES = ("pretrain", "finetune", "baselines")
#: package -> the project packages its library modules may import (``docs/architecture.md``).
#: finetune consumes MAE checkpoints; baselines reuse the probe and the classifier heads.
LAYERS = {
    "launch": set(),
    "pretrain": {"launch"},
    "finetune": {"launch", "pretrain"},
    "baselines": {"launch", "finetune"},
    "benchmarks": set(PACKAGES),
}
#: torch-free settings any stage may read (``mae-pretrain``'s and ``mae-baseline``'s ``probe:`` section)
CONFIG_MODULES = {"finetune.config"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The project modules ``node`` imports: ``import a.b`` -> ``a.b``; ``from a import b`` -> the
    submodule ``a.b`` when there is one, else the package ``a``; relative imports resolved."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # from the importing module's package, ``level - 1`` packages further up
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return {name for name in names if name in modules and name != module}


def import_edges() -> dict[tuple[str, str], str]:
    """``(importer, imported module) -> "file:line"`` (the first such import) between project modules."""
    modules = _modules()
    edges: dict[tuple[str, str], str] = {}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, module, path.name == "__init__.py", modules):
                    edges.setdefault((module, target), f"{path.relative_to(ROOT)}:{node.lineno}")
    return edges


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycle_edges(edges: dict[tuple[str, str], str]) -> set[tuple[str, str]]:
    """The edges ``a -> b`` with a path back from ``b`` to ``a``."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    reach = {m: _reachable(graph, m) for m in graph}
    return {(a, b) for a, b in edges if a in reach.get(b, ())}


def _report(kind: str, new: set[tuple[str, str]], edges: dict[tuple[str, str], str]) -> str:
    return f"{kind}:\n" + "\n".join(f"  {a} -> {b}  ({edges[a, b]})" for a, b in sorted(new))


def test_the_scan_sees_function_level_and_relative_imports() -> None:
    edges = import_edges()
    assert ("baselines.__main__", "baselines.run") in edges  # imported inside run_cli()
    assert ("benchmarks.baselines_table.jobs", "baselines.config") in edges  # inside run_pixels()
    assert ("launch.cli", "launch.config") in edges
    assert ("launch.trainer", "launch.dist") in edges  # from launch import dist
    modules = _modules()
    for source, module, is_package, expected in [
        ("from .config import load_config", "launch.cli", False, {"launch.config"}),
        ("from . import dist", "launch.trainer", False, {"launch.dist"}),
        ("from .loader import build_loader", "launch.data", True, {"launch.data.loader"}),
        ("from ..config import merge", "launch.data.loader", False, {"launch.config"}),
        ("import launch.data.loader, torch", "pretrain.task", False, {"launch.data.loader"}),
    ]:
        assert _targets(ast.parse(source).body[0], module, is_package, modules) == expected, source


def test_no_import_cycle() -> None:
    edges = import_edges()
    on_cycle = cycle_edges(edges)
    assert not on_cycle, _report(
        "imports on a cycle (break it: move the shared piece down, e.g. into launch/)", on_cycle, edges
    )


def test_launch_imports_no_stage_package() -> None:
    edges = import_edges()
    up = {(a, b) for a, b in edges if a.split(".")[0] == "launch" and b.split(".")[0] in STAGES}
    assert not up, _report("launch/ importing a stage package (launch is the ground floor)", up, edges)


def _entry_point(module: str) -> bool:
    """``python -m pkg`` modules: no module imports them, so they may compose the stages
    (``mae-pretrain`` pretrains, exports, then runs the linear probe)."""
    return module.split(".")[-1] == "__main__"


def test_stages_import_only_downwards() -> None:
    edges = import_edges()
    up = {
        (a, b)
        for a, b in edges
        if not _entry_point(a)
        and b not in CONFIG_MODULES
        and b.split(".")[0] not in LAYERS[a.split(".")[0]] | {a.split(".")[0]}
    }
    assert not up, _report("imports against the layers (see LAYERS; move the shared piece down)", up, edges)


def test_config_modules_import_no_torch() -> None:
    code = (
        f"import sys; import {', '.join(sorted(CONFIG_MODULES))}; "
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
