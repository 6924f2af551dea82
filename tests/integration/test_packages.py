"""The .deb and .rpm that `make packages` builds (packaging/): files, owners and modes, the
conffile, the maintainer scripts, the dependencies, lintian, and the installed programs running.

The build runs once per module from this checkout (`make packages`); its venv and the
dependency wheels are cached under /var/cache/opmas-tests/packaging by content, so a repeated
run is offline and takes about 25 s. Installing into a booted Debian root is the e2e test's
(tests/e2e/test_deb_package.py): here the .deb is only extracted, and its /usr/lib/opmas is laid
over the host's /usr/lib in a private mount namespace (an overlay: a bind mount would need
/usr/lib/opmas on the host) to run the wrappers, opmasd and the maintainer scripts where they
belong, with /etc, /var/lib, /var/log and /run of their own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_build_script() -> ModuleType:
    """packaging/build.py, which is a script, not a package (and `build` is a PyPI name)."""
    spec = importlib.util.spec_from_file_location("opmas_packaging_build", ROOT / "packaging/build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


packaging_build = _load_build_script()

pytestmark = pytest.mark.timeout(1200)  # a cold build downloads and builds the wheels once

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DEB = ROOT / "dist" / f"opmas_{VERSION}_amd64.deb"
RPM = ROOT / "dist" / f"opmas-{VERSION}.x86_64.rpm"
SITE = "/usr/lib/opmas/venv/lib/python3.11/site-packages"
AGENTS = sorted(p.name for p in (ROOT / "agents/packages").iterdir() if p.is_dir() and p.name != "_template")
PROTOS = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
# What both packages hold (deb path, rpm path when it differs), with mode and owner.
COMMON = {
    "/usr/bin/opmasd": "-rwxr-xr-x root/root",
    "/usr/bin/opmasctl": "-rwxr-xr-x root/root",
    "/etc/opmas/opmasd.yaml": "-rw-r----- root/root",
    "/usr/lib/sysusers.d/opmas.conf": "-rw-r--r-- root/root",
    "/usr/lib/tmpfiles.d/opmas.conf": "-rw-r--r-- root/root",
    "/usr/share/bash-completion/completions/opmasctl": "-rw-r--r-- root/root",
    "/usr/share/fish/vendor_completions.d/opmasctl.fish": "-rw-r--r-- root/root",
    "/usr/share/man/man1/opmasctl.1.gz": "-rw-r--r-- root/root",
    "/usr/share/man/man8/opmasd.8.gz": "-rw-r--r-- root/root",
    "/usr/lib/opmas/venv/bin/nats-server": "-rwxr-xr-x root/root",
    "/usr/lib/opmas/venv/pyvenv.cfg": "-rw-r--r-- root/root",
    **{f"/usr/share/opmas/proto/{name}": "-rw-r--r-- root/root" for name in PROTOS},
}
DEB_ONLY = {
    "/lib/systemd/system/opmasd.service": "-rw-r--r-- root/root",
    "/lib/systemd/system/opmasd.socket": "-rw-r--r-- root/root",
    "/usr/share/zsh/vendor-completions/_opmasctl": "-rw-r--r-- root/root",
    "/usr/share/doc/opmas/copyright": "-rw-r--r-- root/root",
    "/usr/share/doc/opmas/changelog.gz": "-rw-r--r-- root/root",
}
RPM_ONLY = {
    "/usr/lib/systemd/system/opmasd.service": "-rw-r--r-- root/root",
    "/usr/lib/systemd/system/opmasd.socket": "-rw-r--r-- root/root",
    "/usr/share/zsh/site-functions/_opmasctl": "-rw-r--r-- root/root",
    "/usr/share/licenses/opmas/LICENSE": "-rw-r--r-- root/root",
}
# Libraries the bundled modules may link outside the venv, and the Debian package of each.
LIBRARY_PACKAGES = {
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "libpthread.so.0": "libc6",
    "libdl.so.2": "libc6",
    "librt.so.1": "libc6",
    "libresolv.so.2": "libc6",
    "ld-linux-x86-64.so.2": "libc6",
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
    "libz.so.1": "zlib1g",
}
# lintian warnings accepted, and why (README "Packages"): the maintainer scripts call
# systemctl directly (no dependency on init-system-helpers for deb-systemd-helper); a few
# upstream modules start with a `#!python` line but are not executable nor run as scripts.
ACCEPTED_WARNINGS = {"maintainer-script-calls-systemctl", "unusual-interpreter"}


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")


def run(argv: list[str], **kwargs: object) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return str(done.stdout)


@dataclass(frozen=True)
class Built:
    deb: Path
    rpm: Path


@pytest.fixture(scope="module")
def built() -> Built:
    if not Path("/usr/bin/python3.11").is_file():
        pytest.skip("/usr/bin/python3.11 (Debian's python3.11) is missing: the packages bundle a venv of it")
    need("dpkg-deb")
    for tool in ("strip", "readelf"):
        need(tool)
    run(["make", "packages"], cwd=ROOT)
    assert DEB.is_file() and RPM.is_file()
    return Built(DEB, RPM)


@pytest.fixture(scope="module")
def extracted(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    run(["dpkg-deb", "-x", str(built.deb), str(root)])
    return root


def listing(lines: str, pattern: str) -> dict[str, str]:
    """path -> "mode owner/group" from a listing's lines."""
    found = {}
    for line in lines.splitlines():
        match = re.match(pattern, line)
        if match:
            found[match["path"]] = f"{match['mode']} {match['owner']}"
    return found


