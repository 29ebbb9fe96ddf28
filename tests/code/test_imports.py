"""No import circle between moecl's modules: every module's top-level imports (those a plain
``import`` runs; not the ones inside functions or under ``TYPE_CHECKING``) form a graph without
cycles, so any module imports first and alone."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[2] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, ast.Import | ast.ImportFrom | ast.If | ast.Try) else []:
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                found.add(sub.module)
                found |= {f"{sub.module}.{a.name}" for a in sub.names}
    targets = {name for name in found if name in modules}
    for name in list(targets):  # importing a.b.c runs a and a.b first
        parts = name.split(".")
        targets |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules}
    return targets


def test_moecl_modules_import_without_a_cycle():
    files = {_module(p): p for p in (SRC / "moecl").rglob("*.py")}
    graph = {name: _top_level_imports(path, set(files)) - {name} for name, path in files.items()}
    # A module's own packages are already being imported when it runs (Python has them, partly
    # initialised, in sys.modules): an edge to one of them is no circle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_moecl_packages_depend_on_each_other_without_a_cycle():
    """One level up: the packages (training, methods, reports, ...) form layers too, so a reader
    finds what a package depends on below it and never the package that uses it."""
    files = {_module(p): p for p in (SRC / "moecl").rglob("*.py")}
    packages: dict[str, set[str]] = {}
    for name, path in files.items():
        own = name.split(".")[1] if name.count(".") else None
        if own is None:
            continue  # the root package re-exports lazily, inside a function
        targets = {t.split(".")[1] for t in _top_level_imports(path, set(files)) if t.count(".")}
        packages.setdefault(own, set()).update(targets - {own})

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in packages.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(p for p in packages if p in reach(p))
    assert not circles, f"packages in an import circle: {circles} ({ {p: sorted(packages[p]) for p in circles} })"


def test_the_package_exports_what_a_custom_training_loop_needs_without_importing_torch_first():
    import subprocess
    import sys

    script = (
        "import sys, moecl, moecl.config, moecl.models; "
        "assert 'torch' not in sys.modules, 'importing moecl or a config loaded torch'; "
        "print(sorted(n for n in moecl.__all__ if getattr(moecl, n) is None))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
    import moecl

    assert {"PMoEModel", "PMoEConfig", "MoSEsModel", "router_loss", "score", "RunConfig", "run"} <= set(moecl.__all__)
