"""Local Apache Kafka (KRaft) from the official jars: fetch, format, start, stop."""

from ordermesh.broker.jars import ensure_jars
from ordermesh.broker.local import ClusterState, LocalCluster

__all__ = ["ClusterState", "LocalCluster", "ensure_jars"]
