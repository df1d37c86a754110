"""``PaymentsStore`` on a SQLite file (``payments.db``); see ``stores/payments.py``.

The batch handler and the worker each open their own ``SqlitePaymentsStore`` (their own
connection) on the one file; ``BEGIN IMMEDIATE`` makes each transaction exclusive, so
a claim and an outcome never interleave with a batch's intents.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final

from ordermesh.stores.order_rows import SqliteOrderRows
from ordermesh.stores.outbox import SQLITE_TABLE, SqliteOutbox, WithOutbox
from ordermesh.stores.payments import PaymentRow
from ordermesh.stores.sqlite import Migration, SqliteDatabase, statements

COLUMNS: Final = PaymentRow._fields
_COLUMN_LIST: Final = ", ".join(COLUMNS)

# Append only: the n-th step brings a database to schema version n (stores/sqlite.py).
MIGRATIONS: Final = (
    Migration(
        "payments and their outbox",
        statements(
            """
            CREATE TABLE payments (
                order_id TEXT PRIMARY KEY,
                amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0),
                currency TEXT NOT NULL,
                customer_id TEXT NOT NULL,
                card TEXT NOT NULL,
                state TEXT NOT NULL,
                goal TEXT NOT NULL,
                cause TEXT NOT NULL,
                authorization_id TEXT NOT NULL,
                started INTEGER NOT NULL,
                op TEXT,
                attempts INTEGER NOT NULL,
                due_at REAL NOT NULL,
                claimed_until REAL NOT NULL,
                claim_token TEXT NOT NULL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL
            )
            """,
            # the worker's claim reads only rows with work, earliest due first
            "CREATE INDEX payments_due ON payments (due_at) WHERE op IS NOT NULL",
            *SQLITE_TABLE,
        ),
    ),
)


def _row(values: Sequence[Any]) -> PaymentRow:
    row = PaymentRow(*values)
    return row._replace(started=bool(row.started))


def _values(row: PaymentRow) -> tuple[Any, ...]:
    return (*row[:9], int(row.started), *row[10:])


class SqlitePaymentsStore(WithOutbox):
    """The payments rows and outbox in a SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDatabase(path, name="payments", migrations=MIGRATIONS)
        self._db.connection()
        self._outbox = SqliteOutbox(self._db)
        self._rows = SqliteOrderRows(self._db, "payments", COLUMNS, _row, _values)

    def transaction(self) -> AbstractContextManager[None]:
        return self._db.transaction()

    def load(self, order_ids: Collection[str]) -> dict[str, PaymentRow]:
        return self._rows.load(order_ids)

    def save(self, rows: Sequence[PaymentRow]) -> None:
        self._rows.save(rows)

    def claim(self, now: float, lease_s: float, limit: int, token: str) -> list[PaymentRow]:
        db = self._db
        with db.transaction():
            with db.translate("claim payments"):
                found = (
                    db.writer()
                    .execute(
                        f"SELECT {_COLUMN_LIST} FROM payments WHERE op IS NOT NULL"
                        " AND due_at <= ? AND claimed_until < ? ORDER BY due_at LIMIT ?",
                        (now, now, limit),
                    )
                    .fetchall()
                )
            claimed = [
                _row(r)._replace(
                    claimed_until=now + lease_s,
                    claim_token=token,
                    started=bool(r[9]) or r[10] == "authorize",
                )
                for r in found
            ]
            db.write_many(
                "claim payments",
                "UPDATE payments SET claimed_until = ?, claim_token = ?, started = ?"
                " WHERE order_id = ?",
                [(r.claimed_until, token, int(r.started), r.order_id) for r in claimed],
            )
        return claimed

    def due_count(self) -> int:
        return self._rows.count("count due payments", "op IS NOT NULL")

    def close(self) -> None:
        self._db.close()
