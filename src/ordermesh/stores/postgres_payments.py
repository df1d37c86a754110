"""``PaymentsStore`` on PostgreSQL, shared by every payments instance; see
``stores/payments.py`` and ``stores/postgres.py`` (pool, migrations).

Tables ``payments`` and ``outbox`` in the ``payments`` schema. ``load`` inside a
transaction takes the rows with ``FOR UPDATE`` (in order_id order, so two batches over
the same orders queue up rather than deadlock), so a batch's intents and a worker's
outcome on one order never decide on a stale copy. ``claim`` takes due rows with
``FOR UPDATE SKIP LOCKED``: instances claiming at once split the due work, and a row
leased to one is not offered to another until its lease runs out.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final

from ordermesh.stores.order_rows import PostgresOrderRows
from ordermesh.stores.outbox import POSTGRES_TABLE, PostgresOutbox, WithOutbox
from ordermesh.stores.payments import PaymentRow
from ordermesh.stores.postgres import PgMigration, PostgresDatabase

SCHEMA: Final = "payments"

# Append only: the n-th step brings the schema to version n (stores/postgres.py).
MIGRATIONS: Final = (
    PgMigration(
        "payments and their outbox",
        (
            """
            CREATE TABLE payments (
                order_id TEXT PRIMARY KEY,
                amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
                currency TEXT NOT NULL,
                customer_id TEXT NOT NULL,
                card TEXT NOT NULL,
                state TEXT NOT NULL,
                goal TEXT NOT NULL,
                cause TEXT NOT NULL,
                authorization_id TEXT NOT NULL,
                started BOOLEAN NOT NULL,
                op TEXT,
                attempts INTEGER NOT NULL,
                due_at DOUBLE PRECISION NOT NULL,
                claimed_until DOUBLE PRECISION NOT NULL,
                claim_token TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )
            """,
            "CREATE INDEX payments_due ON payments (due_at) WHERE op IS NOT NULL",
            *POSTGRES_TABLE,
        ),
    ),
)


def _row(values: Sequence[Any]) -> PaymentRow:
    return PaymentRow(*values)


class PostgresPaymentsStore(WithOutbox):
    """The payments rows and outbox in PostgreSQL; one object per thread."""

    def __init__(self, url: str, *, pool_size: int = 2) -> None:
        self._db = PostgresDatabase(url, name=SCHEMA, migrations=MIGRATIONS, max_size=pool_size)
        self.label = self._db.label
        self._outbox = PostgresOutbox(self._db)
        self._rows = PostgresOrderRows(self._db, "payments", PaymentRow._fields, _row)

    def transaction(self) -> AbstractContextManager[None]:
        return self._db.transaction()

    def load(self, order_ids: Collection[str]) -> dict[str, PaymentRow]:
        return self._rows.load(order_ids)

    def save(self, rows: Sequence[PaymentRow]) -> None:
        self._rows.save(rows)

    def claim(self, now: float, lease_s: float, limit: int, token: str) -> list[PaymentRow]:
        with self._db.transaction():
            conn = self._db.writer()
            with self._db.translate("claim payments"):
                rows = conn.execute(
                    "UPDATE payments AS p SET claimed_until = %s, claim_token = %s,"
                    " started = p.started OR p.op = 'authorize'"
                    " WHERE p.order_id IN ("
                    "  SELECT order_id FROM payments WHERE op IS NOT NULL AND due_at <= %s"
                    "  AND claimed_until < %s ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED)"
                    f" RETURNING {', '.join('p.' + c for c in PaymentRow._fields)}",
                    (now + lease_s, token, now, now, limit),
                ).fetchall()
        return sorted((_row(r) for r in rows), key=lambda r: r.due_at)

    def due_count(self) -> int:
        return self._rows.count("count due payments", "op IS NOT NULL")

    def close(self) -> None:
        self._db.close()
