"""Test set-up: Triton kernels run through the interpreter on the CPU when no CUDA device exists.

TRITON_INTERPRET must be set before any kernel module is imported, so it is decided here, before collection.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws its own inputs: a seed from its name (crc32, stable across processes, unlike hash()), so a
    failure reproduces but tests differ."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
