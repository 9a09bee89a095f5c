"""flatnet-lighthouse: ``flatnet-lighthouse --config lighthouse.toml``.

Loads the typed configuration, builds the tunnel engine from the lighthouse's own certificate and
the team's CA, and serves discovery over UDP until SIGINT/SIGTERM; Prometheus metrics on
``[metrics] listen`` (``lighthouse/exporter.py``). With ``[relay] serve = true`` a relay
(``lighthouse/relay_service.py``) runs in the same process; with ``[relay] secret_file`` and
``advertise`` the lighthouse grants sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections import Counter

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


def reload_lighthouse(old: LighthouseConfig, new: LighthouseConfig, engine, core, now: float) -> tuple[list[str], list[str]]:
    """SIGHUP: take *new*'s certificate, key, CA bundle, blocklist and rate limits into a running
    lighthouse; returns (changes, keys needing a restart, left as they were). Every file is loaded
    before anything changes: a bad one raises ConfigError (key named) and nothing changes."""
    from flatnet.pki.cert import TrustStore
    from flatnet.pki.errors import PkiFileError
    from flatnet.pki.files import load_certificate, load_certificates, load_host_key, parse_fingerprint
    from flatnet.proto.noise import public_bytes

    def load(key, loader, *args):
        try:
            return loader(*args)
        except (PkiFileError, OSError, ValueError) as exc:
            raise ConfigError("", key, str(exc)) from None

    pki = new.pki
    cert, host_key = load("pki.cert", load_certificate, pki.cert), load("pki.key", load_host_key, pki.key)
    blocked = {load(f"pki.blocklist[{i}]", parse_fingerprint, item) for i, item in enumerate(pki.blocklist)}
    trust = TrustStore(load("pki.ca", load_certificates, pki.ca), blocked)
    new_identity = cert.encode() != engine.certificate.encode()
    if new_identity and (public_bytes(host_key) != cert.public_key or cert.ip.ip != engine.certificate.ip.ip):
        raise ConfigError("", "pki.cert", "the new certificate does not match the key or changes the address")
    needs_restart = [f.name for f in dataclasses.fields(old)
                     if f.name not in ("pki", "limits") and getattr(old, f.name) != getattr(new, f.name)]
    changes = []
    if new_identity:
        engine.set_identity((cert, host_key), now)
        changes.append(f"own certificate {cert.name}")
    revoked = engine.set_trust(trust, now)
    changes.append(f"trust store reloaded; cut off: {[str(ip) for ip in revoked] or 'none'}")
    if new.limits != old.limits:
        core.settings = dataclasses.replace(core.settings, **dataclasses.asdict(new.limits))
        changes.append("limits: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(new.limits).items()))
    return changes, needs_restart


async def serve(config: LighthouseConfig, engine, config_path: str | None = None) -> None:
    from lighthouse.service import LighthouseService

    service = LighthouseService(engine, build_core(config), tick_interval=config.tick_interval)
    running = config
    reloads = Counter()  # outcome -> count (the exporter's config_reloads_total)

    def on_hup() -> None:
        nonlocal running
        import time

        from flatnet.observability import log_event

        try:
            new = load_lighthouse_config(config_path)
            changes, restart = reload_lighthouse(running, new, engine, service.core, time.time())
        except (ConfigError, ValueError, OSError) as exc:
            if isinstance(exc, ConfigError) and not exc.source:
                exc = ConfigError(str(config_path), exc.key, exc.message)
            reloads["failed"] += 1
            log_event(log, "config.reload_failed", logging.ERROR, msg="config reload refused, nothing changed",
                      file=str(config_path), error=str(exc))
            return
        reloads["ok"] += 1
        running = dataclasses.replace(new, **{key: getattr(running, key) for key in restart})
        service._flush()  # handshakes started by a new identity go out now
        log_event(log, "config.reloaded", msg="config reloaded", file=str(config_path), changes=changes,
                  needs_restart=restart)

    if config_path is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)
    await service.start(config.listen_host, config.listen_port)
    relay = None
    if config.relay.serve:
        from lighthouse.relay_service import build_relay_service, load_relay_secret

        relay = build_relay_service(config.relay, load_relay_secret(config.relay.secret_file))
        await relay.start(config.relay.listen_host, config.relay.udp_port, config.relay.tcp_port)
    exporter = None
    if config.metrics.listen:
        from lighthouse.exporter import LighthouseExporter

        exporter = LighthouseExporter(config.metrics.listen, service, relay)
        exporter.reloads = reloads
        await exporter.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if config_path is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        if exporter is not None:
            await exporter.stop()
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
    asyncio.run(serve(config, engine, args.config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
