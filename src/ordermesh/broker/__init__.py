"""Local Apache Kafka (KRaft) from the official jars: fetch, format, start, stop."""
