"""The package layers hold: only kafka/ (and broker/) touch confluent-kafka, and kafka/
is transport only, never reaching up into the services, stores, API or processes."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "ordermesh"
# broker/ asks its freshly started nodes whether they are ready, with an AdminClient
KAFKA_CLIENT_ALLOWED = ("kafka", "broker")
# what kafka/ may not import: it is the transport under these
ABOVE_KAFKA = ("services", "stores", "api", "apps", "cli")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, function-local imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _package_of(path: Path) -> str:
    """The first-level package of a module (its own name for a top-level module)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _is(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def test_the_walk_sees_the_package() -> None:
    packages = {_package_of(p) for p in _modules()}
    assert {"kafka", "broker", "apps", "services", "stores", "api", "cli"} <= packages


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_kafka_and_broker_import_confluent_kafka(path: Path) -> None:
    if _package_of(path) in KAFKA_CLIENT_ALLOWED:
        return
    found = [name for name in _imports(path) if _is(name, "confluent_kafka")]
    assert not found, f"{path.relative_to(PACKAGE)} imports {found}: go through ordermesh.kafka"


@pytest.mark.parametrize("path", sorted((PACKAGE / "kafka").rglob("*.py")), ids=lambda p: p.name)
def test_kafka_is_transport_only(path: Path) -> None:
    above = [f"ordermesh.{layer}" for layer in ABOVE_KAFKA]
    found = [name for name in _imports(path) if any(_is(name, root) for root in above)]
    assert not found, f"kafka/{path.name} imports {found}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_stores_and_the_local_server_import_psycopg(path: Path) -> None:
    if _package_of(path) in ("stores", "postgres"):
        return
    found = [name for name in _imports(path) if _is(name, "psycopg") or _is(name, "psycopg_pool")]
    assert not found, f"{path.relative_to(PACKAGE)} imports {found}: go through ordermesh.stores"
