"""The local redis-server `baton up` starts: loopback, password, persistence, clear start errors."""

from __future__ import annotations

import os
import stat

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from baton.cluster.redis_server import RedisServer, stop_redis
from baton.errors import RedisStartError

NO_RETRY = Retry(NoBackoff(), 0)


def test_password_is_required(redis_url: str) -> None:
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, password="guess", retry=NO_RETRY).ping()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.ping()
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("protected-mode")["protected-mode"] == "yes"


def test_conf_with_the_password_is_private(tmp_path) -> None:
    with RedisServer(tmp_path / "r") as url:
        assert url.startswith("redis://:") and "@127.0.0.1:" in url
        assert stat.S_IMODE(os.stat(tmp_path / "r" / "redis.conf").st_mode) == 0o600
        assert "Ready to accept connections" in (tmp_path / "r" / "redis.log").read_text()


def test_data_and_password_survive_a_restart(tmp_path) -> None:
    server = RedisServer(tmp_path / "r")
    url = server.start()
    redis.Redis.from_url(url).set("kept", "yes")
    server.stop()
    assert not server.running
    server.stop()  # twice is fine
    again = RedisServer(tmp_path / "r")
    with again:
        assert again.password == server.password
        assert redis.Redis.from_url(again.url).get("kept") == b"yes"


def test_port_in_use_is_a_clear_error(redis_url: str, tmp_path) -> None:
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    server = RedisServer(tmp_path / "r", port=port)
    with pytest.raises(RedisStartError, match="(?s)exited.*Address already in use"):
        server.start()
    assert not server.running


def test_missing_binary_says_how_to_install(tmp_path) -> None:
    with pytest.raises(RedisStartError, match="apt-get install redis-server.*--redis-url"):
        RedisServer(tmp_path / "r", binary="baton-no-such-redis-server").start()


def test_stop_from_another_process_by_data_dir(tmp_path) -> None:
    server = RedisServer(tmp_path / "r")
    server.start()
    assert stop_redis(tmp_path / "r")
    assert server._proc is not None and server._proc.wait(timeout=5) == 0
    assert not stop_redis(tmp_path / "r")  # nothing left there
    assert not stop_redis(tmp_path / "never")
