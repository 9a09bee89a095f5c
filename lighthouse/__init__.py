"""The lighthouse: discovery, hole-punch coordination, relay grants and the service catalogue.

Sans-I/O (no asyncio, socket or time): ``core`` (LighthouseCore), ``client`` (the node's
LighthouseClient), ``relay_table`` (RelayTable), ``ratelimit``. The asyncio edge: ``service`` and
``main`` (``flatnet-lighthouse``). Wire formats: ``flatnet/proto/control.py`` and
``flatnet/proto/relay.py``. See docs/lighthouse.md.
"""
