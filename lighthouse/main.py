"""flatnet-lighthouse: ``flatnet-lighthouse --config lighthouse.toml``.

Loads the typed configuration, builds the tunnel engine from the lighthouse's own certificate and
the team's CA, and serves discovery over UDP until SIGINT/SIGTERM. What is not here yet: the
Prometheus export. With ``[relay] serve = true`` a relay (``lighthouse/relay_service.py``) runs in
the same process; with ``[relay] secret_file`` and ``advertise`` the lighthouse grants sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from flatnet.config import ConfigError
from lighthouse.config import DEFAULT_CONFIG_PATH, LighthouseConfig, load_lighthouse_config
from lighthouse.core import LighthouseCore, LighthouseSettings

log = logging.getLogger("flatnet.lighthouse")


def build_engine(config: LighthouseConfig):
    from flatnet.pki.cert import TrustStore
    from flatnet.pki.files import load_certificate, load_certificates, load_host_key, parse_fingerprint
    from flatnet.proto.engine import TunnelEngine

    pki = config.pki
    blocked = {parse_fingerprint(item) for item in pki.blocklist}
    trust = TrustStore(load_certificates(pki.ca), blocked)
    return TunnelEngine((load_certificate(pki.cert), load_host_key(pki.key)), trust)


def build_core(config: LighthouseConfig) -> LighthouseCore:
    limits = config.limits
    relays, secret = (), None
    if config.relay.secret_file:
        from lighthouse.relay_service import advertised_relays, load_relay_secret

        secret = load_relay_secret(config.relay.secret_file)
        relays = advertised_relays(config.relay)
    return LighthouseCore(
        LighthouseSettings(
            node_ttl=limits.node_ttl,
            answer_ttl=limits.answer_ttl,
            max_nodes=limits.max_nodes,
            max_strangers=limits.max_strangers,
            rate=limits.rate,
            burst=limits.burst,
        ),
        relays=relays,
        relay_secret=secret,
    )


async def serve(config: LighthouseConfig, engine) -> None:
    from lighthouse.service import LighthouseService

    service = LighthouseService(engine, build_core(config), tick_interval=config.tick_interval)
    await service.start(config.listen_host, config.listen_port)
    relay = None
    if config.relay.serve:
        from lighthouse.relay_service import build_relay_service, load_relay_secret

        relay = build_relay_service(config.relay, load_relay_secret(config.relay.secret_file))
        await relay.start(config.relay.listen_host, config.relay.udp_port, config.relay.tcp_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if relay is not None:
            await relay.stop()
        await service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flatnet-lighthouse", description="Flatnet lighthouse (discovery)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="lighthouse.toml")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines (docs/operations.md, Logs)")
    args = parser.parse_args(argv)
    from flatnet.observability import setup_logging

    setup_logging(json=args.log_json, level=args.log_level)
    try:
        config = load_lighthouse_config(args.config)
        if config.relay.secret_file or config.relay.serve:  # a bad secret file: a message, now
            from lighthouse.relay_service import load_relay_secret

            load_relay_secret(config.relay.secret_file)
        engine = build_engine(config)
    except ConfigError as exc:
        print(f"flatnet-lighthouse: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # unreadable or invalid PKI files: a message, not a traceback
        print(f"flatnet-lighthouse: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(config, engine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
