"""The data: a dataset name in, resumable batches of character ids out.

    ds = open_split("roneneldan/TinyStories", "train")      # or a local folder, .parquet, .jsonl, .txt
    batches = Batches(ds, tokenizer, batch_size=64, block_size=128)
    x, y = next(batches)                                     # (64, 128) inputs and next-character targets

Everything is streamed (datasets.load_dataset(..., streaming=True); a .txt file by read_txt): no
split is ever held in memory whole, nor any line or story: text is read from a .txt file, and
turned into ids, at most PIECE characters at a time, however long its lines and stories are. A
stream's position (Batches.state_dict) goes into every checkpoint, so a resumed run reads on from
exactly where the stopped one was. With no validation split, every HOLDOUT_EVERY-th training
story is held out to validate on (held_out), and training skips it.
"""

from pathlib import Path

import datasets
import datasets.distributed
import huggingface_hub
import torch

from config import UserError
from tokenizer import EOS

SEPARATOR = "<|endoftext|>"  # ends a story inside a row or a .txt file
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PAD = -1  # fills the end of a window that the next story does not fit in; ignored by the loss
PIECE = 1 << 16  # characters: the most text read from a .txt file, or turned into ids, at once
VOCABULARY_TEXT = 1 << 24  # characters: the vocabulary's stories are cut off after this much text


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
        if path.suffix == ".txt":
            splits = {"train": datasets.IterableDataset.from_generator(
                read_txt, datasets.Features({"text": datasets.Value("string")}), {"path": str(path)})}
        else:
            splits = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), streaming=True)
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
    kind = (ds.features or {}).get("text")
    if kind is not None and kind not in (datasets.Value("string"), datasets.Value("large_string")):
        raise UserError(f"the 'text' column of {dataset} holds {getattr(kind, 'dtype', type(kind).__name__)}, "
                        "not text: make it a column of strings, a story (or several, joined by <|endoftext|>) a row")
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


def read_txt(path):
    """The rows of a .txt file: its lines, a line longer than PIECE characters in pieces of PIECE.
    (datasets' text builder reads a line whole: a file without line breaks, all at once.) Line
    breaks are kept, and read as that builder reads them: \\r\\n and \\r become \\n."""
    with open(path, encoding="utf-8") as f:
        try:
            for line in iter(lambda: f.readline(PIECE), ""):
                yield {"text": line}
        except UnicodeDecodeError as e:  # e.object: the bytes being decoded, which end where reading got to
            offset = f.buffer.tell() - len(e.object) + e.start
            raise UserError(f"{path} is not UTF-8 text: byte {offset:,} (0x{e.object[e.start]:02x}) cannot be "
                            "decoded; convert it to UTF-8 (iconv -f <its encoding> -t utf-8)") from None


def is_line_based(dataset):
    """True where rows are lines of a .txt file rather than whole stories."""
    return Path(dataset).suffix == ".txt" and Path(dataset).is_file()


def row_text(row, lines):
    """The text of a row, ending its last story unless it is a line of a .txt file (there only the
    separator does); a null row is an empty one."""
    if "text" not in row:
        raise UserError(f"the data has no 'text' column (its columns: {', '.join(row)}): "
                        "rename the column that holds the stories to 'text'")
    return (row["text"] or "") + ("" if lines else SEPARATOR)


def first_stories(ds, lines, n):
    """The first n stories of a split, to build the vocabulary from: those in its first
    VOCABULARY_TEXT characters, so that a text which never ends a story is not read whole."""
    stories, texts, size, rows = [], [], 0, iter(ds)
    for row in rows:
        text = row_text(row, lines)
        size += len(text)
        if SEPARATOR in text:  # what was read is joined only when a story ends: once per story
            *complete, rest = ("".join(texts) + text).split(SEPARATOR)
            stories += [s.strip() for s in complete if s.strip()]
            texts = [rest]
        else:
            texts.append(text)
        if len(stories) >= n or size >= VOCABULARY_TEXT:
            break
    rows.close()  # a stream left open complains at exit
    rest = "".join(texts).strip()
    return (stories + [rest])[:n] if rest else stories[:n]


def vocabulary_stories(dataset, n):
    """The first n stories of dataset's train split: the text the vocabulary is built from. Every
    rank reads the same ones, so every rank builds the same vocabulary."""
    ds = open_split(dataset, "train")
    if ds is None:
        raise UserError(f"{dataset} has no train split")
    stories = first_stories(ds, is_line_based(dataset), n)
    if not stories:
        raise UserError(f"{dataset} holds no text in its train split: check that it is the right data")
    return stories


