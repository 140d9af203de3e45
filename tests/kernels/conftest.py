"""Kernel tests: Triton's CPU interpreter unless CUDA is here (tests/conftest.py turns it on
before anything imports triton)."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.dispatch import force_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Kernel against reference: (atol, rtol) by dtype of the inputs.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.fixture
def triton_path():
    """Force the Triton kernels (interpreted on the CPU, compiled on CUDA) inside the test."""
    with force_backend("triton"):
        yield