def test_deb_holds_the_files_with_their_owners_and_modes(built: Built) -> None:
    lines = run(["dpkg-deb", "-c", str(built.deb)])
    files = listing(lines, r"(?P<mode>\S+) (?P<owner>\S+)\s+\d+ \S+ \S+ \.(?P<path>/\S*)")
    for path, expected in {**COMMON, **DEB_ONLY}.items():
        assert files.get(path) == expected, f"{path}: {files.get(path)} in the .deb, not {expected}"
    assert "/usr/lib/opmas/venv/bin/python3.11 -> ../../../../bin/python3.11" in lines  # relative
    # No byte code in the package (the postinst compiles it), nothing but root's, and nothing
    # executable among the bundled modules and shared objects (which need no execute bit).
    assert not [path for path in files if "__pycache__" in path or path.endswith(".pyc")]
    assert {entry.split()[1] for entry in files.values()} == {"root/root"}
    modules = {p: e for p, e in files.items() if p.startswith(f"{SITE}/") and p.endswith((".py", ".so"))}
    assert not [path for path, entry in modules.items() if "x" in entry.split()[0]]
    assert_one_copy_of_agents_and_sdk(files)


def assert_one_copy_of_agents_and_sdk(files: dict[str, str]) -> None:
    """The shipped agents and the SDK, once: inside the venv where the wheels carry them
    (opmasd/shipped_agents, the opmas-agent wheel), else under /usr/lib/opmas."""
    sdk = [f"{SITE}/opmas_agent/__init__.py", "/usr/lib/opmas/opmas_agent/__init__.py"]
    assert [path in files for path in sdk].count(True) == 1, "the SDK: once"
    agents = [f"{SITE}/opmasd/shipped_agents", "/usr/lib/opmas/agents"]
    held = [root for root in agents if f"{root}/sysmon/agent.yaml" in files]
    assert len(held) == 1, "the shipped agents: once"
    for name in AGENTS:
        assert files.get(f"{held[0]}/{name}/agent.yaml") == "-rw-r--r-- root/root", name


def test_deb_control_conffile_and_maintainer_scripts(built: Built, tmp_path: Path) -> None:
    info = run(["dpkg-deb", "-I", str(built.deb)])
    assert re.search(rf"^ Version: {re.escape(VERSION)}$", info, re.MULTILINE)
    run(["dpkg-deb", "-e", str(built.deb), str(tmp_path / "control")])
    control = tmp_path / "control"
    assert (control / "conffiles").read_text().split() == ["/etc/opmas/opmasd.yaml"]
    postinst = (control / "postinst").read_text()
    prerm = (control / "prerm").read_text()
    postrm = (control / "postrm").read_text()
    for needle in ("systemd-sysusers opmas.conf", "systemd-tmpfiles --create opmas.conf", "daemon-reload",
                   "systemctl enable opmasd.service", "systemctl start opmasd.service",
                   "systemctl try-restart opmasd.service", "compileall"):  # fmt: skip
        assert needle in postinst, needle
    # Stop and disable only on remove (an upgrade restarts and keeps the agents).
    remove_branch = prerm.split("remove)")[1].split(";;")[0]
    assert "systemctl stop opmasd.socket opmasd.service" in remove_branch
    assert "systemctl disable opmasd.service opmasd.socket" in remove_branch
    purge_branch = postrm.split("purge)")[1].split(";;")[0]
    assert "rm -rf /var/lib/opmas" in purge_branch
    commands = [line for line in postrm.replace(purge_branch, "").splitlines() if not line.startswith("#")]
    assert not [line for line in commands if "/var/lib/opmas" in line]  # kept on remove
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK)
        run(["sh", "-n", str(control / script)])


