"""The three wheels `make wheels` builds: opmas-api, opmas-agent and opmas.

Each wheel's files and Requires-Dist are what we mean them to be; opmas-api installs into a fresh
venv of the distribution's Python (/usr/bin/python3) with nothing but its three dependencies,
imports there, and mypy --strict type-checks a client against its stubs (and fails one with a
type error: the stubs are read, not skipped); the SDK installs alone; a wheel-installed opmasd
lists its shipped agents. The dependency wheels come from a cache under /var/cache/opmas-tests/
keyed by their pinned versions (the dev venv's): filled once from the package index, offline after.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")
CACHE = Path(os.environ.get("OPMAS_TEST_CACHE", "/var/cache/opmas-tests")) / "wheels"
with (ROOT / "pyproject.toml").open("rb") as _file:
    PROJECT = tomllib.load(_file)["project"]
VERSION: str = PROJECT["version"]
ROOT_REQUIREMENTS = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
API_DEPENDENCIES = ("grpcio", "protobuf", "googleapis-common-protos")
SDK_DEPENDENCIES = ("nats-py", "structlog")
TYPING = ("types-grpcio", "types-protobuf")

pytestmark = pytest.mark.skipif(
    not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3 (the Python that ships)"
)

GOOD_CLIENT = """
from __future__ import annotations

import grpc
from opmas.v1 import agents_pb2, agents_pb2_grpc


def agent_names(channel: grpc.Channel) -> list[str]:
    stub = agents_pb2_grpc.AgentServiceStub(channel)
    reply: agents_pb2.ListAgentsResponse = stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=10))
    return [agent.agent_id for agent in reply.agents]
"""
# page_size is an int32: only the stubs can tell mypy so.
BAD_CLIENT = GOOD_CLIENT.replace("page_size=10", 'page_size="ten"')


def _run(argv: list[str | Path], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=clean | env, capture_output=True, text=True, timeout=300
    )


def _ok(argv: list[str | Path], cwd: Path, **env: str) -> str:
    done = _run(argv, cwd, **env)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _pip(python: Path, *args: str | Path) -> list[str | Path]:
    """This venv's pip acting on another interpreter: the fresh venvs need no pip of their own."""
    return [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check", *args]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _ok([sys.executable, ROOT / "scripts" / "build_wheels.py", out], ROOT)
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == {"opmas", "opmas_api", "opmas_agent"}
    return found


def test_make_wheels_refuses_a_version_others_cannot_depend_on(tmp_path: Path) -> None:
    done = _run(
        [sys.executable, ROOT / "scripts" / "build_wheels.py", "--version", "1.0+mine", tmp_path], ROOT
    )
    assert done.returncode != 0
    assert "--version '1.0+mine' is not a PEP 440 public version" in done.stderr
    assert not list(tmp_path.iterdir())


def test_make_wheels_leaves_one_set_in_the_output(wheels: dict[str, Path]) -> None:
    out = wheels["opmas"].parent
    (out / "opmas_api-0.0.1-py3-none-any.whl").write_bytes(b"an older build")
    (out / "other-1.0-py3-none-any.whl").write_bytes(b"not ours")
    _ok([sys.executable, ROOT / "scripts" / "build_wheels.py", out], ROOT)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(w.name for w in wheels.values()), "other-1.0-py3-none-any.whl"]
    )
    (out / "other-1.0-py3-none-any.whl").unlink()


def _fresh_venv(path: Path) -> Path:
    _ok([SYSTEM_PYTHON, "-m", "venv", "--without-pip", path], path.parent)
    return path / "bin" / "python"


