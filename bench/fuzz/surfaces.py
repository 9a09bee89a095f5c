"""The campaigns by name (imported lazily: the gateway's needs nginx, the others nothing)."""

from __future__ import annotations


def _node_udp():
    from bench.fuzz.node_udp import NodeUdpSurface

    return NodeUdpSurface()


SURFACES = {
    "node-udp": _node_udp,
}


def _lighthouse():
    from bench.fuzz.lighthouse_control import LighthouseControlSurface

    return LighthouseControlSurface()


def _relay():
    from bench.fuzz.relay_tcp import RelayTcpSurface

    return RelayTcpSurface()


def _certificates():
    from bench.fuzz.certificates import CertificateSurface

    return CertificateSurface()


SURFACES["lighthouse-control"] = _lighthouse
SURFACES["relay-tcp"] = _relay
SURFACES["certificates"] = _certificates


def _cni():
    from bench.fuzz.cni_stdin import CniStdinSurface

    return CniStdinSurface()


SURFACES["cni-stdin"] = _cni


def _gateway():
    from bench.fuzz.gateway_admin import GatewayAdminSurface

    return GatewayAdminSurface()


SURFACES["gateway-admin"] = _gateway
