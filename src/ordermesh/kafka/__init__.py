"""The only package that touches confluent-kafka."""
