"""The data: a dataset name in, resumable batches of character ids out.

    ds = open_split("roneneldan/TinyStories", "train")      # or a local folder, .parquet, .jsonl, .txt
    batches = Batches(ds, tokenizer, batch_size=64, block_size=128)
    x, y = next(batches)                                     # (64, 128) inputs and next-character targets

Everything is streamed, and text is read from a .txt file and turned into ids at most PIECE characters at
a time, so no split, line or story is held whole. Batches' state goes into every checkpoint, so a resumed run
reads on exactly where the stopped one was. docs/data.md tells the whole story.
"""

from contextlib import closing
from itertools import islice
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
HERE = Path(__file__).parent
VOCABULARY_TEXT = 1 << 24  # characters: the vocabulary's stories are cut off after this much text
SHUFFLE_TEXT = 1 << 24  # characters: the most text that Batches reads ahead to shuffle


def open_split(dataset, split, rank=0, world_size=1):
    """One split of dataset as a streaming datasets.IterableDataset, or None if it has none such. Each rank
    streams its own share: whole shards where they divide evenly among the ranks, else every world_size-th
    story."""
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()  # "Repo card metadata block was not found"
    path = Path(dataset).expanduser()
    if not path.exists() and (HERE / path).exists():  # the project's own slice, from any working folder
        path = HERE / path
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
    # A shard per parquet row group, not per file: pyarrow's threads read and decode all the rest of a file ahead
    # once its scan begins, whatever batch_readahead says (1 GB held 2.8 GB); and a resume starts at its row group.
    try:
        ds = ds.reshard()  # reads the footer of every parquet file, from the hub too
    except OSError as e:  # datasets' ConnectionError once it has retried, or the hub's HTTP errors
        raise UserError(f"cannot read the files of {dataset} ({type(e).__name__}: {e}): check that they can "
                        "be read, or pass --dataset=<a local copy>") from e
    if world_size > 1:
        ds = datasets.distributed.split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


def read_txt(path):
    """The rows of a .txt file: its lines, in pieces of PIECE characters where longer (datasets' text builder
    reads a line whole), \\r\\n and \\r read as \\n as that builder reads them."""
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
    """The text of a row (a null row is an empty one), ending its last story unless it is a .txt file's line."""
    if "text" not in row:
        raise UserError(f"the data has no 'text' column (its columns: {', '.join(row)}): "
                        "rename the column that holds the stories to 'text'")
    return (row["text"] or "") + ("" if lines else SEPARATOR)


def stories(ds, lines, limit=float("inf")):
    """The stories of a split; once limit characters are read, the story being read ends there, and so does it."""
    rows, texts, size = iter(ds), [], 0
    try:
        for row in rows:
            text = row_text(row, lines)
            size += len(text)
            if SEPARATOR in text:  # what was read is joined only when a story ends: once per story
                *complete, rest = ("".join(texts) + text).split(SEPARATOR)
                yield from (s.strip() for s in complete if s.strip())
                texts = [rest]
            else:
                texts.append(text)
            if size >= limit:
                break
        rest = "".join(texts).strip()
        if rest:
            yield rest
    finally:
        rows.close()  # a stream left open complains at exit


def first_stories(ds, lines, n):
    """The first n stories of a split's first VOCABULARY_TEXT characters, so that a text without separators
    is not read whole."""
    with closing(stories(ds, lines, VOCABULARY_TEXT)) as it:
        return list(islice(it, n))


def vocabulary_stories(dataset, n):
    """The first n stories of dataset's train split, the vocabulary's text: the same on every rank."""
    ds = open_split(dataset, "train")
    if ds is None:
        raise UserError(f"{dataset} has no train split")
    found = first_stories(ds, is_line_based(dataset), n)
    if not found:
        raise UserError(f"{dataset} holds no text in its train split: check that it is the right data")
    return found


def pair_counts(texts, tokenizer, block_size):
    """How often each id follows each other in texts read as training reads them (EOS story EOS ...):
    model.pair_index's (vocab_size + 1, vocab_size) table by (previous + 1, current), whose first row,
    previous none, counts a window's first id, one in block_size."""
    ids = torch.tensor([i for text in texts for i in [EOS, *tokenizer.encode(text)]])
    v = tokenizer.vocab_size
    counts = torch.bincount((ids[:-1] + 1) * v + ids[1:], minlength=(v + 1) * v).view(v + 1, v).double()
    counts[0] = counts.sum(0) / block_size
    return counts


