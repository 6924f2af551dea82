"""The architecture, checked: imports run one way through the layers, every module says what it is.

The layers (README "Architecture", DESIGN §1):

    app (opmasd.app, __main__, config, logging, systemd clients, instance lock, directories)
     → api (gRPC servicer, converters, NATS manager API)      knows the manager's surface and core
     → manager                                                knows the backends' interfaces only
     → runtime | store | bus                                  know core, never each other
     → core                                                   knows nothing else of opmasd

opmasd.testing holds in-memory backends: it may use what the backends may, plus their
interfaces. opmasctl knows only the shared `opmas` package (generated stubs, shared rules);
`opmas` knows neither opmasd nor opmasctl.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("opmasd", "opmasctl", "opmas")
GENERATED = ROOT / "opmas" / "v1"
# What each layer may import of opmasd/opmasctl/opmas, as module-name prefixes. A module may
# always import its own package (opmasd.bus.x → opmasd.bus.y).
BACKEND_INTERFACES = ("opmasd.store.base", "opmasd.runtime.base", "opmasd.bus.base")
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": ("opmas",),
    "store": ("opmas", "opmasd.core"),
    "runtime": ("opmas", "opmasd.core"),
    "bus": ("opmas", "opmasd.core"),
    "testing": ("opmas", "opmasd.core", *BACKEND_INTERFACES),
    "manager": ("opmas", "opmasd.core", *BACKEND_INTERFACES),
    # The api edge takes the manager's curated surface (opmasd/manager/__init__.py), not its insides.
    "api": ("opmas", "opmasd.core", "opmasd.manager="),
    "app": ("opmas", "opmasd"),
    "opmasctl": ("opmas",),
    "opmas": (),
}
# The top layer, by name: a new subpackage of opmasd must be given a layer on purpose.
APP_MODULES = frozenset({"app", "__main__", "config", "logging", "systemd", "instance_lock", "directories"})
DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})
MAX_MODULE_LINES = 450


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "opmasctl":
        return "opmasctl"
    if parts[0] == "opmas":
        return "opmas"
    if len(parts) == 1:
        return "core"  # opmasd/__init__.py: the version, nothing else
    sub = parts[1]
    if sub in ALLOWED:
        return sub
    return "app" if sub in APP_MODULES else "unknown"


def sources() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if GENERATED not in path.parents
    )


def edges(path: Path, root: Path = ROOT) -> list[Edge]:
    """Every use of our own packages in the module, at any depth (functions, TYPE_CHECKING):
    import statements, importlib.import_module / __import__ / exec of a string, and attribute
    chains through an imported package (`import opmasd.manager as m; m.registry`)."""
    importer = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return list(dict.fromkeys(_edges_in(tree, importer, path.name == "__init__.py", root)))


def _edges_in(tree: ast.AST, importer: str, is_package: bool, root: Path) -> list[Edge]:
    found: list[Edge] = []
    aliases: dict[str, str] = {}  # local name -> module it is bound to

    def add(name: str, line: int) -> None:
        if name.split(".")[0] in PACKAGES:
            found.append(Edge(importer, name, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    aliases[head] = head
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = importer.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from opmasd.manager import AgentManager` imports the package; `from opmasd.core
                # import errors` a module of it: count whichever of the two it is.
                full = f"{base}.{alias.name}"
                if _is_module(full, root):
                    add(full, node.lineno)
                    aliases[alias.asname or alias.name] = full
                elif base == "opmasd" and alias.name == "__version__":
                    add("opmasd.__version__", node.lineno)
                else:
                    add(base, node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            text = node.args[0].value
            if not isinstance(text, str):
                continue
            if name in DYNAMIC_IMPORTERS:
                add(text, node.lineno)
            elif name in ("exec", "eval", "compile"):
                try:
                    inner = ast.parse(text)
                except SyntaxError:
                    continue
                found += [
                    Edge(importer, e.imported, node.lineno)
                    for e in _edges_in(inner, importer, is_package, root)
                ]
    # Attribute chains through an alias: the longest prefix that is a module of ours.
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain: list[str] = []
            current: ast.expr = node
            while isinstance(current, ast.Attribute):
                chain.insert(0, current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id in aliases:
                dotted = aliases[current.id]
                for attr in chain:
                    if not _is_module(f"{dotted}.{attr}", root):
                        break
                    dotted = f"{dotted}.{attr}"
                if dotted != aliases[current.id]:
                    add(dotted, node.lineno)
                elif dotted == "opmasd" and chain:
                    add(
                        f"opmasd.{chain[0]}" if chain[0] != "__version__" else "opmasd.__version__",
                        node.lineno,
                    )
    return found


def _is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def allowed(edge: Edge) -> bool:
    importer, imported = edge.importer, edge.imported
    if importer == "opmasd":
        return False  # the package root must stay import-free...
    if imported == "opmasd.__version__" and importer.startswith("opmasd."):
        return True  # ...so that any layer may read its __version__, and nothing else through it
    layer = layer_of(importer)
    if layer == "unknown":
        return False
    own = ".".join(importer.split(".")[:2]) if layer not in ("opmasctl", "opmas") else layer
    if imported == own or imported.startswith(own + "."):
        return True
    for rule in ALLOWED[layer]:
        if rule.endswith("="):
            if imported == rule[:-1]:
                return True
        elif imported == rule or imported.startswith(rule + "."):
            # `opmas` (the shared package) must not let opmasd or opmasctl in by prefix.
            if rule == "opmas" and imported.split(".")[0] != "opmas":
                continue
            return True
    return False


def back_edges() -> list[str]:
    wrong = []
    for path in sources():
        for edge in edges(path):
            if not allowed(edge):
                wrong.append(
                    f"{path.relative_to(ROOT)}:{edge.line}: {edge.importer} ({layer_of(edge.importer)}) "
                    f"imports {edge.imported} ({layer_of(edge.imported)})"
                )
    return wrong


def test_imports_run_one_way_through_the_layers() -> None:
    wrong = back_edges()
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_back_edge() -> None:
    """The checker itself: an edge from a lower layer into a higher one is reported."""
    store_into_manager = Edge("opmasd.store.sql", "opmasd.manager", 1)
    api_into_bus = Edge("opmasd.api.grpc_servicer", "opmasd.bus.connection", 1)
    api_into_manager_insides = Edge("opmasd.api.grpc_servicer", "opmasd.manager.registry", 1)
    manager_into_concrete_store = Edge("opmasd.manager.operations", "opmasd.store.sql", 1)
    core_into_anything = Edge("opmasd.core.model", "opmasd.config", 1)
    bus_into_store = Edge("opmasd.bus.connection", "opmasd.store.base", 1)
    cli_into_daemon = Edge("opmasctl.cli", "opmasd.config", 1)
    root_into_anything = Edge("opmasd", "opmasd.core", 1)
    unknown_layer = Edge("opmasd.helpers.x", "opmasd.store.sql", 1)
    through_the_root = Edge("opmasd.runtime.usage", "opmasd", 1)
    for edge in (
        store_into_manager,
        api_into_bus,
        api_into_manager_insides,
        manager_into_concrete_store,
        core_into_anything,
        bus_into_store,
        cli_into_daemon,
        root_into_anything,
        unknown_layer,
        through_the_root,
    ):
        assert not allowed(edge), edge
    for edge in (
        Edge("opmasd.api.grpc_servicer", "opmasd.manager", 1),
        Edge("opmasd.manager.operations", "opmasd.store.base", 1),
        Edge("opmasd.app", "opmasd.bus.connection", 1),
        Edge("opmasctl.cli", "opmas.v1.agents_pb2", 1),
        Edge("opmasd.api.nats_api", "opmasd.__version__", 1),
        Edge("opmas.local", "opmas.units", 1),
    ):
        assert allowed(edge), edge


def test_relative_and_nested_imports_are_seen(tmp_path: Path) -> None:
    package = tmp_path / "opmasd" / "store"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    module = package / "sql.py"
    for sub in ("manager", "api", "bus", "config"):
        (tmp_path / "opmasd" / sub).mkdir()
        (tmp_path / "opmasd" / sub / "__init__.py").write_text("")
    (tmp_path / "opmasd" / "manager" / "registry.py").write_text("")
    module.write_text(
        "import importlib\nimport opmasd\nimport opmasd.manager as m\n"
        "from . import base\nfrom ..manager import AgentManager\n"
        "def f():\n    import opmasd.api.grpc_servicer\n"
        "if TYPE_CHECKING:\n    from opmasd.bus.connection import NatsBus\n"
        "importlib.import_module('opmasd.config')\n"
        "exec('from opmasd.bus import x')\n"
        "m.registry.AgentRegistry\n"
        "opmasd.config\n"
    )
    found = {e.imported for e in edges(module, tmp_path)}
    expected = {
        "opmasd.store",
        "opmasd.manager",
        "opmasd.api.grpc_servicer",
        "opmasd.bus.connection",
        "opmasd.config",
        "opmasd.bus",
        "opmasd.manager.registry",
        "opmasd",
    }
    assert expected <= found, expected - found
    assert not allowed(Edge("opmasd.store.sql", "opmasd.manager", 2))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_opens_with_the_one_idea_it_holds(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.splitlines()[0].strip(), f"{path.relative_to(ROOT)} has no docstring"
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, (
        f"{path.relative_to(ROOT)} has {lines} lines: a module past ~400 lines holds two ideas"
    )
