"""The architecture, checked: imports run one way through the layers, every module says what it is.

The layers (README "Architecture", DESIGN §1):

    app (opmasd.app, __main__, config, logging, systemd clients, instance lock)
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
    return sub if sub in ALLOWED else "app"


def sources() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if GENERATED not in path.parents
    )


def edges(path: Path, root: Path = ROOT) -> list[Edge]:
    """Every import of our own packages in the module, at any depth (functions, TYPE_CHECKING)."""
    importer = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: list[Edge] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = importer.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from opmasd.manager import AgentManager` imports the package; `from opmasd.core
            # import errors` a module of it: count whichever of the two it is.
            names = [
                f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}", root) else base
                for alias in node.names
            ]
        found += [Edge(importer, name, node.lineno) for name in names if name.split(".")[0] in PACKAGES]
    return list(dict.fromkeys(found))


def _is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def allowed(edge: Edge) -> bool:
    importer, imported = edge.importer, edge.imported
    if importer == "opmasd":
        return False  # the package root must stay import-free...
    if imported == "opmasd" and importer.startswith("opmasd."):
        return True  # ...so that any layer may read its __version__
    layer = layer_of(importer)
    own = ".".join(importer.split(".")[:2]) if layer != "opmasctl" else "opmasctl"
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
    for edge in (
        store_into_manager,
        api_into_bus,
        api_into_manager_insides,
        manager_into_concrete_store,
        core_into_anything,
        bus_into_store,
        cli_into_daemon,
        root_into_anything,
    ):
        assert not allowed(edge), edge
    for edge in (
        Edge("opmasd.api.grpc_servicer", "opmasd.manager", 1),
        Edge("opmasd.manager.operations", "opmasd.store.base", 1),
        Edge("opmasd.app", "opmasd.bus.connection", 1),
        Edge("opmasctl.cli", "opmas.v1.agents_pb2", 1),
        Edge("opmasd.api.nats_api", "opmasd", 1),
    ):
        assert allowed(edge), edge


def test_relative_and_nested_imports_are_seen(tmp_path: Path) -> None:
    package = tmp_path / "opmasd" / "store"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    module = package / "sql.py"
    module.write_text(
        "from . import base\nfrom ..manager import AgentManager\n"
        "def f():\n    import opmasd.api.grpc_servicer\n"
        "if TYPE_CHECKING:\n    from opmasd.bus.connection import NatsBus\n"
    )
    found = {e.imported for e in edges(module, tmp_path)}
    assert {"opmasd.store", "opmasd.manager", "opmasd.api.grpc_servicer", "opmasd.bus.connection"} <= found
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
