"""Where offloaded experts live: host memory (pinned on CUDA) or safetensors files on disk.

A store holds every expert of every MoE layer and hands out one expert's weights
(`gate_up [2I, H]`, `down [H, I]`): as CPU tensors for the expert cache to copy onto a CUDA
device (`read`), or copied straight into a CPU cache's slot on the calling thread alone
(`read_into`), so that a background prefetch never takes the forward's intra-op threads.

Building a store takes the fused expert tensors out of the model: the experts modules keep only
meta-device placeholders of the same shape, so the full weights no longer sit in the model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from baton.actors.expert_aio import AioReads, open_aio
from baton.actors.expert_file import (
    DOWN,
    GATE_UP,
    RecordReader,
    copy_to,
    record_slots,
    write_layer_file,
)

log = logging.getLogger(__name__)

AIO_DEPTH = 16  # direct reads in flight at once


@dataclass(frozen=True, slots=True)
class ExpertShape:
    """The shape and dtype every offloaded expert shares."""

    gate_up: tuple[int, int]  # [2I, H]
    down: tuple[int, int]  # [H, I]
    dtype: torch.dtype

    @classmethod
    def of(cls, gate_up: torch.Tensor, down: torch.Tensor) -> ExpertShape:
        """The per-expert shape of fused `[E, 2I, H]` and `[E, H, I]` tensors."""
        return cls((gate_up.shape[1], gate_up.shape[2]), (down.shape[1], down.shape[2]),
                   gate_up.dtype)

    @property
    def nbytes(self) -> int:
        elems = self.gate_up[0] * self.gate_up[1] + self.down[0] * self.down[1]
        return elems * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class OffloadedWeight:
    """Stands where an experts module's fused tensor was: its shape and dtype, no data (not a
    tensor, so moving the model to a device leaves it alone)."""

    shape: torch.Size
    dtype: torch.dtype


def take_experts(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's fused expert tensors (`[E, 2I, H]`, `[E, H, I]`) in host memory; the module
    keeps `OffloadedWeight` placeholders in their place, no parameters."""
    taken = []
    for name in (GATE_UP, DOWN):
        full = getattr(experts, name).detach().to("cpu").contiguous()
        delattr(experts, name)
        setattr(experts, name, OffloadedWeight(full.shape, full.dtype))
        taken.append(full)
    return taken[0], taken[1]


class ExpertStore:
    """Every expert of every offloaded layer, readable one at a time.

    `read(layer, expert)` may be called from any thread; the tensors it returns must not be
    written to.
    """

    shape: ExpertShape
    num_experts: int

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def read_into(self, layer: int, expert: int, gate_up: torch.Tensor,
                  down: torch.Tensor) -> None:
        """Fill contiguous CPU tensors with one expert, on this thread only."""
        src_gate_up, src_down = (t.contiguous() for t in self.read(layer, expert))
        copy_to(gate_up, src_gate_up.data_ptr())
        copy_to(down, src_down.data_ptr())

    read_slots = 0  # reads that `begin_reads` can have in flight at once

    @property
    def async_reads(self) -> bool:
        """Whether `slots`/`begin_reads`/`collect` work (reads the forward starts, then
        collects)."""
        return self.read_slots > 0

    def slots(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A CPU cache's slot pool (`gate_up [capacity, 2I, H]`, `down [capacity, H, I]`) that
        `begin_reads` can fill."""
        raise NotImplementedError

    def begin_reads(self, reads: list[tuple[int, int, torch.Tensor]]) -> list[int]:
        """Start reading experts, each `(layer, expert, slot's gate_up)` of a pool from `slots`,
        straight into the slot: a ticket each. At most as many as reads are free (`read_slots`
        less those in flight)."""
        raise NotImplementedError

    def collect(self, wait_for: int | None = None) -> dict[int, bool]:
        """Reads finished since the last call (until `wait_for` is among them, when given):
        ticket -> whether it filled its slot."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files and memory (idempotent)."""


class HostStore(ExpertStore):
    """Experts in host memory, pinned when they are copied to a CUDA device (faster, async)."""

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]], pin: bool):
        self._layers = {
            i: (gu.pin_memory(), d.pin_memory()) if pin else (gu, d)
            for i, (gu, d) in layers.items()
        }
        gate_up, down = next(iter(self._layers.values()))
        self.num_experts = gate_up.shape[0]
        self.shape = ExpertShape.of(gate_up, down)
        self.pinned = pin

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self._layers[layer]
        return gate_up[expert], down[expert]

    def close(self) -> None:
        self._layers = {}


