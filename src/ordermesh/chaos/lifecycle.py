"""The fault matrix's rows of an order's whole life: payments and fulfilment killed, the
gateway down, slow and losing replies, and payments racing the reservation's deadline.

Each runs a mesh with the gateway, payments and fulfilment (``Scenario.lifecycle``), so
orders go on to be paid, shipped and captured, or end declined, expired or cancelled.
Besides what every row checks, ``verify`` then audits every order's life against the
gateway's ledger: no order authorized or captured twice, a shipped order kept exactly its
total, every other order kept and holds nothing, every release exactly once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.request
from collections.abc import Callable
from typing import Any, Final

from ordermesh.chaos.harness import Scenario, Trial
from ordermesh.errors import GatewayError
from ordermesh.gateway.client import HttpGateway, read_ledger_summary
from ordermesh.mesh import GATEWAY, fetch_json
from ordermesh.topics import EVENTS

# the gateway of every whole-life row between its faults: a card processor's latency
LATENCY: Final = {"latency_p50_ms": 20.0, "latency_p99_ms": 150.0}
BASE_FAULTS: Final = (
    "--latency-p50-ms",
    str(LATENCY["latency_p50_ms"]),
    "--latency-p99-ms",
    str(LATENCY["latency_p99_ms"]),
)
# what the whole life costs on 2 cores (four more consumers, a gateway call per step):
# far below the inventory-only rows' rate
LIFE_RATE: Final = 100.0
# every end of a life shows up: declining cards, and cancels soon after placing
DECLINE_RATIO: Final = 0.03
CANCEL_RATIO: Final = 0.02
GATEWAY_DOWN_S: Final = 30.0
_IN_FLIGHT = re.compile(r"^ordermesh_gateway_calls_in_flight\s+([0-9.e+]+)$", re.MULTILINE)


def set_gateway_faults(trial: Trial, **changes: Any) -> None:
    """``POST /admin/faults`` on the mesh's gateway (the fields named; the others stay)."""

    async def change() -> dict[str, Any]:
        gateway = HttpGateway(trial.settings.gateway_base_url())
        try:
            return await gateway.faults(changes)
        finally:
            await gateway.close()

    now = asyncio.run(change())
    shown = {k: now.get(k) for k in changes}
    trial.note(f"gateway faults {shown}")


def in_flight(trial: Trial) -> int:
    """Gateway calls being decided right now (its ``/metrics``), 0 when it does not answer."""
    url = trial.settings.gateway_base_url() + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError:
        return 0
    found = _IN_FLIGHT.search(text)
    return int(float(found.group(1))) if found else 0


def wait_gateway(trial: Trial) -> bool:
    return trial.wait_for(
        lambda: fetch_json(trial.settings.gateway_base_url() + "/health") is not None,
        60,
        "the gateway to answer",
    )


def payments_kill(trial: Trial) -> None:
    # the row's gateway is slow (p50 300 ms), so a kill lands among calls in flight
    wait_gateway(trial)
    trial.mid_stream(1000)
    # polled right before the kill: a call decided between the two is still a kill
    # among calls in flight on a gateway this slow
    calls = 0

    def calls_in_flight() -> bool:
        nonlocal calls
        calls = in_flight(trial)
        return calls > 0

    if trial.wait_for(calls_in_flight, 120, "gateway calls in flight"):
        trial.note(f"{calls} gateway calls in flight just before the kill")
    trial.crash("payments-1")


def fulfilment_kill(trial: Trial) -> None:
    wait_gateway(trial)
    # far enough in that shipments are scheduled and some already done
    trial.mid_stream(1500)
    trial.crash("fulfilment-1")


def gateway_down(trial: Trial) -> None:
    """SIGSTOP the gateway: it keeps its port and its accepted connections, and answers
    nothing. A client cannot tell that from a dead host; a hung call is the harder case
    than a refused one (payments times out, then looks the key up, then retries)."""
    wait_gateway(trial)
    trial.mid_stream(1000)
    pid = trial.pid(GATEWAY)
    events_before = trial.topic_end(EVENTS)
    os.kill(pid, signal.SIGSTOP)
    trial.note(f"SIGSTOP the gateway (pid {pid}) for {GATEWAY_DOWN_S:.0f}s")
    try:
        trial.wait(GATEWAY_DOWN_S)
        during = trial.topic_end(EVENTS) - events_before
    finally:
        os.kill(pid, signal.SIGCONT)
    trial.note(f"SIGCONT the gateway; {during} events while it was stopped")


