"""Databases owned by the services (SQLite by default), one module per service."""
