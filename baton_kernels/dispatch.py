"""Which implementation runs each kernel: Triton on CUDA, the PyTorch path everywhere else.

Chosen once per device type and cached. Tests force the Triton path on the CPU (with
`TRITON_INTERPRET=1` set before any kernel module is imported) to compare it with the reference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from typing import Literal

import torch

log = logging.getLogger(__name__)

Backend = Literal["triton", "torch"]
_forced: Backend | None = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _default_backend(device_type: str) -> Backend:
    backend: Backend = "triton" if device_type == "cuda" and triton_available() else "torch"
    log.debug("kernels on %s run with %s", device_type, backend)
    return backend


def backend(device: torch.device | str) -> Backend:
    """The implementation kernels use for tensors on `device`."""
    if _forced is not None:
        return _forced
    return _default_backend(torch.device(device).type)


def dot_operands(dtype: torch.dtype) -> tuple[object, str]:
    """(Triton dtype, input precision) a kernel should cast `tl.dot` operands to for `dtype` data.

    On a GPU half-precision data multiplies as itself (tensor cores, float32 accumulation) and
    float32 exactly; the interpreter cannot multiply bfloat16, so there everything is float32.
    """
    import triton.language as tl

    if dtype == torch.float32 or interpreting():
        return tl.float32, "ieee"
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype], "tf32"


@contextlib.contextmanager
def force_backend(name: Backend) -> Iterator[None]:
    """Run every kernel with `name` inside the block (tests and benchmarks compare the two)."""
    global _forced
    if name == "triton" and not (triton_available() and (interpreting() or
                                                         torch.cuda.is_available())):
        raise RuntimeError("the Triton path needs CUDA or TRITON_INTERPRET=1 set before import")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
