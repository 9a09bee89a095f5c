"""The CNI contract in isolation: request validation, error codes, result formats, VERSION."""

import json

import pytest

from cni import spec
from cni.spec import CniError, parse_request

CONF = {"cniVersion": "1.0.0", "name": "flatnet", "type": "flatnet", "subnet": "10.87.1.0/24"}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web", "CNI_PATH": "/opt/cni/bin"}


def code_of(environ, stdin):
    with pytest.raises(CniError) as info:
        parse_request(environ, stdin)
    return info.value.code


def test_a_valid_add_is_parsed():
    request = parse_request({**ENV, "CONTAINERS_CONF": "/x.conf"}, json.dumps(CONF).encode())
    assert (request.command, request.container_id, request.netns, request.ifname) == ("ADD", "abc", "/run/netns/x", "eth0")
    assert request.args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}
    assert request.podman_env == {"CONTAINERS_CONF": "/x.conf"}
    assert spec.CniRequest.from_json(json.loads(json.dumps(request.to_json()))).to_json() == request.to_json()


@pytest.mark.parametrize(
    ("environ", "stdin", "code"),
    [
        ({**ENV, "CNI_COMMAND": "FROB"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({k: v for k, v in ENV.items() if k != "CNI_COMMAND"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        (ENV, "{not json", spec.ERR_DECODE),
        (ENV, "[1, 2]", spec.ERR_DECODE),
        (ENV, b"\xff\xfe", spec.ERR_DECODE),
        (ENV, json.dumps({**CONF, "cniVersion": "9.9.9"}), spec.ERR_INCOMPATIBLE_VERSION),
        (ENV, json.dumps({k: v for k, v in CONF.items() if k != "cniVersion"}), spec.ERR_INVALID_CONFIG),
        (ENV, json.dumps({k: v for k, v in CONF.items() if k != "name"}), spec.ERR_INVALID_CONFIG),
        ({k: v for k, v in ENV.items() if k != "CNI_NETNS"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({k: v for k, v in ENV.items() if k != "CNI_CONTAINERID"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({k: v for k, v in ENV.items() if k != "CNI_IFNAME"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({**ENV, "CNI_ARGS": "novalue"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({**ENV, "CNI_CONTAINERID": "../../etc"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({**ENV, "CNI_CONTAINERID": "-x"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({**ENV, "CNI_IFNAME": "a/b"}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({**ENV, "CNI_IFNAME": "x" * 16}, json.dumps(CONF), spec.ERR_INVALID_ENV),
        ({**ENV, "CNI_COMMAND": "CHECK"}, json.dumps({**CONF, "cniVersion": "0.3.1"}), spec.ERR_INCOMPATIBLE_VERSION),
        ({**ENV, "CNI_COMMAND": "GC"}, json.dumps(CONF), spec.ERR_INCOMPATIBLE_VERSION),
        ({**ENV, "CNI_COMMAND": "STATUS"}, json.dumps({**CONF, "cniVersion": "0.4.0"}), spec.ERR_INCOMPATIBLE_VERSION),
    ],
)
def test_bad_requests_get_the_specs_codes(environ, stdin, code):
    assert code_of(environ, stdin.encode() if isinstance(stdin, str) else stdin) == code


def test_del_does_not_need_a_netns():
    environ = {k: v for k, v in ENV.items() if k != "CNI_NETNS"}
    assert parse_request({**environ, "CNI_COMMAND": "DEL"}, json.dumps(CONF).encode()).netns == ""


def test_gc_and_status_need_no_container():
    for command in ("GC", "STATUS"):
        request = parse_request({"CNI_COMMAND": command}, json.dumps({**CONF, "cniVersion": "1.1.0"}).encode())
        assert request.command == command


def test_error_json_has_the_specs_fields():
    out = CniError(7, "invalid network configuration", "subnet is missing").to_json("0.4.0")
    assert out == {"cniVersion": "0.4.0", "code": 7, "msg": "invalid network configuration", "details": "subnet is missing"}
    assert CniError.from_json(out).code == 7


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_version_answer_echoes_a_supported_version(version):
    text = spec.version_answer(spec.requested_version(json.dumps({"cniVersion": version}).encode()))
    assert json.loads(text) == {"cniVersion": version, "supportedVersions": list(spec.SUPPORTED_VERSIONS)}


@pytest.mark.parametrize("stdin", [b"", b"{}", b"garbage", b'{"cniVersion": "7.0.0"}', b'{"cniVersion":'])
def test_version_answer_without_a_usable_version(stdin):
    assert json.loads(spec.version_answer(spec.requested_version(stdin)))["cniVersion"] == "1.0.0"


def test_results_before_1_0_carry_the_ip_version():
    ips = [{"address": "10.87.1.2/24", "gateway": "10.87.1.1", "interface": 1}]
    old = spec.add_result("0.4.0", [], ips, [])
    new = spec.add_result("1.0.0", [], ips, [])
    assert old["ips"][0]["version"] == "4" and "version" not in new["ips"][0]
    assert old["cniVersion"] == "0.4.0" and new["cniVersion"] == "1.0.0"


@pytest.mark.parametrize("doc", [{}, [], {"a": [1, 2.5, True, False, None, "x\u00e9\n"]}, "s", 0, {"nested": {"k": [{}]}}])
def test_jsonwire_round_trips_like_json(doc):
    from cni import jsonwire

    assert jsonwire.loads(jsonwire.dumps(doc)) == doc
    assert json.loads(jsonwire.dumps(doc)) == doc
    assert jsonwire.loads(f"  {json.dumps(doc)}\n") == doc


@pytest.mark.parametrize("text", ["{oops", "[1,]", "{} trailing", "", b"\xff"])
def test_jsonwire_rejects_what_json_rejects(text):
    from cni import jsonwire

    with pytest.raises(ValueError):
        jsonwire.loads(text)
