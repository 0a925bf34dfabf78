"""Streaming and packing: stories become EOS-joined windows, nothing lost, nothing duplicated,
through a resume and across epochs; every supported kind of local data."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import config
import data
from config import UserError
from conftest import make_stories
from data import PAD, SEPARATOR, Batches, EmptyData, first_stories, is_line_based, open_split, validation_batches
from tokenizer import EOS, Tokenizer


def windows(batches, n):
    """The ids of the next n batches, window after window, as one list."""
    ids = []
    for _ in range(n):
        x, y = next(batches)
        assert (x[:, 1:] == y[:, :-1]).all()  # y is x shifted by one
        for xr, yr in zip(x.tolist(), y.tolist()):
            ids += [i for i in xr[:1] + yr if i != PAD]
    return ids


def stream(stories, tok):
    """EOS story EOS story ... as ids."""
    ids = []
    for story in stories:
        ids += [EOS] + tok.encode(story)
    return ids


def test_packing_keeps_every_character_once_across_windows(stories_dir):
    stories = make_stories(300, 0)
    tok = Tokenizer.from_texts(stories)
    batches = Batches(open_split(str(stories_dir), "train"), tok, batch_size=4, block_size=50)
    ids = windows(batches, 20)
    assert ids == stream(stories, tok)[:len(ids)]


def test_packing_keeps_every_character_once_across_a_resume(stories_dir):
    stories = make_stories(300, 0)
    tok = Tokenizer.from_texts(stories)
    first = Batches(open_split(str(stories_dir), "train"), tok, batch_size=3, block_size=70)
    ids = windows(first, 7)
    state = first.state_dict()
    first.close()
    resumed = Batches(open_split(str(stories_dir), "train"), tok, batch_size=3, block_size=70)
    resumed.load_state_dict(state)
    ids += windows(resumed, 9)
    assert ids == stream(stories, tok)[:len(ids)]


def test_the_stream_starts_over_at_the_end_of_the_data(tmp_path):
    stories = make_stories(5, 0)
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    tok = Tokenizer.from_texts(stories)
    batches = Batches(open_split(str(path), "train"), tok, batch_size=2, block_size=100)
    one_epoch = stream(stories, tok)
    ids = windows(batches, 12)  # 2,424 ids: more than two epochs of these five stories
    assert len(ids) > 2 * len(one_epoch)
    assert ids == (one_epoch * 3)[:len(ids)]
    assert batches.rows.epoch == 2


def test_a_resume_across_an_epoch_boundary_continues_the_stream(tmp_path):
    stories = make_stories(3, 0)
    path = tmp_path / "few.parquet"
    pq.write_table(pa.table({"text": stories}), path)
    tok = Tokenizer.from_texts(stories)
    first = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=100)
    ids = windows(first, 7)
    resumed = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=100)
    resumed.load_state_dict(first.state_dict())
    ids += windows(resumed, 7)
    assert ids == (stream(stories, tok) * 10)[:len(ids)]


def epochs_of_stories(ids, n):
    """The stories in ids (EOS story EOS story ...), as tuples of ids, in epochs of n stories."""
    found = []
    for i in ids:
        if i == EOS:
            found.append([])
        else:
            found[-1].append(i)
    found = [tuple(s) for s in found[:len(found) // n * n]]
    return [found[i:i + n] for i in range(0, len(found), n)]


def test_shuffled_batches_take_every_story_once_an_epoch_in_a_new_order(stories_dir):
    stories = make_stories(300, 0)
    tok = Tokenizer.from_texts(stories)
    batches = Batches(open_split(str(stories_dir), "train"), tok, batch_size=8, block_size=100, shuffle=64)
    epochs = epochs_of_stories(windows(batches, 1300), len(stories))[:3]
    stored = [tuple(tok.encode(s)) for s in stories]
    assert len(epochs) == 3
    assert all(sorted(epoch) == sorted(stored) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs} | {tuple(stored)}) == 4  # each its own order
    # in runs of 64 stories: the first 64 of an epoch are the first 64 stored, in another order
    assert all(sorted(epoch[:64]) == sorted(stored[:64]) for epoch in epochs)


def test_the_shuffled_order_is_the_seeds(stories_dir):
    tok = Tokenizer.from_texts(make_stories(300, 0))

    def first(seed):
        return windows(Batches(open_split(str(stories_dir), "train"), tok, 4, 100, shuffle=64, seed=seed), 30)
    assert first(1) == first(1) != first(2)


def test_a_shuffled_stream_resumes_exactly(stories_dir):
    tok = Tokenizer.from_texts(make_stories(300, 0))

    def shuffled():
        return Batches(open_split(str(stories_dir), "train"), tok, batch_size=4, block_size=100, shuffle=64)
    whole = windows(shuffled(), 700)  # past the end of the first epoch
    for stop in (1, 37, 200, 633):  # within the first run of rows, later ones, the second epoch
        first = shuffled()
        ids = windows(first, stop)
        resumed = shuffled()
        resumed.load_state_dict(first.state_dict())
        ids += windows(resumed, 700 - stop)
        assert ids == whole, f"resumed after {stop} batches"


def test_the_saved_state_is_one_flat_dict_with_the_keys_checkpoints_hold(stories_dir):
    batches = Batches(open_split(str(stories_dir), "train"), Tokenizer.from_texts(make_stories(300, 0)), 4, 100,
                      shuffle=64)
    windows(batches, 37)  # mid-epoch, within a run of rows
    assert set(batches.state_dict()) == {"dataset", "order", "taken", "chunks", "shards", "buffer", "queue", "rest",
                                         "open", "epoch", "story", "epoch_ids"}


def test_a_loaded_state_is_saved_again_unchanged(stories_dir):
    tok = Tokenizer.from_texts(make_stories(300, 0))
    first = Batches(open_split(str(stories_dir), "train"), tok, batch_size=4, block_size=100, shuffle=64)
    windows(first, 37)
    resumed = Batches(open_split(str(stories_dir), "train"), tok, batch_size=4, block_size=100, shuffle=64)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()


def test_training_reads_held_out_data_and_txt_lines_in_their_stored_order(stories_dir, tmp_path, capsys):
    tok = Tokenizer.from_texts(make_stories(300, 0))
    cfg = {"dataset": str(stories_dir), "holdout_every": 20, "shuffle": 64, "seed": 0, "batch_size": 4,
           "block_size": 100}
    assert data.training_batches(cfg, tok, held_out=False).rows.shuffle == 64
    assert data.training_batches(cfg, tok, held_out=True).rows.shuffle == 1
    assert "none of them held out" in capsys.readouterr().out
    (tmp_path / "lines.txt").write_text("One line.\nAnother line.\n")
    assert data.training_batches({**cfg, "dataset": str(tmp_path / "lines.txt")}, tok, held_out=True).rows.shuffle == 1
    assert "not the lines of a .txt file" in capsys.readouterr().out


def test_a_position_saved_between_the_end_of_the_data_and_the_next_row_resumes_at_the_next_epoch(tmp_path):
    text = "Q: Where does Zoe live? A: In Geneva, by the lake."  # one row: every other batch ends an epoch
    path = tmp_path / "one.txt"
    path.write_text(text)
    tok = Tokenizer.from_texts([text])
    for stop in range(1, 6):
        first = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=32, lines=True)
        ids = windows(first, stop)
        resumed = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=32, lines=True)
        resumed.load_state_dict(first.state_dict())
        ids += windows(resumed, 3)
        assert ids == (stream([text], tok) * 10)[:len(ids)], f"resumed after {stop} batches"


def test_a_txt_file_is_one_story_without_separators(tmp_path):
    text = "Once upon a time there was a frog.\n\nThe frog was green.\n"
    path = tmp_path / "one.txt"
    path.write_text(text)
    assert is_line_based(str(path))
    assert first_stories(open_split(str(path), "train"), True, 10) == [text.strip()]


def test_a_txt_file_splits_at_endoftext_separators(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("First story.\nLine two.\n<|endoftext|>\nSecond story.\n<|endoftext|>Third.")
    stories = first_stories(open_split(str(path), "train"), True, 10)
    assert stories == ["First story.\nLine two.", "Second story.", "Third."]


def test_a_story_cut_between_lines_survives_a_resume(tmp_path):
    stories = ["Alpha line one.\nAlpha line two.", "Beta line one.\nBeta two.\nBeta three."]
    path = tmp_path / "lines.txt"
    path.write_text("\n<|endoftext|>\n".join(stories * 20))
    tok = Tokenizer.from_texts(stories)
    first = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=8, lines=True)
    ids = windows(first, 5)
    assert first.stories.open and first.stories.rest  # a story is partly in the buffer, partly held back
    resumed = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=8, lines=True)
    resumed.load_state_dict(first.state_dict())
    ids += windows(resumed, 30)
    assert ids == stream(stories * 20, tok)[:len(ids)]


def test_a_line_without_a_line_break_is_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE", 100)
    text = SEPARATOR.join(make_stories(20, 0)).replace("\n", " ")  # about 4,000 characters, one line
    (tmp_path / "one.txt").write_text(text)
    rows = [row["text"] for row in open_split(str(tmp_path / "one.txt"), "train")]
    assert max(map(len, rows)) == 100 and "".join(rows) == text


def packed_with_bounded_state(batches, n):
    """The ids of n batches, checking after each that what waits to be batched stays small."""
    ids = []
    for _ in range(n):
        ids += windows(batches, 1)
        batch_size, window = batches.windows.size
        assert len(batches.windows.buffer) <= batch_size * window + data.PIECE + 2 * window
        assert len(batches.stories.rest) <= 2 * window
    return ids


def test_a_story_longer_than_a_piece_is_packed_exactly_from_a_bounded_state(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE", 100)
    stories = ["x" * 50, "\n".join(make_stories(200, 0)), "y" * 50, "z" * 50]  # the second: 40,000 characters
    path = tmp_path / "long.txt"
    path.write_text(f"\n{SEPARATOR}\n".join(stories))
    tok = Tokenizer.from_texts(stories)
    ids = packed_with_bounded_state(Batches(open_split(str(path), "train"), tok, 2, 30, lines=True), 700)
    assert ids[:len(stream(stories, tok))] == stream(stories, tok)


def test_a_long_row_waits_in_pieces_and_is_packed_exactly_from_a_bounded_state(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE", 100)
    stories = make_stories(200, 0)  # one row of 40,000 characters
    pq.write_table(pa.table({"text": [SEPARATOR.join(stories), "last"]}), tmp_path / "long.parquet")
    tok = Tokenizer.from_texts(stories)
    batches = Batches(open_split(str(tmp_path / "long.parquet"), "train"), tok, 2, 30)
    ids = packed_with_bounded_state(batches, 700)
    assert ids[:len(stream(stories + ["last"], tok))] == stream(stories + ["last"], tok)


def test_the_vocabulary_reads_a_text_without_separators_only_so_far(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "VOCABULARY_TEXT", 1000)
    text = "\n".join(make_stories(100, 0))  # one story of 20,000 characters
    (tmp_path / "one.txt").write_text(text)
    (story,) = first_stories(open_split(str(tmp_path / "one.txt"), "train"), True, 10)
    assert 1000 <= len(story) < 1000 + 200 and text.startswith(story)


def test_a_null_row_is_read_as_an_empty_one(tmp_path):
    pq.write_table(pa.table({"text": ["A story.", None, "Another."]}), tmp_path / "s.parquet")
    assert first_stories(open_split(str(tmp_path / "s.parquet"), "train"), False, 10) == ["A story.", "Another."]


@pytest.mark.parametrize("name, rows, kind", [("s.jsonl", [1, 2], "int64"), ("s.jsonl", ["a", 2], "Json"),
                                              ("s.jsonl", [["a"]], "List"), ("s.parquet", [1.5], "float64")])
def test_a_text_column_that_is_not_strings_is_refused_naming_the_file(tmp_path, name, rows, kind):
    if name.endswith(".jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    else:
        pq.write_table(pa.table({"text": rows}), tmp_path / name)
    with pytest.raises(UserError, match=f"the 'text' column of {tmp_path / name} holds {kind}, not text"):
        open_split(str(tmp_path / name), "train")


def test_a_txt_data_position_saved_before_txt_files_were_read_in_pieces_is_refused(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("\n".join(make_stories(20, 0)))
    tok = Tokenizer.from_texts(make_stories(20, 0))
    # How the earlier version opened a .txt file: datasets' text builder.
    old = datasets.load_dataset("text", data_files=str(path), streaming=True, sample_by="line",
                                keep_linebreaks=True)["train"].reshard()
    saved = Batches(old, tok, 1, 50, lines=True)
    next(saved)
    saved.close()
    with pytest.raises(UserError, match="saved by an earlier version of this code"):
        Batches(open_split(str(path), "train"), tok, 1, 50, lines=True).load_state_dict(saved.state_dict())


def test_jsonl_and_parquet_files_are_read_by_their_text_column(tmp_path):
    stories = make_stories(4, 0)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(stories)))
    pq.write_table(pa.table({"text": stories}), tmp_path / "s.parquet")
    for name in ("s.jsonl", "s.parquet"):
        assert first_stories(open_split(str(tmp_path / name), "train"), False, 10) == stories


def test_a_single_file_has_no_validation_split(tmp_path):
    (tmp_path / "one.txt").write_text("hello")
    assert open_split(str(tmp_path / "one.txt"), "validation") is None


def test_a_held_out_split_and_the_training_split_share_no_story(tmp_path):
    stories = [f"story number {i}." for i in range(40)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    tok = Tokenizer.from_texts(stories)
    held = Batches(open_split(str(path), "train"), tok, 1, 13, keep=lambda i: i % 20 == 19)
    rest = Batches(open_split(str(path), "train"), tok, 1, 13, keep=lambda i: i % 20 != 19)
    assert windows(held, 2) == stream([stories[19], stories[39]], tok)[:28]
    assert windows(rest, 2) == stream(stories[:19], tok)[:28]


def test_data_without_text_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": "  "}) + "\n")
    batches = Batches(open_split(str(path), "train"), Tokenizer.from_texts(["a"]), 1, 8)
    with pytest.raises(EmptyData):
        next(batches)


def test_a_story_that_fits_in_a_window_is_never_cut(tmp_path):
    stories = ["A short one.", "Another short story here.", "Tiny.", "x" * 40] * 5
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    tok = Tokenizer.from_texts(stories)
    batches = Batches(open_split(str(path), "train"), tok, batch_size=2, block_size=40)
    for _ in range(5):
        x, y = next(batches)
        for xr, yr in zip(x.tolist(), y.tolist()):
            pieces = tok.decode([i for i in xr[:1] + yr if i != PAD]).split("<|endoftext|>")
            assert pieces[0] == "" and all(p in stories for p in pieces[1:])  # whole stories only


def test_padding_is_read_as_end_of_story_and_is_never_a_target(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("Q: Where is Zoé? A: In the café.")
    tok = Tokenizer.from_texts(["Q: Where is Zoé? A: In the café."])
    x, y = next(Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=40, lines=True))
    text = "Q: Where is Zoé? A: In the café."
    assert tok.decode(x[0, :len(text) + 1].tolist()) == "<|endoftext|>" + text
    assert (x[0, len(text) + 1:] == EOS).all() and (y[0, len(text):] == PAD).all()


def write_row_groups(path, stories, rows_per_group):
    pq.write_table(pa.table({"text": stories}), path, row_group_size=rows_per_group)
    return pq.ParquetFile(path).metadata.num_row_groups


def test_a_parquet_file_is_streamed_one_row_group_at_a_time(tmp_path):
    # pyarrow reads a file it scans ahead to its end in the background, holding what it decoded:
    # a scan per row group (a shard each) keeps that to one row group. experiments/memory.py measures the
    # memory itself; here, that the shards are row groups, and that ranks split them.
    stories = make_stories(40, 0)
    path = tmp_path / "groups.parquet"
    assert write_row_groups(path, stories, 10) == 4
    assert open_split(str(path), "train").num_shards == 4
    seen = [first_stories(open_split(str(path), "train", rank, 2), False, 40) for rank in (0, 1)]
    assert seen == [stories[0:10] + stories[20:30], stories[10:20] + stories[30:40]]


def test_a_resume_does_not_read_the_row_groups_before_its_position(tmp_path):
    stories = make_stories(400, 0)
    path = tmp_path / "groups.parquet"
    write_row_groups(path, stories, 50)
    tok = Tokenizer.from_texts(stories)
    first = Batches(open_split(str(path), "train"), tok, batch_size=4, block_size=100)
    ids = windows(first, 100)
    state = first.state_dict()
    first.close()
    # Overwrite the row groups before the one the last story read came from (one story a row), all
    # but the last of them: a resume that read them to skip them would fail. datasets does read that
    # last one again: its position is saved as the end of the row group before the current one.
    current = (first.stories.story - 1) // 50
    assert current >= 3
    meta = pq.ParquetFile(path).metadata
    with open(path, "r+b") as f:
        for group in range(current - 1):
            column = meta.row_group(group).column(0)
            f.seek(column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset)
            f.write(b"\0" * column.total_compressed_size)
    with pytest.raises(OSError):  # they are unreadable from the start
        first_stories(open_split(str(path), "train"), False, 10)
    resumed = Batches(open_split(str(path), "train"), tok, batch_size=4, block_size=100)
    resumed.load_state_dict(state)
    ids += windows(resumed, 40)
    assert ids == stream(stories, tok)[:len(ids)]


def test_a_data_position_counted_in_other_shards_is_refused(tmp_path):
    stories = make_stories(40, 0)
    path = tmp_path / "groups.parquet"
    write_row_groups(path, stories, 10)
    batches = Batches(open_split(str(path), "train"), Tokenizer.from_texts(stories), 1, 50)
    next(batches)
    state = batches.state_dict()
    batches.close()
    write_row_groups(path, stories, 20)  # the same stories in other row groups
    for shards in (None, 4):  # a position from before shards were row groups; the data has changed
        state["shards"] = shards
        with pytest.raises(UserError, match="shards"):
            Batches(open_split(str(path), "train"), Tokenizer.from_texts(stories), 1, 50).load_state_dict(state)


def test_the_data_pipeline_and_the_benchmark_do_not_import_the_training_script():
    code = "import sys, data, bench, sample; assert 'train' not in sys.modules, 'train was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def validation_stories(batches):
    """The stories in a list of batches, read back from their windows."""
    ids = []
    for x, y in batches:
        for xr, yr in zip(x.tolist(), y.tolist()):
            ids += [i for i in xr[:1] + yr if i != PAD]
    return [s for s in Tokenizer.from_texts(make_stories(40, 1)).decode(ids).split("<|endoftext|>") if s]


def test_evaluation_reads_every_character_of_a_small_validation_split_once(stories_dir):
    cfg = config.load([f"--dataset={stories_dir}", "--batch_size=4", "--block_size=50"])
    batches, held_out, about = validation_batches(cfg, Tokenizer.from_texts(make_stories(40, 1)))
    assert validation_stories(batches) == make_stories(40, 1)
    assert not held_out and about == "the whole validation split"


def test_a_large_validation_split_is_sampled_across_its_whole_length(stories_dir):
    limit = sum(map(len, make_stories(40, 1))) // 5
    cfg = config.load([f"--dataset={stories_dir}", "--batch_size=4", "--block_size=50", f"--eval_chars={limit}"])
    batches, _, about = validation_batches(cfg, Tokenizer.from_texts(make_stories(40, 1)))
    kept = validation_stories(batches)
    assert kept == make_stories(40, 1)[::8] and about == "every 8th story of the validation split"
    assert limit / 2 <= sum(map(len, kept)) <= limit
