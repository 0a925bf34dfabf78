"""Which device a run takes and how it computes there: the compute dtype, the matrix-product rate
MFU is taken against, and torchrun's devices. No GPU or Mac is needed: torch.cuda's and
torch.backends.mps's answers are replaced, so the tests see the choice being made."""

import pytest
import torch

import device as device_module
from config import UserError
from device import compute_dtype, make_deterministic, matmul_rate, pick_device, rank_device


def test_a_cpu_run_computes_in_float32():
    assert compute_dtype(torch.device("cpu")) == torch.float32


def test_a_cuda_run_computes_in_bf16_only_on_its_own_device_of_compute_capability_8_or_more(monkeypatch):
    # A V100 (7.0) or T4 (7.5) emulates bfloat16, slower than float32: is_bf16_supported() counts it,
    # and asks the current device, not the run's.
    capability = {0: (7, 0), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    dtypes = [compute_dtype(torch.device("cuda", i)) for i in range(3)]
    assert dtypes == [torch.float32, torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("mps", [True, False])
def test_auto_takes_cuda_else_the_cpu_and_never_mps_on_its_own(monkeypatch, mps):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("mps") == torch.device("mps")  # when asked for by name


def test_torchrun_refuses_a_named_gpu_when_several_processes_share_the_machine():
    with pytest.raises(UserError, match="pass --device=cuda"):
        rank_device("cuda:1", 0, 2, 2)


def test_torchrun_honours_a_named_gpu_for_its_one_process():
    assert rank_device("cuda:1", 0, 1, 2) == torch.device("cuda", 1)


def test_torchrun_refuses_mps():
    with pytest.raises(UserError, match="gloo"):
        rank_device("mps", 0, 1, 0)


def test_deterministic_runs_are_refused_on_mps():
    with pytest.raises(UserError, match="MPS"):
        make_deterministic("mps")


def timed_events(monkeypatch, device):
    """matmul_rate(device) on small CPU stand-ins: the side of its matrices and, in order, its
    products ("mm") and its waits for the device ("sync")."""
    events, sides, randn = [], [], torch.randn

    def stand_in(n, m, device, dtype):
        sides.append(n)
        return randn(8, 8)

    monkeypatch.setattr(torch, "randn", stand_in)
    monkeypatch.setattr(torch, "mm", lambda a, b, out: events.append("mm"))
    monkeypatch.setattr(device_module, "synchronize", lambda d: events.append("sync"))
    assert matmul_rate(torch.device(device)) > 0
    return set(sides), events


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_gpus_matmul_rate_times_many_large_products_per_wait(monkeypatch, device):
    # One 2048-cubed product takes a GPU some 30 us, as long as the launch and the wait around it.
    (side,), events = timed_events(monkeypatch, device)
    products = events.index("sync", 1) - 1
    assert side >= 4096 and products > 1 and events == (["sync"] + ["mm"] * products + ["sync"]) * 5


def test_the_cpus_matmul_rate_times_one_product_at_a_time(monkeypatch):
    (side,), events = timed_events(monkeypatch, "cpu")
    assert side == 2048 and events == ["sync", "mm", "sync"] * 5


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_synchronize_waits_for_cuda_and_mps(monkeypatch, kind):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    device_module.synchronize(torch.device(kind))
    device_module.synchronize(torch.device("cpu"))
    assert waited == [kind]