def test_deb_depends_cover_every_library_the_bundle_links(built: Built, extracted: Path) -> None:
    depends = run(["dpkg-deb", "-f", str(built.deb), "Depends"])
    inside = {path.name for path in (extracted / "usr/lib/opmas").rglob("*.so*")}
    needed: set[str] = set()
    glibc = (2, 0)
    for path in (extracted / "usr/lib/opmas").rglob("*"):
        if not path.is_file() or path.is_symlink() or path.open("rb").read(4) != b"\x7fELF":
            continue
        dynamic = run(["readelf", "-d", "-W", str(path)])
        needed |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]", dynamic))
        for version in re.findall(r"GLIBC_(\d+)\.(\d+)", run(["readelf", "-V", "-W", str(path)])):
            glibc = max(glibc, (int(version[0]), int(version[1])))
    outside = sorted(needed - inside)
    unknown = [name for name in outside if name not in LIBRARY_PACKAGES]
    assert not unknown, f"the bundle links {unknown}: add their packages to Depends and LIBRARY_PACKAGES"
    for name in outside:
        assert LIBRARY_PACKAGES[name] in depends, (
            f"{name} needs {LIBRARY_PACKAGES[name]} in Depends: {depends}"
        )
    declared = re.search(r"libc6 \(>= (\d+)\.(\d+)\)", depends)
    assert declared and (int(declared[1]), int(declared[2])) >= glibc, f"GLIBC_{glibc} needed: {depends}"
    assert "python3.11" in depends
    # The system bus: scopes and the systemd runtime need it (Debian's systemd only recommends one).
    assert "dbus | default-dbus-system-bus | dbus-system-bus" in depends


def test_rpm_holds_the_files_conffile_and_scriptlets(built: Built) -> None:
    need("rpm")
    query = "[%{FILEMODES:perms} %{FILEUSERNAME}/%{FILEGROUPNAME} %{FILEFLAGS:fflags}: %{FILENAMES}\n]"
    lines = run(["rpm", "-qp", "--queryformat", query, str(built.rpm)])
    files = listing(lines, r"(?P<mode>\S+) (?P<owner>\S+) \S*: (?P<path>/\S*)")
    for path, expected in {**COMMON, **RPM_ONLY}.items():
        assert files.get(path) == expected, f"{path}: {files.get(path)} in the .rpm, not {expected}"
    assert run(["rpm", "-qp", "--configfiles", str(built.rpm)]).split() == ["/etc/opmas/opmasd.yaml"]
    assert re.search(r" cn: /etc/opmas/opmasd.yaml$", lines, re.MULTILINE)  # config(noreplace)
    assert run(["rpm", "-qp", "--queryformat", "%{VERSION}", str(built.rpm)]) == VERSION
    assert not [path for path in files if "__pycache__" in path]
    scripts = run(["rpm", "-qp", "--scripts", str(built.rpm)])
    sections = dict(
        re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.M | re.S)
    )
    assert "systemd-sysusers opmas.conf" in sections["postinstall"]
    assert "preset opmasd.service" in sections["postinstall"]
    assert "disable --now opmasd.socket opmasd.service" in sections["preuninstall"]
    assert "try-restart opmasd.service" in sections["postuninstall"]
    requires = run(["rpm", "-qp", "--requires", str(built.rpm)])
    assert "python3.11" in requires and "libstdc++.so.6()(64bit)" in requires


def test_lintian_finds_no_error(built: Built) -> None:
    need("lintian")
    done = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(built.deb)], check=False, capture_output=True, text=True
    )
    tags = re.findall(r"^([EWXIP]): opmas[^:]*: (\S+)", done.stdout, re.MULTILINE)
    errors = sorted({tag for kind, tag in tags if kind == "E"})
    assert not errors, done.stdout
    warnings = sorted({tag for kind, tag in tags if kind == "W"} - ACCEPTED_WARNINGS)
    assert not warnings, f"new lintian warnings: fix them or accept them with why\n{done.stdout}"


