"""A local Ray start is tried once more after one of Ray's startup timeouts, and only then."""

from __future__ import annotations

import pytest

from baton.cluster import ray_start

TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")


def _fake_ray(monkeypatch, failures: list[Exception]) -> list[str]:
    calls: list[str] = []

    def init(**options):
        calls.append(f"init {options['address']}")
        if failures:
            raise failures.pop(0)
        return "context"

    monkeypatch.setattr(ray_start.ray, "init", init)
    monkeypatch.setattr(ray_start.ray, "shutdown", lambda: calls.append("shutdown"))
    return calls


GCS_PORT_TIMEOUT = RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_ab")


@pytest.mark.parametrize("timeout", [TIMEOUT, GCS_PORT_TIMEOUT])
def test_a_startup_timeout_gets_one_more_start(monkeypatch, timeout):
    calls = _fake_ray(monkeypatch, [timeout])
    assert ray_start.init_local(num_cpus=2) == "context"
    assert calls == ["init local", "shutdown", "init local"]


def test_a_second_timeout_is_raised(monkeypatch):
    calls = _fake_ray(monkeypatch, [TIMEOUT, TIMEOUT])
    with pytest.raises(Exception, match="timed out during startup"):
        ray_start.init_local()
    assert calls.count("init local") == 2


def test_other_errors_are_raised_at_once(monkeypatch):
    calls = _fake_ray(monkeypatch, [ValueError("bad option")])
    with pytest.raises(ValueError, match="bad option"):
        ray_start.init_local()
    assert calls == ["init local", "shutdown"]
