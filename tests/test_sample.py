"""sample.py: what it prints, and how it reads a checkpoint."""

import itertools

import pytest
import torch

import sample
import train
from config import UserError
from conftest import TINY
from data import SEPARATOR
from tokenizer import EOS


@pytest.fixture(scope="module")
def trained(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main([f"--dataset={stories_dir}", f"--out_dir={out}", *TINY, "--max_steps=60", "--eval_interval=60"])
    return out


def run(capsys, out_dir, *args):
    capsys.readouterr()
    sample.main([f"--out_dir={out_dir}", "--device=cpu", *args])
    return capsys.readouterr()


def test_stdout_is_the_prompt_and_its_continuation_only(trained, capsys):
    printed = run(capsys, trained, "--prompt=Once upon a time", "--max_new_tokens=40", "--ignore_eos")
    assert printed.out.startswith("Once upon a time")
    # With --ignore_eos an end-of-story token may be drawn and is printed as <|endoftext|>: one id.
    out = printed.out.replace("<|endoftext|>", "\0")
    assert len(out) == len("Once upon a time") + 40 + 1  # and a newline


def test_greedy_sampling_prints_the_same_text_every_time(trained, capsys):
    first = run(capsys, trained, "--greedy", "--max_new_tokens=80").out
    assert run(capsys, trained, "--greedy", "--max_new_tokens=80", "--seed=99").out == first


def test_the_same_seed_samples_the_same_text(trained, capsys):
    first = run(capsys, trained, "--seed=5", "--max_new_tokens=80").out
    assert run(capsys, trained, "--seed=5", "--max_new_tokens=80").out == first


def test_generation_runs_past_the_models_context(trained, capsys):
    printed = run(capsys, trained, "--max_new_tokens=100", "--ignore_eos", "--prompt=", "--top_k=0")
    # block_size is 32; a story's end, which --ignore_eos goes past, prints as <|endoftext|>
    assert len(printed.out.replace(SEPARATOR, "#")) == 101


def test_num_samples_prints_that_many_samples(trained, capsys):
    printed = run(capsys, trained, "--num_samples=3", "--max_new_tokens=20", "--ignore_eos")
    assert printed.out.count("\n---\n") == 2


def test_sampling_stops_at_the_end_of_story_token_and_does_not_print_it(trained, capsys, monkeypatch):
    picks = itertools.chain([5, 6, EOS], itertools.repeat(7))  # generate looks for the end every few characters
    monkeypatch.setattr("model.pick", lambda logits, *args: torch.tensor([[next(picks)]]))
    printed = run(capsys, trained, "--prompt=", "--max_new_tokens=100")
    assert len(printed.out) == 3  # two characters and the newline


def test_prompt_characters_outside_the_vocabulary_are_named_on_stderr(trained, capsys):
    printed = run(capsys, trained, "--prompt=Once ¤ upon", "--max_new_tokens=5")
    assert "'¤'" in printed.err and printed.out.startswith("Once ¤ upon")


def test_a_checkpoint_path_can_be_given(trained, capsys, tmp_path):
    newest = sorted(trained.glob("ckpt_*.pt"))[-1]
    printed = run(capsys, tmp_path, f"--checkpoint={newest}", "--greedy", "--max_new_tokens=10")
    assert printed.out.startswith("Once upon a time")


def test_no_checkpoint_says_where_it_looked_and_how_to_train(tmp_path, capsys):
    with pytest.raises(UserError, match=f"no checkpoint in {tmp_path}.*python train.py"):
        run(capsys, tmp_path)


@pytest.mark.parametrize("bad, message", [
    ("--top_k=-1", "--top_k must be between 1 and the vocabulary size"),
    ("--top_k=1000", "--top_k must be between 1 and the vocabulary size"),
    ("--temperature=-0.5", r"--temperature must be 0 \(greedy\) or more, not -0.5"),
    ("--num_samples=0", "--num_samples must be at least 1"),
    ("--max_new_tokens=-1", "--max_new_tokens at least 0"),
])
def test_out_of_range_sampling_settings_are_refused(trained, capsys, bad, message):
    with pytest.raises(UserError, match=message):
        run(capsys, trained, bad)
