"""The shape of the package: no module imports one that imports it back, and migrations stay put.

Imports are read from the source (every ``import`` statement, including
those inside functions, which would only hide a cycle), so the test checks
the modules as written, whatever the import order at run time.
"""

import ast
from pathlib import Path

import mailer

PACKAGE = Path(mailer.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """Return the modules of this package that module ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # "from mailer import conf" imports the module mailer.conf;
            # "from mailer.models import Message" imports mailer.models.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        elif isinstance(node, ast.Call) and _calls_import_module(node):
            # importlib.import_module("mailer.x") and import_string("mailer.x.Name") import too.
            literal = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else ""
            targets = [target for target in _prefixes(str(literal)) if target in MODULES]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


def _calls_import_module(node: ast.Call) -> bool:
    function = node.func
    called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    return called in ("import_module", "import_string", "__import__")


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)][:2]


GRAPH = {name: imported_modules(name) for name in MODULES}


def find_cycle() -> list[str] | None:
    """Return one import cycle as a list of module names, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in visiting:
            return visiting[visiting.index(name) :] + [name]
        if name in done:
            return None
        visiting.append(name)
        for target in sorted(GRAPH[name]):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(name)
        return None

    for name in sorted(GRAPH):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_the_graph_is_read_from_the_source():
    """Known edges are there, so an empty graph cannot pass the cycle test."""
    assert "mailer.models" in GRAPH["mailer"]  # inside a function
    assert "mailer.conf" in GRAPH["mailer.engine"]  # "from mailer import conf"
    assert "mailer.legacy" in GRAPH["mailer.codec"]


def test_no_module_imports_one_that_imports_it_back():
    assert find_cycle() is None, " -> ".join(find_cycle() or [])


def test_a_dynamic_import_counts_as_an_import(tmp_path):
    """importlib.import_module("mailer.engine") inside a function must not hide a cycle from this test."""
    tree = ast.parse('def f():\n    import importlib\n    return importlib.import_module("mailer.engine")\n')
    (call,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    argument = call.args[0]
    assert isinstance(argument, ast.Constant) and _calls_import_module(call)
    assert "mailer.engine" in _prefixes(str(argument.value))


def test_the_cycle_finder_finds_a_cycle():
    GRAPH["mailer.conf"].add("mailer.engine")
    try:
        assert find_cycle() is not None
    finally:
        GRAPH["mailer.conf"].discard("mailer.engine")


# What a migration may use of the live package: the storage API (its output
# format is versioned, so it does not change under a migration) and the
# exceptions it raises. Anything else a later refactor could change.
MIGRATIONS_MAY_IMPORT = {"mailer.codec", "mailer.exceptions"}


def test_migrations_import_only_the_storage_api():
    for name, imported in GRAPH.items():
        if ".migrations." in name:
            assert imported <= MIGRATIONS_MAY_IMPORT, f"{name} imports {sorted(imported - MIGRATIONS_MAY_IMPORT)}"
