"""A real local `redis-server` for `baton up` and tests: loopback, password, append-only data dir.

`baton up` (without `--redis-url`) starts one with `RedisServer(data_dir).start()` and hands the
returned URL to the router and workers; `baton down` calls `stop()`, or `stop_redis(data_dir)`
from another process. Production clusters use an external Redis by URL and never touch this.

The data dir holds everything of one server: `redis.conf` (mode 0600: it carries the password),
the append-only files, `redis.log` and `redis.pid`. Starting again on the same data dir keeps the
data and the password, so URLs handed out before a restart stay valid (the port may change unless
it is given).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from baton.errors import RedisStartError
from baton.ports import LOOPBACK, free_port

log = logging.getLogger(__name__)

CONF_NAME = "redis.conf"
LOG_NAME = "redis.log"


def redis_url(password: str, port: int, host: str = LOOPBACK, db: int = 0) -> str:
    """The URL clients connect with: `redis://:<password>@<host>:<port>/<db>`."""
    return f"redis://:{password}@{host}:{port}/{db}"


def _saved_password(conf: Path) -> str | None:
    if not conf.is_file():
        return None
    for line in conf.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "requirepass" and value:
            return value.strip('"')
    return None


def _saved_port(conf: Path) -> int | None:
    if not conf.is_file():
        return None
    for line in conf.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "port" and value.isdigit():
            return int(value)
    return None


def _client(port: int, password: str, timeout_s: float) -> redis.Redis:
    # No retries: a refused connection is an answer here, not something to wait out.
    return redis.Redis(host=LOOPBACK, port=port, password=password, socket_timeout=timeout_s,
                       socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))


class RedisServer:
    """One `redis-server` child process on loopback, with a password and an append-only data dir.

    `start()` returns the URL once the server answers PING with the password; it raises
    `RedisStartError` (with the server's log tail) when the binary is missing, the port is taken
    or the server exits or stays silent. `stop()` shuts it down cleanly (the append-only file is
    flushed) and is safe to call twice. Also a context manager: `with RedisServer(d) as url:`.
    """

    def __init__(self, data_dir: str | Path, port: int = 0, password: str | None = None,
                 binary: str = "redis-server", start_timeout_s: float = 10.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port  # 0: the data dir's saved port, else a free one, chosen at start
        self.password = password  # None: the data dir's saved one, else a new random one
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL; only meaningful once started."""
        if self.password is None or not self.port:
            raise RedisStartError("redis-server is not started yet: call start() first")
        return redis_url(self.password, self.port)

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Start the server (a no-op if already running) and return its URL."""
        if self.running:
            return self.url
        exe = shutil.which(self.binary)
        if exe is None:
            raise RedisStartError(
                f"{self.binary} not found on PATH: install it (apt-get install redis-server, "
                "or `make redis`), or pass --redis-url to use an external Redis")
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = self.data_dir / CONF_NAME
        self.password = self.password or _saved_password(conf) or secrets.token_urlsafe(32)
        self.port = self.port or _saved_port(conf) or free_port()  # a restart keeps its port
        self._write_conf(conf)
        # stderr too: config errors are printed before the logfile opens.
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen([exe, str(conf)], stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=out, cwd=self.data_dir)
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise
        log.info("redis-server pid %d on %s:%d, data in %s", self._proc.pid, LOOPBACK,
                 self.port, self.data_dir)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down (SIGTERM: redis flushes its append-only file, then exits)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM for %.0fs; killing it", proc.pid,
                        timeout_s)
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log (what to show when it fails)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _write_conf(self, conf: Path) -> None:
        def quoted(path: Path) -> str:
            return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [
            f"bind {LOOPBACK}",
            "protected-mode yes",
            f"port {self.port}",
            "daemonize no",
            f"requirepass {self.password}",
            f"dir {quoted(self.data_dir)}",
            f"logfile {quoted(self.log_path)}",
            f"pidfile {quoted(self.data_dir / 'redis.pid')}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',  # the append-only file is the persistence; no RDB snapshots forking too
        ]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _wait_ready(self) -> None:
        assert self._proc is not None and self.password is not None
        client = _client(self.port, self.password, 1.0)
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.01
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise RedisStartError(
                        f"redis-server exited with status {code} on port {self.port} (port in "
                        f"use? unwritable data dir {self.data_dir}?). Log tail:\n{self.log_tail()}")
                # A server still loading its append-only file answers BusyLoadingError; another
                # server on the same port refuses the password: both mean "not ours yet".
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RedisStartError(
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{self.start_timeout_s:.0f}s. Log tail:\n{self.log_tail()}")
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        finally:
            client.close()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_redis(data_dir: str | Path, timeout_s: float = 10.0) -> bool:
    """Shut down the server that runs on `data_dir` from any process (`baton down`).

    Reads the port and password from the data dir's config, sends SHUTDOWN and waits until the
    port stops answering; returns False when no server answered there (already stopped).
    """
    conf = Path(data_dir).expanduser().resolve() / CONF_NAME
    password, port = _saved_password(conf), _saved_port(conf)
    if password is None or port is None:
        return False
    client = _client(port, password, timeout_s)
    try:
        client.ping()
        client.shutdown()  # returns once the server closed the connection on its way out
    except redis.ConnectionError:
        return False
    finally:
        client.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
        except OSError:
            return True
        time.sleep(0.02)
    raise RedisStartError(f"redis-server on port {port} still answers {timeout_s:.0f}s after "
                          f"SHUTDOWN; see {conf.parent / LOG_NAME}")
