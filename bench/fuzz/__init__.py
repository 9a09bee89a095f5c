"""Fuzz campaigns against every surface that takes input from someone else.

    .venv/bin/python -m bench.fuzz --surface node-udp --count 1000000
    .venv/bin/python -m bench.fuzz --surface all --count 20000

Each surface (one module here) builds the real component — tunnel engines with a live session and
the node's data plane, a LighthouseCore, the relay stream decoder and relay table, the CNI plugin's
entry function, the certificate decoder, a real nginx gateway on loopback — then feeds it inputs:
valid messages mutated (bit flips, splices, interesting integers, msgpack/JSON values replaced),
messages sealed with a real session around mutated plaintext (so the fuzz reaches past the AEAD),
and random bytes. What counts as a crash: an exception escaping the component's entry point, a
broken invariant (a 5xx, a dead nginx worker, unbounded state), or a leaked file descriptor.
See :mod:`bench.fuzz.campaign` for the loop and the report.
"""
