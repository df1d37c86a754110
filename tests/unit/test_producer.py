"""The one producer wrapper without a broker: back-off, deadlines, delivery tracking."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from ordermesh.errors import DeliveryError
from ordermesh.kafka.producer import Delivery, Producer
from ordermesh.records import OutRecord


class Client:
    """A producer client whose local queue is full for the first ``full`` calls."""

    def __init__(self, full: int = 0, refuse: bytes | None = None) -> None:
        self.full = full
        self.refuse = refuse
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.polls = 0
        self.reports: list[Any] = []

    def produce(self, *args: Any, **kwargs: Any) -> None:
        if self.full > 0:
            self.full -= 1
            raise BufferError("Local: Queue full")
        if self.refuse is not None and args[2] == self.refuse:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.calls.append((args, kwargs))
        if kwargs.get("on_delivery") is not None:
            self.reports.append(kwargs["on_delivery"])

    def poll(self, timeout: float) -> int:
        self.polls += 1
        served, self.reports = self.reports, []
        for report in served:
            report(None, None)
        return len(served)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0

    def __len__(self) -> int:
        return len(self.reports)


def test_a_full_queue_is_waited_out() -> None:
    client = Client(full=3)
    assert Producer(client).produce("t", b"v", b"k")
    assert client.polls == 3
    # only the arguments in use reach the client
    assert client.calls == [(("t", b"v", b"k"), {})]


def test_no_wait_past_the_deadline() -> None:
    client = Client(full=10**6)
    assert not Producer(client).produce("t", b"v", b"k", until=time.monotonic() + 0.1)
    assert client.calls == []


def test_produce_now_never_waits() -> None:
    client = Client(full=1)
    with pytest.raises(DeliveryError, match="queue full"):
        Producer(client).produce_now("t", b"v", b"k", lambda err, msg: None)
    assert client.polls == 0
    refused = Client(refuse=b"k")
    with pytest.raises(DeliveryError, match="MSG_SIZE_TOO_LARGE"):
        Producer(refused).produce_now("t", b"v", b"k", lambda err, msg: None)


def test_send_all_tracks_every_delivery() -> None:
    client = Client(full=2, refuse=b"big")
    producer = Producer(client)
    outs = [
        OutRecord("t", b"a", b"1", [("h", b"v")]),
        OutRecord("t", b"big", b"2"),
        OutRecord("t", b"c", b"3"),
    ]
    delivery = Delivery()
    producer.send_all(outs, delivery)
    assert delivery.pending == 2
    assert [(out.key, err.code()) for out, err in delivery.failed] == [
        (b"big", KafkaError.MSG_SIZE_TOO_LARGE)
    ]
    assert client.calls[0][1]["headers"] == [("h", b"v")]
    assert "headers" not in client.calls[1][1]  # no headers: none passed
    producer.poll(0)
    assert delivery.pending == 0 and len(delivery.failed) == 1
