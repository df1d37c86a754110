"""Local PostgreSQL for the services' shared state: create, start, stop, inspect."""

from ordermesh.postgres.local import LocalPostgres, ServerState, find_bin_dir

__all__ = ["LocalPostgres", "ServerState", "find_bin_dir"]
