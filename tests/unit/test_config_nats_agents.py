"""nats.agent_publish / nats.agent_subscribe: the data subjects every agent's login on the
embedded server may use. Taken (file or environment) when they stay within data; refused at
load, naming the key and why, when a pattern could reach other agents' or the manager's
subjects or the request inboxes, when the prefix clashes with the defaults, and with an
external server (whose own configuration decides: they would be ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opmasd.config import Config, ConfigError, load_config

ENV = {"HOME": "/home/op"}


def load(tmp_path: Path, nats: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "opmasd.yaml"
    path.write_text("nats:\n" + "".join(f"  {line}\n" for line in nats.strip().splitlines()))
    return load_config(path, {**ENV, **(env or {})}, euid=1000)


def test_defaults_cover_the_shipped_agents(tmp_path: Path) -> None:
    nats = load(tmp_path, "subject_prefix: agent").nats
    assert nats.agent_publish == nats.agent_subscribe == ("logs.>", "findings.>", "events.>")


def test_lists_from_the_file_and_the_environment(tmp_path: Path) -> None:
    nats = load(tmp_path, 'agent_publish: ["alerts.>", "findings.net"]\nagent_subscribe: []').nats
    assert (nats.agent_publish, nats.agent_subscribe) == (("alerts.>", "findings.net"), ())
    env = {"OPMAS_NATS_AGENT_SUBSCRIBE": "logs.>, metrics.hosts.*"}
    assert load(tmp_path, "", env).nats.agent_subscribe == ("logs.>", "metrics.hosts.*")


@pytest.mark.parametrize(
    ("nats", "key", "reason"),
    [
        ('agent_publish: [">"]', "nats.agent_publish", "'>' could match agent.>"),
        ('agent_subscribe: ["agent.>"]', "nats.agent_subscribe", "could match agent.>: the agents' and"),
        ('agent_subscribe: ["*.x"]', "nats.agent_subscribe", "'*.x' could match agent.>"),
        ('agent_publish: ["_INBOX.>"]', "nats.agent_publish", "the request inboxes"),
        ('subject_prefix: site1\nagent_publish: ["site1.*.status"]', "nats.agent_publish", "site1.>"),
        ('agent_publish: ["logs.>.x"]', "nats.agent_publish", "not a NATS subject pattern"),
        ('agent_publish: ["$SYS.>"]', "nats.agent_publish", "not a NATS subject pattern"),
        ("agent_publish: 3", "nats.agent_publish", "must be a list"),
        ("subject_prefix: logs", "nats.subject_prefix", "clashes with the default nats.agent_publish"),
        ('url: nats://n:4222\nagent_publish: ["x.>"]', "nats.agent_publish", "embedded NATS server only"),
        ("url: nats://n:4222\nagent_subscribe: []", "nats.agent_subscribe", "embedded NATS server only"),
    ],
)
def test_refused(tmp_path: Path, nats: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, nats)
    assert info.value.key == key
    assert reason in info.value.reason


def test_refused_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "", {"OPMAS_NATS_AGENT_PUBLISH": "findings.>,>"})
    assert info.value.key == "OPMAS_NATS_AGENT_PUBLISH"
    assert "'>' could match agent.>" in info.value.reason


def test_a_prefix_clashing_with_the_defaults_is_fine_once_the_lists_are_set(tmp_path: Path) -> None:
    nats = load(tmp_path, 'subject_prefix: logs\nagent_publish: ["findings.>"]\nagent_subscribe: []').nats
    assert nats.subject_prefix == "logs"
