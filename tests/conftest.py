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


@pytest.fixture(autouse=True)
def _cpu_engines_unless_gpu_test(request, monkeypatch):
    """On a CUDA machine, tests not marked gpu build their engines on the CPU (device "auto" -> cpu), as CI does:
    they check engine logic against HF on tiny models, and a CUDA engine each (a KV pool sized from the free
    memory, graph capture, a warm-up) made the suite take hours there. The gpu-marked tests exercise the CUDA path;
    kernel tests pick their device themselves."""
    if _has_cuda() and "gpu" not in request.keywords:
        import fractal.engine.runner as runner

        resolve = runner.resolve_device
        monkeypatch.setattr(runner, "resolve_device", lambda name: resolve("cpu" if name == "auto" else name))
    yield


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """On a CUDA machine every test that builds an engine sizes its KV pool from the free GPU memory: give back
    what the previous test's engines held (their tensors, CUDA graphs and the caching allocator's segments), or
    the next engine finds no budget. Nothing to do without CUDA."""
    yield
    if not _has_cuda():
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
