"""The model shipped in pretrained/ and the TinyStories slice in tinystories/: what a fresh clone
samples and trains on, with nothing beside it."""

import re
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import data
import sample
import train
from config import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "pretrained" / "tinystories-char.pt"


def test_the_default_dataset_is_the_slice_in_the_repository_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = list(data.open_split(config.DATASET, "validation"))
    assert len(rows) == 392 and rows[0]["text"]


def test_the_shipped_model_has_the_validation_loss_its_readme_states(capsys):
    stated = re.search(r"([0-9.]+) nats/char", (ROOT / "pretrained" / "README.md").read_text())[1]
    train.main([f"--checkpoint={SHIPPED}", "--eval_only", "--device=cpu", f"--dataset={ROOT / 'tinystories'}"])
    measured = re.search(r"val_loss=([0-9.]+)", capsys.readouterr().out)[1]
    assert measured == stated  # both to four digits


def test_the_shipped_model_holds_no_optimizer_state_so_nothing_resumes_from_it():
    state = checkpoint.load(SHIPPED)
    assert "optimizer" not in state and "data" not in state and "rng" not in state
    assert state["config"]["dataset"] == "tinystories" and state["step"] == state["config"]["max_steps"]


def test_with_no_checkpoint_of_its_own_sample_py_samples_the_shipped_model_and_says_so(tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setattr(config, "OUT_DIR", str(tmp_path / "checkpoints"))  # the default --out_dir, empty
    sample.main(["--device=cpu", "--max_new_tokens=50", "--seed=3"])
    printed = capsys.readouterr()
    assert printed.out.startswith(config.PROMPT) and len(printed.out) > len(config.PROMPT) + 1
    assert "the shipped model" in printed.err and str(SHIPPED) in printed.err


def test_a_damaged_shipped_model_is_reported_as_any_damaged_checkpoint(tmp_path, capsys, monkeypatch):
    damaged = tmp_path / "tinystories-char.pt"
    state = torch.load(SHIPPED, weights_only=True)
    state["model"]["lm_head.weight"][0, 0] += 1
    torch.save(state, damaged)
    monkeypatch.setattr(sample, "PRETRAINED", damaged)
    monkeypatch.setattr(config, "OUT_DIR", str(tmp_path / "checkpoints"))
    with pytest.raises(UserError, match="is corrupt"):
        sample.main(["--device=cpu", "--max_new_tokens=5"])


def test_export_keeps_the_weights_tokenizer_and_settings_of_a_checkpoint(stories_dir, tmp_path):
    from conftest import TINY
    train.main([f"--dataset={stories_dir}", f"--out_dir={tmp_path}", *TINY, "--max_steps=3"])
    source = checkpoint.paths(tmp_path)[0]
    checkpoint.export(source, tmp_path / "model.pt")
    full, kept = checkpoint.load(source), checkpoint.load(tmp_path / "model.pt")
    assert all(torch.equal(full["model"][k], kept["model"][k]) for k in full["model"])
    assert kept["tokenizer"] == full["tokenizer"] and kept["model_args"] == full["model_args"]
    assert (tmp_path / "model.pt").stat().st_size < source.stat().st_size / 1.5
