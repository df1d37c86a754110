"""One module per process: each wires a core from ``services/``, its store, the
``BatchRunner`` from ``kafka/`` and its HTTP/metrics surface.

The group, the topics and the assignment of each runner come from its
``topology.ServiceSpec``; ``base.service_runner`` builds a runner from one.
"""
