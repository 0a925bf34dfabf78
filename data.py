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
    """One split of dataset as a streaming datasets.IterableDataset, or None if it has none such.

    Under torchrun each rank streams its own share (see split_dataset_by_node): whole shards (the
    row groups of parquet files, whole files of other formats) when their number divides evenly
    among the ranks, else every world_size-th story."""
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


def stories(ds, lines, limit=float("inf")):
    """The stories of a split, one after another. Once limit characters have been read, the story
    being read ends there, and so does the split."""
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
    """The first n stories of a split, to build the vocabulary from: those in its first
    VOCABULARY_TEXT characters, so that a text which never ends a story is not read whole."""
    with closing(stories(ds, lines, VOCABULARY_TEXT)) as it:
        return list(islice(it, n))


def vocabulary_stories(dataset, n):
    """The first n stories of dataset's train split: the text the vocabulary is built from. Every
    rank reads the same ones, so every rank builds the same vocabulary."""
    ds = open_split(dataset, "train")
    if ds is None:
        raise UserError(f"{dataset} has no train split")
    found = first_stories(ds, is_line_based(dataset), n)
    if not found:
        raise UserError(f"{dataset} holds no text in its train split: check that it is the right data")
    return found


def pair_counts(texts, tokenizer, block_size):
    """How often each pair of ids follows in texts as training reads them (EOS story EOS story ...),
    as a (vocab_size + 1, vocab_size) table indexed by (previous + 1, current), model.pair_index's
    counts; the first row, previous none, counts a window's first id: one id in block_size."""
    ids = torch.tensor([i for text in texts for i in [EOS, *tokenizer.encode(text)]])
    v = tokenizer.vocab_size
    counts = torch.bincount((ids[:-1] + 1) * v + ids[1:], minlength=(v + 1) * v).view(v + 1, v).double()
    counts[0] = counts.sum(0) / block_size
    return counts


def is_held_out(i, every):
    """Whether the i-th story of a training split is held out to validate on, where the data has
    no validation split: every every-th story, so the held-out text is spread across the split."""
    return i % every == every - 1


class EmptyData(UserError):
    pass


class RowReader:
    """The rows of a split, epoch after epoch: shuffle rows at a time (fewer once they hold
    SHUFFLE_TEXT characters), handed on in a random order drawn anew for each run of rows in each
    epoch from seed, or with shuffle at most 1 one at a time in the stored order.

    The state is the dataset's own stream position (its state_dict: a shard and a row within it;
    and the number of shards) at the first of the rows in hand, their order, how many of them were
    handed on, how many runs of rows this epoch has read, and the epoch.
    """

    def __init__(self, ds, shuffle, seed):
        self.ds, self.shuffle, self.seed = ds, max(shuffle, 1), seed
        self.start = ds.state_dict()  # where every epoch begins
        self.rows = None
        # Positions are kept here, as ds.state_dict() tells one only once a row is read from it: chunk_at,
        # where the rows in hand begin; at, past the rows read. Then the rows in hand (a resume has their
        # order but not yet the rows), their order, how many were handed on, and how many runs of rows
        # this epoch has read.
        self.at = self.chunk_at = self.start
        self.chunk, self.order, self.taken, self.chunks, self.epoch = [], [], 0, 0, 0

    def next_row(self):
        """The next row, or None at the end of the data, after which the next epoch begins."""
        if len(self.chunk) < len(self.order):  # resumed: the rows in hand when the state was saved, read again
            self.chunk = self._read_rows(len(self.order))
        if self.taken == len(self.order):
            self._read_chunk()
        if not self.order:
            self.rows, self.chunks, self.epoch = None, 0, self.epoch + 1
            self.ds.load_state_dict(self.start)
            self.at = self.chunk_at = self.start
            return None
        i = self.order[self.taken]
        row, self.chunk[i] = self.chunk[i], None  # handed on: no longer held here
        self.taken += 1
        return row

    def _read_chunk(self):
        """The next run of rows, and the order to hand them on in."""
        self.chunk_at = self.at
        self.chunk = self._read_rows(self.shuffle, SHUFFLE_TEXT)
        n, self.taken = len(self.chunk), 0
        self.order = list(range(n))
        if self.shuffle > 1 and n > 1:
            # A generator of its own, seeded by the run's seed, the epoch and the run of rows: the order
            # depends on nothing else (not on the global random state that training draws from).
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.chunks) % 2**63)
            self.order = torch.randperm(n, generator=g).tolist()
        self.chunks += 1

    def _read_rows(self, n, limit=float("inf")):
        """Up to n rows from position self.at on (fewer at the end of the data or at limit characters);
        self.at then moves past them."""
        if self.rows is None:
            self.rows = iter(self.ds)
        rows, size = [], 0
        try:
            while len(rows) < n and size < limit:
                row = next(self.rows, None)
                if row is None:
                    break
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
        # A state saved before rows were read ahead is the position after the row in hand: no rows to read again.
        self.at = self.chunk_at = state["dataset"]
        self.order, self.taken, self.chunks = list(state.get("order", [])), state.get("taken", 0), state.get("chunks", 0)
        self.chunk = []  # read again when first needed
        self.epoch = state["epoch"]


