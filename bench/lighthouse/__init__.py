"""bench/lighthouse: the lighthouse core under simulated nodes (``python -m bench.lighthouse``)."""
