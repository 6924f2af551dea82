"""The private_pg fixture (tests/pgcluster.py) does what fault tests rely on: a server of the test's
own that can be frozen, thawed, stopped, SIGKILLed and started again on the same URL, keeping its
data, and is gone after close() whatever state it was left in."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg2  # type: ignore[import-untyped]
import pytest
from pgcluster import PrivateCluster


def connect(cluster: PrivateCluster, timeout: int = 2) -> Any:
    return psycopg2.connect(cluster.url, connect_timeout=timeout)


def query(cluster: PrivateCluster, sql: str) -> list[tuple[Any, ...]]:
    conn = connect(cluster)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def state(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2]


def test_freeze_thaw_stop_start_kill(private_pg: PrivateCluster) -> None:
    pg = private_pg
    url = pg.url
    assert url == f"postgresql://postgres@127.0.0.1:{pg.port}/opmas"
    assert pg.is_up()
    query(pg, "create table t (v int); insert into t values (1)")

    # Frozen: the kernel still completes the TCP handshake, but nobody answers the startup
    # packet, so only connect_timeout ends the attempt.
    pg.freeze()
    assert pg.frozen and not pg.is_up()
    # The postmaster and its checkpointer, background writer, walwriter... all stopped. The
    # backend of the session just closed may be a zombie: its stopped postmaster cannot reap it.
    states = {p: state(p) for p in pg.processes()}
    assert len(states) > 3
    assert set(states.values()) <= {"T", "Z"}, states
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="timeout"):
        connect(pg, timeout=1)
    # Older libpq rounds connect_timeout up to 2 s; more would mean it waited on something else.
    assert time.monotonic() - started < 5

    pg.thaw()
    assert query(pg, "select v from t") == [(1,)]

    pg.stop()
    assert not pg.is_running() and not pg.is_up()
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        connect(pg)

    pg.start()
    assert pg.url == url
    query(pg, "insert into t values (2)")

    # Committed rows survive a SIGKILL of the whole server (crash recovery from the WAL).
    pg.kill()
    assert not pg.is_running()
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        connect(pg)
    pg.start()
    assert pg.url == url
    assert query(pg, "select v from t order by v") == [(1,), (2,)]


def test_kill_postmaster_only_while_frozen(private_pg: PrivateCluster) -> None:
    pg = private_pg
    held = connect(pg)  # a backend that must exit by itself once its postmaster is gone
    try:
        pg.freeze()
        pg.kill(postmaster_only=True)
        assert not pg.is_running()
        pg.start()
        assert query(pg, "select 1") == [(1,)]
    finally:
        held.close()


def test_close_frozen_cluster_removes_everything() -> None:
    pg = PrivateCluster(name="close-frozen")
    try:
        pg.start()
        pid = pg.pid
        assert pid is not None
        pg.freeze()
    finally:
        pg.close()
    assert not Path(f"/proc/{pid}").exists() or state(pid) == "Z"
    assert not pg.root.exists()
