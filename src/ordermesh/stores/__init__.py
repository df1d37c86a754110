"""Databases owned by the services, behind the Protocols their users need.

- ``inventory``, ``tracker``, ``idempotency``: one contract per store (Protocols, rows),
  no SQL; cores, the API and the CLI depend on these only.
- ``sqlite_inventory``, ``sqlite_tracker``, ``sqlite_idempotency``: the SQLite
  implementations with their schema migrations, over ``sqlite`` (opening, pragmas,
  transactions, the migration runner).
- ``factory``: opens the implementation ``Settings.database_url`` names.
"""
