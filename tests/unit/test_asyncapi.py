"""The AsyncAPI document of the topics: equal to the committed copy, complete, well formed.

No AsyncAPI 3.0 validator from PyPI fits (the official JSON schema is not published
there, and pydantic-asyncapi's model refuses the Kafka message binding that declares the
key), so the 3.0 shape is checked here; the payload and header schemas are checked as
JSON Schema, against real records, with jsonschema_rs (schemathesis brings it).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, get_args

import jsonschema_rs
import msgspec
import pytest
from typer.testing import CliRunner

from ordermesh import lifecycle, schema
from ordermesh.asyncapi import build_asyncapi, render
from ordermesh.cli import app
from ordermesh.records import (
    ERROR_HEADER_PREFIX,
    REPLAY_COUNT_HEADER,
    InRecord,
    dead_letter,
    truncated_dead_letter,
)
from ordermesh.services.dlq import REPLAY_FROM_HEADER
from ordermesh.topics import COMMANDS, DLQ, EVENTS, ORDERS, SPECS
from ordermesh.topology import SERVICES

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"
# AsyncAPI 3.0: the keys of channels, operations and components' maps
ID = re.compile(r"^[A-Za-z0-9.\-_]+$")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_asyncapi()


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """The object a local ``$ref`` points at; KeyError if none."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    """Every ``$ref`` in ``node``, at any depth."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def validator(doc: dict[str, Any], pointer: str) -> jsonschema_rs.Validator:
    """A JSON Schema validator of the schema at ``pointer``, its references resolved."""
    return jsonschema_rs.validator_for({"$ref": pointer, "components": doc["components"]})


def test_the_committed_document_is_the_generated_one(doc: dict[str, Any]) -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render(doc), (
        "docs/asyncapi.json is stale: run `ordermesh asyncapi --output docs/asyncapi.json`"
    )


