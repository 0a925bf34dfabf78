"""Train the character-level GPT on TinyStories, streamed.

    python train.py                                        # roneneldan/TinyStories from the hub
    python train.py --dataset=../shared/data/tinystories   # a local copy in the hub's layout

Every setting is a constant in config.py and can be overridden for one run as --key=value.
A run resumes from the newest checkpoint in OUT_DIR. Ctrl-C finishes the current step,
saves a checkpoint and exits; the same command then continues exactly where it stopped.
"""

import bisect
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import datasets
import datasets.distributed
import huggingface_hub
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import config
from config import UserError
from model import GPT, GPTConfig, pick_device
from tokenizer import EOS, Tokenizer

SEPARATOR = "<|endoftext|>"  # ends a story inside a row or a .txt file
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# A checkpoint's must match to resume it.
MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "rope", "swiglu", "tie_weights")
PAD = -1  # fills the end of a window that the next story does not fit in; ignored by the loss


# ----------------------------------------------------------------------------- data

def open_split(dataset, split, rank=0, world_size=1):
    """One split of dataset as a streaming datasets.IterableDataset, or None if it has none such.

    Under torchrun each rank streams its own share (see split_dataset_by_node): whole shards (the
    row groups of parquet files, whole files of other formats) when their number divides evenly
    among the ranks, else every world_size-th story."""
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()  # "Repo card metadata block was not found"
    path = Path(dataset).expanduser()
    if not path.exists() and (dataset.startswith((".", "/", "~")) or path.suffix in BUILDERS):
        raise UserError(f"no such file or folder: {dataset}: check the path (a hub dataset is named "
                        "like roneneldan/TinyStories)")
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise UserError(f"{dataset} is an empty folder: put the data files in it (data/train-*.parquet, "
                        "data/validation-*.parquet) or point --dataset at the folder that has them")
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise UserError(f"{path} is not a .txt, .jsonl or .parquet file: convert it, or point "
                            "--dataset at a folder in the hub's layout")
        # A .txt file is read by line so that a large one never sits in memory whole.
        extra = {"sample_by": "line", "keep_linebreaks": True} if path.suffix == ".txt" else {}
        splits = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), streaming=True, **extra)
    elif path.is_dir():
        splits = datasets.load_dataset(str(path), streaming=True)
    else:
        hub = datasets.config.HF_ENDPOINT  # HF_ENDPOINT, or the hub itself
        try:
            splits = datasets.load_dataset(dataset, streaming=True)
        except ConnectionError as e:  # datasets has already retried
            raise UserError(f"cannot reach the hub at {hub} to stream {dataset}: pass --dataset=<a local copy> "
                            "(see the README), or point HF_ENDPOINT at a mirror") from e
        except FileNotFoundError as e:  # datasets' DatasetNotFoundError is one
            raise UserError(f"{dataset} is neither a local file or folder nor a dataset on the hub at {hub} "
                            "that can be read: check the name, or pass --dataset=<a local copy>") from e
    ds = splits.get(split)
    if ds is None:
        return None
    # One shard per parquet row group rather than per file (other formats stay one per file). Once a
    # scan of a file has begun, pyarrow's threads read and decode all the rest of it ahead of use
    # (datasets' batch_readahead=0 does not stop them), so a run on a 1 GB file held 2.8 GB, one on
    # 10 MB 0.7 GB. A scan per row group reads ahead only that row group. And a resume starts at its
    # own row group, rather than reading those before it to skip them.
    try:
        ds = ds.reshard()  # reads the footer of every parquet file, from the hub too
    except OSError as e:  # datasets' ConnectionError once it has retried, or the hub's HTTP errors
        raise UserError(f"cannot read the files of {dataset} ({type(e).__name__}: {e}): check that they can "
                        "be read, or pass --dataset=<a local copy>") from e
    if world_size > 1:
        ds = datasets.distributed.split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


def is_line_based(dataset):
    """True where rows are lines of a .txt file rather than whole stories."""
    return Path(dataset).suffix == ".txt" and Path(dataset).is_file()


def split_stories(text, lines):
    """(the complete stories in text, the unfinished rest). A row of a dataset ends its last
    story; a line of a .txt file does not, only the separator does."""
    parts = text.split(SEPARATOR)
    rest = parts.pop() if lines else ""
    return [s.strip() for s in parts if s.strip()], rest