def is_held_out(i, every):
    """Whether the i-th story of a training split is held out to validate on, where the data has
    no validation split: every every-th story, so the held-out text is spread across the split."""
    return i % every == every - 1


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

    Text is taken as it is needed, PIECE characters at most at a time: a long row waits in the
    queue in pieces, and a story longer than two windows (which cannot fit in one) goes into the
    buffer as it is read rather than once it ends. So memory and the state stay small whatever the
    length of a line or a story; only a row, which datasets reads whole, is held whole.

    The state is the dataset's own stream position (its state_dict, a shard and a row within it,
    and the number of shards) plus what has been read and not yet batched: the ids in the buffer,
    the pieces in the queue, and the held-back end of the story being read.
    """

    def __init__(self, ds, tokenizer, batch_size, block_size, lines=False, keep=None):
        self.ds, self.tokenizer, self.lines, self.keep = ds, tokenizer, lines, keep
        self.size = (batch_size, block_size + 1)
        self.start = ds.state_dict()  # where every epoch begins
        self.rows = None
        self.buffer, self.queue, self.rest, self.open = [], [], "", False  # open: a story is partly in the buffer
        self.epoch, self.story, self.epoch_ids = 0, 0, 0

    def __next__(self):
        n = self.size[0] * self.size[1]
        while len(self.buffer) < n:
            if self.queue:
                self._add_text(self.queue.pop(0))
            else:
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
            self._add(self.rest, ends=True)
            if self.epoch_ids == 0:
                raise EmptyData("the data holds no text to train on")
            self.rows, self.rest, self.story, self.epoch_ids = None, "", 0, 0
            self.epoch += 1
            self.ds.load_state_dict(self.start)
            return
        text = row_text(row, self.lines)
        self.queue = [text[i:i + PIECE] for i in range(0, len(text), PIECE)]

    def _add_text(self, text):
        """Add the stories that text ends, and the start of the one it leaves unfinished once that is
        too long for a window, so that what is held back stays short."""
        *stories, self.rest = (self.rest + text).split(SEPARATOR)
        for story in stories:
            self._add(story, ends=True)
        if not self.open:
            self.rest = self.rest.lstrip()
        if len(self.rest) > 2 * self.size[1]:
            # Held back: what may begin a separator, and whitespace the story may end with (and so lose),
            # up to a window of it.
            cut = max(len(self.rest[:1 - len(SEPARATOR)].rstrip()), len(self.rest) - self.size[1])
            self._add(self.rest[:cut], ends=False)
            self.rest = self.rest[cut:]

    def _add(self, text, ends):
        """Put text into the buffer as ids: a whole story, or a piece of one longer than a window
        (ends: the story ends with it)."""
        text = text.rstrip() if ends else text
        if not self.open:
            text = text.lstrip()
            if not text:
                return
            self.story += 1
        if self.keep is None or self.keep(self.story - 1):
            ids = ([] if self.open else [EOS]) + self.tokenizer.encode(text)
            used = len(self.buffer) % self.size[1]  # the buffer starts at a window boundary
            if not self.open and len(ids) <= self.size[1] < used + len(ids):
                self.buffer.extend([PAD] * (self.size[1] - used))
            self.buffer.extend(ids)
            self.epoch_ids += len(ids)
        self.open = not ends

    def close(self):
        if self.rows is not None:
            self.rows.close()

    def state_dict(self):
        return {"dataset": self.ds.state_dict(), "shards": self.ds.num_shards, "buffer": list(self.buffer),
                "queue": list(self.queue), "rest": self.rest, "open": self.open, "epoch": self.epoch,
                "story": self.story, "epoch_ids": self.epoch_ids}

    def load_state_dict(self, state):
        # The stream's position is a shard and a row within it: with other shards it would point
        # elsewhere without a word. Positions saved before shards were row groups have no count.
        if state.get("shards") != self.ds.num_shards:
            saved = "an unknown number of" if state.get("shards") is None else state["shards"]
            raise UserError(f"the checkpoint's data position counts {saved} shards, the data now has "
                            f"{self.ds.num_shards}: the data changed, or an earlier version of this code (which "
                            "counted whole files) saved it; resume with that data and version, or train anew "
                            "in another --out_dir")
        if state["dataset"]["examples_iterable"]["type"] != self.start["examples_iterable"]["type"]:
            # Another kind of reader's position, which datasets would fail on (a KeyError) once reading began.
            raise UserError("the checkpoint's data position was saved by an earlier version of this code, which "
                            "read .txt files otherwise: resume with that version, or train anew in another "
                            "--out_dir")
        self.ds.load_state_dict(state["dataset"])
        self.buffer, self.rest = list(state["buffer"]), state["rest"]
        self.queue, self.open = list(state.get("queue", [])), state.get("open", False)  # older states lack them
        self.epoch, self.story, self.epoch_ids = state["epoch"], state["story"], state["epoch_ids"]


def training_batches(cfg, tokenizer, held_out, rank=0, world_size=1):
    """The training stream of cfg's dataset, without the held-out stories if held_out."""
    every = cfg["holdout_every"]
    return Batches(open_split(cfg["dataset"], "train", rank, world_size), tokenizer, cfg["batch_size"],
                   cfg["block_size"], is_line_based(cfg["dataset"]),
                   (lambda i: not is_held_out(i, every)) if held_out else None)


def validation_batches(cfg, tokenizer, rank=0, world_size=1):
    """(the EVAL_ITERS batches every evaluation uses, the same text each time; whether they were
    held out of the training split because the data has no validation split)."""
    lines, every = is_line_based(cfg["dataset"]), cfg["holdout_every"]
    ds, keep = open_split(cfg["dataset"], "validation", rank, world_size), None
    if ds is None:
        print(f"note: no validation split; every {every}th training story is held out to validate on")
        ds, keep = open_split(cfg["dataset"], "train", rank, world_size), lambda i: is_held_out(i, every)
    batches = Batches(ds, tokenizer, cfg["batch_size"], cfg["block_size"], lines, keep)
    try:
        return [next(batches) for _ in range(cfg["eval_iters"])], keep is not None
    except EmptyData:
        if keep is None:
            raise EmptyData("the validation split holds no text") from None
        print(f"note: fewer than {every} training stories: validating on the training text itself")
        batches = training_batches(cfg, tokenizer, False, rank, world_size)
        return [next(batches) for _ in range(cfg["eval_iters"])], False
    finally:
        batches.close()
