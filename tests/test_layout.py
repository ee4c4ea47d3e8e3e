"""The package layout that docs/architecture.md promises: dependencies point one way (no module imports a package
above its own), there are no import cycles between packages, and every module the docs name imports."""

import ast
import importlib
import os
import pkgutil
import re

import pytest

import megamoe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.dirname(os.path.abspath(megamoe.__file__))

# lower layers first; a module may import its own layer and the layers before it (docs/architecture.md,
# "Which way dependencies point"). Packages on one line do not import each other.
LAYERS = [
    ["errors", "fileio", "console", "divergence"],
    ["config"],
    ["compat"],
    ["parallel", "formats", "data", "kernels"],
    ["ops", "construct"],
    ["layers"],
    ["moe"],
    ["model", "interchange"],
    ["eval"],
    ["training"],
    ["cli"],
    ["train", "quickstart"],
]
RANK = {name: (i, names) for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """megamoe.a.b -> a (the package or top-level module it belongs to)."""
    return module.split(".")[1]


def _imports(path: str, module: str) -> set[str]:
    """Every megamoe module `path` imports, at any depth of the file (absolute and relative imports)."""
    tree = ast.parse(open(path).read(), path)
    pkg = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("megamoe.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name == "megamoe":
                out |= {f"megamoe.{a.name}" for a in node.names}
            elif name.startswith("megamoe."):
                out.add(name)
    return out


def _modules():
    for info in pkgutil.walk_packages([PKG], "megamoe."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        yield info.name, spec.origin


def test_every_module_belongs_to_a_layer():
    units = {_unit(m) for m, _ in _modules()}
    assert units <= set(RANK), f"modules outside the layer table: {sorted(units - set(RANK))}"


def test_dependencies_point_down():
    bad = []
    for module, path in _modules():
        mine = _unit(module)
        for dep in _imports(path, module):
            theirs = _unit(dep)
            if theirs == mine:
                continue
            if RANK[theirs][0] >= RANK[mine][0]:
                bad.append(f"{module} imports {dep} ({mine} is not above {theirs})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    """Module-level import graph (imports at the top of each file) has no cycles."""
    graph = {}
    for module, path in _modules():
        tree = ast.parse(open(path).read(), path)
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        deps = set()
        for node in top.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n.startswith("megamoe."):
                    deps.add(n)
        graph[module] = {d for d in deps if d in dict(_modules()) and d != module}
    seen, stack = {}, []

    def visit(m):
        seen[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if seen.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in graph:
        if m not in seen:
            visit(m)


def _named_in_docs():
    names = set()
    for doc in [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", f)
                                                   for f in os.listdir(os.path.join(ROOT, "docs"))]:
        if not doc.endswith(".md"):
            continue
        text = open(doc).read()
        for m in re.finditer(r"`(megamoe/[\w/]+?)(?:\.py)?/?`", text):
            names.add(m.group(1).replace("/", "."))
        for m in re.finditer(r"\b(megamoe(?:\.\w+)+)\b(?![/\w])", text):
            names.add(m.group(1))
    # the compiled extensions are torch op libraries (torch.ops.megamoe), not Python modules
    return sorted(n for n in names if n.split(".")[1] not in ("_C", "_C_cuda"))


@pytest.mark.parametrize("name", _named_in_docs())
def test_every_module_named_in_the_docs_imports(name):
    """`megamoe/x/y.py` and `megamoe.x.y(.Attr)` in the docs resolve to a module (and attribute)."""
    parts = name.split(".")
    for cut in range(len(parts), 1, -1):
        mod = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is not None and not mod.startswith(e.name) and e.name != mod:
                raise  # the module exists but one of its imports is missing
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"{name}: {mod} has no attribute {attr!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{name}: no such module")
