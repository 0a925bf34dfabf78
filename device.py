"""Which device a run takes, and how it computes there: the compute dtype and its matrix-product
rate (MFU's yardstick), deterministic kernels, and a torchrun process's GPU. train.py, sample.py
and bench.py share them."""

import os
import time
from contextlib import nullcontext

import torch

from config import UserError


def compute_dtype(device):
    """The dtype a run's matrix products are computed in: bfloat16 (under autocast) on a CUDA device
    that supports it, else float32. MFU is taken against the matrix-product rate of this dtype: the
    float32 rate would put a bf16 run far above 100%."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def autocast_for(device):
    """The context a run computes in: autocast to compute_dtype(device), or none for float32."""
    dtype = compute_dtype(device)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def matmul_rate(device, dtype=torch.float32, n=2048):
    """The matrix-product rate of device in dtype, in FLOP/s: the yardstick of MFU."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for an asynchronous device to finish
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def make_deterministic():
    """Deterministic kernels from here on, so that on CUDA two runs with the same seed compute the
    same losses (on the CPU they do already). cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts:
    call this before anything touches the device."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # a fixed workspace: no reductions split by chance
    torch.use_deterministic_algorithms(True)


def pick_device(name):
    """torch.device for a DEVICE setting: auto takes cuda, else mps, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def rank_device(name, local_rank, local_ranks, gpus):
    """The device of torchrun's process local_rank of the local_ranks on this machine, for a DEVICE
    setting: on CUDA each process takes a GPU of its own, of the gpus there are."""
    device = pick_device(name)
    if device.type != "cuda":
        return device
    if local_ranks > gpus:
        raise UserError(f"torchrun starts {local_ranks} processes on this machine, which has {gpus} GPU"
                        f"{'' if gpus == 1 else 's'}: one process per GPU, so --nproc_per_node={gpus} at most; "
                        "--device=cpu runs the processes on the CPU")
    return torch.device("cuda", local_rank)
