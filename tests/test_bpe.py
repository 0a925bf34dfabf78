"""The BPE tokenizer option end to end: training reports bits per character, resume, stages,
torchrun, refusal of the other tokenizer's checkpoints, and sampling."""

import json
import math
import shutil

import pytest
import torch

import checkpoint
import sample
import train
from config import UserError
from conftest import TINY, assert_resume_is_exact
from model import GPT
from tokenizer import EOS, load_tokenizer

BPE = ["--tokenizer=bpe", "--vocab_size=300"]


def run(stories_dir, out_dir, *extra):
    train.main([f"--dataset={stories_dir}", f"--out_dir={out_dir}", *TINY, *BPE, *extra])


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    run(stories_dir, out, "--max_steps=60", "--eval_interval=30")
    return out


def test_a_bpe_run_keeps_its_tokenizer_in_the_checkpoint(trained):
    state = checkpoint.load(checkpoint.paths(trained)[0])
    assert state["tokenizer"]["kind"] == "bpe"
    assert state["model_args"]["vocab_size"] == load_tokenizer(state["tokenizer"]).vocab_size <= 300


def test_a_bpe_run_gives_validation_loss_per_token_and_per_character(trained):
    final = [r for r in rows(trained) if "val_loss" in r][-1]
    assert final["val_tokens"] < final["val_chars"]  # a token stands for several characters
    per_char = final["val_loss"] * final["val_tokens"] / final["val_chars"] / math.log(2)
    assert final["val_bpc"] == pytest.approx(per_char, rel=1e-5)


def test_a_bpe_runs_progress_line_gives_the_loss_in_bits_per_character(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path, "--max_steps=3")
    out = capsys.readouterr().out
    assert "token/s" in out and "nats/token" in out
    logs = [r for r in rows(tmp_path) if "loss" in r]
    assert all(r["bpc"] < r["loss"] / math.log(2) for r in logs)  # fewer bits per character than per token


def test_eval_only_gives_a_bpe_checkpoints_bits_per_character_whatever_the_tokenizer_setting(trained, stories_dir,
                                                                                            capsys):
    capsys.readouterr()
    train.main([f"--dataset={stories_dir}", f"--out_dir={trained}", *TINY, "--eval_only"])  # no --tokenizer
    final = [r for r in rows(trained) if "val_loss" in r][-1]
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"val_loss={final['val_loss']:.4f} val_bpc={final['val_bpc']:.4f} val_chars={final['val_chars']} "
        f"val_tokens={final['val_tokens']}")


@pytest.mark.parametrize("length", ["--max_steps=16", "--stages=8,8"], ids=["plain", "at-a-stage-boundary"])
def test_a_bpe_run_resumes_exactly_without_retraining_its_tokenizer(stories_dir, tmp_path, monkeypatch, length):
    def train_run(out_dir, *extra):
        if out_dir.name == "resumed":
            monkeypatch.setattr(train, "build_tokenizer", lambda *a: pytest.fail("the tokenizer was rebuilt"))
        run(stories_dir, out_dir, *extra)
    args = [length, "--checkpoint_interval=8", "--keep_checkpoints=5", "--eval_interval=8"]
    a, b = assert_resume_is_exact(train_run, tmp_path, args)
    assert a["tokenizer"] == b["tokenizer"]


@pytest.mark.parametrize("first, then, message", [
    (BPE, ["--tokenizer=char"], "trained with --tokenizer=bpe --vocab_size=300, the config asks for --tokenizer=char: "
                                "pass --tokenizer=bpe --vocab_size=300"),
    (["--tokenizer=char"], BPE, "trained with --tokenizer=char, the config asks for --tokenizer=bpe --vocab_size=300: "
                                "pass --tokenizer=char"),
    (BPE, ["--tokenizer=bpe", "--vocab_size=400"], "the config asks for --tokenizer=bpe --vocab_size=400"),
], ids=["bpe-then-char", "char-then-bpe", "another-bpe-size"])
def test_a_checkpoint_of_another_tokenizer_is_refused_naming_both(stories_dir, tmp_path, first, then, message):
    train.main([f"--dataset={stories_dir}", f"--out_dir={tmp_path}", *TINY, "--max_steps=2", *first])
    with pytest.raises(UserError, match=message.replace("-", r"\-")) as e:
        train.main([f"--dataset={stories_dir}", f"--out_dir={tmp_path}", *TINY, "--max_steps=4", *then])
    assert "\n" not in str(e.value)


