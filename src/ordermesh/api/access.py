"""Who may see which orders through the API: each API key is a client owning its orders.

- Without API keys the API is open, as it always was: every caller is the one client
  ``""`` and sees every order; the orders placed then belong to no client.
- With keys (``ORDERMESH_API_KEYS``), each key is a client, known by
  ``client_for_api_key`` of it (a digest: the key itself is never stored or logged), the
  same id that scopes its idempotency keys. The API writes that id into the
  ``OrderPlaced`` it produces (``api_client``), the tracker stores it with the order, and
  the client gets, lists and cancels only its own orders. Another client's order is read
  by the same query as an unknown one (the store filters by owner), so it answers the
  same 404, and a ``?wait=`` on it waits just as long: nothing tells it exists.
- An operator key (``ORDERMESH_API_OPERATOR_KEYS``; a key in both lists is an operator)
  sees and cancels every order, those of producers other than the API (the load
  generator), which belong to no client, included. The orders an operator places carry
  its own id, like a client's.
- The owner lives in the tracker's store, not in an API process: it survives restarts,
  and every replica over one database answers alike.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from msgspec import UNSET, UnsetType

from ordermesh.api.idempotency import client_for_api_key
from ordermesh.config import Settings


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: its client id ("" without keys) and whether it operates."""

    client: str
    operator: bool = False

    @property
    def sees(self) -> str | None:
        """The owner its reads are limited to (``OrderQueries``' ``api_client``); None:
        every order."""
        return None if self.operator or not self.client else self.client

    @property
    def owner(self) -> str | UnsetType:
        """``OrderPlaced.api_client`` of the orders it places (unset: no client's)."""
        return self.client or UNSET


# every caller of an API without keys
OPEN: Final = Caller("", operator=True)


class ApiKeys:
    """The configured keys and the caller each one authenticates."""

    def __init__(self, clients: Iterable[str], operators: Iterable[str] = ()) -> None:
        operator_set = frozenset(operators)
        keys = sorted(frozenset(clients) | operator_set)
        self._keys = tuple(key.encode() for key in keys)
        self._callers = tuple(
            Caller(client_for_api_key(key.encode()), operator=key in operator_set) for key in keys
        )
        self.operators = len(operator_set)
        self.clients = len(keys) - self.operators

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        return cls(settings.api_key_set(), settings.api_operator_key_set())

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (otherwise every caller is ``OPEN``)."""
        return bool(self._keys)

    def identify(self, given: bytes) -> Caller | None:
        """The caller whose key ``given`` is, or None for no configured key."""
        # compare against every key in constant time: no early exit reveals which prefix
        # matched
        matched = [hmac.compare_digest(given, key) for key in self._keys]
        return self._callers[matched.index(True)] if any(matched) else None

    def describe(self) -> str:
        """For the start-up log line: how many keys of each kind, never a key."""
        if not self.enabled:
            return "off (no API keys: every caller sees every order)"
        return f"on ({self.clients} client keys, {self.operators} operator keys)"