def row_text(row):
    if "text" not in row:
        raise UserError(f"the data has no 'text' column (its columns: {', '.join(row)}): "
                        "rename the column that holds the stories to 'text'")
    return row["text"]


def first_stories(ds, lines, n):
    """The first n stories of a split, to build the vocabulary from."""
    stories, rest, rows = [], "", iter(ds)
    for row in rows:
        complete, rest = split_stories(rest + row_text(row), lines)
        stories += complete
        if len(stories) >= n:
            break
    rows.close()  # a stream left open complains at exit
    return (stories + [rest.strip()])[:n] if rest.strip() else stories[:n]


class EmptyData(UserError):
    pass


class Batches:
    """Endless (x, y) batches from one split, resumable.

    The stories are joined as EOS story EOS story ..., and each batch is the next batch_size
    windows of block_size + 1 ids, so every character lands in exactly one window. A story short
    enough to fit in a window is never cut in two: if it would be, the rest of the window is
    padding and the story starts the next one, so short texts are learned whole from their
    first character (padding is never a target). At the end
    of the data the stream starts over: the next epoch. keep(i), if given, says whether the
    i-th story of an epoch is used (a held-out validation set takes the rest).

    The state is the dataset's own stream position (its state_dict, a shard and a row within it,
    and the number of shards) plus what has been read and not yet batched: the ids in the buffer
    and the unfinished part of a story.
    """

    def __init__(self, ds, tokenizer, batch_size, block_size, lines=False, keep=None):
        self.ds, self.tokenizer, self.lines, self.keep = ds, tokenizer, lines, keep
        self.size = (batch_size, block_size + 1)
        self.start = ds.state_dict()  # where every epoch begins
        self.rows = None
        self.buffer, self.rest, self.epoch, self.story, self.epoch_ids = [], "", 0, 0, 0

    def __next__(self):
        n = self.size[0] * self.size[1]
        while len(self.buffer) < n:
            self._read_row()
        chunk = torch.tensor(self.buffer[:n], dtype=torch.long).view(self.size)
        del self.buffer[:n]
        return chunk[:, :-1].clamp(min=EOS), chunk[:, 1:]  # padding: read as EOS, never a target

    def _read_row(self):
        if self.rows is None:
            self.rows = iter(self.ds)
        try:
            row = next(self.rows, None)
        except OSError as e:  # datasets' ConnectionError once it has retried, or the hub's HTTP errors
            raise UserError(f"the data stopped coming ({type(e).__name__}: {e}); the checkpoints saved so far are "
                            "intact: run the same command again to resume once the data can be read") from e
        if row is None:  # the end of the data: finish its last story, begin the next epoch
            self._add(self.rest)
            if self.epoch_ids == 0:
                raise EmptyData("the data holds no text to train on")
            self.rows, self.rest, self.story, self.epoch_ids = None, "", 0, 0
            self.epoch += 1
            self.ds.load_state_dict(self.start)
            return
        stories, self.rest = split_stories(self.rest + row_text(row), self.lines)
        for story in stories:
            self._add(story)

    def _add(self, story):
        story = story.strip()
        if not story:
            return
        self.story += 1
        if self.keep is None or self.keep(self.story - 1):
            ids = [EOS] + self.tokenizer.encode(story)
            used = len(self.buffer) % self.size[1]  # the buffer starts at a window boundary
            if len(ids) <= self.size[1] < used + len(ids):
                self.buffer.extend([PAD] * (self.size[1] - used))
            self.buffer.extend(ids)
            self.epoch_ids += len(ids)

    def close(self):
        if self.rows is not None:
            self.rows.close()

    def state_dict(self):
        return {"dataset": self.ds.state_dict(), "shards": self.ds.num_shards, "buffer": list(self.buffer),
                "rest": self.rest, "epoch": self.epoch, "story": self.story, "epoch_ids": self.epoch_ids}

    def load_state_dict(self, state):
        # The stream's position is a shard and a row within it: with other shards it would point
        # elsewhere without a word. Positions saved before shards were row groups have no count.
        if state.get("shards") != self.ds.num_shards:
            saved = "an unknown number of" if state.get("shards") is None else state["shards"]
            raise UserError(f"the checkpoint's data position counts {saved} shards, the data now has "
                            f"{self.ds.num_shards}: the data changed, or an earlier version of this code (which "
                            "counted whole files) saved it; resume with that data and version, or train anew "
                            "in another --out_dir")
        self.ds.load_state_dict(state["dataset"])
        self.buffer, self.rest = list(state["buffer"]), state["rest"]
        self.epoch, self.story, self.epoch_ids = state["epoch"], state["story"], state["epoch_ids"]