class StoryReader:
    """The text of the stories in rows, in pieces (text, starts): starts where a piece begins a
    story. keep(i), if given, says whether the i-th story of an epoch is handed on.

    Text is taken as it is needed, PIECE characters at most at a time: a long row waits in the
    queue in pieces, and a story longer than two windows (which cannot fit in one) is handed on
    as it is read rather than once it ends. So memory and the state stay small whatever the
    length of a line or a story; only a row, which datasets reads whole, is held whole.

    The state is the pieces in the queue, the held-back end of the story being read, whether a
    story is partly handed on (open), and how many stories this epoch has begun.
    """

    def __init__(self, rows, lines, keep, window):
        self.rows, self.lines, self.keep, self.window = rows, lines, keep, window
        self.queue, self.rest, self.open, self.story = [], "", False, 0

    def read(self):
        """(the pieces of the kept stories that the next piece of text ends or cuts off, whether the
        data ended there)."""
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
        """The stories that text ends, and the start of the one it leaves unfinished once that is
        too long for a window, so that what is held back stays short."""
        *stories, self.rest = (self.rest + text).split(SEPARATOR)
        pieces = []
        for story in stories:
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
        """[(text, starts)] for a whole story or a piece of one (ends: the story ends with it), or []
        where it is empty or its story is not kept."""
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
    """Ids into batches of batch_size windows of `window` ids, every id in exactly one window. A
    story short enough to fit in a window is never cut in two: if it would be, the rest of the
    window is padding and the story starts the next one, so short texts are learned whole from
    their first character (padding is never a target).

    The state is the ids in the buffer, and how many were added this epoch.
    """

    def __init__(self, batch_size, window):
        self.size = (batch_size, window)
        self.buffer, self.epoch_ids = [], 0

    def full(self):
        return len(self.buffer) >= self.size[0] * self.size[1]

    def add(self, ids, starts):
        """Add the ids of a piece of a story, after EOS where it starts one."""
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
        """(x, y): the next batch; short where the buffer is (the last windows of a once pass), the last
        window padded."""
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
    """Endless (x, y) batches from one split, resumable: the stories joined as EOS story EOS story
    ..., packed into windows of block_size + 1 ids. At the end of the data the stream starts over:
    the next epoch; or, with once=True, the last batch is what is left and the iteration ends.
    keep(i), if given, says whether the i-th story of an epoch is used (a held-out validation set
    takes the rest). With shuffle, rows are whole stories, as in the hub's layout, and keep must be
    None: a held-out story is counted in the stored order.

    The state is its parts' states together, one flat dict.
    """

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
    """(tokens, characters) among the targets y: padding is neither, and each token counts the
    characters it stands for (char_lengths, the tokenizer's char_lengths as a tensor, made once by
    the caller), so losses can be given per character."""
    real = y[y != PAD]
    return real.numel(), int(char_lengths[real].sum())


def training_batches(cfg, tokenizer, held_out, rank=0, world_size=1):
    """The training stream of cfg's dataset, without the held-out stories if held_out; shuffled SHUFFLE
    rows at a time where rows are stories (not a .txt file's lines) and none are held out."""
    every, lines = cfg["holdout_every"], is_line_based(cfg["dataset"])
    shuffle = 0 if held_out or lines else cfg["shuffle"]
    if shuffle != cfg["shuffle"] and cfg["shuffle"] > 1:
        print(f"note: training reads the stories in their stored order: SHUFFLE takes whole stories, "
              f"{'not the lines of a .txt file' if lines else 'none of them held out'}")
    return Batches(open_split(cfg["dataset"], "train", rank, world_size), tokenizer, cfg["batch_size"],
                   cfg["block_size"], lines, (lambda i: not is_held_out(i, every)) if held_out else None,
                   shuffle=shuffle, seed=cfg["seed"])


def validation_batches(cfg, tokenizer, rank=0, world_size=1):
    """(the batches every evaluation reads, the same text each time, every character of it once;
    whether that text was held out of the training split; what it is, in words).

    The validation text is the whole validation split where it holds at most EVAL_CHARS characters
    (0: no limit). A larger split is sampled across its whole length, not just its start, which
    can be easier or harder than the rest: every k-th story, k the smallest power of two that
    brings it within EVAL_CHARS (so at least half of EVAL_CHARS). Without a validation split it is
    the held-out training stories, the first EVAL_CHARS characters of them, read from the start
    of the split so that a large training split is not read through before the first step."""
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
    """(every k-th of stories, k): k the smallest power of two that keeps their characters within
    limit. In one pass, holding at most limit characters."""
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
    """The first stories of stories that fit within limit characters together (at least one)."""
    kept, size = [], 0
    with closing(stories):
        for story in stories:
            if kept and size + len(story) > limit:
                break
            kept.append(story)
            size += len(story)
    return kept
