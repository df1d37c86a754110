"""Pure service cores: ``handle(batch) -> records to produce``, no Kafka calls inside."""

from ordermesh.services.analytics import Analytics, Snapshot
from ordermesh.services.dlq import DlqEntry, DlqLogger
from ordermesh.services.inventory import InventoryService
from ordermesh.services.tracker import TrackerService

__all__ = [
    "Analytics",
    "DlqEntry",
    "DlqLogger",
    "InventoryService",
    "Snapshot",
    "TrackerService",
]
