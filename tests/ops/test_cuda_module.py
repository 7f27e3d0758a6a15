"""The CUDA module as a build artefact: it imports everywhere and says why it cannot run.

On a machine without a GPU or driver, importing diffmem (and diffmem._cuda itself) must work,
the registry must report the cuda backend unavailable with the CUDA runtime's reason, and an
explicit request for it must fail with that reason instead of crashing.
"""

from __future__ import annotations

import pytest
import torch

import diffmem
from diffmem.ops import _cuda


def _module_or_skip():
    ext, reason, _ = _cuda._module()
    if ext is None:
        assert reason, "an absent CUDA module must come with a reason"
        pytest.skip(f"diffmem._cuda not built: {reason}")
    return ext


def test_module_reports_itself():
    ext = _module_or_skip()
    info = ext.info()
    assert set(info) >= {"emulated", "devices", "reason", "knn_max_k"}
    assert info["knn_max_k"] >= 2
    if info["devices"] == 0:
        assert info["reason"], "no device must come with the CUDA runtime's reason"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device path")
def test_no_device_is_reported_cleanly():
    ext = _module_or_skip()
    if ext.info()["emulated"]:
        pytest.skip("host-emulator build: runs on CPU tensors")
    report = diffmem.backends()["cuda"]
    assert report["available"] is False
    assert "no CUDA device" in report["reason"]
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="cuda"):
        diffmem.softmax_mean(x, torch.randn(5, 4), 0.5, 0.25, backend="cuda")
    # auto on CPU tensors never picks it
    assert diffmem.softmax_mean(x, torch.randn(5, 4), 0.5, 0.25).shape == (3, 4)


def test_missing_module_reason_is_explained(monkeypatch):
    """Without the compiled module the backend is unavailable with the build's reason."""
    monkeypatch.setattr(_cuda, "_loaded", [(None, "built with DIFFMEM_CUDA=OFF", {})])
    ok, reason = _cuda.status()
    assert not ok and reason == "built with DIFFMEM_CUDA=OFF"
    with pytest.raises(RuntimeError, match="DIFFMEM_CUDA=OFF"):
        _cuda.forward(*([torch.zeros(1, 1, 1)] * 2), torch.ones(1, 1), torch.ones(1, 1), None)
