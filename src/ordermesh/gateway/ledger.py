"""The gateway's ledger: every applied operation, keyed by its idempotency key.

The ground truth for money (``ordermesh verify`` reads it over HTTP). One SQLite file
(``settings.gateway_db_path()``) in WAL mode, and nothing else holds state, so a gateway
killed at any moment restarts deciding exactly as before. The server appends on its
event loop and commits the rows of the calls that arrived together in one transaction
(``commit``: a group commit; a commit costs what tens of inserts do), answering each call
only once its row is committed. ``synchronous=NORMAL``:
a committed row survives the process being killed (the WAL is in the OS's hands); a
power cut may lose the last rows, which a simulator may accept and a real processor would
not.

Reads for the ledger and its summaries run on a thread with a connection of their own
(WAL readers never block the writer), so paging through a big ledger does not stall calls.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

from ordermesh.errors import StoreError
from ordermesh.gateway.protocol import OPERATIONS, Operation
from ordermesh.gateway.rules import Decision
from ordermesh.gateway.wire import LedgerPage, OperationBody, OrderSummary, SummaryPage

SCHEMA_VERSION: Final = 1
_COLUMNS: Final = (
    "seq, key, operation, approved, order_id, authorization_id, amount_cents, currency, reason, at"
)
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    operation TEXT NOT NULL,
    approved INTEGER NOT NULL,
    order_id TEXT NOT NULL,
    authorization_id TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    currency TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_authorization ON ledger (authorization_id);
CREATE INDEX IF NOT EXISTS ledger_order ON ledger (order_id);
"""

_Row = tuple[int, str, str, int, str, str, int, str, str, float]


def _body(row: _Row) -> OperationBody:
    seq, key, operation, approved, order_id, auth_id, cents, currency, reason, at = row
    assert operation in OPERATIONS
    op: Operation = operation
    return OperationBody(
        seq, key, op, bool(approved), order_id, auth_id, cents, currency, reason, at
    )