def validation_batches(cfg, tokenizer, rank=0, world_size=1):
    """(the EVAL_ITERS batches every evaluation uses, the same text each time; whether they were
    held out of the training split because the data has no validation split)."""
    lines, every = is_line_based(cfg["dataset"]), cfg["holdout_every"]
    ds, keep = open_split(cfg["dataset"], "validation", rank, world_size), None
    if ds is None:
        print(f"note: no validation split; every {every}th training story is held out to validate on")
        ds, keep = open_split(cfg["dataset"], "train", rank, world_size), lambda i: i % every == every - 1
    batches = Batches(ds, tokenizer, cfg["batch_size"], cfg["block_size"], lines, keep)
    try:
        return [next(batches) for _ in range(cfg["eval_iters"])], keep is not None
    except EmptyData:
        if keep is None:
            raise EmptyData("the validation split holds no text") from None
        print(f"note: fewer than {every} training stories: validating on the training text itself")
        batches = Batches(open_split(cfg["dataset"], "train", rank, world_size), tokenizer, cfg["batch_size"],
                          cfg["block_size"], lines)
        return [next(batches) for _ in range(cfg["eval_iters"])], False
    finally:
        batches.close()


# ----------------------------------------------------------------------------- training

def learning_rate(step, steps, cfg):
    """The rate at step of a stage of steps steps (the whole run when it has no stages): linear
    warmup to LEARNING_RATE, then cosine decay to MIN_LR at the stage's end."""
    if step < cfg["warmup_steps"]:
        return cfg["learning_rate"] * (step + 1) / cfg["warmup_steps"]
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, steps - cfg["warmup_steps"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Mean validation loss in nats per character."""
    model.eval()
    losses = []
    for x, y in batches:
        with autocast:
            losses.append(model(x.to(device), y.to(device))[1].float())
    model.train()
    loss = torch.stack(losses).mean()
    if dist.is_initialized():  # each rank holds its own share of the validation text
        dist.all_reduce(loss, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
        if device.type != "cuda":
            loss /= dist.get_world_size()  # gloo has no AVG
    return loss.item()


def matmul_rate(device, n=2048):
    """The float32 matrix-product rate of device in FLOP/s: the yardstick of MFU."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for an asynchronous device to finish
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Metrics:
    """OUT_DIR/metrics.jsonl: one JSON object per progress line and per evaluation."""

    def __init__(self, out_dir, resume_step):
        self.path = Path(out_dir) / "metrics.jsonl"
        if self.path.exists():  # drop what a stopped run logged after its last checkpoint
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except ValueError:  # a line cut short by a killed run
                    pass
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def rng_state(device):
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather(obj):
    """obj from every rank, as a list in rank order (a list of one without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def plot_losses(out_dir, chars_per_step):
    """OUT_DIR/loss.png: the training and validation loss of metrics.jsonl against characters
    seen. Skipped without a word where matplotlib is not installed: training never needs it."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        return
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    for key, label, style in (("loss", "train (one batch)", "-"), ("val_loss", "validation", "o-")):
        points = [(r["step"] * chars_per_step / 1e6, r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3, linewidth=1)
    ax.set_xlabel("characters seen (millions)")
    ax.set_ylabel("loss (nats per character)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "loss.png")


def checkpoint_state(step, model, optimizer, tokenizer, cfg, batches, device):
    """Everything a run needs to continue exactly; every rank must call it (it gathers)."""
    starts = stage_starts(cfg)
    stage = bisect.bisect_left(starts, step) - 1  # the stage of the last step taken
    return {
        "format": checkpoint.FORMAT,
        "step": step,
        "stage": stage + 1,
        "stage_step": step - starts[stage],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": asdict(model.config),
        "config": cfg,
        "tokenizer": tokenizer.state_dict(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "data": gather(batches.state_dict()),  # one per rank
        "rng": gather(rng_state(device)),  # one per rank
    }


def stage_starts(cfg):
    """The step each stage starts at: [0] without stages, [0, 30] for --stages=30,30."""
    return [sum(cfg["stages"][:i]) for i in range(len(cfg["stages"]))]


def check_resumable(state, path, cfg):
    """Refuse a checkpoint that this config cannot continue, saying what differs."""
    for key in MODEL_KEYS:
        saved = state["model_args"].get(key, getattr(GPTConfig, key))  # checkpoints older than a switch lack it
        if saved != cfg[key]:
            raise UserError(f"{path} holds a model with {key}={saved}, the config asks for "
                            f"{key}={cfg[key]}: pass --{key}={saved} to resume it, or "
                            "--out_dir=<new folder> to train a new model")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if state["world_size"] != world_size and not cfg["eval_only"]:
        raise UserError(f"{path} was written by a run of {state['world_size']} processes, this one has "
                        f"{world_size}: resume it with as many (torchrun --nproc_per_node={state['world_size']}"
                        f"{' ...' if state['world_size'] > 1 else ' or plain python'}) so every data stream goes on")
    if state["config"]["dataset"] != cfg["dataset"] and not cfg["eval_only"]:
        raise UserError(f"{path} was trained on {state['config']['dataset']!r}, not {cfg['dataset']!r}: pass "
                        f"--dataset={state['config']['dataset']} to resume it, or --out_dir=<new folder>")


def settings(argv):
    """config.py's settings with argv's overrides, checked; STAGES parsed into cfg["stages"]."""
    cfg = config.load(argv)
    positive = ["block_size", "n_layer", "n_head", "n_embd", "max_steps", "batch_size", "grad_accum_steps",
                "learning_rate",
                "log_interval", "eval_interval", "eval_iters", "checkpoint_interval", "keep_checkpoints",
                "tokenizer_stories", "holdout_every"]
    for key in positive:
        if cfg[key] <= 0:
            raise UserError(f"--{key} must be positive, not {cfg[key]}")
    for key in ("min_lr", "warmup_steps", "weight_decay", "grad_clip"):
        if cfg[key] < 0:
            raise UserError(f"--{key} must not be negative, not {cfg[key]}")
    if not 0 <= cfg["dropout"] < 1 or not 0 <= cfg["beta1"] < 1 or not 0 <= cfg["beta2"] < 1:
        raise UserError("--dropout, --beta1 and --beta2 must be at least 0 and below 1")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"--n_embd={cfg['n_embd']} does not split into --n_head={cfg['n_head']} heads: "
                        "make n_embd a multiple of n_head")
    if cfg["stages"]:
        try:
            stages = [int(s) for s in cfg["stages"].split(",")]
        except ValueError:
            raise UserError(f"--stages takes step counts separated by commas, as in --stages=30,30, "
                            f"not {cfg['stages']!r}") from None
        if min(stages) <= 0:
            raise UserError(f"every stage needs at least one step: --stages={cfg['stages']}")
        if cfg["max_steps"] not in (config.MAX_STEPS, sum(stages)):
            raise UserError(f"--stages={cfg['stages']} adds up to {sum(stages)} steps but --max_steps is "
                            f"{cfg['max_steps']}: leave --max_steps out, or make the two agree")
        cfg["stages"], cfg["max_steps"] = stages, sum(stages)
    else:
        cfg["stages"] = [cfg["max_steps"]]
    if cfg["warmup_steps"] > min(cfg["stages"]):
        raise UserError(f"--warmup_steps={cfg['warmup_steps']} is longer than the "
                        f"{'shortest stage' if len(cfg['stages']) > 1 else 'run'} ({min(cfg['stages'])} steps): "
                        "lower --warmup_steps")
    return cfg


def setup_distributed(cfg):
    """(rank, world_size, device). Under torchrun: one process per device, nccl between GPUs and
    gloo between CPU processes; the other ranks print nothing. A plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(cfg["device"])
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(cfg["device"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world_size, device


def main(argv):
    cfg = settings(argv)
    rank, world_size, device = setup_distributed(cfg)
    try:
        run(cfg, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_writable(out_dir):
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out_dir={out_dir} ({e.strerror or e}): choose a writable folder") from e


def run(cfg, rank, world_size, device):
    out_dir = Path(cfg["out_dir"])
    if rank == 0 and not cfg["eval_only"]:
        check_writable(out_dir)
    found = checkpoint.load_newest(out_dir) if cfg["resume"] or cfg["eval_only"] else None
    if found:
        path, state = found
        check_resumable(state, path, cfg)
        tokenizer = Tokenizer.from_state_dict(state["tokenizer"])
    elif cfg["eval_only"]:
        raise UserError(f"no checkpoint to evaluate in {out_dir}: train one with python train.py first")
    else:
        state = None
        train_ds = open_split(cfg["dataset"], "train")
        if train_ds is None:
            raise UserError(f"{cfg['dataset']} has no train split")
        # Every rank reads the same first stories, so every rank builds the same vocabulary.
        stories = first_stories(train_ds, is_line_based(cfg["dataset"]), cfg["tokenizer_stories"])
        if not stories:
            raise UserError(f"{cfg['dataset']} holds no text in its train split: check that it is the right data")
        tokenizer = Tokenizer.from_texts(stories)

    torch.manual_seed(cfg["seed"] + rank)  # DDP copies rank 0's weights; dropout differs per rank
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"], rope=cfg["rope"],
                          swiglu=cfg["swiglu"], tie_weights=cfg["tie_weights"])).to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    val_batches, held_out = validation_batches(cfg, tokenizer, rank, world_size)
    if cfg["eval_only"]:
        model.load_state_dict(state["model"])
        val_loss = evaluate(model, val_batches, device, autocast)
        print(f"val_loss={val_loss:.4f} val_bpc={val_loss / math.log(2):.4f}")
        return

    def new_optimizer():
        return model.optimizer(cfg["learning_rate"], cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]), device.type)

    optimizer = new_optimizer()
    every = cfg["holdout_every"]
    batches = Batches(open_split(cfg["dataset"], "train", rank, world_size), tokenizer, cfg["batch_size"],
                      cfg["block_size"], is_line_based(cfg["dataset"]),
                      (lambda i: i % every != every - 1) if held_out else None)
    step = 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"][rank])
        set_rng_state(state["rng"][rank], device)
        step = state["step"]
        print(f"resuming from {path} at step {step} (--resume=False starts afresh)")
    elif checkpoint.paths(out_dir) and rank == 0:
        print(f"starting fresh: removing the checkpoints in {out_dir}")
        for old in checkpoint.paths(out_dir):
            old.unlink()
    if rank == 0:
        metrics = Metrics(out_dir, step)
    if step >= cfg["max_steps"]:
        print(f"already trained to step {step} of --max_steps={cfg['max_steps']}: raise --max_steps to train longer")
        return

    accum = cfg["grad_accum_steps"]
    chars_per_step = cfg["batch_size"] * cfg["block_size"] * accum * world_size
    print(f"model: {model.num_params():,} parameters, vocabulary {tokenizer.vocab_size}, device {device}; "
          f"global batch {cfg['batch_size'] * accum * world_size} windows = {cfg['batch_size']} x {world_size} "
          f"rank{'s' if world_size > 1 else ''} x {accum} accumulation step{'s' if accum > 1 else ''}")
    train_model = torch.compile(model) if cfg["compile"] and device.type != "mps" else model
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    stop = []  # the signal that asked to stop, once one has

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("\nstopping after this step to save a checkpoint (Ctrl-C again quits at once)", file=sys.stderr)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    starts = stage_starts(cfg)
    staged = {"stage": 0} if len(starts) > 1 else {}  # shown only when there are stages
    first_step, log_step, started, log_time, train_time = step, step, time.time(), time.time(), 0.0
    val_loss = saved = None
    try:
        while step < cfg["max_steps"]:
            stage = bisect.bisect_right(starts, step) - 1
            if step == starts[stage] and step > 0:
                # A stage boundary: same weights, fresh AdamW moments and a restarted schedule.
                optimizer = new_optimizer()
                print(f"stage {stage + 1}/{len(starts)} begins at step {step}: fresh optimizer, schedule restarted")
            lr = learning_rate(step - starts[stage], cfg["stages"][stage], cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = 0.0
            for micro in range(accum):
                x, y = next(batches)
                if world_size > 1:  # average the gradients across ranks once, after the last micro-batch
                    train_model.require_backward_grad_sync = micro == accum - 1
                with autocast:
                    _, micro_loss = train_model(x.to(device), y.to(device))
                (micro_loss / accum).backward()
                loss += micro_loss.detach() / accum
            diverged = ~torch.isfinite(loss)  # checked every step, so no bad update is ever saved
            if world_size > 1:  # every rank must stop at the same step, whichever saw the signal or the NaN
                flags = torch.stack([torch.tensor(float(bool(stop)), device=device), diverged.float()])
                dist.all_reduce(flags)
                if flags[0] > 0 and not stop:
                    stop.append(signal.SIGTERM)
                diverged = flags[1] > 0
            if diverged:
                newest = checkpoint.paths(out_dir)[0] if checkpoint.paths(out_dir) else "none yet"
                raise UserError(f"the loss became {loss.item()} at step {step + 1}, so training stopped; the last "
                                f"good checkpoint is {newest}. Lower --learning_rate (now {cfg['learning_rate']}) "
                                "and run again to resume from it")
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % cfg["log_interval"] == 0 or step == cfg["max_steps"]:
                loss = loss.item()
                now = time.time()
                train_time += now - log_time
                rate = chars_per_step * (step - log_step) / (now - log_time)
                eta = train_time / (step - first_step) * (cfg["max_steps"] - step)
                if staged:
                    staged["stage"] = stage + 1
                print(f"{f'stage {stage + 1}/{len(starts)} | ' if staged else ''}step {step}/{cfg['max_steps']} "
                      f"| loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} char/s | {format_time(now - started)} elapsed "
                      f"| ETA {format_time(eta)}")
                if rank == 0:
                    metrics.log(step=step, **staged, loss=loss, lr=lr, tokens_per_sec=rate, elapsed_s=now - started)
                log_step, log_time = step, time.time()
            if step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]:
                eval_started = time.time()
                val_loss = evaluate(model, val_batches, device, autocast)
                print(f"step {step}: val_loss {val_loss:.4f} nats/char ({val_loss / math.log(2):.4f} bits/char)")
                if rank == 0:
                    metrics.log(step=step, val_loss=val_loss, val_bpc=val_loss / math.log(2))
                log_time += time.time() - eval_started  # evaluation is not training time
            if step % cfg["checkpoint_interval"] == 0 or step == cfg["max_steps"] or stop:
                state = checkpoint_state(step, model, optimizer, tokenizer, cfg, batches, device)
                if rank == 0:
                    saved = checkpoint.save(state, out_dir, cfg["keep_checkpoints"])
            if stop:
                break
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        batches.close()

    report = tokenizer.unknown_report()
    if report:
        print(f"note: {report}")
    if stop:
        print(f"stopped at step {step}, saved {saved}; run the same command again to resume")
        return
    if world_size > 1:
        check_replicas(model)
    elapsed = time.time() - started
    rate = chars_per_step * (step - first_step) / train_time
    print(f"done: {step - first_step} steps in {format_time(elapsed)}, {rate:,.0f} char/s in training; "
          f"val_loss {val_loss:.4f} nats/char ({val_loss / math.log(2):.4f} bits/char); saved {saved}")
    plot_losses(out_dir, chars_per_step)
    flops, peak = model.flops_per_char(), matmul_rate(device)
    print(f"model: {flops / 1e6:.2f} MFLOP per character; MFU {rate * flops / peak / world_size:.0%} of "
          f"{'each process' if world_size > 1 else 'this machine'}'s {peak / 1e9:,.0f} GFLOP/s float32 "
          "matrix-product rate")


def check_replicas(model):
    """Fail loudly if the ranks' weights have drifted apart, which DDP should never allow."""
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    lowest, highest = weights.clone(), weights.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if not torch.equal(lowest, highest):
        raise RuntimeError("the ranks' weights differ after training")
    print(f"weights identical on all {dist.get_world_size()} ranks")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        if "--debug" in sys.argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