class DiskStore(ExpertStore):
    """Experts on disk, one safetensors file per layer (`layer_<i>.safetensors`) of page-aligned
    expert records (`expert_file`).

    A CPU cache's reads (`read_into`) are direct (`O_DIRECT`) where the filesystem allows it: each
    miss or prefetch reads the disk, as "LLM in a flash" assumes, instead of a copy the page
    cache kept outside the budget. With direct reads on Linux, `begin_reads` starts up to
    `AIO_DEPTH` of them at once through native AIO (`expert_aio`), each straight into a slot of
    a pool laid out as the records (`slots`). `read` (a CUDA cache's staging) maps the files.

    `directory` None writes into a temporary directory removed on `close` (or when the store is
    collected); a given directory is left in place.
    """

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 directory: str | Path | None = None, direct: bool = True):
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="baton-experts-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)
        else:
            self.directory = Path(directory).expanduser()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cleanup = None
        self._files = {}
        self._fds: dict[int, int] = {}
        layout = None
        for i, (gate_up, down) in layers.items():
            path = self._path(i)
            # Written aside, then renamed: another worker sharing `directory` keeps reading the
            # file it mapped (truncating a mapped file would crash it).
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            layout = write_layer_file(tmp, gate_up, down)
            os.replace(tmp, path)
            self._files[i] = safe_open(str(path), framework="pt", device="cpu")
        assert layout is not None, "a store needs at least one layer"
        self.reader = RecordReader(layout, direct)
        self._fds = {i: self.reader.open(self._path(i)) for i in layers}
        self._close_fds = weakref.finalize(self, _close_all, list(self._fds.values()))
        self._aio: AioReads | None = open_aio(AIO_DEPTH) if self.reader.direct else None
        self.read_slots = AIO_DEPTH if self._aio is not None else 0
        gate_up, down = next(iter(layers.values()))
        self.num_experts = gate_up.shape[0]
        self.shape = ExpertShape.of(gate_up, down)
        log.info("experts of %d layers written to %s (%s reads)", len(layers), self.directory,
                 "direct" if self.reader.direct else "buffered")

    def _path(self, layer: int) -> Path:
        return self.directory / f"layer_{layer}.safetensors"

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._files[layer]
        return f.get_tensor(f"{GATE_UP}.{expert}"), f.get_tensor(f"{DOWN}.{expert}")

    def read_into(self, layer: int, expert: int, gate_up: torch.Tensor,
                  down: torch.Tensor) -> None:
        self.reader.read_into(self._fds[layer], expert, gate_up, down)

    def slots(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        return record_slots(self.reader.layout, capacity, self.shape.gate_up, self.shape.down,
                            self.shape.dtype)

    def begin_reads(self, reads: list[tuple[int, int, torch.Tensor]]) -> list[int]:
        assert self._aio is not None, "begin_reads needs async_reads"
        layout = self.reader.layout
        return self._aio.submit([(self._fds[layer], layout.offset(expert), into.data_ptr(),
                                  layout.record_bytes) for layer, expert, into in reads])

    def collect(self, wait_for: int | None = None) -> dict[int, bool]:
        assert self._aio is not None, "collect needs async_reads"
        want = self.reader.layout.record_bytes
        done = self._aio.poll(wait_for)
        for got in done.values():
            if got != want:  # minus an errno, or a short read
                log.warning("expert read failed: %s of %d bytes", got, want)
        return {ticket: got == want for ticket, got in done.items()}

    def drop_page_cache(self) -> None:
        """Evict the expert files from the OS page cache, so the next reads come from the disk
        (a cold start). Only while nothing reads the store: the files are unmapped first, since
        the kernel keeps the pages a mapping holds."""
        layers = list(self._files)
        self._files = {}
        for i in layers:
            path = self._path(i)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            self._files[i] = safe_open(str(path), framework="pt", device="cpu")

    def close(self) -> None:
        self._files = {}
        if self._aio is not None:
            self._aio.close()  # waits for reads in flight: their files stay open until then
            self._aio = None
            self.read_slots = 0
        self._fds = {}
        self._close_fds()
        if self._cleanup is not None:
            self._cleanup()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
