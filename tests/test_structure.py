"""The runtime's shape (issue 28): no module of svdcache/ over 450 lines, no import circle (imports inside
functions count), no call or import of another svdcache module's underscore names, and the kernels import
neither svdcache nor diffusers."""
import ast
import os

import pytest

ROOT = os.environ.get("SVDCACHE_STRUCTURE_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 450


def _modules(pkg: str) -> dict[str, str]:
    mods = {}
    for d, _, fs in os.walk(os.path.join(ROOT, pkg)):
        for f in fs:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                name = os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


MODS = _modules("svdcache")
TREES = {m: ast.parse(open(p).read()) for m, p in MODS.items()}


def _imports(mod: str, tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base if MODS[mod].endswith("__init__.py") else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        out.update(n for n in names if n in MODS and n != mod and not mod.startswith(n + "."))
    return out


def test_no_module_is_too_long():
    long = {m: n for m, p in MODS.items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_circle():
    edges = {m: _imports(m, t) for m, t in TREES.items()}
    # a circle: a module that reaches itself through the import graph
    circles = []
    for start in edges:
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m == start:
                circles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
    assert not circles, f"modules in an import circle: {sorted(circles)}"


def test_no_cross_module_underscore_calls():
    private = {}
    for m, t in TREES.items():
        for n in ast.walk(t):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name.startswith("_") \
                    and not n.name.startswith("__"):
                private.setdefault(n.name, set()).add(m)
    bad = []
    for m, t in TREES.items():
        for n in ast.walk(t):
            if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("svdcache")):
                bad += [f"{m}: imports {a.name}" for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in private:
                v = n.func.value
                own = isinstance(v, ast.Name) and v.id in ("self", "cls") or (
                    isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super")
                if not own and private[n.func.attr] != {m}:
                    bad.append(f"{m}:{n.lineno}: calls .{n.func.attr}() of {sorted(private[n.func.attr])}")
    assert not bad, bad


@pytest.mark.parametrize("forbidden", ["svdcache", "diffusers"])
def test_kernels_import_neither_runtime_nor_diffusers(forbidden):
    for m, p in _modules("svdcache_kernels").items():
        for n in ast.walk(ast.parse(open(p).read())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else (
                [n.module or ""] if isinstance(n, ast.ImportFrom) and not n.level else [])
            assert not any(x == forbidden or x.startswith(forbidden + ".") for x in names), (m, names)