def is_held_out(i, every):
    """Whether the i-th training story is held out to validate on where there is no validation split: every
    every-th one, so the held-out text is spread across the split."""
    return i % every == every - 1


class EmptyData(UserError):
    pass


class RowReader:
    """The rows of a split, epoch after epoch, in runs of shuffle rows (fewer where they reach SHUFFLE_TEXT
    characters), each handed on in a random order of its own drawn from seed, the epoch and the run; with
    shuffle at most 1, a row at a time as stored. The state: the stream's position at the first row in hand
    and its number of shards, the order of the rows in hand and how many were handed on, the runs this epoch
    has read, the epoch."""

    def __init__(self, ds, shuffle, seed):
        self.ds, self.shuffle, self.seed = ds, max(shuffle, 1), seed
        self.start = ds.state_dict()  # where every epoch begins
        self.rows = None
        # ds.state_dict() tells a position only once a row is read, so two are kept: where the rows in
        # hand (chunk) begin, and past the rows read. A resume has their order, and reads them again.
        self.at = self.chunk_at = self.start
        self.chunk, self.order, self.taken, self.chunks, self.epoch = [], [], 0, 0, 0

    def next_row(self):
        """The next row, or None at the end of the data, after which the next epoch begins."""
        if len(self.chunk) < len(self.order):  # resumed
            self.chunk = self._read_rows(len(self.order))
        if self.taken == len(self.order):
            self._read_run()
        if not self.order:
            self.rows, self.chunks, self.epoch = None, 0, self.epoch + 1
            self.ds.load_state_dict(self.start)
            self.at = self.chunk_at = self.start
            return None
        i = self.order[self.taken]
        row, self.chunk[i] = self.chunk[i], None  # handed on: no longer held here
        self.taken += 1
        return row

    def _read_run(self):
        self.chunk_at, self.chunk, self.taken = self.at, self._read_rows(self.shuffle, SHUFFLE_TEXT), 0
        self.order = list(range(len(self.chunk)))
        if self.shuffle > 1 and len(self.chunk) > 1:  # a generator of its own: not training's random state
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.chunks) % 2**63)
            self.order = torch.randperm(len(self.chunk), generator=g).tolist()
        self.chunks += 1

    def _read_rows(self, n, limit=float("inf")):
        """Up to n rows from self.at on, fewer at the end of the data or at limit characters."""
        if self.rows is None:
            self.rows = iter(self.ds)
        rows, size = [], 0
        try:
            while len(rows) < n and size < limit and (row := next(self.rows, None)) is not None:
                rows.append(row)
                size += len(row.get("text") or "")
        except OSError as e:  # datasets' ConnectionError once it has retried, or the hub's HTTP errors
            raise UserError(f"the data stopped coming ({type(e).__name__}: {e}); the checkpoints saved so far are "
                            "intact: run the same command again to resume once the data can be read") from e
        if rows:
            self.at = self.ds.state_dict()
        return rows

    def close(self):
        if self.rows is not None:
            self.rows.close()

    def state_dict(self):
        return {"dataset": self.chunk_at, "order": list(self.order), "taken": self.taken, "chunks": self.chunks,
                "shards": self.ds.num_shards, "epoch": self.epoch}

    def load_state_dict(self, state):
        # A position is a shard and a row within it: in other shards it would point elsewhere without
        # a word. Positions saved before shards were row groups have no count.
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
        self.at = self.chunk_at = state["dataset"]
        # A state saved before rows were read ahead is the position after the row in hand: none to read again.
        self.order, self.taken, self.chunks = list(state.get("order", [])), state.get("taken", 0), state.get("chunks", 0)
        self.chunk, self.epoch = [], state["epoch"]  # the rows in hand: read again when first needed


