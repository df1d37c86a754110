"""What the gateway does wrong on purpose: latency, declines, errors, hangs, lost replies.

``FaultConfig`` is set when the gateway starts (``ordermesh gateway`` flags or
``ORDERMESH_GATEWAY_*`` variables: ``config_from_settings``) and replaced while it runs
(``POST /admin/faults``); ``Faults`` draws each call's fate from one seeded
``random.Random``, so a run with the same seed and the same sequence of calls draws the
same fates.

Per operation call, in this order (docs/payments.md):

1. ``error_rate``: answer 503 at once, nothing applied;
2. ``timeout_rate``: hold the call ``hang_s`` (far past any client timeout), then answer
   503: nothing applied. The caller's timeout fires first, so it sees an unknown outcome
   whose lookup finds nothing: the retry-with-the-same-key path;
3. the latency, drawn from a lognormal fitted to ``latency_p50_ms``/``latency_p99_ms``;
4. the operation is decided and committed to the ledger (a test card or listed customer
   declines; otherwise ``decline_rate`` declines an authorization);
5. ``lost_response_rate``: the connection is closed with no reply, although the
   operation is applied: the lookup-finds-it path.

Look-ups get the latency and ``error_rate`` only: they change nothing, so a lost or hung
look-up teaches a caller nothing a failed one does not.

A batch (``POST /v1/batch``) is one request: it hangs or loses its reply as a whole, drawn
once per request at the same rates (``request_fate``); each of its operations draws its
own error, latency and decline (``item_fate``), and the reply comes once the slowest
operation's latency has passed.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Final, NamedTuple

import msgspec
from msgspec import Meta

from ordermesh.config import Settings

# Well-known test card numbers, and the decline each always gets.
TEST_CARD_DECLINES: Final[dict[str, str]] = {
    "4000000000000002": "card_declined",
    "4000000000009995": "insufficient_funds",
    "4000000000009987": "lost_card",
    "4000000000000069": "expired_card",
}
# the reasons of the other declines
RANDOM_DECLINE: Final = "do_not_honor"
CUSTOMER_DECLINE: Final = "customer_blocked"
# z of the 99th percentile of a standard normal: p99 = exp(mu + Z99 * sigma)
Z99: Final = 2.3263478740408408
DEFAULT_HANG_S: Final = 300.0

Rate = Annotated[float, Meta(ge=0.0, le=1.0)]
Millis = Annotated[float, Meta(ge=0.0, le=600_000.0)]


class FaultConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every fault knob; the default is a healthy, instant gateway."""

    latency_p50_ms: Millis = 0.0
    latency_p99_ms: Millis = 0.0
    decline_rate: Rate = 0.0
    decline_customers: frozenset[str] = frozenset()
    error_rate: Rate = 0.0
    timeout_rate: Rate = 0.0
    lost_response_rate: Rate = 0.0
    hang_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = DEFAULT_HANG_S
    # None: seeded from the OS (not reproducible)
    seed: int | None = None

    def __post_init__(self) -> None:
        p50, p99 = self.latency_p50_ms, self.latency_p99_ms
        if p99 < p50:
            raise ValueError(f"latency_p99_ms ({p99}) must be >= latency_p50_ms ({p50})")
        if p50 == 0 and p99 > 0:
            raise ValueError("latency_p50_ms must be > 0 when latency_p99_ms is")