def test_a_checkpoint_from_before_the_tokenizer_option_resumes_as_a_character_run(stories_dir, tmp_path, capsys):
    train.main([f"--dataset={stories_dir}", f"--out_dir={tmp_path}", *TINY, "--max_steps=2"])
    path = checkpoint.paths(tmp_path)[0]
    state = checkpoint.load(path)
    del state["tokenizer"]["kind"], state["config"]["tokenizer"], state["config"]["vocab_size"]
    state.pop("wandb_id", None)
    path.unlink()
    checkpoint.save(state, tmp_path, 2)  # as the code before the option wrote it
    train.main([f"--dataset={stories_dir}", f"--out_dir={tmp_path}", *TINY, "--max_steps=4"])
    assert "resuming from" in capsys.readouterr().out and checkpoint.load(checkpoint.paths(tmp_path)[0])["step"] == 4


def test_a_two_process_bpe_run_resumes_exactly(stories_dir, tmp_path):
    from test_distributed import losses, torchrun
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(stories_dir, straight, *BPE)
    resumed.mkdir()
    shutil.copy(straight / "ckpt_00000004.pt", resumed)
    torchrun(stories_dir, resumed, *BPE)
    assert losses(resumed) == {s: loss for s, loss in losses(straight).items() if s > 4}
    a, b = (checkpoint.load(d / "ckpt_00000008.pt")["model"] for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def generate(capsys, out_dir, *args):
    capsys.readouterr()
    sample.main([f"--out_dir={out_dir}", "--device=cpu", *args])
    return capsys.readouterr()


def test_sampling_a_bpe_model_prints_text_in_its_own_tokens(trained, capsys, monkeypatch):
    tok = load_tokenizer(checkpoint.load(checkpoint.paths(trained)[0])["tokenizer"])
    the = tok.encode(" the")
    assert len(the) == 1  # one token of four characters
    monkeypatch.setattr("model.pick", lambda logits, *args: torch.tensor([[the[0]]]))
    printed = generate(capsys, trained, "--prompt=Once upon a time", "--max_new_tokens=5")
    assert printed.out == "Once upon a time" + " the" * 5 + "\n"  # --max_new_tokens counts tokens


def test_a_bpe_models_prompt_is_encoded_by_its_tokenizer(trained, capsys, monkeypatch):
    seen = []
    real = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda model, idx, *a, **k: seen.append(idx) or real(model, idx, *a, **k))
    generate(capsys, trained, "--prompt=Lily found a kite", "--max_new_tokens=3")
    tok = load_tokenizer(checkpoint.load(checkpoint.paths(trained)[0])["tokenizer"])
    assert seen[0][0].tolist() == [EOS] + tok.encode("Lily found a kite")


@pytest.mark.parametrize("how", [["--greedy"], ["--top_k=5", "--seed=3"]], ids=["greedy", "top-k"])
def test_a_bpe_model_samples_past_its_context_the_same_way_twice(trained, capsys, how):
    first = generate(capsys, trained, "--max_new_tokens=80", "--ignore_eos", *how).out  # block_size is 32
    assert first.startswith("Once upon a time") and len(first) > len("Once upon a time") + 80
    assert generate(capsys, trained, "--max_new_tokens=80", "--ignore_eos", *how).out == first


def test_a_bpe_model_draws_a_batch_of_samples(trained, capsys):
    printed = generate(capsys, trained, "--num_samples=3", "--max_new_tokens=20", "--ignore_eos")
    assert printed.out.count("\n---\n") == 2 and printed.out.count("Once upon a time") == 3
