"""Open the stores the settings ask for: the one place that picks a database backend.

``Settings.database_url`` (``ORDERMESH_DATABASE_URL``) chooses:

- unset, ``sqlite:`` or ``sqlite://``: SQLite files, one per store, at
  ``Settings.inventory_db_path()``, ``tracker_db_path()`` and ``api_db_path()`` (under
  the data dir unless set one by one);
- ``postgresql://...`` (or ``postgres://``): one PostgreSQL database shared by every
  instance of every service, each store in its own schema (``stores/postgres.py``).
  Its schemas are created and upgraded by ``migrate`` (``ordermesh db migrate``), never
  by opening a store: a store refuses a schema of another version.

Everything else gets the store Protocols (``stores/inventory.py``, ``stores/tracker.py``,
``stores/idempotency.py``), never a concrete class. The PostgreSQL modules (and so
psycopg) are imported only when the settings ask for PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from ordermesh.config import Settings
from ordermesh.errors import ConfigError, StoreError
from ordermesh.stores import (
    sqlite_fulfilment,
    sqlite_idempotency,
    sqlite_inventory,
    sqlite_payments,
    sqlite_tracker,
)
from ordermesh.stores.fulfilment import FulfilmentStore
from ordermesh.stores.idempotency import IdempotencyStore
from ordermesh.stores.inventory import InventoryStore
from ordermesh.stores.payments import PaymentsStore
from ordermesh.stores.sqlite import SqliteDatabase, schema_version
from ordermesh.stores.sqlite_fulfilment import SqliteFulfilmentStore
from ordermesh.stores.sqlite_idempotency import SqliteIdempotencyStore
from ordermesh.stores.sqlite_inventory import SqliteInventoryStore
from ordermesh.stores.sqlite_payments import SqlitePaymentsStore
from ordermesh.stores.sqlite_tracker import SqliteOrderQueries, SqliteTrackerStore
from ordermesh.stores.tracker import OrderQueries, TrackerStore

Backend = Literal["sqlite", "postgres"]

_POSTGRES_SCHEMES: Final = frozenset({"postgresql", "postgres"})


def _redacted(url: str) -> str:
    """``url`` without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def backend(settings: Settings) -> Backend:
    """The backend ``settings.database_url`` names; ConfigError if it is not usable."""
    url = settings.database_url
    if url is None or not url.strip():
        return "sqlite"
    scheme, sep, rest = url.strip().partition(":")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        if rest not in ("", "//"):
            raise ConfigError(
                f"ORDERMESH_DATABASE_URL={_redacted(url)!r}: a sqlite: URL takes no path;"
                " the files go to the data dir, or where ORDERMESH_INVENTORY_DB,"
                " ORDERMESH_TRACKER_DB and ORDERMESH_API_DB say"
            )
        return "sqlite"
    if sep and scheme in _POSTGRES_SCHEMES:
        return "postgres"
    raise ConfigError(
        f"ORDERMESH_DATABASE_URL={_redacted(url)!r}: unknown database; expected sqlite:"
        " or postgresql://..."
    )


def _postgres_url(settings: Settings) -> str | None:
    """The PostgreSQL URL of the settings, or None when they ask for SQLite."""
    if backend(settings) == "sqlite":
        return None
    assert settings.database_url is not None  # backend() said postgres
    return settings.database_url.strip()


def open_inventory_store(settings: Settings, *, readonly: bool = False) -> InventoryStore:
    """The inventory service's store; ``readonly`` for ``verify`` (never creates or
    upgrades the database: a missing or older one is a StoreError)."""
    url = _postgres_url(settings)
    if url is not None:
        from ordermesh.stores.postgres_inventory import PostgresInventoryStore

        return PostgresInventoryStore(url, readonly=readonly)
    return SqliteInventoryStore(settings.inventory_db_path(), readonly=readonly)


def open_tracker_store(settings: Settings) -> TrackerStore:
    """The tracker service's store, read-write (SQLite: created and upgraded as needed)."""
    url = _postgres_url(settings)
    if url is not None:
        from ordermesh.stores.postgres_tracker import PostgresTrackerStore

        return PostgresTrackerStore(url)
    return SqliteTrackerStore(settings.tracker_db_path())


