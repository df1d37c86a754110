"""Run store tests on every backend: SQLite files and PostgreSQL (``postgres_database``).

A test module parametrizes its store fixture with ``BACKENDS`` and opens the PostgreSQL
store on ``migrated_database(request)``. The PostgreSQL cases need the conftest's
``postgres_url`` server; when none can be started they fail, never skip.
"""

from __future__ import annotations

from typing import Final

import pytest

from ordermesh.config import Settings
from ordermesh.stores.factory import migrate

BACKENDS: Final = ("sqlite", "postgres")


def migrated_database(request: pytest.FixtureRequest) -> str:
    """URL of this test's own PostgreSQL database, with every store's schema migrated."""
    url: str = request.getfixturevalue("postgres_database")
    migrate(Settings(database_url=url))
    return url
