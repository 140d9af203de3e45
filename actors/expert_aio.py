"""Linux native AIO for the disk tier: expert reads the forward thread starts and collects itself.

On a CPU the forward's intra-op threads hold every core. A loader thread that wakes to read an
expert preempts one of them and stalls the whole parallel region; measured here, each background
read cost the forward about as much as reading the expert synchronously. With `io_submit` on an
`O_DIRECT` file the disk fills a buffer by DMA while no thread runs at all: the forward submits
the next layer's experts (tens of microseconds of kernel time on its own thread) and collects them
when it needs them. The syscalls are called through ctypes (which drops the GIL), so there is
nothing to build.

Reads land where the caller says: the expert cache's slots are laid out as the file's records
(`expert_file.record_slots`), so the disk fills a slot itself and nothing is copied after. Several
reads go to the kernel in one `io_submit`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import weakref

log = logging.getLogger(__name__)

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PREAD = 0


class _Iocb(ctypes.Structure):  # struct iocb, <linux/aio_abi.h>, little-endian
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


class AioReads:
    """Up to `depth` reads in flight, each named by a ticket until `poll` reports it."""

    def __init__(self, depth: int) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or os.name != "posix":
            raise OSError(errno.ENOSYS, f"no native AIO on {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._libc = _libc()
        self._ctx = ctypes.c_ulong(0)
        if self._call(self._setup, ctypes.c_long(depth), ctypes.byref(self._ctx)) < 0:
            raise OSError(ctypes.get_errno(), "io_setup failed")
        # A context not closed is freed when collected (the kernel caps them system-wide).
        self._destroy_ctx = weakref.finalize(self, _destroy, self._libc, self._destroy,
                                             self._ctx.value)
        self._iocbs = [_Iocb(data=ticket, opcode=_IOCB_CMD_PREAD) for ticket in range(depth)]
        self._pointers = [ctypes.pointer(cb) for cb in self._iocbs]
        self._events = (_Event * depth)()
        self._free = list(range(depth - 1, -1, -1))
        self._done: dict[int, int] = {}  # ticket -> bytes read (or -errno), not yet collected
        self.in_flight = 0

    def _call(self, number: int, *args) -> int:
        return int(self._libc.syscall(ctypes.c_long(number), *args))

    def submit(self, reads: list[tuple[int, int, int, int]]) -> list[int]:
        """Start `reads`, each `(fd, offset, address, nbytes)` (for `O_DIRECT`, all aligned to
        the file's block size), in one system call; their tickets. At most `depth` reads can be
        started and not yet reported by `poll`. A read the kernel would not start is reported
        by `poll` as failed, like one that failed."""
        if len(reads) > len(self._free):
            raise ValueError(f"{len(reads)} reads asked for with {len(self._free)} free")
        tickets = [self._free.pop() for _ in reads]
        for ticket, (fd, offset, address, nbytes) in zip(tickets, reads, strict=True):
            cb = self._iocbs[ticket]  # its data (the ticket) and opcode are set once
            cb.fildes, cb.buf, cb.nbytes, cb.offset = fd, address, nbytes, offset
        array = (ctypes.POINTER(_Iocb) * len(tickets))(*(self._pointers[t] for t in tickets))
        started = self._call(self._submit, self._ctx, ctypes.c_long(len(tickets)), array)
        code = ctypes.get_errno() if started < 0 else errno.EAGAIN
        started = max(started, 0)
        self.in_flight += started
        for ticket in tickets[started:]:  # never began: reported by `poll` as failed reads
            self._done[ticket] = -code
        if started < len(tickets):
            log.warning("io_submit started %d of %d reads: %s", started, len(tickets),
                        os.strerror(code))
        return tickets

    def poll(self, wait_for: int | None = None) -> dict[int, int]:
        """Collect finished reads (waiting until `wait_for` is among them, when given): ticket ->
        bytes read, or minus the errno of a failed read. Each ticket is reported once, and is free
        for another read from then on."""
        while True:
            if self.in_flight:
                block = wait_for is not None and wait_for not in self._done
                got = self._call(self._getevents, self._ctx, ctypes.c_long(1 if block else 0),
                                 ctypes.c_long(len(self._events)), self._events, None)
                if got < 0 and ctypes.get_errno() != errno.EINTR:
                    raise OSError(ctypes.get_errno(), "io_getevents failed")
                for event in self._events[: max(got, 0)]:
                    self._done[int(event.data)] = int(event.res)
                    self.in_flight -= 1
            if wait_for is None or wait_for in self._done or not self.in_flight:
                done, self._done = self._done, {}
                self._free += done
                return done

    def close(self) -> None:
        """Wait for reads in flight, then free the context (idempotent)."""
        if self._ctx.value:
            while self.in_flight:
                self.poll(wait_for=-1)
            self._destroy_ctx()
            self._ctx = ctypes.c_ulong(0)


def _destroy(libc, number: int, ctx: int) -> None:
    """io_destroy (it waits for reads still in flight)."""
    libc.syscall(ctypes.c_long(number), ctypes.c_ulong(ctx))


def open_aio(depth: int) -> AioReads | None:
    """An `AioReads`, or None (logged) where this system has no native AIO."""
    try:
        return AioReads(depth)
    except OSError as exc:
        log.info("no native AIO (%s): expert prefetches read on a loader thread", exc)
        return None