@pytest.fixture(scope="module")
def dependency_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels of the API's and SDK's dependencies (and the typing stubs), at the dev venv's
    versions, for /usr/bin/python3: downloaded once into a directory named by their hash."""
    pins = sorted(
        f"{name}=={metadata.version(name)}" for name in (*API_DEPENDENCIES, *SDK_DEPENDENCIES, *TYPING)
    )
    tag = _ok([SYSTEM_PYTHON, "-c", "import sys; print(sys.implementation.cache_tag)"], ROOT).strip()
    key = hashlib.sha256("\n".join([tag, *pins]).encode()).hexdigest()[:16]
    cached = CACHE / f"deps-{tag}-{key}"
    if cached.is_dir():
        return cached
    python = _fresh_venv(tmp_path_factory.mktemp("download") / "venv")
    partial = Path(f"{cached}.partial-{os.getpid()}")
    _ok(_pip(python, "download", "-q", "-d", partial, *pins), ROOT)
    # Whole or not at all: a download cut short must not pass for the cache.
    try:
        partial.rename(cached)
    except OSError:
        if not cached.is_dir():
            raise
        shutil.rmtree(partial)  # another run filled it meanwhile, with the same pins
    return cached


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {n for n in archive.namelist() if ".dist-info/" not in n}


def _metadata(wheel: Path) -> tuple[str, set[str]]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(name).decode())
    return message["Version"], {str(Requirement(r)) for r in message.get_all("Requires-Dist") or []}


def _pinned(*names: str) -> set[str]:
    return {str(ROOT_REQUIREMENTS[name]) for name in names}


def test_opmas_api_wheel_holds_the_stubs_typed_and_the_protos(wheels: dict[str, Path]) -> None:
    stubs = ROOT / "opmas" / "v1"
    protos = sorted((ROOT / "proto" / "opmas" / "v1").glob("*.proto"))
    expected = {f"opmas/v1/{p.name}" for p in stubs.iterdir() if p.suffix in {".py", ".pyi", ".binpb"}}
    expected |= {f"opmas/v1/{p.name}" for p in protos} | {"opmas/v1/py.typed"}
    assert len(protos) >= 4
    # No opmas/__init__.py: the daemon's wheel owns it, this one only adds opmas/v1.
    assert _names(wheels["opmas_api"]) == expected
    version, requires = _metadata(wheels["opmas_api"])
    assert version == VERSION
    typing = {f'{name}; extra == "typing"' for name in TYPING}
    assert requires == _pinned(*API_DEPENDENCIES) | typing


def test_opmas_agent_wheel_is_the_sdk_alone(wheels: dict[str, Path]) -> None:
    sdk = ROOT / "agents" / "opmas_agent"
    expected = {f"opmas_agent/{p.name}" for p in sdk.glob("*.py")} | {"opmas_agent/py.typed"}
    assert _names(wheels["opmas_agent"]) == expected
    version, requires = _metadata(wheels["opmas_agent"])
    assert (version, requires) == (VERSION, _pinned(*SDK_DEPENDENCIES))


def _imports(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module)
    return {name for name in found if name.split(".")[0] not in sys.stdlib_module_names}


def test_the_declared_dependencies_cover_what_the_code_imports() -> None:
    """A new import outside these fails here, before a user's `pip install` does."""
    # google is a namespace of several distributions: google.protobuf is protobuf's.
    api = {
        ".".join(n.split(".")[: 2 if n.startswith("google.") else 1]) for n in _imports(ROOT / "opmas" / "v1")
    }
    assert api - {"opmas.v1", "opmas"} <= {
        "grpc",  # grpcio
        "google.protobuf",  # protobuf
        "google.api",  # googleapis-common-protos
        "google.rpc",
    }, api
    sdk = {n.split(".")[0] for n in _imports(ROOT / "agents" / "opmas_agent")}
    assert sdk <= {"nats", "structlog"}  # nats-py, structlog


def test_opmas_wheel_depends_on_the_two_instead_of_shipping_them(wheels: dict[str, Path]) -> None:
    names = _names(wheels["opmas"])
    assert "opmas/__init__.py" in names and "opmasd/__main__.py" in names and "opmasctl/__main__.py" in names
    assert not {n for n in names if n.startswith(("opmas/v1/", "opmas_agent/"))}
    shipped = {p.name for p in (ROOT / "agents" / "packages").iterdir() if (p / "agent.yaml").is_file()}
    assert {f"opmasd/shipped_agents/{name}/agent.yaml" for name in shipped} <= names
    assert not {n for n in names if "__pycache__" in n}
    version, requires = _metadata(wheels["opmas"])
    assert version == VERSION
    pins = {f"opmas-api=={VERSION}", f"opmas-agent=={VERSION}"}
    assert requires == pins | {str(r) for r in ROOT_REQUIREMENTS.values()}


