"""Topic specs from the settings, and what of an existing topic's shape is an error."""

from __future__ import annotations

from ordermesh.topics import (
    COMMANDS,
    DLQ,
    EVENTS,
    ORDERS,
    SPECS,
    TopicSpec,
    copartition_warning,
    judge_topic,
    topic_specs,
)


def test_specs_follow_the_partition_setting_with_a_small_dlq() -> None:
    assert topic_specs(6) == SPECS
    assert {s.name: s.partitions for s in topic_specs(12)} == {
        ORDERS: 12,
        COMMANDS: 12,
        EVENTS: 12,
        DLQ: 3,
    }
    assert {s.name: s.partitions for s in topic_specs(2)}[DLQ] == 2


def test_more_partitions_is_a_warning_fewer_or_another_rf_an_error() -> None:
    spec = TopicSpec(ORDERS, 6)
    same = judge_topic("orders", spec, partitions=6, replication_factor=3, expected_rf=3)
    assert same.problems == [] and same.warnings == []

    more = judge_topic("orders", spec, partitions=12, replication_factor=3, expected_rf=3)
    assert more.problems == []
    assert more.warnings == [
        "orders: has 12 partitions, more than the 6 configured (ORDERMESH_TOPIC_PARTITIONS);"
        " used as it is"
    ]

    fewer = judge_topic("orders", spec, partitions=3, replication_factor=3, expected_rf=3)
    assert fewer.problems == ["orders: has 3 partitions and RF 3, expected 6 partitions and RF 3"]
    other_rf = judge_topic("orders", spec, partitions=12, replication_factor=2, expected_rf=3)
    assert len(other_rf.problems) == 1 and other_rf.warnings == []


def test_another_retention_is_a_warning_only_when_one_is_configured() -> None:
    def judge(expected: int | None) -> list[str]:
        judged = judge_topic(
            "e",
            TopicSpec(EVENTS, 6),
            partitions=6,
            replication_factor=1,
            expected_rf=1,
            retention_ms="604800000",
            expected_retention_ms=expected,
        )
        assert judged.problems == []
        return judged.warnings

    assert judge(None) == []
    assert judge(604_800_000) == []
    assert judge(86_400_000) == [
        "e: retention.ms is 604800000, not the 86400000 configured"
        " (ORDERMESH_TOPIC_RETENTION_MS); left as it is"
    ]


def test_orders_and_commands_of_different_sizes_are_not_co_assigned() -> None:
    assert copartition_warning(("orders", 6), ("order-commands", 6)) is None
    warning = copartition_warning(("orders", 12), ("order-commands", 6))
    assert warning is not None and "an order and its cancel may go to different" in warning
