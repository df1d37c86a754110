"""The inventory benchmark's baseline: stdlib-json decoding in front of the unchanged core;
its CPU counters."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ordermesh import schema
from ordermesh.bench.baseline import StdlibDecoding, decode_order_stdlib
from ordermesh.bench.inventory import _machine_busy_s, _tree_cpu_s
from ordermesh.errors import DecodeError
from ordermesh.stores.sqlite_inventory import SqliteInventoryStore
from tests.unit.test_inventory_service import (
    DLQ,
    ORDERS,
    order,
    placed,
    rec,
    service_for,
)
from tests.unit.test_schema import REJECTED_ORDERS, VALID, dumps


def test_stdlib_decoder_accepts_what_decode_order_accepts() -> None:
    assert decode_order_stdlib(VALID) == schema.decode_order(VALID)


@pytest.mark.parametrize(
    "raw",
    [
        *(pytest.param(dumps(p.values[0]), id=p.id) for p in REJECTED_ORDERS),
        pytest.param(b"not json", id="text"),
        pytest.param(VALID[:-1], id="truncated"),
        pytest.param(VALID.replace(b"cust-", b"cust-\xc3\x28"), id="bad-utf8"),
        pytest.param(dumps({"note": "x" * schema.MAX_MESSAGE_BYTES}), id="oversized"),
        pytest.param(None, id="none"),
    ],
)
def test_stdlib_decoder_rejects_what_decode_order_rejects(raw: Any) -> None:
    with pytest.raises(DecodeError):
        schema.decode_order(raw)
    with pytest.raises(DecodeError) as info:
        decode_order_stdlib(raw)
    assert info.value.raw is raw


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteInventoryStore]:
    with SqliteInventoryStore(tmp_path / "inventory.db") as s:
        s.seed({"A": 10})
        yield s


def test_stdlib_decoding_hands_the_batch_to_the_core(store: SqliteInventoryStore) -> None:
    service = service_for(store)
    handler = StdlibDecoding(service)
    out = handler.handle([placed(order("o1", ("A", 2))), rec(ORDERS, b"nope", b"o2")])
    assert [r.topic for r in out] == [service.events_topic, DLQ]
    assert service.stats.reserved == 1 and service.stats.dlq == 1


def test_cpu_of_a_process_tree_counts_its_finished_children_and_the_machine_its_cores() -> None:
    me, machine = _tree_cpu_s(os.getpid()), _machine_busy_s()
    assert me is not None and machine is not None
    # a child that spins for 0.3 s of CPU and is reaped counts into its parent's tree
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", spin], check=True, timeout=60)
    after = _tree_cpu_s(os.getpid())
    assert after is not None and after - me >= 0.25
    assert (_machine_busy_s() or 0.0) - machine >= 0.25
    assert _tree_cpu_s(2**31 - 1) is None  # no such process
