import dataclasses
import ipaddress
from pathlib import Path

import pytest

from flatnet.config import ConfigError, from_dict, load, port_check


@dataclasses.dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = dataclasses.field(default=8080, metadata={"check": port_check})


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str
    subnet: ipaddress.IPv4Network
    listen: Listen = dataclasses.field(default_factory=Listen)
    peers: list[str] = dataclasses.field(default_factory=list)
    mode: str | None = None


def test_defaults_and_nesting():
    cfg = from_dict({"name": "a", "subnet": "10.0.0.0/24", "listen": {"port": 9}}, Sample)
    assert cfg.listen == Listen(port=9)
    assert cfg.subnet == ipaddress.IPv4Network("10.0.0.0/24")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"subnet": "10.0.0.0/24"}, "name"),
        ({"name": "a", "subnet": "10.0.0.300/24"}, "subnet"),
        ({"name": "a", "subnet": "10.0.0.0/24", "listen": {"port": 70000}}, "listen.port"),
        ({"name": "a", "subnet": "10.0.0.0/24", "listen": {"port": "x"}}, "listen.port"),
        ({"name": "a", "subnet": "10.0.0.0/24", "peers": ["x", 3]}, "peers[1]"),
        ({"name": "a", "subnet": "10.0.0.0/24", "colour": "red"}, "colour"),
    ],
)
def test_errors_name_key(data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(data, Sample, source="node.toml")
    assert err.value.key == key
    assert f"node.toml: key '{key}'" in str(err.value)


def test_load_names_file(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "a"\nsubnet = "nope"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: key 'subnet'"):
        load(path, Sample)
    path.write_text("name = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path, Sample)
