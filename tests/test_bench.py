"""bench.py: what it measures is named as the speed table of docs/speed.md names it."""

import re
from pathlib import Path

import bench

ROOT = Path(__file__).resolve().parent.parent


def table_rows(text):
    """The first cells of the rows of markdown tables in text."""
    return [m.group(1).strip() for m in re.finditer(r"^\| ([^|]+?) \|", text, re.MULTILINE)]


def test_the_benchmark_names_its_rows_as_the_docs_speed_table_does(stories_dir, capsys):
    bench.main([f"--dataset={stories_dir}", "--device=cpu", "--n_embd=32", "--n_head=2", "--block_size=32",
                "--batch_size=8"])
    printed = table_rows(capsys.readouterr().out)
    assert len(printed) == 5
    assert set(printed) <= set(table_rows((ROOT / "docs" / "speed.md").read_text()))
