"""train.py end to end on a small generated dataset: training, evaluation, checkpoints, exact resume."""

import json
import math
import os
from collections import Counter

import pytest

import torch

import checkpoint
import config
import data
import train
from config import UserError
from conftest import TINY, assert_resume_is_exact, make_stories
from model import GPT, GPTConfig, pair_index
from tokenizer import Tokenizer


def run(stories_dir, out_dir, *extra):
    train.main([f"--dataset={stories_dir}", f"--out_dir={out_dir}", *TINY, *extra])


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_metrics_and_a_checkpoint(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path, "--max_steps=30", "--eval_interval=15")
    out = capsys.readouterr().out
    assert "step 30/30 | loss" in out and "char/s" in out and "ETA" in out and "bits/char" in out
    rows = metrics(tmp_path)
    logs = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 31))
    assert set(logs[0]) == {"step", "loss", "bpc", "lr", "tokens_per_sec", "elapsed_s"}
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss"] / math.log(2))
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.5
    assert [p.name for p in checkpoint.paths(tmp_path)] == ["ckpt_00000030.pt"]


@pytest.mark.parametrize("length", ["--max_steps=16", "--stages=8,8", "--stages=4,12"],
                         ids=["plain", "at-a-stage-boundary", "in-the-middle-of-a-stage"])
def test_resume_continues_exactly_as_an_uninterrupted_run(stories_dir, tmp_path, length):
    args = [length, "--checkpoint_interval=8", "--keep_checkpoints=5", "--eval_interval=8",
            "--dropout=0.1"]  # dropout draws random numbers, so the RNG state must resume too
    a, b = assert_resume_is_exact(lambda out_dir, *extra: run(stories_dir, out_dir, *extra), tmp_path, args)
    assert a["data"] == b["data"]
    assert str(a["optimizer"]) == str(b["optimizer"])