class StoryReader:
    """The stories in rows as pieces of text, each with whether it starts a story; keep(i), if given, says
    whether the i-th story of an epoch is handed on. A row waits in the queue in pieces of PIECE characters,
    and of a story longer than two windows (which cannot fit in one) at most a window is held back, so memory
    and the state stay small. The state: the queue, the held-back text, whether a story is partly handed on
    (open), and the stories this epoch has begun."""

    def __init__(self, rows, lines, keep, window):
        self.rows, self.lines, self.keep, self.window = rows, lines, keep, window
        self.queue, self.rest, self.open, self.story = [], "", False, 0

    def read(self):
        """([(text, starts)] that the next piece of a row completes, whether the data ended there)."""
        if self.queue:
            return self._split(self.queue.pop(0)), False
        row = self.rows.next_row()
        if row is None:  # the end of the data: its last story ends
            pieces = self._piece(self.rest, ends=True)
            self.rest, self.story = "", 0
            return pieces, True
        text = row_text(row, self.lines)
        self.queue = [text[i:i + PIECE] for i in range(0, len(text), PIECE)]
        return [], False

    def _split(self, text):
        *ended, self.rest = (self.rest + text).split(SEPARATOR)
        pieces = []
        for story in ended:
            pieces += self._piece(story, ends=True)
        if not self.open:
            self.rest = self.rest.lstrip()
        if len(self.rest) > 2 * self.window:
            # Held back: what may begin a separator, and whitespace the story may end with (and so lose),
            # up to a window of it.
            cut = max(len(self.rest[:1 - len(SEPARATOR)].rstrip()), len(self.rest) - self.window)
            pieces += self._piece(self.rest[:cut], ends=False)
            self.rest = self.rest[cut:]
        return pieces

    def _piece(self, text, ends):
        """[(text, starts)], or [] where its story is empty or not kept; ends: the story ends here."""
        text = text.rstrip() if ends else text
        starts = not self.open
        if starts:
            text = text.lstrip()
            if not text:
                return []
            self.story += 1
        self.open = not ends
        return [(text, starts)] if self.keep is None or self.keep(self.story - 1) else []

    def state_dict(self):
        return {"queue": list(self.queue), "rest": self.rest, "open": self.open, "story": self.story}

    def load_state_dict(self, state):
        self.rest, self.story = state["rest"], state["story"]
        self.queue, self.open = list(state.get("queue", [])), state.get("open", False)  # older states lack them


class WindowPacker:
    """Ids into batches of batch_size windows of `window` ids, each id in one window. A story that fits in a
    window is never cut in two: the rest of the window is padding instead, so short texts are learned whole
    from their first character. The state: the ids waiting, and how many this epoch added (none: no text)."""

    def __init__(self, batch_size, window):
        self.size = (batch_size, window)
        self.buffer, self.epoch_ids = [], 0

    def full(self):
        return len(self.buffer) >= self.size[0] * self.size[1]

    def add(self, ids, starts):
        if starts:
            ids = [EOS, *ids]
            used = len(self.buffer) % self.size[1]  # the buffer starts at a window boundary
            if len(ids) <= self.size[1] < used + len(ids):
                self.buffer.extend([PAD] * (self.size[1] - used))
        self.buffer.extend(ids)
        self.epoch_ids += len(ids)

    def end_epoch(self):
        if self.epoch_ids == 0:
            raise EmptyData("the data holds no text to train on")
        self.epoch_ids = 0

    def take(self):
        """(x, y), fewer windows where fewer wait (the end of a once pass), the last one padded."""
        if not self.buffer:
            raise StopIteration
        n = min(self.size[0] * self.size[1], len(self.buffer) + -len(self.buffer) % self.size[1])
        self.buffer.extend([PAD] * (n - len(self.buffer)))
        chunk = torch.tensor(self.buffer[:n], dtype=torch.long).view(-1, self.size[1])
        del self.buffer[:n]
        return chunk[:, :-1].clamp(min=EOS), chunk[:, 1:]  # padding: read as EOS, never a target

    def state_dict(self):
        return {"buffer": list(self.buffer), "epoch_ids": self.epoch_ids}

    def load_state_dict(self, state):
        self.buffer, self.epoch_ids = list(state["buffer"]), state["epoch_ids"]


