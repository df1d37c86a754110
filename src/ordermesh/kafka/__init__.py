"""Transport only, and the only package (besides ``broker/``) that touches confluent-kafka:
client config, the producer wrapper, the batch runner and its commit bookkeeping,
partition assignment, readers, lag, consumer groups, topic admin and metrics. Nothing here
imports ``services/``, ``stores/``, ``api/`` or ``apps/`` (``tests/unit/test_layers.py``)."""
