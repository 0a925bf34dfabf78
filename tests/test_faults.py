"""Nothing lost: crash-safe checkpoints, and a one-line error for every kind of bad input."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import sample
import train
from config import UserError
from conftest import TINY, progress_losses

ROOT = Path(__file__).resolve().parent.parent


def train_args(stories_dir, out_dir, *extra):
    return [f"--dataset={stories_dir}", f"--out_dir={out_dir}", *TINY, *extra]


def script(name, *args, **kwargs):
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:  # one byte of the token embedding flipped (the file's middle may be padding, which nothing reads)
        wte = torch.load(path, weights_only=True)["model"]["transformer.wte.weight"]
        data[data.find(wte.numpy().tobytes()) + 10] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- checkpoints

def paused_train(save_pause, step_pause, *args):
    """train.py with args, started, its stdout and stderr one pipe: see paused_train.py. Its output
    is buffered as a user's pipe would buffer it, whatever PYTHONUNBUFFERED the tests run with."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.Popen([sys.executable, "tests/paused_train.py", str(save_pause), str(step_pause), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def read_until(proc, start):
    """What proc printed up to and including its first line that starts with start."""
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith(start):
            break
    return "".join(printed)


def test_sigkill_at_any_moment_also_mid_save_never_stops_a_run_from_resuming(stories_dir, tmp_path):
    out_dir = tmp_path / "killed"
    extra = ["--max_steps=30", "--eval_interval=1000", "--dropout=0.1"]  # dropout: the RNG must resume too
    args = train_args(stories_dir, out_dir, *extra, "--checkpoint_interval=5")
    train.main(train_args(stories_dir, tmp_path / "straight", *extra))
    rng, pause = random.Random(0), 0.5
    # Each run is killed at a line it prints, a while later: in the pause halfway through writing a
    # checkpoint (0), on either side of that pause's end, or between steps. The first two start afresh.
    kills = [("test: saving step 5", 0), ("test: saving step 10", rng.uniform(0, 2 * pause)),
             ("step 17/", rng.uniform(0, 0.05)), ("test: saving step 25", 0)]
    for start, wait in kills:
        newest = checkpoint.paths(out_dir)[0] if checkpoint.paths(out_dir) else None
        proc = paused_train(pause, 0.01, *args)
        printed = read_until(proc, start)
        time.sleep(wait)
        proc.kill()
        printed += proc.communicate()[0]
        assert proc.returncode == -signal.SIGKILL, printed  # all four were alive when killed: none had finished
        assert ("resuming from" in printed) == bool(newest)
        if newest:
            assert f"resuming from {newest} at step {checkpoint.load(newest)['step']}" in printed
        if wait == 0 and start.startswith("test: saving"):  # killed mid-save: the half-written file is all it left
            step = int(start.split()[-1])
            assert (out_dir / f"ckpt_{step:08d}.tmp").exists() and not (out_dir / f"ckpt_{step:08d}.pt").exists()
    finished = script("train.py", *args)
    assert finished.returncode == 0, finished.stderr
    assert "resuming from" in finished.stdout and not list(out_dir.glob("*.tmp"))
    straight = progress_losses(tmp_path / "straight")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == straight[r["step"]] for r in rows if "loss" in r)  # every step retrained as it was
    a, b = (checkpoint.load(checkpoint.paths(tmp_path / d)[0]) for d in ("straight", "killed"))
    assert a["step"] == b["step"] == 30
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_saves_a_checkpoint_and_exits_0_saying_how_to_resume(stories_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(stories_dir, tmp_path, "--max_steps=100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "run the same command again to resume" in out
    stopped = int(out.split("stopped at step ")[1].split(",")[0])
    assert checkpoint.load(checkpoint.paths(tmp_path)[0])["step"] == stopped


def test_a_second_ctrl_c_quits_at_once_with_exit_code_130(stories_dir, tmp_path):
    proc = paused_train(60, 0, *train_args(stories_dir, tmp_path, "--max_steps=100000"))
    printed = read_until(proc, "step 3/")
    proc.send_signal(signal.SIGINT)
    printed += read_until(proc, "test: saving step")  # the checkpoint the first Ctrl-C asked for
    proc.send_signal(signal.SIGINT)
    printed += proc.communicate(timeout=30)[0]  # not the minute the save would have taken
    assert proc.returncode == 130, printed
    assert "Ctrl-C again quits at once" in printed and not checkpoint.paths(tmp_path)


def test_sigterm_saves_a_checkpoint_too(stories_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(stories_dir, tmp_path, "--max_steps=100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.terminate()
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 0 and checkpoint.paths(tmp_path)


def test_a_run_stopped_by_sigterm_then_ctrl_c_trains_as_an_uninterrupted_run(stories_dir, tmp_path):
    extra = ["--max_steps=30", "--eval_interval=1000", "--checkpoint_interval=1000", "--dropout=0.1"]
    train.main(train_args(stories_dir, tmp_path / "straight", *extra))
    stopped_at = []
    for signum, at in ((signal.SIGTERM, 5), (signal.SIGINT, 15)):
        proc = paused_train(0, 0.05, *train_args(stories_dir, tmp_path / "stopped", *extra))
        printed = read_until(proc, f"step {at}/")
        proc.send_signal(signum)
        printed += proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, printed
        stopped_at.append(int(printed.split("stopped at step ")[1].split(",")[0]))
    train.main(train_args(stories_dir, tmp_path / "stopped", *extra))
    assert 5 <= stopped_at[0] < 15 <= stopped_at[1] < 30  # each signal stopped the run it was sent to
    rows = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))  # each step once: none lost, none redone
    assert progress_losses(tmp_path / "stopped") == progress_losses(tmp_path / "straight")  # bit for bit
    a, b = (checkpoint.load(checkpoint.paths(tmp_path / d)[0]) for d in ("straight", "stopped"))
    assert a["step"] == b["step"] == 30
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_checkpoint_is_reported_and_the_one_before_it_used(stories_dir, tmp_path, capsys, how):
    train.main(train_args(stories_dir, tmp_path, "--max_steps=4", "--checkpoint_interval=2"))
    damage(tmp_path / "ckpt_00000004.pt", how)
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=5"])
    assert "ckpt_00000004.pt" in capsys.readouterr().err
    train.main(train_args(stories_dir, tmp_path, "--max_steps=6"))
    captured = capsys.readouterr()
    assert "ckpt_00000004.pt" in captured.err and "resuming from" in captured.out and "at step 2" in captured.out


def test_no_intact_checkpoint_is_a_one_line_error_with_exit_code_2(stories_dir, tmp_path):
    train.main(train_args(stories_dir, tmp_path, "--max_steps=2"))
    damage(checkpoint.paths(tmp_path)[0], "truncated")
    for name in ("sample.py", "train.py"):
        result = script(name, *train_args(stories_dir, tmp_path, "--max_steps=4"))
        assert result.returncode == 2
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("error: no intact checkpoint in") and "Traceback" not in result.stderr


def test_a_checkpoint_of_another_format_is_refused_saying_so(stories_dir, tmp_path):
    train.main(train_args(stories_dir, tmp_path, "--max_steps=2"))
    path = checkpoint.paths(tmp_path)[0]
    state = torch.load(path, weights_only=True)
    torch.save({**state, "format": checkpoint.FORMAT + 1}, path)
    with pytest.raises(UserError, match=f"has format {checkpoint.FORMAT + 1}, this code reads format"):
        checkpoint.load(path)


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_intact(stories_dir, tmp_path, monkeypatch):
    train.main(train_args(stories_dir, tmp_path, "--max_steps=2"))

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError) as error:
        train.main(train_args(stories_dir, tmp_path, "--max_steps=4"))
    assert str(error.value) == (f"could not write {tmp_path / 'ckpt_00000004.pt'} (No space left on device): free "
                                f"some space, then run the same command to resume from {tmp_path / 'ckpt_00000002.pt'}"
                                ", which is intact")
    assert [p.name for p in tmp_path.iterdir() if "ckpt" in p.name] == ["ckpt_00000002.pt"]
    assert checkpoint.load(tmp_path / "ckpt_00000002.pt")["step"] == 2


@pytest.mark.parametrize("number, fix", [(errno.EACCES, "writable"), (errno.EROFS, "writable"),
                                         (errno.ENOENT, "moved or deleted during the run")])
def test_a_failed_save_names_its_cause_and_suggests_freeing_space_only_for_a_full_disk(stories_dir, tmp_path,
                                                                                      monkeypatch, number, fix):
    def failing(obj, f):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(checkpoint.torch, "save", failing)
    with pytest.raises(UserError) as error:
        train.main(train_args(stories_dir, tmp_path, "--max_steps=2"))
    assert os.strerror(number) in str(error.value) and fix in str(error.value)
    assert "space" not in str(error.value)


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(stories_dir, tmp_path):
    with pytest.raises(UserError) as error:
        train.main(train_args(stories_dir, tmp_path, "--max_steps=50", "--checkpoint_interval=1",
                              "--learning_rate=1e12", "--grad_clip=0"))
    newest = checkpoint.paths(tmp_path)[0]  # a checkpoint every step: the one of the step before the bad one
    state = checkpoint.load(newest)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert max(progress_losses(tmp_path)) == state["step"]  # the bad step was neither logged nor saved
    assert re.fullmatch(f"the loss became (nan|inf) at step {state['step'] + 1}, so training stopped; the last good "
                        f"checkpoint is {re.escape(str(newest))}. Lower --learning_rate \\(now 1000000000000.0\\) and "
                        "run again to resume from it", str(error.value))


def test_an_unwritable_out_dir_is_refused_before_training(stories_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write to --out_dir"):
        train.main(train_args(stories_dir, tmp_path / "a_file" / "out", "--max_steps=2"))


@pytest.mark.skipif(os.name == "nt", reason="a folder's permission bits are POSIX's")
def test_a_folder_its_user_cannot_write_is_refused_though_an_earlier_runs_lock_file_is_writable(tmp_path):
    command = [sys.executable, "train.py"]
    base = tmp_path
    if os.geteuid() == 0:  # root may write anywhere: run train.py as nobody, in a folder nobody can reach
        import pwd
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("the tests run as root, and there is no user nobody to run train.py as")
        if not shutil.which("setpriv"):
            pytest.skip("the tests run as root, and there is no setpriv to run train.py as nobody")
        command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *command]
        base = Path(tempfile.mkdtemp())  # pytest's temporary folders are root's alone
        base.chmod(0o755)
    out_dir = base / "out"
    out_dir.mkdir()
    (out_dir / checkpoint.LOCK).write_text("12345\n")
    (out_dir / checkpoint.LOCK).chmod(0o666)
    out_dir.chmod(0o555)
    try:  # a dataset that does not exist: the run must refuse before it looks for one
        result = subprocess.run([*command, f"--dataset={base / 'missing'}", f"--out_dir={out_dir}", *TINY],
                                cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HOME": str(base)})
    finally:
        out_dir.chmod(0o755)
        if base != tmp_path:
            shutil.rmtree(base)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: cannot write to --out_dir={out_dir} (Permission denied): "
                             "choose a writable folder\n")


def test_a_second_run_on_the_same_out_dir_is_refused_before_it_reads_any_data(stories_dir, tmp_path, monkeypatch):
    opened, open_split = [], data.open_split
    monkeypatch.setattr(data, "open_split", lambda *args, **kw: opened.append(args) or open_split(*args, **kw))
    with checkpoint.lock(tmp_path), pytest.raises(UserError, match="is in use by another training run"):
        train.main(train_args(stories_dir, tmp_path, "--max_steps=2"))
    assert not opened


def test_a_second_run_on_the_same_out_dir_is_refused_before_it_touches_anything(stories_dir, tmp_path):
    train.main(train_args(stories_dir, tmp_path, "--max_steps=2"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with checkpoint.lock(tmp_path):  # this process is the run that holds the folder
        result = script("train.py", *train_args(stories_dir, tmp_path, "--max_steps=4", "--resume=False"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (f"error: --out_dir={tmp_path} is in use by another training run (process "
                             f"{os.getpid()}): wait for it to finish or stop it, or pass --out_dir=<another folder>\n")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # --resume=False removed nothing


def test_a_run_killed_with_sigkill_leaves_no_stale_lock(stories_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(stories_dir, tmp_path, "--max_steps=100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            break
    with pytest.raises(UserError, match=f"in use by another training run \\(process {proc.pid}\\)"):
        checkpoint.lock(tmp_path)
    proc.kill()
    proc.wait()
    checkpoint.lock(tmp_path).close()  # free again, with nothing removed by hand


def test_sampling_and_evaluation_read_a_folder_that_is_being_trained_in(stories_dir, tmp_path, capsys):
    train.main(train_args(stories_dir, tmp_path, "--max_steps=2"))
    with checkpoint.lock(tmp_path):
        sample.main([f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=5"])
        train.main(train_args(stories_dir, tmp_path, "--eval_only"))
    assert "val_loss=" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_on_stderr_without_traceback(tmp_path):
    result = script("train.py", "--max_step=5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: unknown setting --max_step; did you mean --max_steps?\n"


def test_debug_shows_the_traceback():
    assert "Traceback" in script("train.py", "--max_step=5", "--debug").stderr


@pytest.mark.parametrize("args, message", [
    (["--n_embd=100", "--n_head=3"], "does not split into --n_head=3 heads"),
    (["--n_embd=100", "--n_head=4"], "a head here has an odd number \\(100 / 4\\)"),
    (["--batch_size=0"], "--batch_size must be positive"),
    (["--learning_rate=-1"], "--learning_rate must be positive"),
    (["--shift_reach=0"], "--shift_reach must be positive"),
    (["--dropout=1.5"], "--dropout, --beta1 and --beta2"),
    (["--max_steps=50", "--warmup_steps=100"], "longer than the run"),
    (["--max_steps=ten"], "takes an int"),
])
def test_bad_settings_are_refused(args, message):
    with pytest.raises(UserError, match=message):
        train.settings(args)


def test_a_dataset_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(UserError, match="no such file or folder: .*missing.parquet"):
        train.main([f"--dataset={tmp_path / 'missing.parquet'}", f"--out_dir={tmp_path / 'out'}"])


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is an empty folder"):
        train.main([f"--dataset={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'out'}"])


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no text"):
        train.main([f"--dataset={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'out'}", *TINY])


def test_a_file_without_a_text_column_is_refused(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"story": "Once upon a time."}) + "\n")
    with pytest.raises(UserError, match="no 'text' column \\(its columns: story\\)"):
        train.main([f"--dataset={tmp_path / 's.jsonl'}", f"--out_dir={tmp_path / 'out'}", *TINY])


def test_a_txt_file_that_is_not_utf8_is_one_line_naming_the_file_and_the_byte(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes("Once upon a time.\n".encode() * 1000 + b"\xff" + bytes(range(256)))  # past the first block read
    result = script("train.py", f"--dataset={path}", f"--out_dir={tmp_path / 'out'}", *TINY)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {path} is not UTF-8 text: byte 18,000 (0xff) cannot be decoded")


def test_an_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "s.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match="is not a .txt, .jsonl or .parquet file"):
        train.main([f"--dataset={tmp_path / 's.csv'}", f"--out_dir={tmp_path / 'out'}", *TINY])


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def trained(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(train_args(stories_dir, out, "--max_steps=40"))  # long enough to learn how a story starts
    return out


def test_an_empty_prompt_starts_a_new_story(trained, capsys):
    sample.main([f"--out_dir={trained}", "--device=cpu", "--prompt=", "--greedy", "--max_new_tokens=10", "--ignore_eos"])
    assert capsys.readouterr().out.startswith("O")  # as every story it learned from: "Once upon a time"


def test_a_prompt_longer_than_the_context_keeps_its_end_and_says_so(trained, capsys):
    end = "Lily liked to play in the park. "  # 32 characters: block_size
    continuations = []
    for start in ("Once upon a time, there was a little dog. " * 3, "Tom found a big kite. " * 6):
        sample.main([f"--out_dir={trained}", "--device=cpu", f"--prompt={start + end}", "--greedy",
                     "--max_new_tokens=20", "--ignore_eos"])
        captured = capsys.readouterr()
        assert "continues from the last 32 characters" in captured.err
        assert captured.out.startswith(start + end) and len(captured.out) == len(start + end) + 21
        continuations.append(captured.out[len(start + end):])
    assert continuations[0] == continuations[1]  # what came before the last 32 characters is not read


def test_temperature_zero_is_greedy(trained, capsys):
    sample.main([f"--out_dir={trained}", "--device=cpu", "--temperature=0", "--max_new_tokens=40", "--seed=1"])
    zero = capsys.readouterr().out
    sample.main([f"--out_dir={trained}", "--device=cpu", "--greedy", "--max_new_tokens=40", "--seed=2"])
    assert capsys.readouterr().out == zero