def _distributions(python: Path, cwd: Path) -> set[str]:
    listing = "import json, importlib.metadata as m; print(json.dumps([d.name for d in m.distributions()]))"
    return {name.lower().replace("_", "-") for name in json.loads(_ok([python, "-c", listing], cwd))}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_opmas_api_installs_alone_and_mypy_checks_a_client_against_it(
    wheels: dict[str, Path], dependency_wheels: Path, scratch: Path
) -> None:
    python = _fresh_venv(scratch / "venv")
    offline = ("install", "-q", "--no-index", "--find-links", dependency_wheels)
    _ok(_pip(python, *offline, wheels["opmas_api"]), scratch)
    # Its three dependencies (and grpcio's typing-extensions), nothing of the daemon's.
    assert _distributions(python, scratch) == {"opmas-api", *API_DEPENDENCIES, "typing-extensions"}
    imported = "from opmas.v1 import agents_pb2_grpc; print(agents_pb2_grpc.__file__)"
    assert _ok([python, "-c", imported], scratch).startswith(str(scratch / "venv"))
    assert _run([python, "-c", "import opmasd"], scratch).returncode != 0

    _ok(_pip(python, *offline, f"{wheels['opmas_api']}[typing]"), scratch)
    (scratch / "mypy.ini").write_text("[mypy]\n", encoding="utf-8")
    mypy = [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini", "--no-incremental"]
    mypy += ["--python-executable", python]
    (scratch / "client.py").write_text(GOOD_CLIENT, encoding="utf-8")
    _ok([*mypy, "client.py"], scratch)
    (scratch / "bad_client.py").write_text(BAD_CLIENT, encoding="utf-8")
    done = _run([*mypy, "bad_client.py"], scratch)
    assert done.returncode == 1, done.stdout + done.stderr
    assert '"page_size"' in done.stdout and '"str"' in done.stdout, done.stdout
    assert "Found 1 error" in done.stdout, done.stdout


def test_the_sdk_installs_alone(wheels: dict[str, Path], dependency_wheels: Path, scratch: Path) -> None:
    python = _fresh_venv(scratch / "venv")
    _ok(
        _pip(python, "install", "-q", "--no-index", "--find-links", dependency_wheels, wheels["opmas_agent"]),
        scratch,
    )
    assert _distributions(python, scratch) == {"opmas-agent", *SDK_DEPENDENCIES}
    imported = "import opmas_agent; print(opmas_agent.__file__)"
    assert _ok([python, "-c", imported], scratch).startswith(str(scratch / "venv"))


def test_a_wheel_installed_opmasd_lists_its_shipped_agents(wheels: dict[str, Path], scratch: Path) -> None:
    """The three wheels without their dependencies; those come from the dev venv (appended to
    sys.path after the fresh venv's own site-packages: its code is the wheels', not the checkout's)."""
    python = _fresh_venv(scratch / "venv")
    _ok(_pip(python, "install", "-q", "--no-index", "--no-deps", *wheels.values()), scratch)
    site = Path(
        _ok([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], scratch).strip()
    )
    (site / "zz-dev-venv-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    (scratch / "opmasd.yaml").write_text("{}\n", encoding="utf-8")

    listed = _ok([scratch / "venv" / "bin" / "opmasd", "--config", "opmasd.yaml", "--list-agents"], scratch)
    lines = listed.splitlines()
    shipped = site / "opmasd" / "shipped_agents"
    assert lines[0] == f"agents directories: {shipped}, /etc/opmas/agents.d"
    expected = sorted(
        p.name
        for p in (ROOT / "agents" / "packages").iterdir()
        if (p / "agent.yaml").is_file() and p.name[0] != "_"
    )
    assert lines[1:] == [f"{name}\t{shipped / name}" for name in expected]
    assert _ok([scratch / "venv" / "bin" / "opmasd", "--version"], scratch).strip() == f"opmasd {VERSION}"
    # Each module agent's command and PYTHONPATH as this opmasd makes them: its module and the SDK
    # import (the SDK from the opmas-agent wheel; the folder from the package data).
    specs = (
        "import json; from opmasd.config.paths import default_agent_dirs; "
        "from opmasd.manager.packages.scan import scan; "
        "found = scan(default_agent_dirs()).manifests; "
        "print(json.dumps([[m.spec.command, dict(m.spec.environment)] for m in found]))"
    )
    # The last line: structlog, unconfigured here, logs the absent /etc/opmas/agents.d on stdout.
    listed_specs = json.loads(_ok([python, "-c", specs], scratch).splitlines()[-1])
    modules = [(c, e) for c, e in listed_specs if c[1:2] == ["-m"]]
    assert len(modules) == 3
    for command, environment in modules:
        assert command[0] == str(python)
        check = f"import {command[2]}, opmas_agent; print({command[2]}.__file__); print(opmas_agent.__file__)"
        imported_from = _ok([python, "-c", check], scratch, PYTHONPATH=environment["PYTHONPATH"]).splitlines()
        assert imported_from[0].startswith(str(shipped)) and imported_from[1].startswith(str(site))
    where = "import opmas.v1, opmas_agent; print(opmas.v1.__file__); print(opmas_agent.__file__)"
    assert all(line.startswith(str(site)) for line in _ok([python, "-c", where], scratch).splitlines())
    assert (site / "opmas" / "v1" / "agents.proto").is_file()
