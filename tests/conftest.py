"""Shared fixtures: a small generated TinyStories-like dataset in the hub's layout, written to a
temporary folder, so the tests need neither the network nor anything beside the repository."""

import json
import os
import random
import shutil
import sys
from pathlib import Path

# The tests' models are tiny: one thread is as fast as two, and it does not collapse when other
# work shares the cores. Set before torch is imported; the subprocesses the tests start inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, GPTConfig  # noqa: E402

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Zoé", "Tim"]
ANIMALS = ["cat", "dog", "bird", "frog", "bear", "fish"]
PLACES = ["park", "garden", "forest", "house", "river", "school"]
THINGS = ["ball", "kite", "box", "hat", "cake", "boat"]


def make_story(rng):
    name, friend = rng.sample(NAMES, 2)
    animal, place, thing = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(THINGS)
    return (f"Once upon a time, there was a little {animal} named {name}. {name} liked to play in the "
            f"{place}.\nOne day, {name} found a big {thing}. \"Look!\" said {name}. {friend} came to see "
            f"the {thing}, and they played all day. They were very happy.")


def make_stories(n, seed):
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(n)]


def write_hub_layout(folder, n_train=300, n_val=40):
    """A dataset folder as the hub lays one out: data/train-*.parquet and data/validation-*.parquet."""
    data = Path(folder) / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"text": make_stories(n_train, 0)}), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": make_stories(n_val, 1)}), data / "validation-00000-of-00001.parquet")
    return Path(folder)


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory):
    return write_hub_layout(tmp_path_factory.mktemp("tinystories"))


# For tests of what only a CUDA device runs: skipped where there is none.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "mps: runs on Apple silicon's MPS device; skipped where there is none")


# A model small enough that a training step takes milliseconds on a CPU, and on the CPU where a GPU
# is visible too: the tests hold runs to the CPU's exactness, and torchrun's ranks to gloo.
TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--log_interval=1", "--warmup_steps=2", "--learning_rate=3e-3"]


def progress_losses(out_dir):
    """{step: training loss} from out_dir/metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_resume_is_exact(train_run, tmp_path, args, stop_at=8, end=16):
    """Train to step end; train again from the step-stop_at checkpoint alone, as if the run had
    stopped there; assert the same loss at every later step and the same final weights. Returns
    both final checkpoints."""
    import checkpoint
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_run(straight, *args)
    resumed.mkdir()
    shutil.copy(straight / f"ckpt_{stop_at:08d}.pt", resumed)
    train_run(resumed, *args)
    losses, resumed_losses = progress_losses(straight), progress_losses(resumed)
    assert list(resumed_losses) == list(range(stop_at + 1, end + 1))
    assert all(resumed_losses[s] == losses[s] for s in resumed_losses)  # bit for bit, not approximately
    a, b = (checkpoint.load(d / f"ckpt_{end:08d}.pt") for d in (straight, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    return a, b


def small_model(block_size=16, seed=0, **switches):
    """A two-block GPT of 16 channels over 20 ids, in eval mode, seeded."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, block_size=block_size, n_layer=2, n_head=2, n_embd=16, **switches)).eval()
