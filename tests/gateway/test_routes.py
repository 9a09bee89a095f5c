"""Route rules and the hand-written route file, without nginx."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flatnet.config import ConfigError
from flatnet.gateway.routes import Route, RouteError, load_route_file, routes_from_dict


def test_a_valid_route_round_trips_through_json():
    route = Route("web", ("10.87.1.2:80", "10.87.2.3:8080"), mode="pass", port=8001, owner="wsl-a", host="w.lan")
    assert Route.from_json(route.to_json()) == route
    assert Route.from_json({"name": "web", "backends": ["10.87.1.2:80"], "port": None, "owner": None}) == Route(
        "web", ("10.87.1.2:80",))


def test_backends_are_canonical():
    assert Route("web", ["010.087.001.002:0080"]).backends == ("10.87.1.2:80",)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "Web"}, "name"),
        ({"name": "-web"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": "api"}, "name"),
        ({"backends": ()}, "backends"),
        ({"backends": "10.87.1.2:80"}, "backends"),
        ({"backends": ("10.87.1.2",)}, "backends[0]"),
        ({"backends": ("10.87.1.2:80", "10.87.1.256:80")}, "backends[1]"),
        ({"backends": ("10.87.1.2:0",)}, "backends[0]"),
        ({"backends": ("host.lan:80",)}, "backends[0]"),
        ({"backends": ("10.87.1.2:80", "10.87.1.2:80")}, "backends"),
        ({"backends": tuple(f"10.87.1.{i}:80" for i in range(1, 18))}, "backends"),
        ({"mode": "rewrite"}, "mode"),
        ({"port": 0}, "port"),
        ({"port": True}, "port"),
        ({"owner": "Wsl A"}, "owner"),
        ({"host": "a..b"}, "host"),
    ],
)
def test_invalid_routes_name_the_field(kwargs, field):
    args = {"name": "web", "backends": ("10.87.1.2:80",), **kwargs}
    with pytest.raises(RouteError) as err:
        Route(**args)
    assert err.value.field == field


def test_from_json_rejects_unknown_and_missing_fields():
    with pytest.raises(RouteError, match="color"):
        Route.from_json({"name": "web", "backends": ["10.87.1.2:80"], "color": "red"})
    with pytest.raises(RouteError, match="backends"):
        Route.from_json({"name": "web"})
    with pytest.raises(RouteError, match="backends"):
        Route.from_json({"name": "web", "backends": "10.87.1.2:80"})


@given(st.text(alphabet="abc-019XY_.", min_size=0, max_size=70))
def test_name_rule_matches_the_dns_label_definition(name):
    expected = (
        1 <= len(name) <= 63
        and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in name)
        and not name.startswith("-")
        and not name.endswith("-")
        and name != "api"
    )
    try:
        Route(name, ("10.87.1.2:80",))
        accepted = True
    except RouteError:
        accepted = False
    assert accepted == expected


def test_route_file_loads_and_errors_name_file_and_key(tmp_path):
    good = tmp_path / "routes.toml"
    good.write_text(
        '[[route]]\nname = "web"\nbackends = ["10.87.1.2:80"]\n\n'
        '[[route]]\nname = "forge"\nbackends = ["10.87.1.3:3000"]\nmode = "pass"\nport = 8001\n'
    )
    routes = load_route_file(good, owner="manual")
    assert routes == [
        Route("web", ("10.87.1.2:80",), owner="manual"),
        Route("forge", ("10.87.1.3:3000",), mode="pass", port=8001, owner="manual"),
    ]

    bad = tmp_path / "bad.toml"
    bad.write_text('[[route]]\nname = "web"\nbackends = ["10.87.1.2:80"]\n[[route]]\nname = "x"\nbackends = ["1.2.3:4"]\n')
    with pytest.raises(ConfigError) as err:
        load_route_file(bad)
    assert str(bad) in str(err.value) and "route[1].backends[0]" in str(err.value)

    with pytest.raises(ConfigError, match=r"route\[0\].colour"):
        routes_from_dict({"route": [{"name": "web", "backends": ["10.87.1.2:80"], "colour": 1}]}, "r.toml")
    with pytest.raises(ConfigError, match=r"route\[1\].name.*already defined"):
        routes_from_dict({"route": [{"name": "a", "backends": ["1.2.3.4:1"]}, {"name": "a", "backends": ["1.2.3.4:2"]}]})
    with pytest.raises(ConfigError, match=r"route\[0\].mode"):
        routes_from_dict({"route": [{"name": "a", "backends": ["1.2.3.4:1"], "mode": "x"}]})
