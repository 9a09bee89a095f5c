"""The lighthouse's [relay] section: parsing, errors that name the key, the core's relay grants."""

from __future__ import annotations

import pytest

from flatnet.config import ConfigError
from flatnet.proto.control import TRANSPORT_TCP, TRANSPORT_UDP
from lighthouse.config import load_lighthouse_config, parse_relay_url
from lighthouse.main import build_core, main


def write(tmp_path, relay_section: str):
    path = tmp_path / "lighthouse.toml"
    path.write_text('name = "lh"\n' + relay_section)
    return path


def test_relay_section_gives_the_core_its_relays_and_secret(tmp_path):
    secret = tmp_path / "relay.secret"
    secret.write_text("a-shared-secret-of-enough-bytes\n")
    path = write(
        tmp_path,
        f'[relay]\nsecret_file = "{secret}"\nadvertise = ["udp://203.0.113.50:3478", "tcp://203.0.113.50:443"]\n',
    )
    config = load_lighthouse_config(path)
    assert config.relay.udp_port == 3478 and config.relay.serve is False
    core = build_core(config)
    assert [(r.transport, r.endpoint) for r in core.relays] == [
        (TRANSPORT_UDP, ("203.0.113.50", 3478)),
        (TRANSPORT_TCP, ("203.0.113.50", 443)),
    ]


def test_bad_advertised_relay_names_the_key(tmp_path):
    path = write(tmp_path, '[relay]\nadvertise = ["sctp://1.2.3.4:9"]\n')
    with pytest.raises(ConfigError) as info:
        load_lighthouse_config(path)
    assert "relay.advertise" in str(info.value)


def test_short_or_missing_secret_is_a_message_not_a_traceback(tmp_path, capsys):
    secret = tmp_path / "relay.secret"
    secret.write_text("short")
    path = write(tmp_path, f'[relay]\nsecret_file = "{secret}"\nserve = true\n')
    assert main(["--config", str(path)]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err
    path = write(tmp_path, "[relay]\nserve = true\n")
    assert main(["--config", str(path)]) == 2
    assert "relay.secret_file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("udp://10.0.0.1:3478", ("udp", ("10.0.0.1", 3478))),
        ("tcp://[2001:db8::1]:443", ("tcp", ("2001:db8::1", 443))),
        ("udp://host.example:3478", None),
        ("udp://10.0.0.1", None),
        ("udp://10.0.0.1:0", None),
        ("10.0.0.1:3478", None),
    ],
)
def test_parse_relay_url(text, parsed):
    assert parse_relay_url(text) == parsed
