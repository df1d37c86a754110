"""Payments' card processor: the seam and the simulated one behind it.

``protocol`` (the ``PaymentGateway`` seam payments depends on), ``client``
(``HttpGateway`` and ``open_gateway``), ``server`` (``ordermesh gateway``), ``ledger``
(its SQLite ledger), ``rules`` (what capture, void and refund may do), ``faults`` (what
it does wrong on purpose), ``wire`` (the HTTP bodies). docs/payments.md tells the whole.
"""
