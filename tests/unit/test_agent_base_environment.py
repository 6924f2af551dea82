"""What of opmasd's own environment an agent inherits: nothing that is opmasd's alone."""

from __future__ import annotations

from opmasd.manager.launch import agent_base_environment


def test_opmasd_s_systemd_and_own_variables_do_not_reach_agents() -> None:
    daemon = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OPMAS_CONFIG": "/etc/opmas/opmasd.yaml",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "LISTEN_FDS": "1",
        "INVOCATION_ID": "0" * 32,
        "JOURNAL_STREAM": "8:123",
        # opmasd's unit's directories: an agent keeping its state there would write opmasd's.
        "STATE_DIRECTORY": "/var/lib/opmas",
        "RUNTIME_DIRECTORY": "/run/opmas",
        "LOGS_DIRECTORY": "/var/log/opmas",
        "CONFIGURATION_DIRECTORY": "/etc/opmas",
        "CREDENTIALS_DIRECTORY": "/run/credentials/opmasd.service",
        "SYSTEMD_EXEC_PID": "4242",
        "MANAGERPID": "1",
    }
    assert agent_base_environment(daemon) == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
