"""Benchmarks on the machine it runs on: the matrix-product rate, training characters/s and MFU,
sampling characters/s with and without the key/value cache, and the data loader's characters/s,
each beside the reference implementation (attention as explicit masked softmax, through
scaled_dot_product_attention's math backend; the whole context recomputed for every sampled
character).

    python bench.py                                    # default model, the tinystories/ slice
    python bench.py --dataset=PATH --n_embd=512 --n_layer=8

Peak memory on large data is experiments/memory.py's.

Timings are noisy on a shared machine: each figure is the best of a few repeats.
"""

import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import config
import optim
from checkpoint import MODEL_KEYS
from data import training_batches, vocabulary_stories
from device import autocast_for, compute_dtype, matmul_rate, pick_device, synchronize
from model import GPT, GPTConfig, pick
from tokenizer import Tokenizer

# The settings bench.py reads, for --help.
READS = ("DATASET", "TOKENIZER_STORIES", *(key.upper() for key in MODEL_KEYS), "BATCH_SIZE", "MUON", "DEVICE")

# The rows are a markdown table, named as docs/speed.md's speed table names them.
HEADER = "| | this project | reference |\n|---|---|---|"


def row(name, ours, ref=""):
    print(f"| {name} | {ours} | {ref} |")


def best_of(repeats, fn):
    """The shortest of several timings of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def train_rate(model, cfg, device, steps=10):
    """Training characters/s: forward (in train.py's dtype), backward, clipping and the optimizers
    (Muon and AdamW, or AdamW alone with --muon=False), as train.py does them."""
    optimizer = optim.optimizer(model, 1e-3, 0.1, (0.9, 0.99), device.type, cfg["muon"])
    x = torch.randint(0, model.config.vocab_size, (cfg["batch_size"], cfg["block_size"]), device=device)

    def run():
        for _ in range(steps):
            with autocast_for(device):
                _, loss = model(x, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    run()  # warm up
    return steps * x.numel() / best_of(3, run)


def sample_rate(model, n, batch=1, use_cache=True, threads=1):
    """Sampled characters/s (all rows together) for n new characters from a one-character prompt,
    on threads CPU threads (sample.py uses one); without the cache, the whole context's forward
    for every character."""
    idx = torch.zeros(batch, 1, dtype=torch.long, device=next(model.parameters()).device)
    gen = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def uncached():
        ids = idx
        for _ in range(n):
            logits = model(ids[:, -model.config.block_size:])[0]
            ids = torch.cat([ids, pick(logits, 0.8, 20, gen)], 1)

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds = best_of(3, lambda: model.generate(idx, n, 0.8, 20, generator=gen) if use_cache else uncached())
    torch.set_num_threads(default_threads)
    return batch * n / seconds


def loader_rate(cfg, tokenizer, batches=200):
    """Characters/s the streaming loader produces, tokenizing included."""
    loader = training_batches(cfg, tokenizer, held_out=False)
    seconds = best_of(1, lambda: [next(loader) for _ in range(batches)])
    loader.close()
    return batches * cfg["batch_size"] * (cfg["block_size"] + 1) / seconds


def main(argv):
    cfg = config.load(argv, __doc__, READS)
    device = pick_device(cfg["device"])
    tokenizer = Tokenizer.from_texts(vocabulary_stories(cfg["dataset"], cfg["tokenizer_stories"]))

    def make():
        torch.manual_seed(0)
        return GPT(GPTConfig(tokenizer.vocab_size, **{key: cfg[key] for key in MODEL_KEYS})).to(device)

    model = make()
    dtype = compute_dtype(device)  # what training computes in, so MFU's yardstick
    peak, dtype = matmul_rate(device, dtype), str(dtype).removeprefix("torch.")
    flops = model.flops_per_char()
    print(f"device {device}, {torch.get_num_threads()} threads, training in {dtype}; model {model.num_params():,} "
          f"parameters, {flops / 1e6:.2f} MFLOP per character (forward and backward)")
    print(HEADER)
    row("matrix products, 2048 x 2048, in the training dtype",
        f"{peak / 1e9:,.0f} GFLOP/s in {dtype}, a limit of {peak / flops:,.0f} char/s")
    ours = train_rate(model, cfg, device)
    with sdpa_kernel(SDPBackend.MATH):  # the reference's attention: explicit masked softmax
        ref = train_rate(make(), cfg, device)
    row("training (forward, backward, optimizer step)", f"{ours:,.0f} char/s at batch {cfg['batch_size']} x "
        f"{cfg['block_size']}, MFU {ours * flops / peak:.0%}", f"{ref:,.0f} char/s ({ours / ref:.2f}x)")

    model.eval()
    T = cfg["block_size"]
    cached, short = sample_rate(model, 2000), sample_rate(model, 200)
    with sdpa_kernel(SDPBackend.MATH):  # the reference at whichever thread count suits it better
        uncached = max(sample_rate(model, T - 1, use_cache=False, threads=n) for n in (1, torch.get_num_threads()))
    row("sampling, one stream, top-k 20",
        f"{cached:,.0f} char/s over 2,000 characters ({short:,.0f} over the first 200)",
        f"{uncached:,.0f} char/s over {T - 1} ({cached / uncached:.2f}x)")
    row("sampling, --num_samples=16", f"{sample_rate(model, 500, batch=16):,.0f} char/s")
    loader = loader_rate(cfg, tokenizer)
    row("loader (stream, tokenize, pack)", f"{loader:,.0f} char/s, {loader / ours:.0f}x what training consumes")

if __name__ == "__main__":
    main(sys.argv[1:])
