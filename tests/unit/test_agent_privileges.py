"""An agent's capabilities and sandbox (issue 12): normalised where a spec comes in, checked at
registration, refused where the runtime cannot enforce them, and turned into unit properties
(systemd runtime, with safe defaults) or setpriv options (process runtime).

tests/integration/test_systemd_sandboxing.py checks that they take effect in a real systemd.
"""

from __future__ import annotations

import argparse
import os

import pytest

from opmas.v1 import agents_pb2 as pb
from opmasctl.spec import SpecError, add_spec_arguments, build_spec
from opmasctl.spec_privileges import privilege_pairs
from opmasd.api.convert import spec_fields, spec_to_pb
from opmasd.core.model import AgentSpec, RuntimeKind
from opmasd.core.privileges import (
    MAX_CAPABILITIES,
    Sandbox,
    capability_mask,
    normalise_capabilities,
)
from opmasd.manager.packages.manifest_privileges import capabilities_from, sandbox_from
from opmasd.manager.privileges import _process_capability_refusals, privilege_refusals
from opmasd.manager.spec_update import apply_fields
from opmasd.manager.validation import spec_violations
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.identity import SETPRIV, as_identity, privilege_options
from opmasd.runtime.systemd_launch import agent_unit
from opmasd.runtime.systemd_sandboxing import sandbox_properties

NET_RAW = 1 << 13


def spec(**kw: object) -> AgentSpec:
    return AgentSpec(name="a", command=("/bin/true",), **kw)  # type: ignore[arg-type]


def request(**kw: object) -> LaunchRequest:
    fields: dict[str, object] = {"working_directory": "", **kw}
    return LaunchRequest("a", ("/bin/true",), **fields)  # type: ignore[arg-type]


# -- names and values ----------------------------------------------------------------------------


def test_capability_names_are_normalised_to_the_cap_form() -> None:
    assert normalise_capabilities(["net_raw", "CAP_NET_RAW", " cap_chown ", "Net_Bind_Service"]) == (
        "CAP_CHOWN",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
    )
    assert capability_mask(["CAP_NET_RAW", "CAP_CHOWN"]) == NET_RAW | 1
    assert capability_mask(["CAP_CHECKPOINT_RESTORE"]) == 1 << 40


def test_unknown_capabilities_and_modes_are_refused_naming_the_value() -> None:
    bad = spec(capabilities=("CAP_NET_RAW", "CAP_FLY"), sandbox=Sandbox(protect_system="sometimes"))
    found = {(v.field, v.description) for v in spec_violations(bad)}
    assert ("spec.capabilities", "'CAP_FLY' is not a Linux capability (e.g. CAP_NET_RAW)") in found
    assert ("spec.sandbox.protect_system", "'sometimes' is not one of no, yes, full, strict") in found
    too_many = spec(capabilities=tuple(f"CAP_X{i}" for i in range(MAX_CAPABILITIES + 1)))
    assert [v.description for v in spec_violations(too_many)] == [f"has more than {MAX_CAPABILITIES} entries"]
    # Hostile input costs nothing: a huge list is cut before it is normalised.
    assert len(normalise_capabilities(f"c{i}" for i in range(10**6))) == MAX_CAPABILITIES + 1


def test_the_store_keeps_them_and_rows_without_them_read_as_before() -> None:
    both = spec(capabilities=("CAP_NET_RAW",), sandbox=Sandbox(private_tmp=False, protect_system="strict"))
    assert both.to_dict()["sandbox"] == {"private_tmp": False, "protect_system": "strict"}
    assert AgentSpec.from_dict(both.to_dict()) == both
    plain = spec()
    assert "capabilities" not in plain.to_dict() and "sandbox" not in plain.to_dict()
    assert AgentSpec.from_dict(plain.to_dict()) == plain


# -- what each runtime refuses -------------------------------------------------------------------


def test_the_process_runtime_refuses_what_it_cannot_enforce() -> None:
    asked = Sandbox(no_new_privileges=True, protect_system="strict", private_tmp=True, private_devices=False)
    assert privilege_refusals(spec(sandbox=asked), euid=0) == [
        ("sandbox.protect_system", "strict cannot be enforced by the process runtime; use runtime: systemd"),
        ("sandbox.private_tmp", "true cannot be enforced by the process runtime; use runtime: systemd"),
    ]  # no_new_privileges it enforces; private_devices off is what it does
    assert privilege_refusals(spec(sandbox=asked, runtime=RuntimeKind.SYSTEMD), euid=0) == []


