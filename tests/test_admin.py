"""Unit tests of the Caddy admin client's error mapping, with ``httpx.MockTransport`` as the seam."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from reconciler.caddy.admin import AdminClient
from reconciler.errors import CaddyError, CaddyRejected, CaddyUnavailable

CONFIG = {"admin": {"listen": "127.0.0.1:2019"}, "apps": {}}


def client(handler: Callable[[httpx.Request], httpx.Response]) -> AdminClient:
    return AdminClient("http://127.0.0.1:2019", transport=httpx.MockTransport(handler))


def test_load_posts_the_config_as_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    with client(handler) as c:
        c.load(CONFIG)
        c.load(CONFIG, force=True)
    assert [r.method for r in seen] == ["POST", "POST"]
    assert seen[0].url.path == "/load"
    assert json.loads(seen[0].content) == CONFIG
    assert seen[0].headers["content-type"] == "application/json"
    assert "cache-control" not in seen[0].headers
    assert seen[1].headers["cache-control"] == "must-revalidate"


def test_get_config_returns_parsed_json() -> None:
    with client(lambda r: httpx.Response(200, json=CONFIG)) as c:
        assert c.get_config() == CONFIG
        assert c.ping() is True


def test_400_is_rejected_with_caddys_message() -> None:
    message = "loading config: loading new config: http app module: start: listening on :1: bind"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": message})

    with client(handler) as c, pytest.raises(CaddyRejected) as info:
        c.load(CONFIG)
    assert info.value.message == message
    assert info.value.status_code == 400
    assert message in str(info.value)
    assert not isinstance(info.value, CaddyUnavailable)


def test_400_with_a_plain_text_body_keeps_the_text() -> None:
    c = client(lambda r: httpx.Response(400, text="bad things\n"))
    with c, pytest.raises(CaddyRejected) as info:
        c.load(CONFIG)
    assert info.value.message == "bad things"


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_unavailable(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": "internal trouble"})

    with client(handler) as c:
        with pytest.raises(CaddyUnavailable) as info:
            c.load(CONFIG)
        assert "internal trouble" in str(info.value)
        assert str(status) in str(info.value)
        with pytest.raises(CaddyUnavailable):
            c.get_config()
        assert c.ping() is False


def _raise(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("connection refused"),
    httpx.RemoteProtocolError("server disconnected"),
    httpx.ReadError("connection reset"),
])
def test_transport_errors_are_unavailable(exc: Exception) -> None:
    with client(_raise(exc)) as c:
        with pytest.raises(CaddyUnavailable) as info:
            c.load(CONFIG)
        assert isinstance(info.value.__cause__, httpx.HTTPError)
        assert "127.0.0.1:2019" in str(info.value)
        with pytest.raises(CaddyUnavailable):
            c.get_config()
        with pytest.raises(CaddyUnavailable):
            c.stop()
        assert c.ping() is False


@pytest.mark.parametrize("exc", [
    httpx.ReadTimeout("read timed out"),
    httpx.ConnectTimeout("connect timed out"),
    httpx.WriteTimeout("write timed out"),
    httpx.PoolTimeout("pool timed out"),
])
def test_timeouts_are_unavailable(exc: Exception) -> None:
    with client(_raise(exc)) as c:
        with pytest.raises(CaddyUnavailable) as info:
            c.load(CONFIG)
        assert "timed out" in str(info.value)
        assert isinstance(info.value.__cause__, httpx.TimeoutException)
        assert c.ping() is False


def test_invalid_json_from_get_config_is_unavailable() -> None:
    with client(lambda r: httpx.Response(200, text="<html>not caddy</html>")) as c, \
            pytest.raises(CaddyUnavailable):
        c.get_config()


def test_errors_share_one_base() -> None:
    assert issubclass(CaddyRejected, CaddyError)
    assert issubclass(CaddyUnavailable, CaddyError)
