"""The node's control socket: framing, error codes, handler registration."""

import asyncio

import pytest

from flatnet.node.control import (
    BAD_REQUEST,
    HANDLER_FAILED,
    UNKNOWN_COMMAND,
    ControlClient,
    ControlError,
    ControlServer,
)


@pytest.fixture
async def server(tmp_path):
    srv = ControlServer(tmp_path / "node.sock")

    async def echo(request):
        return {"echo": request.get("value")}

    async def broken(request):
        raise RuntimeError("boom")

    async def refuses(request):
        raise ControlError(503, "not ready")

    srv.register("echo", echo)
    srv.register("broken", broken)
    srv.register("refuses", refuses)
    await srv.start()
    yield srv
    await srv.close()


async def test_answers_and_error_codes(server):
    client = ControlClient(server.path)
    assert await asyncio.to_thread(client.call, "echo", value=[1, 2]) == {"echo": [1, 2]}
    for cmd, code in (("nope", UNKNOWN_COMMAND), ("broken", HANDLER_FAILED), ("refuses", 503)):
        with pytest.raises(ControlError) as info:
            await asyncio.to_thread(client.call, cmd)
        assert info.value.code == code


async def test_bad_lines_get_400_and_the_connection_keeps_serving(server):
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b"not json\n[1]\n{\"cmd\": \"echo\", \"value\": 3}\n")
    answers = [await reader.readline() for _ in range(3)]
    writer.close()
    await writer.wait_closed()
    assert [a.count(b'"code":400') for a in answers[:2]] == [1, 1]
    assert answers[2] == b'{"ok":true,"echo":3}\n'
    assert server.bad_requests == 2 and BAD_REQUEST == 400


def test_registering_a_name_twice_is_a_bug(tmp_path):
    srv = ControlServer(tmp_path / "s")

    async def h(request):
        return {}

    srv.register("x", h)
    with pytest.raises(ValueError):
        srv.register("x", h)


async def test_close_removes_the_socket(tmp_path):
    srv = ControlServer(tmp_path / "node.sock")
    await srv.start()
    assert srv.path.exists()
    await srv.close()
    assert not srv.path.exists()
