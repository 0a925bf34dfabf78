"""Which device a run takes, and how it computes there: the compute dtype and its matrix-product
rate (MFU's yardstick), deterministic kernels, a torchrun process's GPU and its process group.
train.py, sample.py and bench.py share them."""

import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from config import UserError


def compute_dtype(device):
    """The dtype a run's matrix products are computed in: bfloat16 (under autocast) on a CUDA device
    that supports it, else float32. MFU is taken against the matrix-product rate of this dtype: the
    float32 rate would put a bf16 run far above 100%."""
    return torch.bfloat16 if device.type == "cuda" and has_bf16(device) else torch.float32


def has_bf16(device):
    """Whether CUDA device computes bfloat16 in hardware (compute capability 8.0, Ampere, or later).
    torch.cuda.is_bf16_supported() also counts the emulation of older GPUs (V100, T4), slower than
    float32, and asks the current device rather than the run's."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_for(device):
    """The context a run computes in: autocast to compute_dtype(device), or none for float32."""
    dtype = compute_dtype(device)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def synchronize(device):
    """Wait for what device has queued to finish: CUDA and MPS run asynchronously to the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_rate(device, dtype=torch.float32, n=None, products=None):
    """The matrix-product rate of device in dtype, in FLOP/s: the yardstick of MFU. Best of a few
    timings of `products` n-by-n matrix products in a row and one wait for the device. A GPU computes a
    2048-cubed product in tens of microseconds, as long as a launch and a wait take: timed one
    at a time its rate comes out low, and MFU high. The CPU computes synchronously, and slowly."""
    gpu = device.type != "cpu"
    n, products = n or (4096 if gpu else 2048), products or (20 if gpu else 1)
    a, b, out = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    best = float("inf")
    for _ in range(5):  # the best of them: the first also loads the kernels
        synchronize(device)
        start = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * products / best


def make_deterministic(name):
    """Deterministic kernels from here on, so that on CUDA two runs with the same seed compute the
    same losses (on the CPU they do already). cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts:
    call this before anything touches the device. name: the DEVICE setting."""
    if name.startswith("mps"):
        raise UserError("--deterministic is not available on MPS: the embedding's backward there is not "
                        "deterministic and torch has no deterministic kernel for it; --device=cpu is exact")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # a fixed workspace: no reductions split by chance
    torch.use_deterministic_algorithms(True)


def pick_device(name):
    """torch.device for a DEVICE setting: auto takes cuda, else cpu. MPS (Apple silicon) only when
    asked for by name: it is not taken on its own."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rank_device(name, local_rank, local_ranks, gpus):
    """The device of torchrun's process local_rank of the local_ranks on this machine, for a DEVICE
    setting: on CUDA each process takes a GPU of its own, of the gpus there are."""
    device = pick_device(name)
    if device.type == "mps":
        raise UserError("torchrun cannot run on MPS: gloo, its CPU backend, cannot carry MPS tensors; "
                        "--device=cpu runs the processes on the CPU")
    if device.type != "cuda":
        return device
    if device.index is not None:
        if local_ranks > 1:
            raise UserError(f"--device={name} names one GPU, but torchrun starts {local_ranks} processes on "
                            "this machine and each takes cuda:LOCAL_RANK: pass --device=cuda")
        return device
    if local_ranks > gpus:
        raise UserError(f"torchrun starts {local_ranks} processes on this machine, which has {gpus} GPU"
                        f"{'' if gpus == 1 else 's'}: one process per GPU, so --nproc_per_node={gpus} at most; "
                        "--device=cpu runs the processes on the CPU")
    return torch.device("cuda", local_rank)


def setup_distributed(cfg):
    """(rank, world_size, device). Under torchrun: one process per device, nccl between GPUs and
    gloo between CPU processes; the other ranks print nothing. A plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(cfg["device"])
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = rank_device(cfg["device"], local_rank, local_ranks, torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world_size, device