def open_order_queries(settings: Settings) -> OrderQueries:
    """Read-only order queries over the tracker's store (API, CLI, ``verify``).

    Never fails because the tracker's database (or schema) is not there yet: queries
    raise StoreError until it is.
    """
    url = _postgres_url(settings)
    if url is not None:
        from ordermesh.stores.postgres_tracker import PostgresOrderQueries

        return PostgresOrderQueries(url)
    return SqliteOrderQueries(settings.tracker_db_path())


def open_idempotency_store(settings: Settings) -> IdempotencyStore:
    """The API's idempotency keys (SQLite: created and upgraded as needed)."""
    url = _postgres_url(settings)
    if url is not None:
        from ordermesh.stores.postgres_idempotency import PostgresIdempotencyStore

        return PostgresIdempotencyStore(url)
    return SqliteIdempotencyStore(settings.api_db_path())


def open_payments_store(settings: Settings) -> PaymentsStore:
    """The payments service's store, read-write (SQLite: created and upgraded as needed).
    Each caller gets its own connection (the batch handler and the worker open one each)."""
    url = _postgres_url(settings)
    if url is not None:
        from ordermesh.stores.postgres_payments import PostgresPaymentsStore

        return PostgresPaymentsStore(url)
    return SqlitePaymentsStore(settings.payments_db_path())


def open_fulfilment_store(settings: Settings) -> FulfilmentStore:
    """The fulfilment service's store, read-write; one connection per caller."""
    url = _postgres_url(settings)
    if url is not None:
        from ordermesh.stores.postgres_fulfilment import PostgresFulfilmentStore

        return PostgresFulfilmentStore(url)
    return SqliteFulfilmentStore(settings.fulfilment_db_path())


def migrate(settings: Settings) -> list[str]:
    """Create or upgrade every store's schema to this code's version.

    One line per migration step applied, ``<store>: schema version <n>: <summary>``;
    empty when every store was up to date. StoreError if a database cannot be reached
    or holds a schema newer than this code. Safe to run from several hosts at once.
    """
    url = _postgres_url(settings)
    if url is not None:
        return _migrate_postgres(url)
    applied: list[str] = []
    files = (
        ("inventory", settings.inventory_db_path(), sqlite_inventory.MIGRATIONS),
        ("tracker", settings.tracker_db_path(), sqlite_tracker.MIGRATIONS),
        ("api", settings.api_db_path(), sqlite_idempotency.MIGRATIONS),
        ("payments", settings.payments_db_path(), sqlite_payments.MIGRATIONS),
        ("fulfilment", settings.fulfilment_db_path(), sqlite_fulfilment.MIGRATIONS),
    )
    for name, path, steps in files:
        before = _sqlite_version(path)
        # a read-write open migrates, as every service's own open does (stores/sqlite.py)
        db = SqliteDatabase(path, name=name, migrations=steps)
        try:
            db.connection()
        finally:
            db.close()
        applied += [
            f"{name}: schema version {number}: {step.summary}"
            for number, step in enumerate(steps[before:], before + 1)
        ]
    return applied


def _sqlite_version(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as conn:
            return schema_version(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the schema version of {path}: {exc}") from exc


def _migrate_postgres(url: str) -> list[str]:
    from ordermesh.stores import (
        postgres_fulfilment,
        postgres_idempotency,
        postgres_inventory,
        postgres_payments,
        postgres_tracker,
    )
    from ordermesh.stores.postgres import PostgresDatabase

    applied: list[str] = []
    for module in (
        postgres_inventory,
        postgres_tracker,
        postgres_idempotency,
        postgres_payments,
        postgres_fulfilment,
    ):
        db = PostgresDatabase(url, name=module.SCHEMA, migrations=module.MIGRATIONS, lazy=True)
        try:
            applied += db.migrate()
        finally:
            db.close()
    return applied
