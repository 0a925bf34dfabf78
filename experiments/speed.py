"""Training throughput of the model switches against the default model, to compare them at equal
wall-clock time on a shared machine: the loss after a number of steps does not depend on how
busy the machine was, the time per step does. So each variant's speed is measured here, briefly
and repeatedly, and a variant that is 20% slower is then trained for 20% fewer steps.

    python experiments/speed.py                      # batch 64 x 128, the threads torch picks
    python experiments/speed.py --steps=1500         # also the equal-time step count of each
    OMP_NUM_THREADS=1 python experiments/speed.py
    python experiments/speed.py --variants=muon,bpe-512,bpe-2048 --steps=4500   # only these, against the first
    python experiments/speed.py --variants=muon,bpe-512 --dataset=tinystories --rounds=10

The BPE variants are the default model (Muon included) at the README's BPE widths: a larger
vocabulary spends parameters on embeddings, so they are narrower to stay within 240,000. With
--dataset each step also draws its batch from the real data pipeline, with the variant's own
tokenizer built as a run builds it: BPE encoding costs a noticeable part of a step, characters
do not. Without it every step trains on one random batch.

The variants take turns within each round, so that a burst of load from elsewhere slows them
alike; each figure is the best round.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import config  # noqa: E402
import data  # noqa: E402
import optim  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402

VOCAB = 83  # the tokenizer's vocabulary on the tinystories/ slice
# name: (model settings, batch_size, block_size, muon)
VARIANTS = {"default": ({}, 64, 128, False), "rope": ({"rope": True}, 64, 128, False),
            "swiglu": ({"swiglu": True}, 64, 128, False), "tie_weights": ({"tie_weights": True}, 64, 128, False),
            "n_layer=2": ({"n_layer": 2}, 64, 128, False), "muon": ({}, 64, 128, True),
            "block_size=64": ({}, 64, 64, False), "batch_size=128": ({}, 128, 128, False),
            "muon token_shift": ({"token_shift": True}, 64, 128, True),
            "muon token_shift bigram key_offset": ({"token_shift": True, "mlp_hidden": 396, "bigram": 256,
                                                    "key_offset": True}, 64, 128, True),
            "muon batch_size=32": ({}, 32, 128, True), "muon batch_size=16": ({}, 16, 128, True),
            "bpe-512": ({"vocab_size": 512, "n_embd": 100}, 64, 128, True),
            "bpe-2048": ({"vocab_size": 2048, "n_embd": 48}, 64, 128, True)}


def trainer(overrides, batch_size=64, block_size=128, muon=False, dataset=None):
    """A function that takes one training step of a fresh model, as train.py takes them; with dataset,
    on the next batch of its training split, in the tokens of a tokenizer built from it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{"vocab_size": VOCAB, "block_size": block_size, **overrides}))
    optimizer = optim.optimizer(model, 3e-3, 0.1, (0.9, 0.99), "cpu", muon)
    inputs = torch.randint(0, model.config.vocab_size, (batch_size, block_size))
    batches = None
    if dataset:
        kind = "char" if model.config.vocab_size == VOCAB else "bpe"
        tok = build_tokenizer(kind, data.vocabulary_stories(dataset, config.TOKENIZER_STORIES), model.config.vocab_size)
        batches = data.Batches(data.open_split(dataset, "train"), tok, batch_size, block_size)

    def step():
        x, y = next(batches) if batches else (inputs, inputs)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()  # warm up
    return step


def main(argv):
    base_steps = next((int(a.split("=")[1]) for a in argv if a.startswith("--steps=")), None)
    names = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--variants=")), list(VARIANTS))
    rounds = next((int(a.split("=")[1]) for a in argv if a.startswith("--rounds=")), 5)
    steps = 5
    dataset = next((a.split("=", 1)[1] for a in argv if a.startswith("--dataset=")), None)
    steppers = {name: trainer(*VARIANTS[name], dataset=dataset) for name in names}
    best = {name: float("inf") for name in names}
    for _ in range(rounds):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    print(f"{torch.get_num_threads()} threads, best of {rounds} rounds of {steps} steps")
    for name, seconds in best.items():
        ratio = best[names[0]] / seconds
        equal = f"  {round(base_steps * ratio)} steps for {base_steps} of {names[0]}" if base_steps else ""
        chars = VARIANTS[name][1] * VARIANTS[name][2]
        print(f"{name:14s} {seconds * 1000:6.0f} ms/step  {chars / seconds:8,.0f} char/s  "
              f"{ratio:5.2f}x {names[0]}'s steps per second{equal}")


if __name__ == "__main__":
    main(sys.argv[1:])
