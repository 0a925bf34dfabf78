"""A checkpoint written before model.py was split into model, generate, optim and device (format 1,
its token shift's shares named shift, shift_1, shift_2) loads, samples and resumes as it did then.

tests/data/ckpt_before_layout.pt is step 200 of this run, at commit 64219b5:

    python train.py --device=cpu --n_layer=1 --n_head=2 --n_embd=16 --block_size=16 --batch_size=8
        --max_steps=201 --checkpoint_interval=200 --log_interval=50 --eval_interval=200
        --eval_chars=2000 --warmup_steps=3 --learning_rate=1e-2

and tests/data/ckpt_before_layout_expected.pt what that commit made of it: sample.py's output
(--greedy, and --seed=7 --num_samples=2, 60 characters each), and the weights, loss and validation
loss of step 201 resumed from it.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint
import sample
import train

DATA = Path(__file__).resolve().parent / "data"
OLD = DATA / "ckpt_before_layout.pt"
RUN = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=8",
       "--max_steps=201", "--checkpoint_interval=200", "--log_interval=50", "--eval_interval=200",
       "--eval_chars=2000", "--warmup_steps=3", "--learning_rate=1e-2",
       # and the recipe of then, which today's defaults have moved on from
       "--mlp_hidden=0", "--bigram=0", "--key_offset=False", "--swiglu=False", "--shift_reach=1", "--attn_gate=False",
       "--shift_gate=False", "--rope=False", "--rope_half=False", "--rope_unturned_first=False"]


@pytest.fixture(scope="module")
def expected():
    return torch.load(DATA / "ckpt_before_layout_expected.pt", weights_only=True)


@pytest.mark.parametrize("args, key", [(["--greedy"], "greedy"), (["--seed=7", "--num_samples=2"], "sampled")])
def test_sample_continues_an_old_checkpoint_as_before(capsys, expected, args, key):
    sample.main([f"--checkpoint={OLD}", "--device=cpu", "--max_new_tokens=60", *args])
    assert capsys.readouterr().out == expected[key]


def test_train_resumes_an_old_checkpoint_to_the_same_next_step(tmp_path, expected):
    shutil.copy(OLD, tmp_path)
    train.main([f"--out_dir={tmp_path}", *RUN])
    state = checkpoint.load(tmp_path / "ckpt_00000201.pt")
    # The parameter names a checkpoint is keyed by, as format 2 names token shift's shares
    expected_model = {checkpoint.share_name(name): weights for name, weights in expected["model"].items()}
    assert list(state["model"]) == list(expected_model)
    for name, weights in expected_model.items():
        torch.testing.assert_close(state["model"][name], weights, msg=name)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [pytest.approx(expected["loss"], rel=1e-5)]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == [pytest.approx(expected["val_loss"], rel=1e-5)]
    assert [r["val_bpc"] for r in rows if "val_bpc" in r] == [pytest.approx(expected["val_bpc"], rel=1e-5)]
