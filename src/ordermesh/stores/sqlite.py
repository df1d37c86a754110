"""What every SQLite store shares: opening a file, its pragmas, transactions, migrations.

A ``SqliteDatabase`` is one database file over one connection. Stores build their SQL on
top of it; this module is the only place that decides how a file is opened:

- Read-write: the file (and its directory) is created, the journal is WAL, ``synchronous``
  is what the store asks for, and the schema is migrated (below) before first use.
- Read-only (``readonly=True``): SQLite's ``mode=ro`` URI, so a missing file is a
  ``StoreError`` rather than a new empty database, and every write fails. A read-only
  open never migrates: a schema of another version than this code's is refused.
- Writes run inside ``transaction()``: ``BEGIN IMMEDIATE`` takes the write lock up front,
  so a read-check-write inside it is atomic across processes; the busy timeout makes
  several instances sharing one file take turns.
- Every ``sqlite3.Error`` surfaces as a ``StoreError`` naming the database and the step.
- Checkpoints (copying the WAL back into the file) run in a background thread with its
  own connection, every ``CHECKPOINT_EVERY_S`` once the store has written. SQLite's own
  automatic checkpoint runs inside the commit that crosses its threshold: measured with
  the inventory at 5,000 orders/s, those commits were most of the batches slower than
  15 ms (55 of 5,591 against 10 of 8,871 without them; the slowest 167 ms against 28 ms).
  The automatic checkpoint stays, at ``WAL_FALLBACK_PAGES``, in case the thread falls
  behind.

Migrations: each store has an ordered list of ``Migration`` steps; the database records
how many have been applied in ``PRAGMA user_version`` (0 in a new file, and in files of
releases before versioning, whose steps are therefore written to be no-ops on tables
that exist already). Opening read-write applies the missing steps and sets the version in
the same ``BEGIN IMMEDIATE`` transaction, so two instances opening one old file upgrade
it once, and a failed step leaves the file as it was. A file whose version is newer than
the list is refused: this code does not know its tables.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

from ordermesh.errors import StoreError
from ordermesh.repeats import Repeats

logger = logging.getLogger(__name__)

Synchronous = Literal["NORMAL", "FULL"]

# SQLite allows 32766 host parameters per statement (999 before 3.32); 500 stays far
# below both and keeps the statement small enough to be cached and reused.
IN_CHUNK: Final = 500
BUSY_TIMEOUT_S: Final = 30.0
CHECKPOINT_EVERY_S: Final = 0.5
# SQLite's default is 1000 pages (4 MB); this one (64 MB) is only reached when the
# background checkpoints fall behind
WAL_FALLBACK_PAGES: Final = 16_000


class Migration(NamedTuple):
    """One schema step; the n-th step of a list brings a database to version n."""

    summary: str
    apply: Callable[[sqlite3.Connection], None]


def statements(*sql: str) -> Callable[[sqlite3.Connection], None]:
    """A migration step that runs these statements in order."""

    def apply(conn: sqlite3.Connection) -> None:
        for statement in sql:
            conn.execute(statement)

    return apply


def add_column(table: str, column: str, sql_type: str) -> Callable[[sqlite3.Connection], None]:
    """A step adding a (nullable) column, unless a file from before versioning has it."""

    def apply(conn: sqlite3.Connection) -> None:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")

    return apply


def schema_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), IN_CHUNK):
        yield values[start : start + IN_CHUNK]


class SqliteDatabase:
    """One SQLite file over one connection; every use holds ``lock``.

    ``name`` (``inventory``, ``tracker``, ``api``) labels errors and logs. The connection
    opens on the first ``connection()`` (the constructor does not open it), and a failed
    open is retried on the next use: a read-only reader may start before the file exists.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        migrations: Sequence[Migration],
        readonly: bool = False,
        synchronous: Synchronous = "FULL",
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.name = name
        self.readonly = readonly
        self.migrations = tuple(migrations)
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        # sqlite3 connections must not run statements from two threads at once; stores
        # may be called from a thread pool (the API) or handed to a worker thread
        self.lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def label(self) -> str:
        return f"{self.name} db {self.path}"

    # --- opening -------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        """The open connection, opening (and, read-write, migrating) it first if needed."""
        with self.lock:
            if self._conn is None:
                self._conn = self._open()
            return self._conn

    def _open(self) -> sqlite3.Connection:
        path = self.path
        try:
            if self.readonly:
                target, uri = f"{path.resolve().as_uri()}?mode=ro", True
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                target, uri = str(path), False
            # isolation_level=None: no implicit BEGIN; transaction() issues BEGIN IMMEDIATE.
            # check_same_thread=False: guarded by self.lock instead.
            conn = sqlite3.connect(
                target,
                uri=uri,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.label}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            if self.readonly:
                # fails here (not on the first query) when the file is not a database
                self._check_version(schema_version(conn))
            else:
                self._configure(conn)
                self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {self.label}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.label}: cannot switch to WAL journal (got {mode!r})")
        # FULL fsyncs the WAL at every commit. The runners commit Kafka offsets right
        # after our COMMIT, so a transaction must survive not only kill -9 (NORMAL is
        # enough for that: the WAL is in the OS page cache) but also a power loss or OS
        # crash, which under NORMAL could roll back a transaction whose events were
        # produced and whose offsets were committed. With one commit per batch the fsync
        # costs little; NORMAL is for stores whose writes are safe to lose (see api.db).
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_FALLBACK_PAGES}")

    def _check_version(self, version: int) -> None:
        latest = len(self.migrations)
        if version > latest:
            raise StoreError(
                f"{self.label}: database schema version {version} is newer than this"
                f" OrderMesh ({latest})"
            )
        if self.readonly and version < latest:
            raise StoreError(
                f"{self.label}: database schema version {version} is older than this"
                f" OrderMesh ({latest}); a read-only open does not upgrade it (starting"
                f" the {self.name} service does)"
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        latest = len(self.migrations)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # read inside the write lock: a second instance sees the first one's upgrade
            version = schema_version(conn)
            self._check_version(version)
            for number, step in enumerate(self.migrations[version:], version + 1):
                step.apply(conn)
                logger.info("%s: schema version %d: %s", self.label, number, step.summary)
            if version != latest:
                conn.execute(f"PRAGMA user_version = {latest}")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    def close(self) -> None:
        self._closing.set()
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.join()
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._closing = threading.Event()  # a later write opens it again

    # --- checkpoints ---------------------------------------------------------------

    def _start_checkpoints(self) -> None:
        if self._checkpointer is None:
            thread = threading.Thread(
                target=self._checkpoints,
                args=(self._closing,),
                name=f"{self.name}-checkpoint",
                daemon=True,
            )
            self._checkpointer = thread
            thread.start()

    def _checkpoints(self, closing: threading.Event) -> None:
        """Checkpoint the WAL every ``CHECKPOINT_EVERY_S`` until the store is closed.

        PASSIVE: it copies what no reader still needs and never waits for, nor blocks,
        the writer or the readers. Failures are logged and the next round tries again.
        """
        conn: sqlite3.Connection | None = None
        failures = Repeats(every=100)
        try:
            while not closing.wait(CHECKPOINT_EVERY_S):
                try:
                    if conn is None:
                        conn = sqlite3.connect(
                            str(self.path), timeout=self._busy_timeout_s, isolation_level=None
                        )
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    failures.succeeded()
                except sqlite3.Error as exc:
                    if failures.failed():
                        logger.warning(
                            "%s: background checkpoint failed (%d in a row): %s",
                            self.label,
                            failures.count,
                            exc,
                        )
        finally:
            if conn is not None:
                conn.close()

    # --- statements ----------------------------------------------------------------

    @contextmanager
    def translate(self, what: str) -> Iterator[None]:
        """``sqlite3.Error`` inside becomes a ``StoreError`` naming the db and ``what``."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.label}: {what} failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``; rollback on error."""
        if self.readonly:
            raise StoreError(f"{self.label}: opened read-only")
        with self.lock:
            conn = self.connection()
            if conn.in_transaction:
                raise StoreError(f"{self.label}: nested transaction")
            with self.translate("begin"):
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                with self.translate("commit"):
                    conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
        self._start_checkpoints()

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: it changes whenever another connection (in
        any process) commits to the file. Costs microseconds; reads no table."""
        with self.lock, self.translate("data version"):
            (version,) = self.connection().execute("PRAGMA data_version").fetchone()
        return int(version)

    def writer(self) -> sqlite3.Connection:
        """The connection of the open ``transaction()``; StoreError outside one."""
        conn = self._conn
        if conn is None or not conn.in_transaction:
            raise StoreError(f"{self.label}: write outside transaction()")
        return conn

    @contextmanager
    def read(self, what: str) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for a read of several statements (or the open write
        transaction's view, when called inside one)."""
        with self.lock:
            conn = self.connection()
            if conn.in_transaction:
                with self.translate(what):
                    yield conn
                return
            with self.translate(what):
                conn.execute("BEGIN")
            try:
                with self.translate(what):
                    yield conn
            finally:
                self._rollback(conn)

    def select_in(self, sql: str, values: Collection[str]) -> list[Any]:
        """Rows of ``sql`` (with one ``{marks}`` slot) for ``values``, in chunks."""
        ordered = list(values)
        if not ordered:
            return []
        full_sql = sql.format(marks=",".join("?" * IN_CHUNK))
        rows: list[Any] = []
        with self.read("select") as conn:
            for chunk in _chunks(ordered):
                text = (
                    full_sql
                    if len(chunk) == IN_CHUNK
                    else sql.format(marks=",".join("?" * len(chunk)))
                )
                rows += conn.execute(text, chunk).fetchall()
        return rows

    def write_many(self, what: str, sql: str, params: Sequence[Any]) -> int:
        """``executemany`` inside the open transaction; the rows it changed (nothing to
        write needs no transaction)."""
        if not params:
            return 0
        conn = self.writer()
        with self.translate(what):
            return int(conn.executemany(sql, params).rowcount)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("%s: rollback failed", self.label)
