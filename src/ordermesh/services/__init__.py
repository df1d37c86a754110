"""Pure service cores: ``handle(batch) -> records to produce``, no Kafka calls inside."""