def test_capabilities_need_opmasd_to_be_root() -> None:
    assert privilege_refusals(spec(capabilities=("CAP_NET_RAW",)), euid=0) == []
    assert privilege_refusals(
        spec(capabilities=("CAP_NET_RAW",), runtime=RuntimeKind.SYSTEMD), euid=1000
    ) == [("capabilities", "opmasd runs as uid 1000, not root: it cannot give an agent capabilities")]


def test_the_process_runtime_refuses_capabilities_setpriv_cannot_give() -> None:
    # setpriv, run by opmasd, keeps only what opmasd has, and drops the rest only with
    # CAP_SETPCAP: without it the shipped unit's agents kept opmasd's whole bounding set.
    raw, setpcap = capability_mask(["CAP_NET_RAW"]), capability_mask(["CAP_SETPCAP"])
    assert _process_capability_refusals(("CAP_NET_RAW",), (raw | setpcap, raw | setpcap)) == []
    [(field, why)] = _process_capability_refusals(("CAP_NET_RAW",), (raw, raw))
    assert field == "capabilities" and "CAP_SETPCAP" in why and "runtime: systemd" in why
    [(field, why)] = _process_capability_refusals(("CAP_NET_RAW", "CAP_SYS_ADMIN"), (setpcap, raw | setpcap))
    assert why == "CAP_SYS_ADMIN not in opmasd's own bounding set; use runtime: systemd"
    assert _process_capability_refusals(("CAP_SYS_ADMIN",), None) == []  # unknown: setpriv says


# -- the systemd runtime -------------------------------------------------------------------------


def test_unset_fields_take_the_safe_defaults() -> None:
    props = {name: (sig, value) for name, sig, value in sandbox_properties(request(), euid=0)}
    assert props == {
        "CapabilityBoundingSet": ("t", 0),  # none named: none at all, root or not
        "NoNewPrivileges": ("b", True),
        "PrivateTmp": ("b", True),
        "PrivateDevices": ("b", False),
        "ProtectKernelTunables": ("b", True),
        "ProtectKernelModules": ("b", True),
        "ProtectControlGroups": ("b", True),
        "ProtectSystem": ("s", "full"),
        "ProtectHome": ("s", "read-only"),
    }


def test_not_as_root_the_empty_bounding_set_is_left_out() -> None:
    assert "CapabilityBoundingSet" not in {n for n, _, _ in sandbox_properties(request(), euid=1000)}
    assert ("CapabilityBoundingSet", "t", 0) in sandbox_properties(request(), euid=0)


def test_named_capabilities_are_the_bounding_set_and_ambient_for_a_user_not_root() -> None:
    def caps(**kw: object) -> dict[str, object]:
        return {n: v for n, _, v in sandbox_properties(request(**kw)) if "Capabilit" in n}

    assert caps(capabilities=("CAP_NET_RAW",), user="nobody") == {
        "CapabilityBoundingSet": NET_RAW,
        "AmbientCapabilities": NET_RAW,
    }
    assert caps(capabilities=("CAP_NET_RAW",)) == {"CapabilityBoundingSet": NET_RAW}
    assert caps(capabilities=("CAP_NET_RAW",), user="0") == {"CapabilityBoundingSet": NET_RAW}


def test_explicit_values_win_and_strict_keeps_the_working_directory_writable() -> None:
    box = Sandbox(no_new_privileges=False, protect_system="strict", protect_home="no", private_devices=True)
    props = {n: v for n, _, v in sandbox_properties(request(sandbox=box, working_directory="/srv/a"))}
    assert props["NoNewPrivileges"] is False and props["PrivateDevices"] is True
    assert props["ProtectSystem"] == "strict" and props["ProtectHome"] == "no"
    assert props["ReadWritePaths"] == ["-/srv/a"]
    root = {n for n, _, _ in sandbox_properties(request(sandbox=box))}
    assert "ReadWritePaths" not in root  # "/" writable would undo strict


def test_the_agent_unit_carries_them() -> None:
    names = [p[0] for p in agent_unit(request()).extra]
    assert "CapabilityBoundingSet" in names and "ProtectSystem" in names


# -- the process runtime -------------------------------------------------------------------------


