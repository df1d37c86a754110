"""OrderMesh: Kafka-based order processing with real stock, tracking and a replayable DLQ."""

__version__ = "0.1.0"
