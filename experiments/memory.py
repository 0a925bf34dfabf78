"""Peak memory of training on large data, and how fast a resume deep into it finds its place:
100-step runs of train.py on 10 MB and 1 GB of generated parquet, and on .txt files of one line
that is one story, and the first batch after a resume 90% into the 1 GB file. Prints rows of
docs/speed.md's table (Linux and macOS: os.wait4 gives each run's own peak).

    python experiments/memory.py
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
from bench import HEADER, row  # noqa: E402
from data import Batches, open_split, vocabulary_stories  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def write_parquet(path, stories, size):
    """A parquet file of about size bytes of text, the stories repeated, in row groups as the hub's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    chunk = pa.table({"text": stories})
    chunk_bytes = sum(len(s) for s in stories)
    with pq.ParquetWriter(path, chunk.schema) as writer:
        for _ in range(max(1, size // chunk_bytes)):
            writer.write_table(chunk, row_group_size=1000)


def write_line(path, stories, size):
    """A .txt file of about size bytes without a line break or a separator: one line, one story."""
    chunk = " ".join(s.replace("\n", " ") for s in stories) + " "
    with open(path, "w") as f:
        for _ in range(max(1, size // len(chunk))):
            f.write(chunk)


def peak_rss(cfg):
    """Peak resident memory of a 100-step training run on 10 MB and on 1 GB of generated data: parquet,
    and a .txt file of one line that is one story."""
    stories = vocabulary_stories(cfg["dataset"], 10_000)
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("10 MB", 10 * 2**20), ("1 GB", 2**30)):
            parquet = Path(tmp) / f"{size}.parquet"
            write_parquet(parquet, stories, size)
            row(f"peak RSS of a 100-step run, {label} of data", f"{run_rss(parquet):,.0f} MB "
                f"({os.path.getsize(parquet) / 2**20:,.0f} MB parquet)")
        for label, size in (("10 MB", 10 * 2**20), ("1 GB", 2**30)):
            txt = Path(tmp) / f"{size}.txt"
            write_line(txt, stories, size)
            row(f"peak RSS of a 100-step run, {label} .txt without a line break", f"{run_rss(txt):,.0f} MB "
                "(one line, one story)")
        row("first batch after resuming 90% into the 1 GB file", f"{resume_seconds(parquet, 0.9):.2f} s "
            f"(at its start: {resume_seconds(parquet, 0.0):.2f} s)")


def run_rss(data):
    """Peak resident memory, in MB, of a 100-step run of train.py on data."""
    log = data.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--dataset={data}", f"--out_dir={data}.out",
                                 "--max_steps=100", "--log_interval=100", "--eval_interval=100",
                                 "--eval_chars=50000"], stdout=f, stderr=subprocess.STDOUT)
        # wait4 gives this run's own peak; RUSAGE_CHILDREN would give the largest of all runs so far.
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(log.read_text())
    return usage.ru_maxrss / 1024


def resume_seconds(data, fraction):
    """Seconds from loading a data position that far into the file to the first batch."""
    import pyarrow.parquet as pq
    tokenizer = Tokenizer.from_texts(["abc"])
    ds = open_split(str(data), "train")
    rows = iter(ds)
    for _ in range(int(pq.ParquetFile(data).metadata.num_rows * fraction)):
        next(rows)
    state = Batches(ds, tokenizer, 64, 128).state_dict()  # the stream's position; nothing read into the loader
    rows.close()
    start = time.perf_counter()
    batches = Batches(open_split(str(data), "train"), tokenizer, 64, 128)
    batches.load_state_dict(state)
    next(batches)
    batches.close()
    return time.perf_counter() - start


if __name__ == "__main__":
    peak_rss(config.load(sys.argv[1:]))
