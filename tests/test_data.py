"""Streaming and packing: stories become EOS-joined windows, nothing lost, nothing duplicated,
through a resume and across epochs; every supported kind of local data."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_stories
from tokenizer import EOS, Tokenizer
from train import PAD, Batches, EmptyData, first_stories, is_line_based, open_split


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
    assert batches.epoch == 2


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
    first = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=20, lines=True)
    ids = windows(first, 5)
    assert first.rest  # part of a story sits unfinished in the state
    resumed = Batches(open_split(str(path), "train"), tok, batch_size=1, block_size=20, lines=True)
    resumed.load_state_dict(first.state_dict())
    ids += windows(resumed, 30)
    assert ids == stream(stories * 20, tok)[:len(ids)]


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
