"""``ordermesh bench``: throughput of the inventory service against its naive baseline.

Both modes run the same ``InventoryService`` through the same ``BatchRunner`` on the same
broker, in one process run, on freshly produced orders:

- ``batched``: msgspec decoding, up to ``settings.batch_max`` messages per poll, one DB
  transaction and one offset commit per batch, outputs acknowledged once per batch;
- ``baseline``: stdlib ``json`` decoding and one message per poll, i.e. one transaction,
  one produce-and-wait and one synchronous offset commit per message (the original
  design's discipline).

The rate is records over the time from the first batch to the last commit, so consumer
group joining is not counted. Numbers go to ``bench-results/inventory-<time>.json``.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ordermesh import schema
from ordermesh.config import Settings
from ordermesh.kafka.client import make_admin
from ordermesh.kafka.runner import BatchRunner
from ordermesh.loadgen import run_load, sku_name
from ordermesh.services.inventory import InventoryService
from ordermesh.stores.inventory import InventoryStore
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS, ensure_topics

log = logging.getLogger(__name__)


@contextmanager
def bench_cluster(settings: Settings) -> Iterator[str]:
    """The configured cluster, or a throwaway local broker on free ports."""
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers
        return
    from ordermesh.broker.jars import ensure_jars
    from ordermesh.broker.local import LocalCluster

    jar_dir = ensure_jars(settings.kafka_jar_dir(), settings.kafka_version)
    with tempfile.TemporaryDirectory(prefix="ordermesh-bench-") as tmp:
        cluster = LocalCluster(Path(tmp), jar_dir, heap_mb=settings.broker_heap_mb)
        state, _ = cluster.up(nodes=1)
        try:
            yield state.bootstrap_servers
        finally:
            cluster.down()


def _run_mode(
    base: Settings,
    workdir: Path,
    *,
    mode: str,
    orders: int,
    skus: int,
    batch_max: int,
    pipelined: bool,
    decode_order: Callable[[bytes | None], schema.OrderPlaced],
) -> dict[str, Any]:
    settings = base.model_copy(
        update={
            "topic_prefix": f"bench-{mode}-{uuid.uuid4().hex[:6]}-",
            "inventory_db": workdir / f"{mode}.db",
            "batch_max": batch_max,
        }
    )
    ensure_topics(make_admin(settings), settings)
    store = InventoryStore(settings.inventory_db_path())
    # plentiful stock: the benchmark measures reservations, not rejections
    store.seed({sku_name(i): 10_000_000 for i in range(1, skus + 1)})
    load = run_load(
        settings, count=orders, duration=None, rate=None, malformed_ratio=0.0, seed=1, skus=skus
    )
    service = InventoryService(
        store,
        orders_topic=settings.topic(ORDERS),
        commands_topic=settings.topic(COMMANDS),
        events_topic=settings.topic(EVENTS),
        dlq_topic=settings.topic(DLQ),
        decode_order=decode_order,
    )
    runner = BatchRunner(
        settings,
        group="inventory",
        topics=[settings.topic(ORDERS)],
        handler=service,
        name=f"bench-{mode}",
        pipelined=pipelined,
    )
    try:
        stats = runner.run(idle_exit_s=2.0)
    finally:
        store.close()
    if stats.first_batch_at is None or stats.last_commit_at is None:
        raise RuntimeError(f"{mode}: nothing was processed")
    seconds = stats.last_commit_at - stats.first_batch_at
    return {
        "orders": stats.records_in,
        "produced": load.acknowledged,
        "seconds": round(seconds, 3),
        "orders_per_s": round(stats.records_in / seconds, 1),
        "batches": stats.batches,
        "commits": stats.commits,
        "handle_s": round(stats.handle_seconds, 3),
        "produce_wait_s": round(stats.produce_seconds, 3),
        "poll_s": round(stats.poll_seconds, 3),
        "reserved": service.stats.reserved,
    }


def bench_inventory(
    settings: Settings,
    *,
    orders: int = 200_000,
    baseline_orders: int = 5_000,
    skus: int = 1000,
    out_dir: Path = Path("bench-results"),
) -> dict[str, Any]:
    """Run both modes in one process run; returns (and writes) the numbers."""
    with bench_cluster(settings) as bootstrap, tempfile.TemporaryDirectory() as tmp:
        base = settings.model_copy(update={"bootstrap_servers": bootstrap})
        workdir = Path(tmp)
        batched = _run_mode(
            base,
            workdir,
            mode="batched",
            orders=orders,
            skus=skus,
            batch_max=settings.batch_max,
            pipelined=True,
            decode_order=schema.decode_order,
        )
        baseline = _run_mode(
            base,
            workdir,
            mode="baseline",
            orders=baseline_orders,
            skus=skus,
            batch_max=1,
            pipelined=False,
            decode_order=schema.decode_order_stdlib,
        )
    result = {
        "benchmark": "inventory",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "batched": batched,
        "baseline": baseline,
        "speedup": round(batched["orders_per_s"] / baseline["orders_per_s"], 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"inventory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    result["file"] = str(path)
    return result


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