@pytest.fixture
def on_usr_lib(extracted: Path) -> Iterator[list[str]]:
    """argv prefix running a command with the extracted /usr/lib/opmas at /usr/lib/opmas, in a
    private mount namespace: an overlay of the extracted usr/lib over the host's /usr/lib (a
    bind mount would need /usr/lib/opmas to exist on the host)."""
    if os.geteuid() != 0:
        pytest.skip("mounting the extracted package in a private mount namespace needs root")
    need("unshare")
    mount = f"mount -t overlay overlay -o lowerdir={extracted}/usr/lib:/usr/lib /usr/lib"
    yield ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} && exec "$@"', "sh"]


def test_installed_wrappers_run_from_usr_lib_opmas(extracted: Path, on_usr_lib: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(extracted)}
    assert (
        run([*on_usr_lib, str(extracted / "usr/bin/opmasctl"), "--version"], env=env).strip()
        == f"opmasctl {VERSION}"
    )
    assert VERSION in run([*on_usr_lib, str(extracted / "usr/bin/opmasd"), "--version"], env=env)
    conf = str(extracted / "etc/opmas/opmasd.yaml")
    run([*on_usr_lib, str(extracted / "usr/bin/opmasd"), "--config", conf, "--check-config"], env=env)
    # opmasd's default agents directories hold the shipped agents, and each module entrypoint
    # imports its module and the SDK with the interpreter and PYTHONPATH opmasd gives it.
    probe = (
        "import subprocess, sys; from pathlib import Path\n"
        "from opmasd.config import default_agent_dirs\n"
        "from opmasd.manager.packages.scan import scan\n"
        "result = scan(default_agent_dirs())\n"
        "assert not result.errors, result.errors\n"
        "for m in result.manifests:\n"
        "    argv, env = m.spec.command, m.spec.env\n"
        "    if argv[1:2] == ('-m',):\n"
        "        code = f'import opmas_agent, importlib.util as u; assert u.find_spec({argv[2]!r})'\n"
        "        subprocess.run([argv[0], '-c', code], env={'PYTHONPATH': env['PYTHONPATH']}, check=True)\n"
        "print(sorted(m.path.parent.name for m in result.manifests))\n"
    )
    python = "/usr/lib/opmas/venv/bin/python"
    found = run([*on_usr_lib, python, "-P", "-c", probe], env=env, cwd="/")
    assert found.strip().splitlines()[-1] == str(sorted(AGENTS))  # after the scan's log lines


def test_version_override_and_changelog(tmp_path: Path) -> None:
    """VERSION=… (the upgrade test's higher version) is checked and gets a changelog entry."""
    assert packaging_build.checked_version("0.1.1") == "0.1.1"
    for bad in ("v1", "1.0-1", "1..2", "1.0 ; rm", "0.2.0rc1", "0.1.0+local"):
        with pytest.raises(SystemExit, match="version"):
            packaging_build.checked_version(bad)
    (tmp_path / "root").mkdir()
    packaging_build.changelog("9.9.9", tmp_path)
    debian = (tmp_path / "changelog.Debian").read_text()
    assert debian.startswith("opmas (9.9.9) unstable; urgency=medium\n")
    assert f"opmas ({VERSION}) unstable" in debian
    assert "- semver: 9.9.9" in (tmp_path / "changelog.yaml").read_text()


STUBBED = ("systemctl", "systemd-sysusers", "systemd-tmpfiles")


