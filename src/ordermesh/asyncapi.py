"""The AsyncAPI 3.0 document of OrderMesh's topics (``ordermesh asyncapi``, ``docs/asyncapi.json``).

Built from the code the way ``api/openapi.py`` builds the HTTP API's document, so it cannot
drift from it: the channels are ``topics.topic_specs()``; the payload schemas are generated
by msgspec from the wire types of ``schema``; each event's summary and sender come from
``lifecycle``; the dead-letter headers are read off a record made by ``records.dead_letter``
itself; who sends and receives on each channel is ``topology.SERVICES``.

Channel addresses are the topic names before the deployment's ``ORDERMESH_TOPIC_PREFIX``,
and group ids the group names before it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any, Final, get_args

import msgspec

from ordermesh import lifecycle, schema
from ordermesh.config import KAFKA_VERSION, Settings
from ordermesh.records import (
    ERROR_HEADER_PREFIX,
    REPLAY_COUNT_HEADER,
    TRUNCATED_KEEP_BYTES,
    InRecord,
    dead_letter,
    truncated_dead_letter,
)
from ordermesh.services.dlq import REPLAY_FROM_HEADER
from ordermesh.topics import (
    COMMANDS,
    DLQ,
    DLQ_MAX_PARTITIONS,
    EVENTS,
    ORDERS,
    TopicSpec,
    topic_specs,
)
from ordermesh.topology import SERVICES, ServiceSpec

ASYNCAPI_VERSION: Final = "3.0.0"
KAFKA_BINDING_VERSION: Final = "0.5.0"
SCHEMA_REF: Final = "#/components/schemas/{name}"
JSON: Final = "application/json"
SERVER: Final = "local"

DEAD_LETTER: Final = "DeadLetter"
REPLAY_HEADERS: Final = "ReplayHeaders"
DEAD_LETTER_HEADERS: Final = "DeadLetterHeaders"

# What each topic carries; the dead-letter record is not a msgspec type (it is the
# original bytes), so orders-dlq's one message is built apart.
CONTENT: Final[dict[str, tuple[type[msgspec.Struct], ...]]] = {
    ORDERS: (schema.OrderPlaced,),
    COMMANDS: get_args(schema.OrderCommand),
    EVENTS: get_args(schema.OrderEvent),
}

# The payload field a message is keyed by; every other message is keyed by its order_id.
KEY_FIELD: Final[dict[str, str]] = {"Restock": "sku"}

# Which commands each producer of order-commands sends: the inventory's sweep asks for
# expiries and due restocks, the API and the load for cancels. A new producer of the topic in
# ``topology`` without an entry here fails the build of the document.
COMMAND_SENDERS: Final[dict[str, tuple[str, ...]]] = {
    "inventory": ("ExpireReservation", "Restock"),
    "api": ("CancelOrder",),
    # the load's share of customers who cancel
    "load": ("CancelOrder",),
}

CHANNEL_TEXT: Final[dict[str, str]] = {
    ORDERS: "Orders as placed, by the API and the load generator; JSON, schema-versioned.",
    COMMANDS: "Requests to the inventory: cancel an order, expire a reservation past its "
    "deadline, restock a sku. The JSON field `type` names the command.",
    EVENTS: "Every event of an order's life (`lifecycle.py`): the inventory's decisions, "
    "payments' and fulfilment's facts. The JSON field `type` names the event; records "
    "carry no type header.",
    DLQ: "Records a service could not handle: the original key, bytes and headers, plus "
    "`ordermesh.error.*` headers saying where they came from and why. `ordermesh dlq "
    "replay` puts chosen ones back on their source topic.",
}

# The dead-letter headers, by the name after ``ordermesh.error.``: their meaning (a
# header ``dead_letter`` sets that is missing here fails the build of the document).
_INTEGER: Final[dict[str, Any]] = {"pattern": "^-?[0-9]+$"}
DLQ_HEADER_TEXT: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "topic": ("The topic the record was consumed from (with the prefix).", {}),
    "partition": ("Its partition, in decimal.", _INTEGER),
    "offset": ("Its offset, in decimal.", _INTEGER),
    "timestamp": ("Its timestamp, milliseconds since the epoch, in decimal.", _INTEGER),
    "service": ("The service that dead-lettered it (`topology.py`'s name).", {}),
    "stage": (
        "Where it failed: decode, route, process, produce, or a step of the service "
        "(place, cancel, restock).",
        {},
    ),
    "class": (
        "Why, as an error class: DecodeError.<kind> (json, schema, validation, utf8, size), "
        "DuplicateOrderId, CancelRejected, RestockRefused, UnexpectedTopic, "
        "HeaderDecodeError, a Kafka error name, ...",
        {},
    ),
    "message": ("The error in words, at most 1000 characters.", {}),
    "truncated": (
        "1 on a size-bounded copy, made when Kafka refused the full one: it keeps at most "
        f"{TRUNCATED_KEEP_BYTES} bytes of key and value and drops the original headers.",
        {"enum": ["1"]},
    ),
    "original.size": ("On a size-bounded copy: the original value's size in bytes.", _INTEGER),
}


def _ref(pointer: str) -> dict[str, str]:
    return {"$ref": pointer}


def _message_name(struct: type[msgspec.Struct]) -> str:
    """What the message is called: its ``type`` tag on the wire, else its class name."""
    tag = struct.__struct_config__.tag
    return tag if isinstance(tag, str) else struct.__name__


def _event_summaries() -> dict[str, str]:
    """Event type -> what it means and who emits it, from ``lifecycle``."""
    moves: dict[str, list[lifecycle.Transition]] = {}
    for t in lifecycle.TRANSITIONS:
        moves.setdefault(t.event, []).append(t)
    summaries = {
        event: f"Emitted by {ts[0].owner}; moves an order "
        + ", ".join(f"{t.source} → {t.target} (on {t.trigger})" for t in ts)
        + "."
        for event, ts in moves.items()
    }
    for fact in lifecycle.FACTS:
        summaries[fact.event] = f"Emitted by {fact.owner}: {fact.meaning}. Moves no status."
    return summaries


def event_senders() -> dict[str, tuple[str, ...]]:
    """Service -> the event types it emits on order-events, from ``lifecycle``."""
    owners: dict[str, list[str]] = {}
    for event, owner in [(t.event, t.owner) for t in lifecycle.TRANSITIONS] + [
        (f.event, f.owner) for f in lifecycle.FACTS
    ]:
        if event not in owners.setdefault(owner, []):
            owners[owner].append(event)
    return {owner: tuple(events) for owner, events in owners.items()}


def _dead_letter_headers() -> dict[str, Any]:
    """The headers schema of a DLQ record, read off one that ``dead_letter`` made."""
    sample = InRecord(ORDERS, 0, 0, b"key", b"value", [], 0)
    full = dead_letter(sample, dlq_topic=DLQ, service="-", stage="-", error_class="-", message="-")
    always = [name for name, _ in full.headers or ()]
    bounded = [name for name, _ in truncated_dead_letter(full).headers or () if name not in always]
    properties: dict[str, Any] = {}
    for name in always + bounded:
        text, shape = DLQ_HEADER_TEXT[name.removeprefix(ERROR_HEADER_PREFIX)]
        properties[name] = {"type": "string", **shape, "description": text}
    return {
        "type": "object",
        "description": "Header values are UTF-8 text. Beside the error headers, the original "
        "record's headers are kept as they were (a replayed record's "
        f"`{REPLAY_COUNT_HEADER}` among them), except on a size-bounded copy.",
        "properties": properties,
        "required": always,
        "additionalProperties": {"type": "string"},
    }


def _add_order_rules(placed: dict[str, Any]) -> None:
    """What ``schema.validate_order`` checks beyond the typed decode, on ``OrderPlaced``."""
    placed["properties"]["currency"]["enum"] = sorted(schema.CURRENCIES)
    placed["description"] = (
        f"{placed.get('description', '')} Beyond this schema, a consumer checks that the "
        "total equals the sum of quantity x unit_price, every amount a whole number of "
        f"cents, that schema_version is {schema.SCHEMA_VERSION} and that the record is at "
        f"most {schema.MAX_MESSAGE_BYTES // 1024} KiB; an order that fails goes to the DLQ."
    ).strip()


def _replay_headers() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "OrderMesh sets no headers on a record it first produces; these two "
        "are on a record that `ordermesh dlq replay` put back on its topic. Values are "
        "UTF-8 text.",
        "properties": {
            REPLAY_COUNT_HEADER: {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "How many times the record was replayed, in decimal.",
            },
            REPLAY_FROM_HEADER: {
                "type": "string",
                "description": "The DLQ entry it was replayed from: `topic[partition]@offset`.",
            },
        },
    }


def _key(payload: dict[str, Any], field: str) -> dict[str, Any]:
    """The schema of a message's key: its payload's ``field``, as UTF-8 bytes."""
    key: dict[str, Any] = copy.deepcopy(payload["properties"][field])
    key["description"] = f"The payload's {field}, UTF-8."
    return key


def _struct_message(
    struct: type[msgspec.Struct], schemas: dict[str, Any], summaries: dict[str, str]
) -> dict[str, Any]:
    name = _message_name(struct)
    payload = schemas[struct.__name__]
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "contentType": JSON,
        "headers": _ref(SCHEMA_REF.format(name=REPLAY_HEADERS)),
        "payload": _ref(SCHEMA_REF.format(name=struct.__name__)),
        "bindings": {
            "kafka": {
                "key": _key(payload, KEY_FIELD.get(name, "order_id")),
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }
    summary = summaries.get(name) or payload.get("description")
    if summary:
        message["summary"] = summary
    return message


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": DEAD_LETTER,
        "title": "Dead letter",
        "summary": "A record a service could not handle, with why.",
        "contentType": "application/octet-stream",
        "headers": _ref(SCHEMA_REF.format(name=DEAD_LETTER_HEADERS)),
        "payload": {
            "description": "The original record's value, byte for byte: usually a message of "
            "its source topic, but possibly malformed (often why it is here). A "
            f"size-bounded copy keeps its first {TRUNCATED_KEEP_BYTES} bytes."
        },
        "bindings": {
            "kafka": {
                "key": {"description": "The original record's key, byte for byte."},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _keyed_by(topic: str) -> str:
    """How ``topic`` is keyed, in words, from ``KEY_FIELD``."""
    if topic not in CONTENT:
        return "the original record's key"
    names = [_message_name(s) for s in CONTENT[topic]]
    others = [f"{n}: {KEY_FIELD[n]}" for n in names if n in KEY_FIELD]
    if len(others) == len(names):
        return ", ".join(others)
    return "order_id" + (f" ({', '.join(others)})" if others else "")


def _channel(spec: TopicSpec, messages: Iterable[str]) -> dict[str, Any]:
    setting = "`ORDERMESH_TOPIC_PARTITIONS`"
    if spec.name == DLQ:
        setting = f"min({DLQ_MAX_PARTITIONS}, {setting})"
    return {
        "address": spec.name,
        "title": spec.name,
        "description": f"{CHANNEL_TEXT[spec.name]} Keyed by {_keyed_by(spec.name)}. "
        f"{spec.partitions} partitions by default ({setting}); the address gets "
        "`ORDERMESH_TOPIC_PREFIX` in front.",
        "messages": {name: _ref(f"#/components/messages/{name}") for name in messages},
        "bindings": {
            "kafka": {"partitions": spec.partitions, "bindingVersion": KAFKA_BINDING_VERSION}
        },
    }


def _sent(service: ServiceSpec, topic: str, channel_messages: list[str]) -> list[str]:
    """The messages ``service`` sends on ``topic``."""
    if topic == EVENTS:
        sent = list(event_senders()[service.name])
    elif topic == COMMANDS:
        sent = list(COMMAND_SENDERS[service.name])
    else:
        sent = channel_messages
    unknown = set(sent) - set(channel_messages)
    if unknown:
        raise ValueError(f"{service.name} sends {sorted(unknown)}, not messages of {topic}")
    return sent


def _operation(
    service: ServiceSpec, action: str, topic: str, messages: list[str]
) -> dict[str, Any]:
    verb = "sends to" if action == "send" else "receives from"
    operation: dict[str, Any] = {
        "action": action,
        "channel": _ref(f"#/channels/{topic}"),
        "title": f"{service.name} {verb} {topic}",
        "summary": f"`ordermesh {' '.join(service.command)}` {verb} {topic}.",
        "messages": [_ref(f"#/channels/{topic}/messages/{name}") for name in messages],
    }
    if action == "receive" and service.group is not None:
        group: dict[str, Any] = {"type": "string", "enum": [service.group]}
        if service.per_partition_assignment:
            group["description"] = "It assigns itself every partition (no group membership)."
        operation["bindings"] = {
            "kafka": {"groupId": group, "bindingVersion": KAFKA_BINDING_VERSION}
        }
    return operation


def build_asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic, its messages, and who sends and receives."""
    structs = [struct for content in CONTENT.values() for struct in content]
    _, schemas = msgspec.json.schema_components(structs, ref_template=SCHEMA_REF)
    _add_order_rules(schemas[schema.OrderPlaced.__name__])
    schemas[REPLAY_HEADERS] = _replay_headers()
    schemas[DEAD_LETTER_HEADERS] = _dead_letter_headers()

    summaries = _event_summaries()
    messages: dict[str, Any] = {}
    channel_messages: dict[str, list[str]] = {}
    for topic, content in CONTENT.items():
        channel_messages[topic] = [_message_name(s) for s in content]
        for struct in content:
            messages[_message_name(struct)] = _struct_message(struct, schemas, summaries)
    messages[DEAD_LETTER] = _dead_letter_message()
    channel_messages[DLQ] = [DEAD_LETTER]

    specs = topic_specs()
    channels = {spec.name: _channel(spec, channel_messages[spec.name]) for spec in specs}
    operations: dict[str, Any] = {}
    for service in SERVICES:
        for topic in service.produces:
            sent = _sent(service, topic, channel_messages[topic])
            operations[f"{service.name}.send.{topic}"] = _operation(service, "send", topic, sent)
        for topic in service.consumes:
            operations[f"{service.name}.receive.{topic}"] = _operation(
                service, "receive", topic, channel_messages[topic]
            )

    port = Settings.model_fields["broker_port"].default
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "OrderMesh topics",
            "version": str(schema.SCHEMA_VERSION),
            "description": "The Kafka topics of OrderMesh, their messages, and which "
            "service sends and receives on each. Generated from the code by `ordermesh "
            "asyncapi`; a test keeps `docs/asyncapi.json` equal to it. Every record of an "
            "order is keyed by its order_id, so it is one partition, in order.",
        },
        "defaultContentType": JSON,
        "servers": {
            SERVER: {
                "host": f"127.0.0.1:{port}",
                "protocol": "kafka",
                "protocolVersion": KAFKA_VERSION,
                "description": "The local KRaft broker that `ordermesh broker up` (and `up`) "
                "starts; another cluster is `--bootstrap-server` "
                "(`ORDERMESH_BOOTSTRAP_SERVERS`).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def render(document: dict[str, Any]) -> str:
    """The document as the JSON text ``ordermesh asyncapi`` prints and writes."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