def gateway_fault_for(seconds: tuple[float, float], **changes: Any) -> Callable[[Trial], None]:
    """Apply ``changes`` to the gateway for ``seconds`` (quick, full), then back to
    ``LATENCY`` with no faults."""

    def fault(trial: Trial) -> None:
        wait_gateway(trial)
        trial.mid_stream(1000)
        hold = seconds[0] if trial.quick else seconds[1]
        set_gateway_faults(trial, **changes)
        trial.wait(hold)
        healthy = {name: 0.0 for name in changes if name.endswith("_rate")}
        set_gateway_faults(trial, **{**healthy, **LATENCY})
        trial.note(f"healed after {hold:.0f}s")

    return fault


def expiry_race(trial: Trial) -> None:
    """The gateway is slower than the reservation's TTL for a share of orders from the
    start (the row's gateway flags); this checks the race happened: late approvals
    voided."""
    wait_gateway(trial)
    trial.wait_loads()

    def voided_late() -> int:
        # no cancels in this row's load: an approval voided is one that lost the race
        ledger = read_ledger_summary(trial.settings)
        return sum(1 for m in ledger.values() if m.authorizations and m.voids)

    seen = 0

    def some_voided() -> bool:
        nonlocal seen
        try:
            seen = voided_late()
        except GatewayError:
            return False
        return seen > 0

    if trial.wait_for(some_voided, 120, "a late approval voided"):
        trial.note(f"{seen} approvals landed after their reservation expired and were voided")


def _life(
    name: str,
    summary: str,
    fault: Callable[[Trial], None],
    *,
    orders: tuple[int, int],
    quick: bool = False,
    gateway_faults: tuple[str, ...] = BASE_FAULTS,
    cancel_ratio: float = CANCEL_RATIO,
    settings: dict[str, Any] | None = None,
) -> Scenario:
    return Scenario(
        name,
        summary,
        fault,
        quick,
        orders=orders,
        rate=LIFE_RATE,
        lifecycle=True,
        gateway_faults=gateway_faults,
        decline_ratio=DECLINE_RATIO,
        cancel_ratio=cancel_ratio,
        settings=settings or {},
    )


LIFECYCLE_SCENARIOS: Final[tuple[Scenario, ...]] = (
    _life(
        "payments-kill",
        "whole life: kill -9 payments while gateway calls are in flight (gateway p50 300 ms)",
        payments_kill,
        orders=(1000, 3000),
        # in --quick: the one row of an order's whole life, and its money
        quick=True,
        gateway_faults=("--latency-p50-ms", "300", "--latency-p99-ms", "1500"),
    ),
    _life(
        "gateway-down",
        f"whole life: SIGSTOP the gateway for {GATEWAY_DOWN_S:.0f} s, then SIGCONT",
        gateway_down,
        orders=(4500, 5000),
    ),
    _life(
        "gateway-slow",
        "whole life: gateway latency p50 800 ms, p99 2.5 s for 20 s (10 s quick), then back",
        gateway_fault_for((10.0, 20.0), latency_p50_ms=800.0, latency_p99_ms=2500.0),
        orders=(2500, 3500),
    ),
    _life(
        "gateway-lossy",
        "whole life: the gateway loses 10% of replies (applied) and hangs 5% of requests "
        "(not applied) for 20 s (10 s quick)",
        gateway_fault_for((10.0, 20.0), lost_response_rate=0.1, timeout_rate=0.05, hang_s=10.0),
        orders=(2500, 3500),
    ),
    _life(
        "fulfilment-kill",
        "whole life: kill -9 fulfilment mid-stream (pick and pack 2 s)",
        fulfilment_kill,
        orders=(1000, 3000),
        settings={"fulfilment_delay_s": 2.0},
    ),
    _life(
        "expiry-race",
        "whole life: reservations live 3 s, the gateway takes p50 1 s, p99 6 s: "
        "late approvals voided",
        expiry_race,
        orders=(1000, 2000),
        gateway_faults=("--latency-p50-ms", "1000", "--latency-p99-ms", "6000"),
        cancel_ratio=0.0,
        settings={"reservation_ttl_s": 3.0, "sweep_every_s": 0.5},
    ),
)
