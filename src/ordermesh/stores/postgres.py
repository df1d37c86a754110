"""What every PostgreSQL store shares: a connection pool, transactions, migrations, errors.

A ``PostgresDatabase`` is one store's PostgreSQL schema (``inventory``, ``tracker``,
``api``) reached through a ``psycopg_pool.ConnectionPool``. The stores of one deployment
may share one database: each keeps its tables in its own schema, so the tables keep the
plain names they have in SQLite (the inventory's ``orders`` and the tracker's ``orders``
live side by side). Stores build their SQL on top of this module, which alone decides:

- Connections are autocommit, with ``search_path`` set to the store's schema. A read
  outside a transaction is one statement, so it sees one snapshot on its own.
- Writes run inside ``transaction()`` (READ COMMITTED): the stores take the row locks
  they need (the inventory locks stock rows in sku order) or one advisory lock (the
  tracker), whichever gives the cross-instance exclusivity their Protocol promises.
- Every ``psycopg.Error`` surfaces as a ``StoreError`` naming the store and the step; a
  deadlock or serialization failure as a ``StoreConflictError``: the transaction was
  rolled back and running the whole batch again is expected to succeed.
- A server that goes away (restart, failover) is survived: the error is a ``StoreError``
  like any other (the runner holds the batch and retries it, see ``kafka/outage.py``);
  the idle connections it broke too are tested and replaced at once, rather than failing
  one batch each; while connections fail a request waits for one only briefly, and the
  pool never waits long between attempts to reconnect, so it serves again within
  seconds of the server's return.

Migrations are not applied by opening a store (unlike SQLite, whose file belongs to one
service): ``migrate()`` (``ordermesh db migrate``) applies each store's numbered steps,
one transaction per store under an advisory lock, and records each step in the schema's
``schema_version`` table. A store refuses to open on a schema of another version than
this code's, telling the operator to run ``ordermesh db migrate`` (or to upgrade
OrderMesh, when the schema is newer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from ordermesh.errors import StoreConflictError, StoreError

logger = logging.getLogger(__name__)

# While the server is away the pool logs every failed attempt to reconnect, and every
# connection it discards, at WARNING (libpq's reasons span lines); the runner reports
# the outage once, in its own words (kafka/outage.py). A level set by the operator on
# this logger is kept.
_pool_log = logging.getLogger("psycopg.pool")
if _pool_log.level == logging.NOTSET:
    _pool_log.setLevel(logging.ERROR)

Connection = psycopg.Connection[tuple[Any, ...]]

CONNECT_TIMEOUT_S: Final = 10.0
# How long the pool keeps trying to replace a lost connection. Its pause between
# attempts doubles from 1 s and is reset only when it gives up, so with the default (5
# minutes) a pool could wait a minute after the server's return; after giving up, the
# next request that finds the pool empty starts a new attempt at once.
RECONNECT_TIMEOUT_S: Final = 10.0
# While connections fail (one broke, or none came in time), a request waits at most this
# long for one, not CONNECT_TIMEOUT_S: a server that is away then holds neither a stop
# nor the runner's next retry for long. The first connection handed out ends it.
FAILING_WAIT_S: Final = 2.0
MIGRATE_HINT: Final = "run `ordermesh db migrate`"
# pg_advisory_xact_lock key serializing migrations of every store of a database
_MIGRATION_LOCK: Final = 0x6F6D5F6D6967  # "om_mig"
# a transaction that lost to a concurrent one: rolled back, worth running again
_CONFLICTS: Final = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


class PgMigration(NamedTuple):
    """One schema step; the n-th step of a list brings a schema to version n."""

    summary: str
    statements: tuple[str, ...]


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a connection URL, for labels (never the password)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"postgresql {host}:{port}/{info.get('dbname') or info.get('user') or ''}"


class PostgresDatabase:
    """One store's schema in a PostgreSQL database, over a connection pool.

    ``name`` is both the schema and the label of errors and logs. The pool opens in the
    constructor; unless ``lazy``, the constructor also waits for a first connection and
    checks the schema version (a StoreError if the server is down or the schema is of
    another version). A ``lazy`` database (readers that may start before the schema
    exists) checks on first use, and again on every use until a check passed.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        migrations: Sequence[PgMigration],
        max_size: int = 4,
        lazy: bool = False,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.name = name
        self.migrations = tuple(migrations)
        self.label = f"{name} db ({describe_url(url)})"
        self._timeout_s = connect_timeout_s
        self._local = threading.local()  # .conn: the thread's open transaction
        self._checked = False
        self._failing = False  # see FAILING_WAIT_S
        self.pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, max_size),
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout_s))},
            configure=self._configure,
            timeout=connect_timeout_s,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            name=f"ordermesh-{name}",
            open=False,
        )
        if not lazy:
            # one direct connection first: a server that is down or refuses us fails here
            # with its own reason, rather than as a pool timeout
            with (
                self.translate("connect"),
                psycopg.connect(
                    url, autocommit=True, connect_timeout=max(1, int(connect_timeout_s))
                ) as conn,
            ):
                refusal = self._refusal(self._version(conn))
            if refusal is not None:
                raise refusal
            self._checked = True
        self.pool.open(wait=False)

    def _configure(self, conn: Connection) -> None:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.name)))

    def close(self) -> None:
        self.pool.close()

    # --- schema versions -------------------------------------------------------------

    def _version(self, conn: Connection) -> int:
        (table,) = conn.execute(
            "SELECT to_regclass(%s)", (f"{self.name}.schema_version",)
        ).fetchone() or (None,)
        if table is None:
            return 0
        row = conn.execute(
            sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(
                sql.Identifier(self.name)
            )
        ).fetchone()
        return int(row[0]) if row else 0

    def _refusal(self, version: int) -> StoreError | None:
        latest = len(self.migrations)
        if version > latest:
            return StoreError(
                f"{self.label}: schema version {version} is newer than this OrderMesh"
                f" ({latest}); upgrade OrderMesh"
            )
        if version < latest:
            found = "does not exist yet" if version == 0 else f"is at version {version}"
            return StoreError(
                f"{self.label}: the schema {found}, this OrderMesh needs version {latest};"
                f" {MIGRATE_HINT}"
            )
        return None

    def check(self) -> None:
        """StoreError unless the server answers and the schema is at this code's version."""
        if self._checked:
            return
        with self.connection("check schema version") as conn:
            refusal = self._refusal(self._version(conn))
        if refusal is not None:
            raise refusal
        self._checked = True

    def migrate(self) -> list[str]:
        """Apply the missing steps in one transaction; one line per step applied."""
        applied: list[str] = []
        schema = sql.Identifier(self.name)
        with self.connection("migrate") as conn, self.translate("migrate"), conn.transaction():
            # two `db migrate` at once: the second waits, then finds nothing to do
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(schema))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, summary TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = self._version(conn)
            if version > len(self.migrations):
                raise self._refusal(version) or StoreError(self.label)
            for number, step in enumerate(self.migrations[version:], version + 1):
                for statement in step.statements:
                    conn.execute(statement.encode())
                conn.execute(
                    "INSERT INTO schema_version (version, summary) VALUES (%s, %s)",
                    (number, step.summary),
                )
                line = f"{self.name}: schema version {number}: {step.summary}"
                logger.info("%s: %s", self.label, line)
                applied.append(line)
        self._checked = False
        return applied

    # --- connections and transactions ----------------------------------------------

    @contextmanager
    def translate(self, what: str) -> Iterator[None]:
        """``psycopg.Error`` inside becomes a ``StoreError`` (``StoreConflictError`` for a
        deadlock or serialization failure) naming the store and ``what``."""
        try:
            yield
        except _CONFLICTS as exc:
            raise StoreConflictError(f"{self.label}: {what}: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"{self.label}: {what} failed: {exc}") from exc

    @contextmanager
    def connection(self, what: str) -> Iterator[Connection]:
        """A pooled autocommit connection (errors translated), back to the pool after."""
        broken = False
        wait = min(self._timeout_s, FAILING_WAIT_S) if self._failing else self._timeout_s
        try:
            with self.translate(what), self.pool.connection(timeout=wait) as conn:
                self._failing = False
                try:
                    yield conn
                finally:
                    broken = conn.broken
        except StoreError as exc:
            if isinstance(exc.__cause__, PoolTimeout):
                self._failing = True
            raise
        finally:
            if broken:
                self._failing = True
                self._replace_broken()

    def _replace_broken(self) -> None:
        """A connection was lost (the pool replaces it): test the idle ones too. The
        server's restart broke them as well, and each would fail a batch of its own."""
        try:
            self.pool.check()
        except psycopg.Error as exc:  # closed meanwhile: nothing to replace
            logger.debug("%s: checking the idle connections: %s", self.label, exc)

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "conn", None) is not None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction on one pooled connection; rollback on error.

        The connection is the calling thread's until the end: ``reader()`` and
        ``writer()`` hand it out, so the batch's reads see its writes.
        """
        if self.in_transaction:
            raise StoreError(f"{self.label}: nested transaction")
        self.check()
        with self.connection("transaction") as conn, conn.transaction():
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    def writer(self) -> Connection:
        """The connection of this thread's open ``transaction()``; StoreError outside one."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            raise StoreError(f"{self.label}: write outside transaction()")
        return conn

    @contextmanager
    def reader(self, what: str) -> Iterator[Connection]:
        """The open transaction's connection (its view), else a pooled one (one statement,
        one snapshot)."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            with self.translate(what):
                yield conn
            return
        self.check()
        with self.connection(what) as pooled:
            yield pooled
