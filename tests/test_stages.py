"""Staged training: at each stage boundary the weights stay, the optimizer and the learning-rate
schedule start afresh; and the memorisation example it makes possible."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint
import train
from config import UserError
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def run(stories_dir, out_dir, *extra):
    train.main([f"--dataset={stories_dir}", f"--out_dir={out_dir}", *TINY, "--eval_interval=1000",
                "--checkpoint_interval=1", "--keep_checkpoints=100", *extra])
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]  # the progress rows, not the evaluations


def adam_steps(out_dir, step):
    """The step count AdamW holds in the checkpoint of that step."""
    state = checkpoint.load(out_dir / f"ckpt_{step:08d}.pt")["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


def test_a_stage_boundary_recreates_the_optimizer(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--stages=3,3", "--muon=False")
    assert adam_steps(tmp_path, 3) == {3}
    assert adam_steps(tmp_path, 4) == {1}  # the moments of stage 1 are gone


def test_the_learning_rate_restarts_at_a_stage_boundary(stories_dir, tmp_path):
    rows = run(stories_dir, tmp_path, "--stages=4,4")
    lr = {r["step"]: r["lr"] for r in rows}
    assert [lr[s] for s in (5, 6, 7, 8)] == [lr[s] for s in (1, 2, 3, 4)]
    assert lr[4] < lr[3]  # and it had decayed within the first stage


def test_a_stage_boundary_keeps_the_weights(stories_dir, tmp_path):
    loss = {r["step"]: r["loss"] for r in run(stories_dir, tmp_path, "--stages=20,20")}
    assert loss[21] < loss[1] - 0.5  # the second stage starts from what the first one learned


def test_the_progress_line_and_metrics_show_the_stage(stories_dir, tmp_path, capsys):
    rows = run(stories_dir, tmp_path, "--stages=2,2")
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    out = capsys.readouterr().out
    assert "stage 2/2 | step 3/4 |" in out and "stage 2/2 begins at step 2" in out


def test_checkpoints_record_the_stage_and_the_step_within_it(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--stages=2,3")
    states = [checkpoint.load(tmp_path / f"ckpt_{s:08d}.pt") for s in range(1, 6)]
    assert [(s["stage"], s["stage_step"]) for s in states] == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]


def test_stages_set_the_number_of_steps():
    assert train.settings(["--stages=30,20", "--warmup_steps=5"])["max_steps"] == 50


def test_stages_and_a_max_steps_that_disagree_are_refused():
    with pytest.raises(UserError, match="adds up to 50 steps but --max_steps is 40"):
        train.settings(["--stages=30,20", "--max_steps=40", "--warmup_steps=5"])
    assert train.settings(["--stages=30,20", "--max_steps=50", "--warmup_steps=5"])["stages"] == [30, 20]


@pytest.mark.parametrize("stages", ["30,x", "30,0", "30,,30"])
def test_malformed_stages_are_refused(stages):
    with pytest.raises(UserError, match="stage"):
        train.settings([f"--stages={stages}", "--warmup_steps=0"])


def test_warmup_longer_than_a_stage_is_refused():
    with pytest.raises(UserError, match="longer than the shortest stage"):
        train.settings(["--stages=30,30", "--warmup_steps=31"])


def test_the_staged_example_reproduces_its_text_under_greedy_decoding(tmp_path):
    # The README's experiment, with its settings: two stages of 30 steps on one short text.
    question = "Q: Où habite Zoé ?"
    text = f"{question} R: Zoé habite à Genève, près du lac."
    (tmp_path / "qa.txt").write_text(text)
    train.main([f"--dataset={tmp_path / 'qa.txt'}", "--stages=30,30", f"--out_dir={tmp_path / 'out'}",
                "--batch_size=1", "--warmup_steps=5", "--learning_rate=3e-3", "--min_lr=3e-4", "--seed=1"])
    printed = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'out'}", "--greedy",
                              "--prompt", question, "--max_new_tokens=200"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert printed == text + "\n"


def test_a_stage_boundary_recreates_both_optimizers_under_muon(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--stages=3,3", "--muon=True")
    adamw, muon = checkpoint.load(tmp_path / "ckpt_00000004.pt")["optimizer"]
    assert {int(s["step"]) for s in adamw["state"].values()} == {1}
    # attention's three matrices, the MLP's two, and the gates of token shift at the two sublayers
    assert muon["state"] and len(muon["param_groups"][0]["params"]) == 7
