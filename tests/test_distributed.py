"""Training on several processes with torchrun and DistributedDataParallel (gloo on the CPU), and
gradient accumulation."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import checkpoint
import data
import train
from config import UserError
from conftest import TINY, make_stories
from device import rank_device

ROOT = Path(__file__).resolve().parent.parent
ARGS = [*TINY, "--max_steps=8", "--checkpoint_interval=4", "--keep_checkpoints=5", "--eval_interval=4",
        "--dropout=0.1"]


def torchrun(dataset, out_dir, *extra, fails=False):
    """What the run printed: stdout, or stderr where it is to fail."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", f"--dataset={dataset}", f"--out_dir={out_dir}", *ARGS, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (proc.returncode != 0) == fails, proc.stderr[-3000:]
    return proc.stderr if fails else proc.stdout


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def two_process_run(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun(stories_dir, out)


@pytest.mark.parametrize("files", [1, 2], ids=["one-shard-split-by-story", "two-shards-split-by-file"])
def test_each_rank_streams_its_own_stories(tmp_path, files):
    stories = make_stories(40, 0)
    (tmp_path / "data").mkdir()
    for i in range(files):
        pq.write_table(pa.table({"text": stories[i::files]}), tmp_path / f"data/train-{i:05d}-of-{files:05d}.parquet")
    seen = [set(data.first_stories(data.open_split(str(tmp_path), "train", rank, 2), False, 40))
            for rank in (0, 1)]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(stories)


def test_two_processes_train_and_keep_identical_weights(two_process_run):
    out_dir, printed = two_process_run
    assert "global batch 16 windows = 8 x 2 ranks x 1 accumulation step" in printed
    assert "weights identical on all 2 ranks" in printed
    assert checkpoint.load(checkpoint.paths(out_dir)[0])["world_size"] == 2


def test_only_rank_0_logs(two_process_run):
    out_dir, printed = two_process_run
    assert printed.count("step 8/8 |") == 1
    assert list(losses(out_dir)) == list(range(1, 9))


def test_the_checkpoint_holds_every_ranks_data_position_and_rng(two_process_run):
    state = checkpoint.load(checkpoint.paths(two_process_run[0])[0])
    assert len(state["data"]) == len(state["rng"]) == 2
    assert state["data"][0]["buffer"] != state["data"][1]["buffer"]
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # dropout differs per rank


def test_a_two_process_run_resumes_exactly(two_process_run, stories_dir, tmp_path):
    straight, _ = two_process_run
    shutil.copy(straight / "ckpt_00000004.pt", tmp_path)  # as if the run had stopped at step 4
    torchrun(stories_dir, tmp_path)
    assert losses(tmp_path) == {s: loss for s, loss in losses(straight).items() if s > 4}
    a, b = (checkpoint.load(d / "ckpt_00000008.pt")["model"] for d in (straight, tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_number_of_processes_is_refused(two_process_run, stories_dir, tmp_path):
    shutil.copy(checkpoint.paths(two_process_run[0])[0], tmp_path)
    with pytest.raises(UserError, match=r"written by a run of 2 processes, this one has 1: resume it with as many "
                                        r"\(torchrun --nproc_per_node=2 \.\.\.\) so every data stream goes on"):
        train.main([f"--dataset={stories_dir}", f"--out_dir={tmp_path}", *ARGS, "--max_steps=12"])


def test_a_run_of_several_processes_is_refused_on_a_folder_another_run_holds(stories_dir, tmp_path):
    # Rank 0 takes the folder's lock (two ranks both taking it would refuse each other: the runs above
    # show they do not), so a run that holds it keeps a whole torchrun run out.
    with checkpoint.lock(tmp_path):
        printed = torchrun(stories_dir, tmp_path, fails=True)
    assert f"error: --out_dir={tmp_path} is in use by another training run (process {os.getpid()})" in printed
    assert not checkpoint.paths(tmp_path)


def test_accumulated_micro_batches_make_the_same_update_as_one_large_batch(stories_dir, tmp_path):
    # AdamW's eps at 1e-8, not the recipe's 1e-10: the key bias's gradient is zero but for rounding (a
    # constant added to every score of a query leaves its softmax as it was), and at 1e-10 Adam turns
    # that rounding, which differs between the two ways of summing, into steps of full size. And the
    # pair table at the common rate: at BIGRAM_LR's 5 times it, the rounding in its steps is 5 times
    # as large too, past the tolerance.
    common = [f"--dataset={stories_dir}", *TINY, "--max_steps=3", "--eval_interval=100", "--grad_clip=0",
              "--muon=False", "--adam_eps=1e-8", "--bigram_lr=1"]
    train.main([*common, f"--out_dir={tmp_path / 'one'}", "--batch_size=8", "--grad_accum_steps=1"])
    train.main([*common, f"--out_dir={tmp_path / 'acc'}", "--batch_size=4", "--grad_accum_steps=2"])
    a, b = (checkpoint.load(tmp_path / d / "ckpt_00000003.pt") for d in ("one", "acc"))
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])
    # The moments scale with the gradient; the weights would hide a wrong scale (Adam divides it out,
    # and so does clipping, which is why it is off here).
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.allclose(s["exp_avg"], t["exp_avg"], rtol=1e-3, atol=1e-7)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "acc"), rel=1e-5)


def test_more_processes_than_gpus_is_refused_saying_how_many_gpus_and_how_to_run_on_the_cpu():
    with pytest.raises(UserError, match=r"2 processes on this machine, which has 1 GPU: .*--nproc_per_node=1 "
                                        r"at most; --device=cpu"):
        rank_device("cuda", 1, 2, gpus=1)


def test_each_process_takes_the_gpu_of_its_local_rank():
    assert rank_device("cuda", 1, 2, gpus=2) == torch.device("cuda", 1)


def test_cpu_processes_need_no_gpu():
    assert rank_device("cpu", 1, 2, gpus=0) == torch.device("cpu")
