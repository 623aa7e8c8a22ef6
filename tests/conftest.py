import os

import pytest

# Tiny models run faster on one thread, and CI has two cores shared with the server tests' subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
