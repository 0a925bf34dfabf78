"""Fine-tuning (INIT_FROM): a fresh run from another run's weights, its vocabulary grown by the new
data's characters; the inputs it refuses; and samples while a run trains (SAMPLE_INTERVAL)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import train
from config import UserError
from conftest import TINY, assert_resume_is_exact, progress_losses
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
FRENCH = "Q: Où habite Zoé ? R: Zoé habite à Genève, près du lac. Ça fête ses dîners là-bas."


def same(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-20)


def run(dataset, out_dir, *extra):
    train.main([f"--dataset={dataset}", f"--out_dir={out_dir}", *TINY, "--eval_interval=1000", *extra])


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def source(stories_dir, tmp_path_factory):
    """A tiny model trained 40 steps on the generated stories: the checkpoint a fine-tuning run starts from."""
    out_dir = tmp_path_factory.mktemp("source")
    run(stories_dir, out_dir, "--max_steps=40", "--eval_interval=40")
    return checkpoint.paths(out_dir)[0]


@pytest.fixture
def french(tmp_path):
    path = tmp_path / "french.txt"
    path.write_text(FRENCH, encoding="utf-8")
    return path


def test_a_fine_tuning_run_starts_at_its_source_loss_not_at_chance(stories_dir, source, tmp_path):
    source_val = rows(source.parent)[-1]["val_loss"]
    run(stories_dir, tmp_path / "tuned", f"--init_from={source}", "--max_steps=2")
    run(stories_dir, tmp_path / "fresh", "--max_steps=2")
    tuned, fresh = progress_losses(tmp_path / "tuned")[1], progress_losses(tmp_path / "fresh")[1]
    vocab = checkpoint.load(source)["model_args"]["vocab_size"]
    assert fresh == pytest.approx(math.log(vocab), abs=0.2)  # a fresh model guesses about uniformly
    assert tuned == pytest.approx(source_val, abs=0.2) and tuned < fresh - 1


def test_a_fine_tuning_run_is_a_fresh_run_in_all_but_its_weights(stories_dir, source, tmp_path, capsys):
    run(stories_dir, tmp_path / "tuned", f"--init_from={source}", "--max_steps=3", "--muon=False")
    assert f"fine-tuning {source}, trained 40 steps" in capsys.readouterr().out
    run(stories_dir, tmp_path / "fresh", "--max_steps=3", "--muon=False")
    tuned, fresh = (checkpoint.load(checkpoint.paths(tmp_path / d)[0]) for d in ("tuned", "fresh"))
    assert {int(s["step"]) for s in tuned["optimizer"]["state"].values()} == {3}  # not the source's 40
    assert tuned["data"] == fresh["data"]  # the data stream from its start
    assert [r["lr"] for r in rows(tmp_path / "tuned") if "lr" in r] == [r["lr"] for r in rows(tmp_path / "fresh")
                                                                         if "lr" in r]  # the schedule from its start


def test_new_characters_get_ids_after_the_old_ones_and_rows_as_a_fresh_models(source, french, tmp_path, capsys):
    # One step at a learning rate that moves no weight by more than 1e-29: the weights the run began with.
    run(french, tmp_path, f"--init_from={source}", "--max_steps=1", "--warmup_steps=0", "--learning_rate=1e-30")
    old, new = checkpoint.load(source), checkpoint.load(checkpoint.paths(tmp_path)[0])
    added = sorted(set(FRENCH) - set(old["tokenizer"]["chars"]))
    assert added and new["tokenizer"]["chars"] == old["tokenizer"]["chars"] + "".join(added)
    assert f"vocabulary: {len(added)} characters of the data added" in capsys.readouterr().out
    torch.manual_seed(config.SEED)  # as the run seeds its model: a fresh model of the grown vocabulary
    fresh = GPT(GPTConfig(**new["model_args"])).state_dict()
    n, rows_by_id = old["model_args"]["vocab_size"], ("transformer.wte.weight", "lm_head.weight")
    for name in rows_by_id:
        assert len(new["model"][name]) == n + len(added)
        assert same(new["model"][name][:n], old["model"][name]) and same(new["model"][name][n:], fresh[name][n:])
    pairs = new["model"]["pair_index"]  # (previous + 1, current): the old pairs' rows, the new pairs' hashed
    assert same(pairs[:n + 1, :n], old["model"]["pair_index"]) and same(pairs[n + 1:], fresh["pair_index"][n + 1:])
    assert all(same(new["model"][name], old["model"][name]) for name in old["model"]
               if name not in (*rows_by_id, "pair_index"))


def test_a_model_fine_tuned_on_new_characters_samples_them(source, french, tmp_path):
    run(french, tmp_path, f"--init_from={source}", "--max_steps=60", "--sample_interval=60", "--prompt=Q:",
        "--temperature=0")
    sample = [r["sample"] for r in rows(tmp_path) if "sample" in r][-1]
    assert set(sample) & (set(FRENCH) - set(checkpoint.load(source)["tokenizer"]["chars"]))


def test_a_bpe_source_keeps_its_vocabulary_and_says_why(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path / "bpe", "--max_steps=2", "--tokenizer=bpe", "--vocab_size=300")
    source = checkpoint.paths(tmp_path / "bpe")[0]
    run(stories_dir, tmp_path / "tuned", f"--init_from={source}", "--max_steps=2")
    assert "as byte-level BPE covers every text" in capsys.readouterr().out
    state = checkpoint.load(checkpoint.paths(tmp_path / "tuned")[0])
    assert state["tokenizer"] == checkpoint.load(source)["tokenizer"]


def test_a_fine_tuning_run_resumes_exactly_and_samples_as_the_unbroken_run(stories_dir, source, tmp_path):
    args = [f"--init_from={source}", "--max_steps=16", "--checkpoint_interval=8", "--keep_checkpoints=5",
            "--dropout=0.1", "--sample_interval=4", "--sample_chars=20"]
    assert_resume_is_exact(lambda out_dir, *extra: run(stories_dir, out_dir, *extra), tmp_path, args)
    samples = [{r["step"]: r["sample"] for r in rows(tmp_path / d) if "sample" in r} for d in ("straight", "resumed")]
    assert samples[1] == {step: text for step, text in samples[0].items() if step > 8} and len(samples[1]) == 2


def damaged(source, tmp_path):
    """A copy of source with one byte of its token embedding flipped (a byte in the file's middle may
    fall in the padding between its records, which nothing reads)."""
    path = tmp_path / "damaged.pt"
    data = bytearray(source.read_bytes())
    wte = checkpoint.load(source)["model"]["transformer.wte.weight"]
    data[data.find(wte.numpy().tobytes()) + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def bpe_source(stories_dir, tmp_path):
    run(stories_dir, tmp_path / "bpe", "--max_steps=2", "--tokenizer=bpe", "--vocab_size=300")
    return checkpoint.paths(tmp_path / "bpe")[0]


@pytest.mark.parametrize("given, make, message", [
    ("--n_embd=64", lambda src, tmp, data: src, "--n_embd=64 disagrees with n_embd=32 of"),
    ("--tokenizer=bpe", lambda src, tmp, data: src, "--tokenizer=bpe disagrees with tokenizer=char of"),
    ("--vocab_size=400", lambda src, tmp, data: bpe_source(data, tmp), "--vocab_size=400 disagrees with vocab_size=300"),
    ("", lambda src, tmp, data: data / "data" / "train-00000-of-00001.parquet", "cannot be read as a checkpoint"),
    ("", lambda src, tmp, data: damaged(src, tmp), "is corrupt"),
    ("", lambda src, tmp, data: tmp / "missing.pt", "is neither a checkpoint file nor a run folder"),
], ids=["another-shape", "another-tokenizer", "bpe-asked-to-grow", "not-a-checkpoint", "damaged", "missing"])
def test_a_source_that_cannot_be_fine_tuned_is_refused_in_one_line_and_nothing_is_written(
        stories_dir, source, tmp_path, given, make, message):
    path, out_dir = make(source, tmp_path, stories_dir), tmp_path / "out"
    with pytest.raises(UserError, match=message) as error:
        run(stories_dir, out_dir, f"--init_from={path}", "--max_steps=2", *[given] * bool(given))
    assert "\n" not in str(error.value)
    assert os.listdir(out_dir) == [checkpoint.LOCK]


def test_a_refused_source_is_one_line_on_stderr_and_exit_code_2(stories_dir, tmp_path):
    done = subprocess.run([sys.executable, "train.py", f"--dataset={stories_dir}", f"--out_dir={tmp_path / 'out'}",
                           f"--init_from={tmp_path / 'missing.pt'}", *TINY], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --init_from=") and done.stderr.count("\n") == 1


def test_init_from_beside_another_runs_checkpoint_is_refused_naming_both_and_the_flags(stories_dir, source,
                                                                                       tmp_path):
    run(stories_dir, tmp_path, "--max_steps=2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError) as error:
        run(stories_dir, tmp_path, f"--init_from={source}", "--max_steps=2")
    message = str(error.value)
    assert str(checkpoint.paths(tmp_path)[0]) in message and str(source) in message
    assert "--resume=False to start afresh" in message and "drop --init_from to resume" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_false_starts_afresh_from_init_from(stories_dir, source, tmp_path):
    run(stories_dir, tmp_path / "other", "--max_steps=2")
    run(stories_dir, tmp_path / "other", f"--init_from={source}", "--max_steps=2", "--resume=False")
    run(stories_dir, tmp_path / "tuned", f"--init_from={source}", "--max_steps=2")
    assert progress_losses(tmp_path / "other") == progress_losses(tmp_path / "tuned")


def test_samples_while_training_leave_the_losses_as_they_were(stories_dir, tmp_path, capsys):
    args = ["--max_steps=9", "--dropout=0.1"]  # dropout: the samples must not draw on the run's random numbers
    run(stories_dir, tmp_path / "plain", *args)
    capsys.readouterr()
    run(stories_dir, tmp_path / "sampled", *args, "--sample_interval=3", "--sample_chars=20", "--prompt=Once")
    assert progress_losses(tmp_path / "sampled") == progress_losses(tmp_path / "plain")
    samples = {r["step"]: r["sample"] for r in rows(tmp_path / "sampled") if "sample" in r}
    assert list(samples) == [3, 6, 9] and all(s.startswith("Once") for s in samples.values())
    out = capsys.readouterr().out
    assert "step 3/9 | loss" in out.split("sample: Once")[0]  # under the progress line of its step