class Batches:
    """Endless (x, y) batches from one split, the stories joined as EOS story EOS story ... in windows of
    block_size + 1 ids; with once=True, one pass, its last batch what is left. keep(i) says whether the i-th
    story of an epoch is used; with shuffle, rows are whole stories (the hub's layout) and keep must be None.
    The state is the parts' states in one flat dict, as checkpoints have always held it."""

    def __init__(self, ds, tokenizer, batch_size, block_size, lines=False, keep=None, once=False, shuffle=0, seed=0):
        assert shuffle <= 1 or keep is None, "a held-out story is counted in the stored order"
        self.tokenizer, self.once = tokenizer, once
        self.rows = RowReader(ds, shuffle, seed)
        self.stories = StoryReader(self.rows, lines, keep, block_size + 1)
        self.windows = WindowPacker(batch_size, block_size + 1)

    def __iter__(self):
        return self

    def __next__(self):
        while not self.windows.full() and not (self.once and self.rows.epoch):
            pieces, ended = self.stories.read()
            for text, starts in pieces:
                self.windows.add(self.tokenizer.encode(text), starts)
            if ended:
                self.windows.end_epoch()
        return self.windows.take()

    def close(self):
        self.rows.close()

    def state_dict(self):
        return {**self.rows.state_dict(), **self.stories.state_dict(), **self.windows.state_dict()}

    def load_state_dict(self, state):
        for part in (self.rows, self.stories, self.windows):
            part.load_state_dict(state)


def target_counts(y, char_lengths):
    """(tokens, characters) among the targets y, padding neither, each token its characters (char_lengths: the
    tokenizer's, as a tensor), so losses can be given per character."""
    real = y[y != PAD]
    return real.numel(), int(char_lengths[real].sum())


def training_batches(cfg, tokenizer, held_out, rank=0, world_size=1):
    """The training stream of cfg's dataset, without the held-out stories if held_out; shuffled where rows are
    stories (not a .txt file's lines) and none are held out."""
    every, lines = cfg["holdout_every"], is_line_based(cfg["dataset"])
    shuffle = 0 if held_out or lines else cfg["shuffle"]
    if shuffle != cfg["shuffle"] and cfg["shuffle"] > 1:
        print(f"note: training reads the stories in their stored order: SHUFFLE takes whole stories, "
              f"{'not the lines of a .txt file' if lines else 'none of them held out'}")
    return Batches(open_split(cfg["dataset"], "train", rank, world_size), tokenizer, cfg["batch_size"],
                   cfg["block_size"], lines, (lambda i: not is_held_out(i, every)) if held_out else None,
                   shuffle=shuffle, seed=cfg["seed"])


def validation_batches(cfg, tokenizer, rank=0, world_size=1):
    """(the batches every evaluation reads, the same text each time, every character once; whether it was held out
    of the training split; what it is, in words). That is the validation split, sampled across its length where it
    holds over EVAL_CHARS characters, as its start may be easier or harder than the rest; else the held-out
    training stories at the start of the split, so that a large one is not read through before the first step."""
    lines, every, limit = is_line_based(cfg["dataset"]), cfg["holdout_every"], cfg["eval_chars"] or float("inf")
    ds, held_out = open_split(cfg["dataset"], "validation", rank, world_size), False
    if ds is not None:
        text, k = spread_sample(stories(ds, lines), limit)
        if not text:
            raise EmptyData("the validation split holds no text")
        about = "the whole validation split" if k == 1 else f"every {k}th story of the validation split"
    else:
        print(f"note: no validation split; every {every}th training story is held out to validate on")
        ds, held_out = open_split(cfg["dataset"], "train", rank, world_size), True
        text = first_chars((s for i, s in enumerate(stories(ds, lines)) if is_held_out(i, every)), limit)
        about = "held-out training stories"
        if not text:
            print(f"note: fewer than {every} training stories: validating on the training text itself")
            ds, held_out = open_split(cfg["dataset"], "train", rank, world_size), False
            text, about = first_chars(stories(ds, lines), limit), "the training text"
    ds = datasets.Dataset.from_dict({"text": text}).to_iterable_dataset()  # in memory, at most EVAL_CHARS
    return list(Batches(ds, tokenizer, cfg["batch_size"], cfg["block_size"], once=True)), held_out, about


def spread_sample(stories, limit):
    """(every k-th of stories, k), k the smallest power of two that keeps them within limit characters: in
    one pass, holding at most limit characters."""
    kept, every, size = [], 1, 0
    for i, story in enumerate(stories):
        if i % every == 0:
            kept.append(story)
            size += len(story)
            while size > limit and len(kept) > 1:  # drop every other story kept: they are then every 2k-th
                kept, every = kept[::2], every * 2
                size = sum(map(len, kept))
    return kept, every


def first_chars(stories, limit):
    """The first of stories that fit within limit characters together (at least one)."""
    kept, size = [], 0
    with closing(stories):
        for story in stories:
            if kept and size + len(story) > limit:
                break
            kept.append(story)
            size += len(story)
    return kept