def config_from(values: object) -> FaultConfig:
    """A ``FaultConfig`` from plain values (a decoded JSON object); ``ValueError`` says
    what is wrong."""
    try:
        return msgspec.convert(values, FaultConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None


def config_from_settings(settings: Settings) -> FaultConfig:
    """The faults a gateway starts with (``ORDERMESH_GATEWAY_*``, ``ordermesh gateway``
    flags); ``ValueError`` when they do not fit together."""
    customers = settings.gateway_decline_customers.split(",")
    return FaultConfig(
        latency_p50_ms=settings.gateway_latency_p50_ms,
        latency_p99_ms=settings.gateway_latency_p99_ms,
        decline_rate=settings.gateway_decline_rate,
        decline_customers=frozenset(c.strip() for c in customers if c.strip()),
        error_rate=settings.gateway_error_rate,
        timeout_rate=settings.gateway_timeout_rate,
        lost_response_rate=settings.gateway_lost_response_rate,
        hang_s=settings.gateway_hang_s,
        seed=settings.gateway_seed,
    )


def merged(config: FaultConfig, changes: object) -> FaultConfig:
    """``config`` with the fields named in ``changes`` (a JSON object) replaced."""
    if not isinstance(changes, dict):
        raise ValueError("expected a JSON object of fault settings")
    values = msgspec.to_builtins(config)
    values.update(changes)
    return config_from(values)


class Latency(NamedTuple):
    """A lognormal in seconds; ``sigma`` 0 is a constant, ``median`` 0 no delay."""

    median_s: float
    sigma: float

    @classmethod
    def fitted(cls, p50_ms: float, p99_ms: float) -> Latency:
        if p50_ms <= 0:
            return cls(0.0, 0.0)
        return cls(p50_ms / 1000.0, math.log(p99_ms / p50_ms) / Z99)

    def draw(self, rng: random.Random) -> float:
        # always draw, so that turning latency on does not shift the other faults' draws
        z = rng.gauss(0.0, 1.0)
        if self.median_s <= 0:
            return 0.0
        return self.median_s * math.exp(self.sigma * z)


class Fate(NamedTuple):
    """What happens to one call."""

    delay_s: float = 0.0
    error: bool = False
    hang: bool = False
    lose_reply: bool = False
    # the draw a decline_rate compares against (used by authorizations only)
    decline_draw: float = 1.0


HEALTHY: Final = Fate()


class Faults:
    """The current ``FaultConfig`` and its random draws."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.config = FaultConfig()
        self._latency = Latency(0.0, 0.0)
        self._rng = random.Random()
        self.configure(config or FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        """Use ``config`` from the next call on; a seed given restarts the draws."""
        self.config = config
        self._latency = Latency.fitted(config.latency_p50_ms, config.latency_p99_ms)
        if config.seed is not None:
            self._rng = random.Random(config.seed)
        self._quiet = (
            self._latency.median_s == 0
            and config.decline_rate == 0
            and config.error_rate == 0
            and config.timeout_rate == 0
            and config.lost_response_rate == 0
        )

    def operation_fate(self) -> Fate:
        """The fate of an operation call (authorize, capture, void, refund)."""
        if self._quiet:
            return HEALTHY  # the hot path of a healthy gateway draws nothing
        rng, config = self._rng, self.config
        # a fixed number of draws per call, whatever the config: one seed, one sequence
        error = rng.random() < config.error_rate
        hang = rng.random() < config.timeout_rate
        lose = rng.random() < config.lost_response_rate
        decline_draw = rng.random()
        delay = self._latency.draw(rng)
        if error:
            return Fate(error=True)
        if hang:
            return Fate(hang=True)
        return Fate(delay_s=delay, lose_reply=lose, decline_draw=decline_draw)

    def request_fate(self) -> Fate:
        """The fate of a batch request as a whole: held ``hang_s`` (nothing applied) or
        its reply lost (everything applied)."""
        if self._quiet:
            return HEALTHY
        rng, config = self._rng, self.config
        hang = rng.random() < config.timeout_rate
        lose = rng.random() < config.lost_response_rate
        return Fate(hang=True) if hang else Fate(lose_reply=lose)

    def item_fate(self) -> Fate:
        """The fate of one operation of a batch: a 503 of its own, its latency, its
        decline draw."""
        if self._quiet:
            return HEALTHY
        rng = self._rng
        error = rng.random() < self.config.error_rate
        decline_draw = rng.random()
        delay = self._latency.draw(rng)
        return Fate(error=True) if error else Fate(delay_s=delay, decline_draw=decline_draw)

    def lookup_fate(self) -> Fate:
        """The fate of a look-up: latency and errors only."""
        if self._quiet:
            return HEALTHY
        rng = self._rng
        error = rng.random() < self.config.error_rate
        delay = self._latency.draw(rng)
        return Fate(error=True) if error else Fate(delay_s=delay)

    def decline_reason(self, card: str, customer_id: str, fate: Fate) -> str:
        """Why an authorization is declined ("" when it is approved)."""
        reason = TEST_CARD_DECLINES.get(card)
        if reason is not None:
            return reason
        if customer_id in self.config.decline_customers:
            return CUSTOMER_DECLINE
        if fate.decline_draw < self.config.decline_rate:
            return RANDOM_DECLINE
        return ""