def test_the_checkpoint_holds_the_whole_training_state(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=3", "--muon=False")
    state = checkpoint.load(checkpoint.paths(tmp_path)[0])
    assert state["step"] == 3
    assert {"model", "optimizer", "model_args", "config", "tokenizer", "data", "rng"} <= set(state)
    assert state["optimizer"]["state"]  # AdamW moments
    assert len(state["data"]) == 1 and len(state["rng"]) == 1  # one per process
    assert state["data"][0]["dataset"]["epoch"] == 0 and len(state["data"][0]["buffer"]) > 0
    assert state["config"]["max_steps"] == 3 and state["model_args"]["n_embd"] == 32


def test_raising_max_steps_on_resume_trains_on(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path, "--max_steps=4")
    run(stories_dir, tmp_path, "--max_steps=6")
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_finished_run_says_how_to_train_longer(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path, "--max_steps=2")
    run(stories_dir, tmp_path, "--max_steps=2")
    assert "raise --max_steps" in capsys.readouterr().out


def test_resume_false_starts_afresh(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path, "--max_steps=4")
    run(stories_dir, tmp_path, "--max_steps=2", "--resume=False")
    assert "starting fresh" in capsys.readouterr().out
    assert [p.name for p in checkpoint.paths(tmp_path)] == ["ckpt_00000002.pt"]


def test_a_checkpoint_of_another_model_shape_is_refused(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=2")
    with pytest.raises(UserError, match="n_embd=32, the config asks for n_embd=64"):
        run(stories_dir, tmp_path, "--max_steps=4", "--n_embd=64")


def test_a_checkpoint_without_rotary_positions_is_refused_by_a_rope_config(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=2", "--rope=False")
    with pytest.raises(UserError, match="rope=False, the config asks for rope=True"):
        run(stories_dir, tmp_path, "--max_steps=4", "--rope=True")


def test_a_model_with_every_switch_on_resumes(stories_dir, tmp_path):
    switches = ["--rope", "--swiglu", "--tie_weights", "--token_shift", "--shift_gate"]
    run(stories_dir, tmp_path, "--max_steps=2", *switches)
    run(stories_dir, tmp_path, "--max_steps=4", *switches)
    state = checkpoint.load(checkpoint.paths(tmp_path)[0])
    assert state["step"] == 4 and all(state["model_args"][s[2:]] for s in switches)


def test_eval_only_prints_the_validation_loss_of_the_newest_checkpoint(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path, "--max_steps=5")
    final = [r for r in metrics(tmp_path) if "val_loss" in r][-1]
    capsys.readouterr()
    run(stories_dir, tmp_path, "--eval_only=True")
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == (f"val_loss={final['val_loss']:.4f} val_bpc={final['val_bpc']:.4f} val_chars={final['val_chars']} "
                   f"val_tokens={final['val_tokens']}")


def test_eval_only_evaluates_a_checkpoint_of_another_shape_than_the_configs(stories_dir, tmp_path, capsys):
    run(stories_dir, tmp_path, "--max_steps=2", "--swiglu=False", "--n_head=4")
    run(stories_dir, tmp_path, "--eval_only")
    assert "val_loss=" in capsys.readouterr().out


def test_eval_only_without_a_checkpoint_is_an_error(stories_dir, tmp_path):
    with pytest.raises(UserError, match="no checkpoint to evaluate"):
        run(stories_dir, tmp_path, "--eval_only")


def test_only_the_newest_checkpoints_are_kept(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=6", "--checkpoint_interval=1", "--keep_checkpoints=2")
    assert [p.name for p in checkpoint.paths(tmp_path)] == ["ckpt_00000006.pt", "ckpt_00000005.pt"]


def test_a_dataset_without_validation_split_holds_out_training_stories(tmp_path, capsys):
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(make_stories(60, 0)))
    run(path, tmp_path / "out", "--max_steps=2")
    assert "every 20th training story is held out" in capsys.readouterr().out


def test_training_skips_the_stories_held_out_to_validate_on(tmp_path, monkeypatch):
    path = tmp_path / "stories.txt"  # no validation split; the 20th, 40th and 60th stories alone hold a '#'
    path.write_text("\n<|endoftext|>\n".join(f"Story {i}{'#' * (i % 20 == 19)}." for i in range(60)))
    marks, next_batch = [], data.Batches.__next__

    def counting_marks(self):
        x, y = next_batch(self)
        if not self.once:  # a training batch, not the validation text's
            marks.append(int((x == self.tokenizer.encode("#")[0]).sum()))
        return x, y

    monkeypatch.setattr(data.Batches, "__next__", counting_marks)
    run(path, tmp_path / "out", "--max_steps=6")  # about two passes over the 60 stories
    assert marks == [0] * 6


def test_training_draws_the_loss_curve_when_matplotlib_is_installed(stories_dir, tmp_path):
    pytest.importorskip("matplotlib")
    run(stories_dir, tmp_path, "--max_steps=4", "--eval_interval=2")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_shorter_than_the_default_warmup_scales_the_warmup_and_says_so(stories_dir, tmp_path, capsys):
    argv = [f"--dataset={stories_dir}", f"--out_dir={tmp_path}", *[a for a in TINY if "warmup" not in a],
            "--max_steps=50", "--eval_interval=1000"]
    train.main(argv)
    assert "note: warmup of 5 steps, a tenth of the 50-step run" in capsys.readouterr().out
    lr = {r["step"]: r["lr"] for r in metrics(tmp_path) if "lr" in r}
    assert lr[5] == pytest.approx(3e-3) and lr[1] == pytest.approx(3e-3 / 5)


def test_a_warmup_asked_for_by_name_that_is_longer_than_the_run_is_refused():
    with pytest.raises(UserError, match="--warmup_steps=60 is longer than the run"):
        train.settings(["--max_steps=50", "--warmup_steps=60"])


def test_eval_only_evaluates_the_whole_split_unless_told_otherwise():
    assert train.settings(["--eval_only"])["eval_chars"] == 0
    assert train.settings(["--eval_only", "--eval_chars=1000"])["eval_chars"] == 1000
    assert train.settings([])["eval_chars"] == config.EVAL_CHARS


def test_the_validation_loss_is_the_mean_over_every_validation_character(stories_dir):
    import torch.nn.functional as F
    from contextlib import nullcontext
    cfg = train.settings([f"--dataset={stories_dir}", *TINY])
    tok = Tokenizer.from_texts(make_stories(300, 0))
    batches, _, _ = data.validation_batches(cfg, tok)
    assert len({len(x) for x, _ in batches}) == 2  # the last batch is smaller, so a mean of batch means would be off
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_head=2, n_embd=32))
    with torch.no_grad():
        logits = torch.cat([model(x, y)[0].flatten(0, 1) for x, y in batches])
        expected = F.cross_entropy(logits, torch.cat([y.flatten() for _, y in batches]), ignore_index=data.PAD)
    targets = sum(int((y != data.PAD).sum()) for _, y in batches)  # each a character: (tokens, characters)
    loss, bpc = train.evaluate(model, batches, (targets, targets), torch.device("cpu"), nullcontext())
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert bpc == loss / math.log(2)  # a character tokenizer's bits per character: its loss / ln 2, exactly as before


def test_the_char_tokenizers_progress_line_gives_its_loss_in_bits_per_character(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=3")
    assert all(r["bpc"] == r["loss"] / math.log(2) for r in metrics(tmp_path) if "loss" in r)


def test_an_adamw_run_resumes_exactly_as_an_uninterrupted_run(stories_dir, tmp_path):
    args = ["--max_steps=16", "--muon=False", "--checkpoint_interval=8", "--keep_checkpoints=5", "--eval_interval=8"]
    a, b = assert_resume_is_exact(lambda out_dir, *extra: run(stories_dir, out_dir, *extra), tmp_path, args)
    assert str(a["optimizer"]) == str(b["optimizer"])


def test_a_checkpoint_of_another_optimizer_is_refused(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=2", "--muon=False")
    with pytest.raises(UserError, match="was trained with --muon=False"):
        run(stories_dir, tmp_path, "--max_steps=4", "--muon=True")


def test_cooldown_holds_the_peak_rate_then_decays_linearly_to_min_lr():
    cfg = train.settings(["--max_steps=100", "--warmup_steps=10", "--cooldown=0.2", "--learning_rate=1e-2",
                          "--min_lr=0"])
    lr = [train.learning_rate(step, 100, cfg) for step in range(100)]
    assert lr[9] == lr[10] == lr[79] == 1e-2  # warmed up, then held
    assert lr[80] == pytest.approx(1e-2 * 20 / 20) and lr[90] == pytest.approx(1e-2 * 10 / 20)
    assert lr[99] == pytest.approx(1e-2 / 20)  # the last step's rate; the weights it leaves are never trained on again


def test_mfu_is_taken_against_the_rate_of_the_dtype_the_run_computes_in(monkeypatch, capsys):
    measured = []
    monkeypatch.setattr(train, "compute_dtype", lambda device: torch.bfloat16)  # as on a CUDA device with bf16
    monkeypatch.setattr(train, "matmul_rate", lambda device, dtype: measured.append(dtype) or 1e12)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16))
    train.report(model, torch.device("cpu"), 1, 1e6, "1 steps", 1.0, 1.0 / math.log(2), "char", "ckpt")
    assert measured == [torch.bfloat16]
    assert "1,000 GFLOP/s bfloat16 matrix-product rate" in capsys.readouterr().out


@pytest.fixture
def deterministic_undone(monkeypatch):
    """Leaves the process as it found it after a run with --deterministic."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # the value before the test comes back after it
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_is_applied_before_the_device_is_set_up(stories_dir, tmp_path, monkeypatch,
                                                              deterministic_undone):
    seen = []
    setup = train.setup_distributed

    def record_then_set_up(cfg):
        seen.append((os.environ["CUBLAS_WORKSPACE_CONFIG"], torch.are_deterministic_algorithms_enabled()))
        return setup(cfg)

    monkeypatch.setattr(train, "setup_distributed", record_then_set_up)
    run(stories_dir, tmp_path, "--max_steps=2", "--deterministic")
    assert seen == [(":4096:8", True)]


def test_a_deterministic_cpu_run_trains_and_resumes_exactly(stories_dir, tmp_path, deterministic_undone):
    args = ["--max_steps=16", "--checkpoint_interval=8", "--keep_checkpoints=5", "--eval_interval=8",
            "--dropout=0.1", "--deterministic"]
    assert_resume_is_exact(lambda out_dir, *extra: run(stories_dir, out_dir, *extra), tmp_path, args)
    losses = [r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bigram_lr, moves", [(0.0, False), (1.0, True)])
def test_bigram_lr_sets_the_pair_tables_learning_rate(stories_dir, tmp_path, bigram_lr, moves):
    run(stories_dir, tmp_path, "--max_steps=3", "--bigram=64", f"--bigram_lr={bigram_lr}")
    table = checkpoint.load(checkpoint.paths(tmp_path)[0])["model"]["bigram.weight"]
    assert bool(table.abs().sum() > 0) == moves  # from zero: at rate 0 it stays there


def test_a_fresh_run_gives_the_commonest_pairs_of_its_data_a_row_each(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=2", "--bigram=64")
    state = checkpoint.load(checkpoint.paths(tmp_path)[0])
    stoi = Tokenizer.from_state_dict(state["tokenizer"]).stoi
    texts = data.vocabulary_stories(str(stories_dir), config.TOKENIZER_STORIES)
    pairs = Counter(pair for text in texts for pair in zip(text, text[1:])).most_common(32)
    rows = [int(state["model"]["pair_index"][stoi[a] + 1, stoi[b]]) for (a, b), _ in pairs]
    assert len(set(rows)) == 32  # hashed into 64 rows, 32 pairs would share some


def test_a_checkpoint_from_before_the_pair_index_reads_hashed_rows(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=2", "--bigram=64")
    path = checkpoint.paths(tmp_path)[0]
    state = checkpoint.load(path)
    del state["model"]["pair_index"]
    torch.save({**state, "checksum": checkpoint.checksum(state)}, path)
    vocab = len(state["model"]["transformer.wte.weight"])
    assert torch.equal(checkpoint.load(path)["model"]["pair_index"], pair_index(vocab, 64))


def test_a_swiglu_checkpoint_from_before_mlp_hidden_set_its_width_samples_and_resumes(stories_dir, tmp_path):
    run(stories_dir, tmp_path, "--max_steps=2", "--swiglu", "--mlp_hidden=0")  # 8/3 * 32 = 85 wide
    path = checkpoint.paths(tmp_path)[0]
    state = checkpoint.load(path)
    state["model_args"]["mlp_hidden"] = 24  # what such a run recorded while SwiGLU ignored it
    torch.save({**state, "checksum": checkpoint.checksum(state)}, path)
    model = GPT(GPTConfig(**checkpoint.load(path)["model_args"]))
    model.load_state_dict(checkpoint.load(path)["model"])
    run(stories_dir, tmp_path, "--max_steps=3", "--swiglu", "--mlp_hidden=0")
    assert checkpoint.paths(tmp_path)[0].name == "ckpt_00000003.pt"
