"""Weights that cannot fit get a clear error before any allocation (not an OOM kill)."""
import pytest
import torch

from fractal.errors import FractalError
from fractal.models import loader
from fractal.models.testing import make_tiny_model


def test_refuses_weights_larger_than_free_memory(tmp_path, monkeypatch):
    path = make_tiny_model("llama", tmp_path / "m")
    model = loader.load_model(path, dtype=torch.float32)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(loader, "available_memory_bytes", lambda device: need // 2)
    with pytest.raises(FractalError, match=r"weights need .* GB .* free"):
        loader.load_model(path, dtype=torch.float32)
    monkeypatch.setattr(loader, "available_memory_bytes", lambda device: need * 2)
    loader.load_model(path, dtype=torch.float32)


def test_host_memory_is_read():
    have = loader.available_memory_bytes(torch.device("cpu"))
    assert have is None or have > 0
