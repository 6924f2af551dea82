"""Database URLs → unconnected peewee databases (SQLite or PostgreSQL).

The forms `database.url` takes:

    sqlite:///var/lib/opmas/opmas.db          a file (absolute path; its directory is created)
    sqlite:///:memory:                         a private in-memory database (tests)
    postgresql://user:pass@host:5432/opmas     PostgreSQL through psycopg2; also postgres://,
                                               and the original design's SQLAlchemy-style
                                               postgresql+asyncpg:// and postgresql+psycopg2://

PostgreSQL URLs take libpq connection parameters as query parameters (`?sslmode=require&
connect_timeout=5`, `options=-c%20statement_timeout%3D5000`, `host=/run/postgresql` for a
unix socket), plus one of our own: `schema=NAME` puts the tables in that (existing) schema by
setting the connection's search_path, which is how the tests isolate themselves.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee
import structlog
from playhouse.pool import PooledPostgresqlDatabase

from opmasd.core.errors import StoreError
from opmasd.core.own_files import NotOwnFileError, open_own_file
from opmasd.core.urls import redacted

log = structlog.get_logger(__name__)

ACCEPTED_URLS = (
    "sqlite:///absolute/path.db, sqlite:///:memory:, postgresql://user:pass@host:port/db "
    "(also postgres://, postgresql+asyncpg://, postgresql+psycopg2://)"
)
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2")
# Every scheme database.url may have (the configuration checks it against this).
SCHEMES = ("sqlite", *_POSTGRES_SCHEMES)
# The schema name ends up inside a connection option: a plain identifier only, nothing to quote.
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_postgres_url(url: str) -> bool:
    return "://" in url and urlsplit(url).scheme.lower() in _POSTGRES_SCHEMES


def database_from_url(url: str, *, pool_size: int = 5) -> peewee.Database:
    """An unconnected peewee database for `url`; ValueError for a URL we do not accept."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size}")
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "sqlite":
        return _sqlite_database(url)
    if scheme in _POSTGRES_SCHEMES:
        return _postgres_database(url, pool_size)
    raise ValueError(
        f"unsupported database URL scheme {scheme or '(none)'!r} in {redacted(url)!r}: accepted are "
        + ACCEPTED_URLS
    )


def _sqlite_database(url: str) -> peewee.SqliteDatabase:
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc or not path.startswith("/") or parts.query:
        raise ValueError(f"bad SQLite URL {url!r}: expected sqlite:///absolute/path.db or sqlite:///:memory:")
    if path == "/:memory:":
        target = ":memory:"
    else:
        # sqlite:////abs (SQLAlchemy's spelling of an absolute path) means the same file.
        file = Path("/" + path.lstrip("/"))
        if file.name == "":
            raise ValueError(f"bad SQLite URL {url!r}: no file name")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            _private(file)
        except OSError as exc:
            log.error("store.open_failed", url=url, error=str(exc))
            raise StoreError(f"cannot create the directory of the database {url}: {exc}") from exc
        target = str(file)
    return peewee.SqliteDatabase(
        target,
        pragmas={
            # WAL: readers do not block the writer; NORMAL is durable across process crashes
            # in WAL mode, and only a power loss may cost the last commits.
            "journal_mode": "wal",
            "synchronous": "normal",
            "foreign_keys": 1,
            "busy_timeout": 5000,
        },
        # Take the write lock at BEGIN: upgrading a read lock later fails at once with
        # SQLITE_BUSY instead of waiting out busy_timeout.
        lock_type="IMMEDIATE",
        # One connection, shared under SqlStore's call lock (see sql.py) whichever thread calls.
        thread_safe=False,
        check_same_thread=False,
    )


def _postgres_database(url: str, pool_size: int) -> peewee.PostgresqlDatabase:
    parts = urlsplit(url)
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise ValueError(f"bad PostgreSQL URL {redacted(url)!r}: no database name")
    params: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    schema = params.pop("schema", None)
    if schema is not None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema {schema!r} in PostgreSQL URL: use letters, digits and _")
        params["options"] = f"{params.get('options', '')} -c search_path={schema}".strip()
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    if parts.hostname:
        params["host"] = parts.hostname
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in PostgreSQL URL {redacted(url)!r}") from exc
    if port is not None:
        params["port"] = port
    # libpq waits forever for an unreachable host by default; a daemon should report it.
    params.setdefault("connect_timeout", 10)
    params.setdefault("application_name", "opmasd")
    # Every wait bounded: a server that stops answering (frozen, or cut off by a firewall) is
    # noticed by TCP keepalives within ~25 s, and no statement runs longer than 10 s.
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 10)
    params.setdefault("keepalives_interval", 5)
    params.setdefault("keepalives_count", 3)
    if "statement_timeout" not in params.get("options", ""):
        params["options"] = f"{params.get('options', '')} -c statement_timeout=10000".strip()
    # playhouse.pool has no type annotations.
    database: peewee.PostgresqlDatabase = _Pool(  # type: ignore[no-untyped-call]
        dbname,
        max_connections=pool_size,
        # Recycle idle connections before firewalls and proxies silently cut them.
        stale_timeout=300,
        timeout=10,
        **params,
    )
    return database


class _Pool(PooledPostgresqlDatabase):
    """playhouse's pool, without its health check at checkout.

    That check is a `SELECT 1` round trip on every checkout, outside any call's deadline: on a
    frozen server it blocks forever (SqlStore cuts calls only once they hold a connection), and
    it costs a round trip per call anyway. A connection the server dropped fails on its first
    use instead, and SqlStore replaces it and retries the call once.
    """

    def _is_closed(self, conn: Any) -> bool:
        return bool(conn.closed)


def _private(file: Path) -> None:
    """The database file readable by its owner only (agents' specs and environments are in it),
    made so before SQLite opens it: its -wal and -shm files take the database's mode.

    Nobody else may swap it (opmasd is often root): its directory must be owned by opmasd's
    user or root and not writable by others, and neither the file nor its -wal and -shm may be
    a symlink (SQLite itself refuses a symlinked -wal or -shm, with no better word than "unable
    to open database file"). StoreError naming the path when one is."""
    directory = os.stat(file.parent)
    if directory.st_uid not in (os.geteuid(), 0) or directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(
            f"refusing to keep the database in {file.parent}: owned by {_user(directory.st_uid)}, "
            f"mode {stat.S_IMODE(directory.st_mode):04o}; others could swap the file: make the "
            "directory opmasd's user's (or root's) and not writable by others, or choose another"
        )
    for path in (file, file.with_name(file.name + "-wal"), file.with_name(file.name + "-shm")):
        try:
            flags = os.O_RDWR | os.O_CREAT if path == file else os.O_RDONLY
            fd = open_own_file(path, flags, 0o600)
        except FileNotFoundError:
            continue  # no -wal or -shm (yet)
        except NotOwnFileError as exc:
            raise StoreError(
                f"{exc}; the database's files are opmasd's own: remove it, or choose another database.url"
            ) from None
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
