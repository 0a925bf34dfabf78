"""Experiment tracking: with WANDB_PROJECT set, metrics.jsonl's rows and the settings go to a W&B run,
and a resume continues that run. Checked for real with wandb in offline mode, reading back the run
file it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint
import metrics
import train
from config import UserError
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def wandb_records(path):
    """The records of a .wandb run file, as wandb's own protobuf messages. The file is a 7-byte
    header (":W&B", a magic number, a version) and then a LevelDB-style log: blocks of 32 KiB of
    records, each a 7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last piece)
    and its bytes; a block's last 6 bytes or fewer are padding."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = Path(path).read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_run(path):
    """(run id, config keys, {step: logged values}) of a .wandb run file."""
    run_id, config, history = None, set(), {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, config = record.run.run_id, {item.key for item in record.run.config.update}
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
    return run_id, config, history


def train_with_wandb(dataset, out_dir, wandb_dir, *extra):
    """train.py as a user runs it, with W&B offline; its metrics.jsonl rows."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "train.py", f"--dataset={dataset}", f"--out_dir={out_dir}", *TINY,
                           "--log_interval=2", "--eval_interval=3", "--checkpoint_interval=3",
                           "--sample_interval=5", "--sample_chars=10", "--wandb_project=tinystories-test", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_wandb_logs_what_metrics_jsonl_holds_and_a_resume_continues_the_same_run(stories_dir, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install \"wandb>=0.31\"")
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    train_with_wandb(stories_dir, out, wandb_dir, "--max_steps=6")
    run_id = checkpoint.load(checkpoint.paths(out)[0])["wandb_id"]
    rows = train_with_wandb(stories_dir, out, wandb_dir, "--max_steps=10")  # resumes from step 6

    runs = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # offline, each process writes its own file of the run
    (first_id, config, first), (second_id, _, second) = map(read_run, runs)
    assert first_id == second_id == run_id  # the resume continued the same W&B run
    assert {"tokenizer", "learning_rate", "max_steps"} <= config
    logged = {**first, **second}
    expected = {}
    for row in rows:
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    assert logged == expected  # every row of metrics.jsonl, at its step, and nothing else
    assert logged[5]["sample"] and logged[10]["sample"]  # the samples too
    assert max(first) == 6 and min(second) > 6


def test_a_missing_wandb_is_a_one_line_error_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    cfg = train.settings(["--wandb_project=p"])
    with pytest.raises(UserError, match=r'pip install "wandb>=0.31"') as e:
        metrics.Metrics(tmp_path, 0, cfg)
    assert "\n" not in str(e.value)


def test_without_a_wandb_project_wandb_is_never_imported(stories_dir, tmp_path):
    script = (f"import sys, train; train.main({[f'--dataset={stories_dir}', f'--out_dir={tmp_path}', *TINY, '--max_steps=2']!r}); "
              "assert 'wandb' not in sys.modules, 'wandb was imported'")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
