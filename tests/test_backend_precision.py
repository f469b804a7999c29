"""precision=auto: bf16 only where the device multiplies it natively."""

import pytest
import torch

from launch import backend
from launch.backend import resolve_precision


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(explicit: str) -> None:
    assert resolve_precision(explicit) == explicit


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU rule")
@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(backend, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto") == ("bf16" if native else "fp32")