def test_the_command_prints_it_and_writes_it(doc: dict[str, Any], tmp_path: Path) -> None:
    printed = CliRunner().invoke(app, ["asyncapi"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output) == doc
    target = tmp_path / "asyncapi.json"
    written = CliRunner().invoke(app, ["asyncapi", "--output", str(target)])
    assert written.exit_code == 0, written.output
    assert target.read_text(encoding="utf-8") == render(doc)


def test_every_topic_is_a_channel_with_its_partitions(doc: dict[str, Any]) -> None:
    assert {spec.name for spec in SPECS} == {ORDERS, COMMANDS, EVENTS, DLQ}
    assert set(doc["channels"]) == {spec.name for spec in SPECS}
    for spec in SPECS:
        channel = doc["channels"][spec.name]
        assert channel["address"] == spec.name
        assert channel["bindings"]["kafka"]["partitions"] == spec.partitions


def test_every_message_type_of_the_schema_is_on_its_channel(doc: dict[str, Any]) -> None:
    tagged = {
        cls.__struct_config__.tag
        for _, cls in inspect.getmembers(schema, inspect.isclass)
        if issubclass(cls, msgspec.Struct) and cls.__struct_config__.tag is not None
    }
    events = {cls.__name__ for cls in get_args(schema.OrderEvent)}
    commands = {cls.__name__ for cls in get_args(schema.OrderCommand)}
    assert tagged == events | commands
    assert events == lifecycle.EVENTS
    on = {name: set(channel["messages"]) for name, channel in doc["channels"].items()}
    assert on == {
        ORDERS: {"OrderPlaced"},
        COMMANDS: commands,
        EVENTS: events,
        DLQ: {"DeadLetter"},
    }
    for name in tagged:
        payload = doc["components"]["schemas"][name]
        # the event type travels in the JSON, as the tag field
        assert payload["properties"]["type"] == {"enum": [name]}, name
        assert "type" in payload["required"]


def test_keys_are_the_order_id_and_a_restock_s_sku(doc: dict[str, Any]) -> None:
    messages = doc["components"]["messages"]
    for name, message in messages.items():
        key = message["bindings"]["kafka"]["key"]
        if name == "DeadLetter":
            assert "original" in key["description"]
        else:
            field = "sku" if name == "Restock" else "order_id"
            assert key["description"] == f"The payload's {field}, UTF-8.", name
            assert key["type"] == "string"


def test_operations_are_the_topology(doc: dict[str, Any]) -> None:
    ops = doc["operations"]
    expected = {
        f"{s.name}.{action}.{topic}"
        for s in SERVICES
        for action, topics in (("send", s.produces), ("receive", s.consumes))
        for topic in topics
    }
    assert set(ops) == expected
    for s in SERVICES:
        for topic in s.consumes:
            op = ops[f"{s.name}.receive.{topic}"]
            assert op["bindings"]["kafka"]["groupId"]["enum"] == [s.group]
            # a consumer reads every message of its topic
            assert len(op["messages"]) == len(doc["channels"][topic]["messages"])
    # every event is sent by the service lifecycle.py says emits it
    senders = {
        name.split("/")[-1]: op_id.split(".")[0]
        for op_id, op in ops.items()
        if op_id.endswith(f".send.{EVENTS}")
        for name in (m["$ref"] for m in op["messages"])
    }
    owners = {t.event: t.owner for t in lifecycle.TRANSITIONS} | {
        f.event: f.owner for f in lifecycle.FACTS
    }
    assert senders == owners
    sent_commands = {
        m["$ref"].split("/")[-1]
        for op_id, op in ops.items()
        if op_id.endswith(f".send.{COMMANDS}")
        for m in op["messages"]
    }
    assert sent_commands == set(doc["channels"][COMMANDS]["messages"])


def test_the_document_has_asyncapi_3_shape(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert isinstance(doc["info"]["title"], str) and doc["info"]["title"]
    assert isinstance(doc["info"]["version"], str) and doc["info"]["version"]
    for server in doc["servers"].values():
        assert server["protocol"] == "kafka"
        assert re.fullmatch(r"[\w.\-]+:\d+", server["host"]), server["host"]
    for channel_id, channel in doc["channels"].items():
        assert ID.match(channel_id)
        assert isinstance(channel["address"], str)
        assert channel["messages"]
        for message_id, message in channel["messages"].items():
            assert ID.match(message_id)
            target = resolve(doc, message["$ref"])
            assert "payload" in target and target["name"] == message_id
    for op_id, op in doc["operations"].items():
        assert ID.match(op_id)
        assert op["action"] in ("send", "receive")
        channel_ref = op["channel"]["$ref"]
        assert re.fullmatch(r"#/channels/[^/]+", channel_ref), channel_ref
        resolve(doc, channel_ref)
        # 3.0: an operation's messages are those of its channel, referenced there
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), (op_id, message)
            resolve(doc, message["$ref"])
    for kind, entries in doc["components"].items():
        assert kind in ("schemas", "messages")
        assert all(ID.match(key) for key in entries), kind
    for ref in refs(doc):
        resolve(doc, ref)


def test_every_schema_is_valid_json_schema(doc: dict[str, Any]) -> None:
    for name, value in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(value), name


def test_real_records_validate_against_their_payload_schemas(doc: dict[str, Any]) -> None:
    item = schema.OrderItem(sku="SKU-1", quantity=2, unit_price=5.0)
    records: list[msgspec.Struct] = [
        schema.OrderPlaced("o-1", "c-1", (item,), "EUR", 10.0, 1.0),
        schema.OrderPlaced("o-2", "c-1", (item,), "EUR", 10.0, 1.0, api_client="client-1"),
        schema.OrderReserved("o-1", (schema.ItemQty("SKU-1", 2),), 10.0, "EUR", 1.0, 2.0),
        schema.PaymentVoided("o-1", "auth-1", 10.0, "EXPIRED", 3.0),
        schema.CancelOrder("o-1", 4.0, reason="changed my mind"),
        schema.ExpireReservation("o-1", 5.0),
        schema.Restock("r-1", "SKU-1", 100, 6.0),
    ]
    for record in records:
        name = type(record).__name__
        check = validator(doc, f"#/components/schemas/{name}")
        check.validate(json.loads(schema.encode(record)))
        # not vacuous: the order_id (or restock_id) is required
        assert not check.is_valid({"type": name}), name


def test_dead_letter_headers_are_those_dead_letter_sets(doc: dict[str, Any]) -> None:
    source = InRecord(ORDERS, 2, 17, b"o-1", b"{", [(REPLAY_COUNT_HEADER, b"1")], 1_700_000)
    dlq = dead_letter(
        source,
        dlq_topic=DLQ,
        service="inventory",
        stage="decode",
        error_class="DecodeError.json",
        message="bad order: not valid JSON",
    )
    headers = doc["components"]["schemas"]["DeadLetterHeaders"]
    set_by_code = [name for name, _ in dlq.headers or () if name.startswith(ERROR_HEADER_PREFIX)]
    assert headers["required"] == set_by_code
    check = validator(doc, "#/components/schemas/DeadLetterHeaders")
    for record in (dlq, truncated_dead_letter(dlq)):
        check.validate({name: value.decode() for name, value in record.headers or ()})
    assert not check.is_valid({})
    replay = validator(doc, "#/components/schemas/ReplayHeaders")
    replay.validate({REPLAY_COUNT_HEADER: "2", REPLAY_FROM_HEADER: "orders-dlq[0]@5"})
    assert not replay.is_valid({REPLAY_COUNT_HEADER: "two"})
