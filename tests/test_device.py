"""The compute dtype a device's run takes."""

import pytest
import torch

from device import compute_dtype


def test_a_cpu_run_computes_in_float32():
    assert compute_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("bf16", [True, False])
def test_a_cuda_run_computes_in_bf16_where_the_device_supports_it(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert compute_dtype(torch.device("cuda")) == (torch.bfloat16 if bf16 else torch.float32)
