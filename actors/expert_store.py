"""Where offloaded experts live: host memory (pinned on CUDA) or memory-mapped safetensors on disk.

A store holds every expert of every MoE layer and hands out one expert's weights
(`gate_up [2I, H]`, `down [H, I]`) as CPU tensors for the expert cache to copy onto the compute
device. Building a store takes the fused expert tensors out of the model: the experts modules keep
only meta-device placeholders of the same shape, so the full weights no longer sit in the model.
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
from safetensors.torch import save_file

log = logging.getLogger(__name__)

GATE_UP = "gate_up_proj"
DOWN = "down_proj"


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
    """Experts on disk, one safetensors file per layer (`layer_<i>.safetensors`), memory-mapped.

    `directory` None writes into a temporary directory removed on `close` (or when the store is
    collected); a given directory is left in place.
    """

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 directory: str | Path | None = None):
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="baton-experts-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)
        else:
            self.directory = Path(directory).expanduser()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cleanup = None
        self._files = {}
        for i, (gate_up, down) in layers.items():
            path = self.directory / f"layer_{i}.safetensors"
            # Written aside, then renamed: another worker sharing `directory` keeps reading the
            # file it mapped (truncating a mapped file would crash it).
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({GATE_UP: gate_up, DOWN: down}, str(tmp))
            os.replace(tmp, path)
            self._files[i] = safe_open(str(path), framework="pt", device="cpu")
        gate_up, down = next(iter(layers.values()))
        self.num_experts = gate_up.shape[0]
        self.shape = ExpertShape.of(gate_up, down)
        log.info("experts of %d layers written to %s", len(layers), self.directory)

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._files[layer]
        return f.get_slice(GATE_UP)[expert], f.get_slice(DOWN)[expert]

    def drop_page_cache(self) -> None:
        """Evict the expert files from the OS page cache, so the next reads come from the disk
        (a cold start). Only while nothing reads the store: the files are unmapped first, since
        the kernel keeps the pages a mapping holds."""
        layers = list(self._files)
        self._files = {}
        for i in layers:
            path = self.directory / f"layer_{i}.safetensors"
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            self._files[i] = safe_open(str(path), framework="pt", device="cpu")

    def close(self) -> None:
        self._files = {}
        if self._cleanup is not None:
            self._cleanup()