def test_the_process_runtime_applies_capabilities_through_setpriv() -> None:
    assert privilege_options(request()) == ()  # its default: nothing applied
    both = privilege_options(request(capabilities=("CAP_NET_RAW",), user="nobody"))
    assert both == (
        "--bounding-set=-all,+net_raw",
        "--inh-caps=-all,+net_raw",
        "--ambient-caps=-all,+net_raw",
    )
    root = privilege_options(request(capabilities=("CAP_NET_RAW",), sandbox=Sandbox(no_new_privileges=True)))
    assert root == ("--bounding-set=-all,+net_raw", "--inh-caps=-all,+net_raw", "--no-new-privs")
    assert as_identity("", "", ("prog",), ("--no-new-privs",)) == (SETPRIV, "--no-new-privs", "--", "prog")


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv --reuid needs root")
def test_setpriv_gets_identity_and_privileges_in_one_call() -> None:
    argv = as_identity("nobody", "", ("prog",), ("--no-new-privs",))
    assert (
        argv[0] == SETPRIV and argv[1] == "--reuid=nobody" and argv[-3:] == ("--no-new-privs", "--", "prog")
    )


# -- the API, manifests and opmasctl -------------------------------------------------------------


def test_the_api_normalises_and_an_update_names_single_sandbox_fields() -> None:
    msg = pb.AgentSpec(
        capabilities=["net_raw"], sandbox=pb.AgentSandbox(protect_system="OFF", private_tmp=False)
    )
    assert spec_fields(msg) == {
        "capabilities": ("CAP_NET_RAW",),
        "sandbox": {"private_tmp": False, "protect_system": "no"},
    }
    base = spec(sandbox=Sandbox(protect_home="tmpfs", private_tmp=True))
    # One field named, left unset: back to the default; the others stay.
    fields = spec_fields(pb.AgentSpec(), ["sandbox.private_tmp", "capabilities"])
    assert fields == {"capabilities": (), "sandbox": {"private_tmp": None}}
    assert apply_fields(base, fields).sandbox == Sandbox(protect_home="tmpfs")
    # "sandbox" as a whole: replaced.
    whole = spec_fields(pb.AgentSpec(sandbox=pb.AgentSandbox(protect_system="strict")), ["sandbox"])
    assert apply_fields(base, whole).sandbox == Sandbox(protect_system="strict")
    shown = spec_to_pb(spec(capabilities=("CAP_NET_RAW",), sandbox=Sandbox(private_tmp=False)))
    assert list(shown.capabilities) == ["CAP_NET_RAW"] and shown.sandbox.HasField("private_tmp")
    assert not shown.sandbox.HasField("no_new_privileges")


def test_manifest_keys() -> None:
    assert capabilities_from(["net_raw"]) == ("CAP_NET_RAW",) and capabilities_from("CAP_CHOWN") == (
        "CAP_CHOWN",
    )
    # YAML's yes/no are booleans: words for the modes, booleans for the rest.
    assert sandbox_from(
        {"protect_system": True, "protect_home": "read-only", "private_tmp": False}
    ) == Sandbox(protect_system="yes", protect_home="read-only", private_tmp=False)
    with pytest.raises(ValueError, match="sandbox: unknown key"):
        sandbox_from({"protect_everything": True})
    with pytest.raises(ValueError, match=r"sandbox\.private_tmp: must be true or false"):
        sandbox_from({"private_tmp": "maybe"})
    with pytest.raises(ValueError, match="capabilities: must be a list"):
        capabilities_from({"CAP_NET_RAW": True})


def cli(*argv: str, update: bool = False) -> tuple[pb.AgentSpec, list[str]]:
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser, update=update)
    return build_spec(parser.parse_args(list(argv)), [])


def test_opmasctl_flags_and_view() -> None:
    msg, paths = cli(
        "--capability", "net_raw", "--capability", "CAP_CHOWN", "--sandbox", "protect_system=strict",
        "--sandbox", "private-tmp=no", "--sandbox", "protect_home=default",
    )  # fmt: skip
    assert list(msg.capabilities) == ["net_raw", "CAP_CHOWN"]
    assert msg.sandbox == pb.AgentSandbox(protect_system="strict", private_tmp=False)
    assert paths == ["capabilities", "sandbox.protect_system", "sandbox.private_tmp", "sandbox.protect_home"]
    _, paths = cli("--no-capabilities", update=True)
    assert paths == ["capabilities"]
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        cli("--sandbox", "protect_all=yes")
    with pytest.raises(SpecError, match="takes yes or no"):
        cli("--sandbox", "private_tmp=perhaps")
    assert privilege_pairs(pb.AgentSpec()) == [("Capabilities", "(none)"), ("Sandbox", "(runtime defaults)")]
    shown = privilege_pairs(
        spec_to_pb(spec(capabilities=("CAP_NET_RAW",), sandbox=Sandbox(private_tmp=False)))
    )
    assert shown == [("Capabilities", "CAP_NET_RAW"), ("Sandbox", "private_tmp=no")]
