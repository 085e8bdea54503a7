"""The package's shape (issue 18): no private name imported across modules, no import cycle, no module
over 400 lines. Static (``ast``): nothing is imported or run. Imports under ``if TYPE_CHECKING:`` are
annotations only (they never run), so they are no edges."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rlsim"
MAX_LINES = 400
def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]):
    """(imported module, names taken from it) for every import of the file, top level and inside functions."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:  # `from pkg import module`: an import of that module
                    yield sub, []
                else:
                    yield base, [a.name]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> rlsim modules it imports. Importing a.b.c runs a/__init__ and a/b/__init__ first: edges too."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for m, p in known.items():
        for target, _ in imports_of(m, p, known):
            parts = target.split(".")
            for k in range(1, len(parts) + 1):
                t = ".".join(parts[:k])
                if t in known and t != m and not m.startswith(t + "."):  # a module's own parents ran already
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_private_name_crosses_a_module_boundary():
    known = modules()
    bad = [f"{m}: from {t} import {n}" for m, p in known.items() for t, names in imports_of(m, p, known)
           if t.startswith("rlsim") and t != m for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported from another module:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    found = cycles(import_graph(modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p in sorted(PKG.rglob("*.py"))
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_checks_see_what_they_look_for(tmp_path):
    """The graph and the private-name scan on a made-up package: a cycle through a function-level import,
    a package __init__ edge, and a private name (a test of the test: each check can fail)."""
    pkg = tmp_path / "rlsim" / "x"
    pkg.mkdir(parents=True)
    (tmp_path / "rlsim" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from rlsim.x.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from rlsim.x.b import _g\n    return _g\n")
    (pkg / "b.py").write_text("import rlsim.y\n\ndef _g():\n    pass\n")
    (tmp_path / "rlsim" / "y.py").write_text("from rlsim.x import a\n")
    (tmp_path / "rlsim" / "z.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import rlsim.y\n")
    known = {module_name(p, tmp_path): p for p in sorted((tmp_path / "rlsim").rglob("*.py"))}
    graph = import_graph(known)
    assert graph["rlsim.x.a"] == {"rlsim.x.b"} and graph["rlsim.y"] == {"rlsim.x", "rlsim.x.a"}
    assert cycles(graph) == [["rlsim.x", "rlsim.x.a", "rlsim.x.b", "rlsim.y"]]
    assert graph["rlsim.z"] == set()  # a TYPE_CHECKING import never runs
    names = [(m, t, n) for m, p in known.items() for t, ns in imports_of(m, p, known) for n in ns]
    assert ("rlsim.x.a", "rlsim.x.b", "_g") in names

