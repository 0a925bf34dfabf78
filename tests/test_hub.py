"""The full dataset, roneneldan/TinyStories streamed from the hub, end to end. The hub is a small
server on loopback (hub_server.py) serving a generated dataset under that name, and HF_ENDPOINT
points datasets at it, as it would at a mirror or a private hub."""

import importlib.util
import json
import re
import socket
import time
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import checkpoint
import data
import sample
import train
from config import UserError
from conftest import TINY, assert_resume_is_exact, make_stories
from hub_server import HubServer
from tokenizer import Tokenizer

# The dataset card's front matter says which files hold each split, as TinyStories' card does.
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
# TinyStories, generated for the tests
"""


def write_tinystories(folder, train_files=8, stories_per_file=30, validation_stories=40):
    """A small dataset laid out as roneneldan/TinyStories is on the hub: the card, and each split in
    parquet files, the training split in several so that a run goes from one file to the next."""
    data = Path(folder) / "data"
    data.mkdir(parents=True)
    (Path(folder) / "README.md").write_text(CARD)
    stories = make_stories(train_files * stories_per_file, 0)
    for i in range(train_files):
        rows = stories[i * stories_per_file:(i + 1) * stories_per_file]
        pq.write_table(pa.table({"text": rows}), data / f"train-{i:05d}-of-{train_files:05d}.parquet")
    validation = pa.table({"text": make_stories(validation_stories, 1)})
    pq.write_table(validation, data / "validation-00000-of-00001.parquet")
    return Path(folder)


def reread_environment(monkeypatch, module):
    """huggingface_hub and datasets read HF_ENDPOINT, HF_HOME and the like into constants once, at
    import: run the module's code again in the environment as it is now and set the constants that
    come out differently (monkeypatch sets them back after the test)."""
    spec = importlib.util.spec_from_file_location(module.__name__, module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if name.isupper() and getattr(module, name, None) != value:
            monkeypatch.setattr(module, name, value)


def loopback_only(monkeypatch):
    """Any other host fails to resolve, at once, so no test reaches beyond this machine. (datasets
    also asks datasets-server.<the hub's host> for a parquet export; it does without one.)"""
    resolve = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: the tests stay on loopback")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub on loopback serving a small generated TinyStories as roneneldan/TinyStories, with
    HF_ENDPOINT pointed at it and HF_HOME (the download cache) in tmp_path."""
    server = HubServer({"roneneldan/TinyStories": write_tinystories(tmp_path / "repo")})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    reread_environment(monkeypatch, huggingface_hub.constants)
    reread_environment(monkeypatch, datasets.config)  # second: it reads some of huggingface_hub's
    loopback_only(monkeypatch)
    yield server
    server.stop()


@pytest.fixture
def quick_retries(monkeypatch):
    """datasets and huggingface_hub retry a hub that does not answer for many minutes, sleeping
    between tries: retry less, and without the sleeps."""
    monkeypatch.setattr(datasets.config, "STREAMING_OPEN_MAX_RETRIES", 2)
    monkeypatch.setattr(datasets.config, "STREAMING_READ_MAX_RETRIES", 2)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def run(out_dir, *extra):
    train.main([f"--out_dir={out_dir}", "--dataset=roneneldan/TinyStories", *TINY, *extra])


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_hub_dataset_trains_evaluates_and_checkpoints_through_the_hub(hub, tmp_path, capsys):
    run(tmp_path, "--max_steps=6", "--eval_interval=3")
    out = capsys.readouterr().out
    assert "step 6/6 | loss" in out and "step 6: val_loss" in out
    assert "no validation split" not in out
    assert any("/data/validation-" in request for request in hub.requests)  # the hub's validation split
    assert [r["step"] for r in metrics(tmp_path) if "val_loss" in r] == [3, 6]
    state = checkpoint.load(checkpoint.paths(tmp_path)[0])
    assert state["step"] == 6 and state["config"]["dataset"] == "roneneldan/TinyStories"


def test_resume_through_the_hub_continues_exactly_as_an_uninterrupted_run(hub, tmp_path):
    args = ["--max_steps=16", "--checkpoint_interval=8", "--keep_checkpoints=5", "--eval_interval=8",
            "--dropout=0.1",  # dropout draws random numbers, so the RNG state must resume too
            "--batch_size=32"]  # about 7 steps to a file: the stream resumes in the second of eight
    a, b = assert_resume_is_exact(run, tmp_path, args)
    # Not a["data"] == b["data"]: after a resume, datasets' state of a stream of several files keeps
    # a stale note of the file it last read ahead from, which its next resume does not use. The two
    # checkpoints must go on with the same text.
    assert without_stream(a["data"][0]) == without_stream(b["data"][0])
    assert torch.equal(next_batch(a), next_batch(b))


def without_stream(data):
    return {k: v for k, v in data.items() if k != "dataset"}


def next_batch(state):
    """The training batch that comes after the checkpoint state."""
    cfg, tokenizer = state["config"], Tokenizer.from_state_dict(state["tokenizer"])
    batches = data.Batches(data.open_split(cfg["dataset"], "train"), tokenizer, cfg["batch_size"], cfg["block_size"])
    batches.load_state_dict(state["data"][0])
    try:
        return next(batches)[0]
    finally:
        batches.close()


def test_a_model_trained_through_the_hub_samples(hub, tmp_path, capsys):
    run(tmp_path, "--max_steps=4")
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path}", "--device=cpu", "--greedy", "--max_new_tokens=40", "--ignore_eos"])
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) == len("Once upon a time") + 40 + 1


def test_a_hub_that_stops_answering_mid_run_is_a_clear_error_and_keeps_the_last_checkpoint(
        hub, tmp_path, quick_retries, monkeypatch, capsys):
    saved, save = [], checkpoint.save

    def save_then_stop_the_hub(*args, **kwargs):
        saved.append(save(*args, **kwargs))
        if len(saved) == 1:
            hub.stop()  # the run goes on with the file it is reading, and needs the hub for the next
        return saved[-1]

    monkeypatch.setattr(checkpoint, "save", save_then_stop_the_hub)
    # a few stories read ahead at a time, so the run needs the hub again soon after the first checkpoint
    args = ["--max_steps=12", "--checkpoint_interval=2", "--batch_size=32", "--shuffle=8"]
    with pytest.raises(UserError, match="the data stopped coming .*run the same command again") as stopped:
        run(tmp_path, *args)
    assert "\n" not in str(stopped.value)
    assert len(saved) > 1 and checkpoint.paths(tmp_path)[0] == saved[-1]  # saved after the hub stopped
    last = checkpoint.load(saved[-1])["step"]

    monkeypatch.setattr(checkpoint, "save", save)
    hub.start()  # back, at the same address: the same command goes on from the last checkpoint
    capsys.readouterr()
    run(tmp_path, *args)
    assert f"resuming from {saved[-1]} at step {last}" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == list(range(1, 13))


def test_a_hub_that_does_not_answer_is_a_clear_error(hub, tmp_path, quick_retries):
    hub.stop()
    with pytest.raises(UserError, match=f"cannot reach the hub at {re.escape(hub.url)} .*--dataset=") as error:
        run(tmp_path, "--max_steps=2")
    assert "\n" not in str(error.value)


def test_a_dataset_the_hub_does_not_have_is_a_clear_error(hub, tmp_path):
    with pytest.raises(UserError, match="nobody/NoSuchStories is neither a local file or folder nor a dataset "
                                        f"on the hub at {re.escape(hub.url)}") as error:
        run(tmp_path, "--dataset=nobody/NoSuchStories", "--max_steps=2")
    assert "\n" not in str(error.value)