def _connect(path: Path, *, check_same_thread: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class Ledger:
    """Append and read the ledger. ``get``/``history``/``append``/``commit`` belong to
    one thread (the server's event loop; ``get`` and ``history`` see rows not yet
    committed); ``page``/``summaries``/``last_seq`` may run on any and see committed rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(path, check_same_thread=True)
            self._migrate()
            self._reader = _connect(path, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"gateway ledger {path}: {exc}") from exc
        self._read_lock = threading.Lock()

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version not in (0, SCHEMA_VERSION):
            raise StoreError(
                f"gateway ledger {self.path} has schema version {version}, this code knows "
                f"{SCHEMA_VERSION}"
            )
        self._conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        self._conn.close()
        self._reader.close()

    # --- the hot path (the event loop's thread) ----------------------------------------

    def get(self, key: str) -> tuple[str, OperationBody] | None:
        """(fingerprint, row) of ``key``; None: never applied."""
        try:
            row = self._conn.execute(
                f"SELECT fingerprint, {_COLUMNS} FROM ledger WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"gateway ledger: {exc}") from exc
        return None if row is None else (row[0], _body(row[1:]))

    def history(self, authorization_id: str) -> list[OperationBody]:
        """Every row of one authorization, in ledger order."""
        try:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM ledger WHERE authorization_id = ? ORDER BY seq",
                (authorization_id,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"gateway ledger: {exc}") from exc
        return [_body(row) for row in rows]

    def append(
        self, key: str, fingerprint: str, operation: Operation, decision: Decision, at: float
    ) -> OperationBody:
        """Record one applied operation, in the open transaction (``commit`` ends it)."""
        try:
            if not self._conn.in_transaction:
                self._conn.execute("BEGIN")
            cursor = self._conn.execute(
                "INSERT INTO ledger (key, fingerprint, operation, approved, order_id,"
                " authorization_id, amount_cents, currency, reason, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    fingerprint,
                    operation,
                    int(decision.approved),
                    decision.order_id,
                    decision.authorization_id,
                    decision.amount_cents,
                    decision.currency,
                    decision.reason,
                    at,
                ),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"gateway ledger: {exc}") from exc
        seq = cursor.lastrowid
        assert seq is not None
        d = decision
        return OperationBody(
            seq, key, operation, d.approved, d.order_id, d.authorization_id, d.amount_cents,
            d.currency, d.reason, at,
        )  # fmt: skip

    @property
    def pending(self) -> bool:
        """Whether rows are appended and not yet committed."""
        return self._conn.in_transaction

    def commit(self) -> None:
        """Commit every row appended since the last commit; on failure they are gone."""
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise StoreError(f"gateway ledger commit: {exc}") from exc

    # --- reads (any thread) ------------------------------------------------------------

    def _read(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        try:
            with self._read_lock:
                return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"gateway ledger: {exc}") from exc

    def last_seq(self) -> int:
        rows = self._read("SELECT coalesce(max(seq), 0) FROM ledger", ())
        return int(rows[0][0])

    def page(self, after: int, limit: int) -> LedgerPage:
        """Up to ``limit`` rows with ``seq > after``, in order."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM ledger WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        )
        entries = [_body(row) for row in rows]
        return LedgerPage(entries, entries[-1].seq if len(entries) == limit else None)

    def summaries(self, after: str, limit: int, order_id: str | None = None) -> SummaryPage:
        """Per-order money of up to ``limit`` orders with ids after ``after`` (or of the
        one ``order_id``). Rows of no order (a capture of an unknown authorization) are
        left out: they moved no money."""
        params: tuple[str, ...]
        if order_id is not None:
            high, ids = order_id, [order_id]
            where, params = "order_id = ?", (order_id,)
        else:
            found = self._read(
                "SELECT DISTINCT order_id FROM ledger WHERE order_id > ? ORDER BY order_id LIMIT ?",
                (after, limit),
            )
            ids = [str(row[0]) for row in found if row[0]]
            if not ids:
                return SummaryPage([], None)
            high = ids[-1]
            where, params = "order_id > ? AND order_id <= ?", (after, high)
        rows = self._read(
            "SELECT order_id, operation, approved, count(*), coalesce(sum(amount_cents), 0)"
            f" FROM ledger WHERE {where} GROUP BY order_id, operation, approved",
            params,
        )
        acc: dict[str, dict[str, int]] = {oid: {} for oid in ids}
        for oid, operation, approved, count, cents in rows:
            fields = acc.get(str(oid))
            if fields is None:
                continue
            n, total = int(count), int(cents)
            if not approved:
                fields["declines"] = fields.get("declines", 0) + n
                continue
            name = _SUMMARY_FIELDS[str(operation)]
            fields[name[0]] = fields.get(name[0], 0) + n
            fields[name[1]] = fields.get(name[1], 0) + total
        orders = [OrderSummary(oid, **fields) for oid, fields in acc.items() if fields]
        more = order_id is None and len(ids) == limit
        return SummaryPage(orders, high if more else None)


# (count field, cents field) of each operation in an OrderSummary
_SUMMARY_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "authorize": ("authorizations", "authorized_cents"),
    "capture": ("captures", "captured_cents"),
    "void": ("voids", "voided_cents"),
    "refund": ("refunds", "refunded_cents"),
}


def read_summaries(path: Path, page_size: int = 10_000) -> dict[str, OrderSummary]:
    """Every order's money in the ledger file at ``path`` (the gateway need not run)."""
    ledger = Ledger(path)
    try:
        found: dict[str, OrderSummary] = {}
        cursor: str | None = ""
        while cursor is not None:
            page = ledger.summaries(cursor, page_size)
            found.update((summary.order_id, summary) for summary in page.orders)
            cursor = page.next_after
        return found
    finally:
        ledger.close()
