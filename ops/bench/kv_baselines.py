"""The baselines `baton bench kv` holds the KV link against: raw TCP and Ray's object store.

Both move the very bytes the link moves, and both are driven the way the link is: the caller
times one `send` and the call returns only once the other side holds every byte.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Any, Self

import numpy as np

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")  # payload length; 0 ends the connection
_ACK = b"k"


class Link:
    """A baseline's connection: closed by `close`, or on leaving a `with` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RawTCPLink(Link):
    """A loopback socket pair: a server thread `recv_into`s a preallocated buffer, then acks.

    The floor for any protocol over TCP on this machine: no framing, checksums or copies beyond
    the kernel's. One connection, kept open across sends (as the KV link's gRPC channel is).
    """

    def __init__(self, max_bytes: int):
        self.buffer = bytearray(max_bytes)  # written once below, so its pages are mapped
        self.buffer[:] = bytes(max_bytes)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, name="raw-tcp-recv", daemon=True)
        self._thread.start()
        self._client = socket.create_connection(self._listener.getsockname()[:2])
        self._client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes | memoryview) -> None:
        """Send `payload`; return once the server has received all of it."""
        n = len(payload)
        if not 0 < n <= len(self.buffer):
            raise ValueError(f"{n} bytes do not fit the {len(self.buffer)}-byte buffer")
        self._client.sendall(_HEADER.pack(n))
        self._client.sendall(payload)
        if self._client.recv(1) != _ACK:
            raise ConnectionError("raw TCP server closed the connection")

    def close(self) -> None:
        self._client.sendall(_HEADER.pack(0))
        self._client.close()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(self.buffer)
        header = bytearray(_HEADER.size)
        with conn:
            while True:
                if not _recv_exactly(conn, memoryview(header)):
                    return
                (n,) = _HEADER.unpack(header)
                if n == 0 or not _recv_exactly(conn, view[:n]):
                    return
                conn.sendall(_ACK)


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        k = conn.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


class ObjectStoreSink:
    """A Ray actor body: receives an array through the object store and touches a few bytes."""

    def touch(self, arr: np.ndarray) -> int:
        step = max(1, len(arr) // 8)
        return len(arr) + int(arr[::step].sum())


def expected_touch(arr: np.ndarray) -> int:
    """What `ObjectStoreSink.touch` answers for `arr` (to check the actor saw the right bytes)."""
    return ObjectStoreSink().touch(arr)


class RayObjectStoreLink(Link):
    """`ray.put` in this process, `ray.get` (as an actor call's argument) in another process.

    Starts a local Ray (2 CPUs, no dashboard) unless this process already runs one, and stops
    it on `close` only if it started it. On one node the object store is shared memory: `put`
    copies the array in once and the actor maps it without a copy.
    """

    def __init__(self, num_cpus: int = 2):
        import ray

        from baton.cluster.ray_start import init_local

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            init_local(num_cpus=num_cpus, include_dashboard=False,
                       logging_level=logging.ERROR)
        sink: Any = ray.remote(ObjectStoreSink)  # Ray's stubs type the handle's methods poorly
        self._actor = sink.options(num_cpus=1).remote()
        ray.get(self._actor.touch.remote(np.zeros(1, dtype=np.uint8)))  # the actor is up

    def send(self, arr: np.ndarray) -> int:
        """Put `arr`, have the actor get it, and return what the actor answered."""
        if self._actor is None:
            raise RuntimeError("the object store link is closed")
        ref = self._ray.put(arr)
        answer: int = self._ray.get(self._actor.touch.remote(ref))
        del ref  # freed from the store before the next send
        return answer

    def close(self) -> None:
        """Stop the actor (and Ray, if this started it); closing twice does nothing."""
        if self._actor is None:
            return
        self._ray.kill(self._actor)
        self._actor = None
        if self._started:
            self._ray.shutdown()
