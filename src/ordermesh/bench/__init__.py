"""Benchmarks and their baselines; no production module imports this package.

- ``inventory``: ``ordermesh bench inventory``, inventory orders/s batched vs the
  one-commit-per-message baseline, written to ``bench-results/inventory-<time>.json``;
- ``baseline``: that baseline's stdlib-json decoding, kept out of the inventory core;
- ``decode``: ``ordermesh bench decode``, decode+validate speed of four JSON stacks;
- ``api``: ``ordermesh api-bench``, POST throughput and POST -> RESERVED latency of a
  running API;
- ``mesh``: ``ordermesh bench mesh``, the whole mesh's drain rate and latency beside
  Kafka's own ProducerPerformance/ConsumerPerformance (``kafka_tools``), written to
  ``bench-results/mesh-<time>.json`` and ``docs/performance.md`` (``performance_doc``).

The numbers are measured, never asserted by tests.
"""

from ordermesh.bench.api import bench_api, bench_latency
from ordermesh.bench.baseline import StdlibDecoding, decode_order_stdlib
from ordermesh.bench.decode import bench_decode
from ordermesh.bench.inventory import bench_inventory

__all__ = [
    "StdlibDecoding",
    "bench_api",
    "bench_decode",
    "bench_inventory",
    "bench_latency",
    "decode_order_stdlib",
]
