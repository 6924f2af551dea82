"""One stop, one SIGTERM: signal_tree reaches each process of an agent's tree exactly once."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from opmasd.runtime import signals


class FakeProcess:
    def __init__(self, pid: int, group: int) -> None:
        self.pid, self.group = pid, group
        self.signals: list[signal.Signals] = []

    def send_signal(self, sig: signal.Signals) -> None:
        self.signals.append(sig)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    record: dict[str, list[Any]] = {"killpg": [], "pidfd": []}
    monkeypatch.setattr(signals, "signal_group", lambda pgid, sig: record["killpg"].append((pgid, sig)))
    monkeypatch.setattr(signal, "pidfd_send_signal", lambda fd, sig: record["pidfd"].append((fd, sig)))
    return record


def test_the_group_once_and_only_the_descendants_that_left_it(
    sent: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    in_group, escaped = FakeProcess(101, group=100), FakeProcess(102, group=102)
    groups = {101: 100, 102: 102}
    monkeypatch.setattr(signals, "_group_of", lambda pid: groups.get(pid))
    signals.signal_tree(7, 100, signal.SIGTERM, [in_group, escaped])
    # killpg reaches the leader and its group: no second signal to the leader by its pidfd,
    # none to a descendant still in the group.
    assert sent == {"killpg": [(100, signal.SIGTERM)], "pidfd": []}
    assert in_group.signals == [] and escaped.signals == [signal.SIGTERM]


def test_once_the_leader_is_gone_every_descendant_is_signalled(
    sent: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    left = [FakeProcess(101, group=100), FakeProcess(102, group=102)]
    monkeypatch.setattr(signals, "_group_of", lambda pid: {101: 100, 102: 102}[pid])
    signals.signal_tree(None, 100, signal.SIGKILL, left)
    assert sent == {"killpg": [], "pidfd": []}  # the group id may be another's by now
    assert [p.signals for p in left] == [[signal.SIGKILL], [signal.SIGKILL]]
