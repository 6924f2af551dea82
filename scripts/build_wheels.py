"""Build the project's three wheels into one directory, offline: opmas-api, opmas-agent, opmas.

- opmas-api: the opmas.v1 stubs (.py, .pyi, py.typed, agents.binpb) and proto/opmas/v1/*.proto
  beside them; depends on grpcio, protobuf and googleapis-common-protos only.
- opmas-agent: the agent SDK, agents/opmas_agent (py.typed); nats-py and structlog.
- opmas: opmasd, opmasctl and opmas/ without v1, the agent packages (agents/packages) as the
  package data opmasd/shipped_agents; the project's dependencies plus opmas-api and opmas-agent
  pinned to the same version.

Each is staged into a temporary directory (packaging/python/<name>/pyproject.toml and README.md,
a VERSION file, copies of what it ships), then built by this Python's pip with --no-deps
--no-build-isolation --no-index: the running venv's setuptools, no network. The version is
pyproject.toml's unless --version gives another (a rebuilt higher version to test upgrades).

Run as `python scripts/build_wheels.py [--version V] [OUTPUT_DIR]` (default dist/); prints the
wheels' paths.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "packaging" / "python"
DISTRIBUTIONS = ("opmas-api", "opmas-agent", "opmas")
# PEP 440's public versions (no local part: a wheel that others depend on must not carry one).
_VERSION = re.compile(
    r"^([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*((a|b|rc)(0|[1-9][0-9]*))?"
    r"(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?$"
)
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "*.egg-info", "build")


def project() -> dict[str, object]:
    """The [project] table of the repository's pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        table = tomllib.load(file)["project"]
    assert isinstance(table, dict)
    return table


def project_version() -> str:
    version = project()["version"]
    assert isinstance(version, str)
    return version


def checked_version(version: str) -> str:
    if not _VERSION.match(version):
        raise SystemExit(f"build_wheels: --version {version!r} is not a PEP 440 public version (e.g. 0.1.1)")
    return version


def _stage_common(name: str, stage: Path, version: str) -> None:
    shutil.copy2(TEMPLATES / name / "pyproject.toml", stage / "pyproject.toml")
    (stage / "VERSION").write_text(version + "\n", encoding="utf-8")


def stage_api(stage: Path) -> None:
    shutil.copy2(TEMPLATES / "opmas-api" / "README.md", stage / "README.md")
    target = stage / "opmas" / "v1"
    shutil.copytree(ROOT / "opmas" / "v1", target, ignore=_IGNORED)
    for proto in sorted((ROOT / "proto" / "opmas" / "v1").glob("*.proto")):
        # Beside the stubs, as googleapis-common-protos ships google/api: the include root of
        # `import "opmas/v1/agents.proto"` is then the directory holding opmas/.
        shutil.copy2(proto, target / proto.name)
    (target / "py.typed").write_text("", encoding="utf-8")


def stage_agent(stage: Path) -> None:
    shutil.copy2(TEMPLATES / "opmas-agent" / "README.md", stage / "README.md")
    target = stage / "opmas_agent"
    shutil.copytree(ROOT / "agents" / "opmas_agent", target, ignore=_IGNORED)
    (target / "py.typed").write_text("", encoding="utf-8")


def stage_daemon(stage: Path, version: str) -> None:
    shutil.copy2(ROOT / "README.md", stage / "README.md")
    shutil.copytree(ROOT / "opmas", stage / "opmas", ignore=shutil.ignore_patterns("v1", "__pycache__"))
    shutil.copytree(ROOT / "opmasd", stage / "opmasd", ignore=_IGNORED)
    shutil.copytree(ROOT / "opmasctl", stage / "opmasctl", ignore=_IGNORED)
    shutil.copytree(ROOT / "agents" / "packages", stage / "opmasd" / "shipped_agents", ignore=_IGNORED)
    dependencies = project()["dependencies"]
    assert isinstance(dependencies, list)
    pins = [f"opmas-api=={version}", f"opmas-agent=={version}"]
    (stage / "requirements.txt").write_text("\n".join([*pins, *dependencies]) + "\n", encoding="utf-8")


def build(name: str, out: Path, version: str) -> Path:
    """Stage one distribution and build its wheel into out; the wheel's path."""
    with tempfile.TemporaryDirectory(prefix=f"opmas-wheel-{name}-") as tmp:
        stage = Path(tmp)
        _stage_common(name, stage, version)
        if name == "opmas-api":
            stage_api(stage)
        elif name == "opmas-agent":
            stage_agent(stage)
        else:
            stage_daemon(stage, version)
        built = Path(tmp + ".out")
        argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        argv += ["--no-index", "-w", str(built), str(stage)]
        try:
            subprocess.run(argv, check=True)
            (wheel,) = built.glob("*.whl")
            out.mkdir(parents=True, exist_ok=True)
            target = out / wheel.name
            shutil.move(wheel, target)
        finally:
            shutil.rmtree(built, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="build_wheels.py", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "dist", help="output directory (dist/)")
    parser.add_argument("--version", help="the wheels' version (default: pyproject.toml's)")
    args = parser.parse_args(argv)
    version = checked_version(args.version or project_version())
    out = args.out.resolve()
    # One set in the output: an older build's wheels beside these would be installed by mistake.
    for stale in out.glob("opmas*-py3-none-any.whl"):
        if stale.name.split("-")[0] in {name.replace("-", "_") for name in DISTRIBUTIONS}:
            stale.unlink()
    for name in DISTRIBUTIONS:
        print(build(name, out, version))


if __name__ == "__main__":
    main()