def run_scripts(
    extracted: Path, control: Path, tmp: Path, steps: list[str], booted: bool = True
) -> list[str]:
    """Run maintainer script steps ("postinst configure", ...) as dpkg would, in a private mount
    namespace: /usr/lib/opmas from the extracted .deb (writable through an overlay, for the byte
    code), /etc and /var/lib through overlays, a /run of its own (with /run/systemd/system when
    `booted`), and systemctl, systemd-sysusers and systemd-tmpfiles stubs that record their calls.
    Returns the calls, one "tool args" line each, with "== step" lines between the steps."""
    stubs = tmp / "stubs"
    stubs.mkdir(exist_ok=True)
    calls = tmp / "calls"
    for tool in STUBBED:
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (stubs / tool).chmod(0o755)
    layers = []
    for target, lower in (
        ("/usr/lib", f"{extracted}/usr/lib:/usr/lib"),
        ("/etc", "/etc"),
        ("/var/lib", "/var/lib"),
    ):
        name = target.strip("/").replace("/", "-")
        (tmp / f"{name}-up").mkdir(exist_ok=True)
        (tmp / f"{name}-work").mkdir(exist_ok=True)
        options = f"lowerdir={lower},upperdir={tmp}/{name}-up,workdir={tmp}/{name}-work"
        layers.append(f"mount -t overlay overlay -o {options} {target}")
    setup = [*layers, "mount -t tmpfs tmpfs /run", "mount -t tmpfs tmpfs /var/log"]
    if booted:
        setup.append("mkdir -p /run/systemd/system")
    body = [f'echo "== {step}" >> {calls}; sh {control}/{step}' for step in steps]
    script = " && ".join([*setup, *body, f'echo "== end" >> {calls}'])
    env = {"PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env)
    return calls.read_text().splitlines()


def between(calls: list[str], step: str) -> list[str]:
    start = calls.index(f"== {step}") + 1
    end = next(i for i in range(start, len(calls)) if calls[i].startswith("== "))
    return calls[start:end]


def test_deb_maintainer_scripts_follow_debian_convention(
    built: Built, extracted: Path, on_usr_lib: list[str], tmp_path: Path
) -> None:
    control = tmp_path / "control"
    run(["dpkg-deb", "-e", str(built.deb), str(control)])
    steps = [
        "postinst configure",  # first install
        "prerm upgrade 0.1.1",
        "postinst configure 0.1.0",  # upgrade from 0.1.0
        "prerm remove",
        "postrm remove",
    ]
    calls = run_scripts(extracted, control, tmp_path, steps)
    assert between(calls, "postinst configure") == [
        "systemd-sysusers opmas.conf",
        "systemd-tmpfiles --create opmas.conf",
        "systemctl enable opmasd.service",
        "systemctl --system daemon-reload",
        "systemctl start opmasd.service",
    ]
    assert between(calls, "prerm upgrade 0.1.1") == []  # an upgrade stops nothing
    # No enable on upgrade (an admin's disable stays), a restart job that keeps the agents.
    assert between(calls, "postinst configure 0.1.0") == [
        "systemd-sysusers opmas.conf",
        "systemd-tmpfiles --create opmas.conf",
        "systemctl --system daemon-reload",
        "systemctl try-restart opmasd.service",
    ]
    assert between(calls, "prerm remove") == [
        "systemctl stop opmasd.socket opmasd.service",
        "systemctl disable opmasd.service opmasd.socket",
    ]
    assert between(calls, "postrm remove") == ["systemctl --system daemon-reload"]
    # The byte code the postinst compiled is gone after the prerm (the overlay's upper layer
    # holds what the scripts wrote under /usr/lib).
    assert not list((tmp_path / "usr-lib-up").rglob("*.pyc"))


def test_deb_postinst_compiles_and_needs_no_running_systemd(
    built: Built, extracted: Path, on_usr_lib: list[str], tmp_path: Path
) -> None:
    control = tmp_path / "control"
    run(["dpkg-deb", "-e", str(built.deb), str(control)])
    calls = run_scripts(extracted, control, tmp_path, ["postinst configure"], booted=False)
    # In a chroot or image build: the links are made, nothing is started.
    assert between(calls, "postinst configure")[-1] == "systemctl enable opmasd.service"
    assert not [call for call in calls if "start" in call or "daemon-reload" in call]
    compiled = list((tmp_path / "usr-lib-up/opmas/venv").rglob("*.cpython-311.pyc"))
    assert len(compiled) > 1000


def test_deb_purge_deletes_state_and_keeps_your_files(
    built: Built, extracted: Path, on_usr_lib: list[str], tmp_path: Path
) -> None:
    control = tmp_path / "control"
    run(["dpkg-deb", "-e", str(built.deb), str(control)])
    # The state the daemon left and an agent package of the admin's, seen through the overlays.
    (tmp_path / "var-lib-up/opmas").mkdir(parents=True)
    (tmp_path / "var-lib-up/opmas/opmas.db").write_text("agents")
    (tmp_path / "etc-up/opmas/agents.d/mine").mkdir(parents=True)
    run_scripts(extracted, control, tmp_path, ["postrm purge"])
    assert not (tmp_path / "var-lib-up/opmas/opmas.db").exists()
    assert (tmp_path / "etc-up/opmas/agents.d/mine").is_dir()  # yours: kept


def test_rpm_scriptlets_follow_fedora_convention(
    built: Built, extracted: Path, on_usr_lib: list[str], tmp_path: Path
) -> None:
    """The scriptlets as the .rpm holds them (packaging/scripts/rpm-*, checked the same as
    `rpm -qp --scripts` shows), run in the order rpm runs them on install, upgrade and erase."""
    scripts = ROOT / "packaging/scripts"
    steps = ["rpm-post 1", "rpm-post 2", "rpm-preun 1", "rpm-postun 1", "rpm-preun 0", "rpm-postun 0"]
    calls = run_scripts(extracted, scripts, tmp_path, steps)
    ensure = ["systemd-sysusers opmas.conf", "systemd-tmpfiles --create opmas.conf"]
    assert between(calls, "rpm-post 1") == [
        *ensure,
        "systemctl --no-reload preset opmasd.service opmasd.socket",
        "systemctl daemon-reload",
    ]
    assert between(calls, "rpm-post 2") == [*ensure, "systemctl daemon-reload"]
    assert between(calls, "rpm-preun 1") == []
    restart = "systemctl try-restart opmasd.service"
    assert between(calls, "rpm-postun 1") == ["systemctl daemon-reload", restart]
    erase = "systemctl --no-reload disable --now opmasd.socket opmasd.service"
    assert between(calls, "rpm-preun 0") == [erase]
    assert between(calls, "rpm-postun 0") == ["systemctl daemon-reload"]
    assert not list((tmp_path / "usr-lib-up").rglob("*.pyc"))  # erased with the package
    packaged = run(["rpm", "-qp", "--scripts", str(built.rpm)]) if shutil.which("rpm") else ""
    for name in ("rpm-post", "rpm-preun", "rpm-postun"):
        body = (scripts / name).read_text().split("\n", 1)[1].strip()
        assert not packaged or body in packaged, f"{name} is not what the .rpm holds"


def test_packaged_opmasd_runs_a_shipped_agent(extracted: Path, on_usr_lib: list[str], tmp_path: Path) -> None:
    """The packaged opmasd, started by its wrapper on the shipped configuration, finds the
    shipped agents, starts sysmon (autostart) with the bundled interpreter, SDK and embedded
    nats-server, and answers opmasctl on its unix socket; /var/lib, /var/log and /run are its
    own (overlays and a tmpfs), gRPC's TCP address, REST and the systemd runtime are off."""
    layers = []
    for target in ("/usr/lib", "/var/lib", "/var/log"):
        name = target.strip("/").replace("/", "-")
        (tmp_path / f"{name}-up").mkdir()
        (tmp_path / f"{name}-work").mkdir()
        lower = f"{extracted}/usr/lib:/usr/lib" if target == "/usr/lib" else target
        options = f"lowerdir={lower},upperdir={tmp_path}/{name}-up,workdir={tmp_path}/{name}-work"
        layers.append(f"mount -t overlay overlay -o {options} {target}")
    opmasd, opmasctl = extracted / "usr/bin/opmasd", extracted / "usr/bin/opmasctl"

    def until(condition: str) -> str:  # polled, 15 s at most
        return f"for i in $(seq 150); do {condition} && break; sleep 0.1; done"

    script = "\n".join([
        "set -e", *layers, "mount -t tmpfs tmpfs /run", "cd /",
        f"{opmasd} --config {extracted}/etc/opmas/opmasd.yaml > {tmp_path}/opmasd.log 2>&1 &",
        "pid=$!",
        "trap 'kill $pid; wait $pid || true' EXIT",
        until("[ -S /run/opmas/opmasd.sock ]"),
        until(f"{opmasctl} agents list | grep -q '^sysmon .* running '"),
        f"{opmasctl} agents list",
        until(f"{opmasctl} agents logs sysmon | grep -q memory_total"),
        f"{opmasctl} agents logs sysmon",
    ])  # fmt: skip
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OPMAS_REST_ENABLED": "false",
        "OPMAS_GRPC_ADDRESS": "",
        "OPMAS_AGENTS_SYSTEMD": "off",
    }
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log = (tmp_path / "opmasd.log").read_text() if (tmp_path / "opmasd.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\nopmasd:\n{log}"
    rows = {line.split()[0]: line.split()[2] for line in done.stdout.splitlines() if line.split()}
    assert set(AGENTS) <= set(rows), done.stdout
    assert rows["sysmon"] == "running", done.stdout
    assert "memory_total" in done.stdout, done.stdout  # sysmon's report, through the log relay
