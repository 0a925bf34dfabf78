"""explain.py: the page's numbers are model.py's forward's, the page stands alone, and bad input is
handled or refused in one line."""

import base64
import json
import math
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import checkpoint
import data
import explain
import train
from config import UserError
from conftest import TINY, small_model
from model import GPT, GPTConfig
from tokenizer import EOS, UNK, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "pretrained" / "tinystories-char.pt"
QUICK = ["--device=cpu", "--max_new_tokens=20"]  # the samples short: they are not what these tests look at
# Longer than the shipped model's 256 characters of context, so that the context slides.
LONG = ("Once upon a time, there was a little girl named Lily. She loved to play with her toys and her friends. "
        "One day, she went to the park with her mom. They saw a big tree with a red ball in it. Lily wanted the "
        "ball, so she asked her mom for help. Her mom smiled and got the ball down. Lily was very happy.")


def shipped():
    state = checkpoint.load(SHIPPED)
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    return model.eval(), load_tokenizer(state["tokenizer"])


def jumbled(model, seed=0):
    """model with every weight drawn at random, so that token shift's shares and the bigram table, which
    start at zero, add something too."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


MODELS = {
    "shipped": lambda: shipped()[0],
    "two blocks, every switch": lambda: jumbled(small_model(
        swiglu=True, token_shift=True, shift_reach=2, shift_gate=True, bigram=8, key_offset=True, attn_gate=True)),
    "rotary, tied, GELU": lambda: jumbled(small_model(rope=True, tie_weights=True)),
}


def window(model, seed=0):
    """A window of random ids filling the context, and targets, -1 at the last position as where none is known."""
    torch.manual_seed(seed)
    T, V = model.config.block_size, model.config.vocab_size
    x, y = torch.randint(V, (2, T)), torch.randint(V, (2, T))
    y[:, -1] = -1
    return x, y


def explained(tmp_path, *args):
    """explain.py run with args; (the page's text, the data it draws from). Every page is checked to
    stand alone (read): nothing in it is fetched from the network."""
    out = tmp_path / "page.html"
    explain.main([*QUICK, f"--out={out}", *args])
    return read(out)


def read(page):
    """(the page's text, the data it draws from), once it is checked to stand alone."""
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    # Nothing loaded from beside it either: no script, style sheet or picture of its own file, no CSS url().
    assert not re.search(r"""\bsrc\s*=|<(link|iframe|img)\b|url\(\s*["']?(?!data:)""", html, re.I)
    found = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
    return html, json.loads(found[1])


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_the_traced_forward_gives_the_plain_forwards_logits(make):
    model = make()
    x, y = window(model)
    with torch.no_grad():
        traced, _ = model(x, y, trace={})
        plain, _ = model(x, y)
    torch.testing.assert_close(traced, plain)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_the_attribution_bars_sum_to_the_logit_of_the_character_that_came(make):
    model = make()
    x, y = window(model)
    targets = y.clamp(min=0)  # the last position's target is unknown: any id has a logit there
    with torch.no_grad():
        trace = {}
        model(x, y, trace=trace)
        bars = explain.attribution(model, trace["terms"], targets)
        logits, _ = model(x, y)
    torch.testing.assert_close(sum(bars.values()), logits.gather(2, targets[..., None])[..., 0])


def test_the_attribution_has_a_bar_for_each_term_of_the_stream_and_the_biases(tmp_path):
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", "--text=Tom")  # rotary: no position embedding
    assert found["terms"] == ["token embedding", "token shift at the embedding", "bigram table",
                              *(f"head {h}" for h in range(8)), "MLP", "biases, ln_f's too"]


def test_each_heads_attention_rows_are_deflated_bytes_that_sum_to_one(tmp_path):
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", "--text=Tom saw a dog. Tom said hi.")
    lengths = [j - start + 1 for j, start in enumerate(found["window"])]
    for packed in found["attention"]:
        weights = torch.tensor(list(zlib.decompress(base64.b64decode(packed)))) / 255
        rows = weights.split(lengths)
        assert len(weights) == sum(lengths)
        assert all(abs(float(row.sum()) - 1) <= 0.5 * len(row) / 255 for row in rows)  # one byte rounds by 1/510


@pytest.fixture(scope="module")
def learned_positions_checkpoint(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wpe")
    train.main([f"--dataset={stories_dir}", f"--out_dir={out}", *TINY, "--rope=False", "--max_steps=2",
                "--eval_interval=2"])
    return checkpoint.paths(out)[0]


def test_learned_positions_have_a_bar_and_a_table_of_their_own(tmp_path, learned_positions_checkpoint):
    _, found = explained(tmp_path, f"--checkpoint={learned_positions_checkpoint}", "--text=Tom")
    assert found["terms"][:2] == ["token embedding", "position embedding"]
    assert found["positions"] is not None


def test_the_pages_losses_are_the_plain_forwards_cross_entropy_in_the_same_window(tmp_path):
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", f"--text={LONG}")
    model, tokenizer = shipped()
    ids = torch.tensor([EOS] + tokenizer.encode(LONG))
    x, y, T = ids[None, :-1], ids[None, 1:], model.config.block_size  # each character after the one before
    for j, start in enumerate(found["window"]):
        with torch.no_grad():
            logits, _ = model(x[:, start:start + T], y[:, start:start + T])
        nats = F.cross_entropy(logits[0, j - start], y[0, j])
        assert found["bits"][j] == pytest.approx(float(nats) / math.log(2), abs=1e-4)  # the page's 4 decimals


def test_a_text_longer_than_the_context_is_covered_whole_each_character_predicted_once(tmp_path):
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", f"--text={LONG}")
    assert "".join(found["tokens"]) == LONG and len(found["bits"]) == len(LONG) > 2 * 128


def test_the_context_slides_as_sampling_slides_it_starting_again_from_the_last_half_when_full():
    T = 128
    assert explain.windows(2 * T, T) == [(0, 0), (T // 2 + 1, T // 2 - 1), (T + 2, T // 2 - 1)]
    for n in range(1, 700):
        spans = explain.windows(n, T)
        ends = [start + T for start, _ in spans]
        firsts = [start + first for start, first in spans]
        assert firsts == [0] + ends[:-1] and ends[-1] >= n  # each prediction made once, in its window
        assert all(first == 0 or first + 1 == T // 2 for _, first in spans)  # from at least T // 2 ids


def test_a_greedy_story_is_the_pages_likeliest_character_at_every_step_as_generate_reads_the_context(tmp_path):
    # GPT.generate slides the context with its cache; the page, with windows of model.py's forward: if the
    # two read the same characters, greedy decoding drew the page's likeliest character every time.
    # From "Tom had a" the shipped model's greedy story runs to --max_new_tokens, well past the context.
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", "--prompt=Tom had a", "--temperature=0",
                         "--max_new_tokens=400")
    top = found["top_ids"][::len(found["top_ids"]) // len(found["bits"])]
    start = len("Tom had a")
    assert len(found["bits"]) > 300 and top[start:] == found["ids"][start:]


def test_prompt_explains_the_models_own_continuation_of_it(tmp_path):
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", "--prompt=Tom had a")
    text = "".join(found["tokens"])
    assert text.startswith("Tom had a") and len(text) > len("Tom had a")
    assert "Tom had a" in found["about"]["source"]


def test_with_no_text_the_page_explains_the_first_validation_story_with_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: the shipped model, as sample.py takes it
    explain.main(QUICK)
    _, found = read(tmp_path / "explain.html")
    first = next(data.stories(data.open_split("tinystories", "validation"), lines=False))
    assert "".join(found["tokens"]) == first and "tinystories-char.pt" in found["about"]["checkpoint"]


def test_characters_outside_the_vocabulary_are_shown_as_they_are_and_marked(tmp_path):
    text = "Tom ¤ saw a ☃."
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", f"--text={text}")
    assert "".join(found["tokens"]) == text
    assert found["unknown"] == [text.index("¤"), text.index("☃")]
    assert [found["ids"][j] for j in found["unknown"]] == [UNK, UNK]  # read as training reads them


def test_an_empty_text_is_refused(tmp_path):
    with pytest.raises(UserError, match="the text is empty"):
        explained(tmp_path, f"--checkpoint={SHIPPED}", "--text=")


def test_text_and_prompt_together_are_refused(tmp_path):
    with pytest.raises(UserError, match="--text and --prompt"):
        explained(tmp_path, f"--checkpoint={SHIPPED}", "--text=Tom", "--prompt=Lily")


@pytest.fixture(scope="module")
def bpe_checkpoint(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train.main([f"--dataset={stories_dir}", f"--out_dir={out}", *TINY, "--tokenizer=bpe", "--vocab_size=300",
                "--max_steps=2", "--eval_interval=2"])
    return checkpoint.paths(out)[0]


def test_a_bpe_checkpoints_tokens_are_shown_as_their_text(tmp_path, bpe_checkpoint):
    text = "Once upon a time, Zoé saw a ☃ in the park."  # ☃: three bytes, likely split between tokens
    _, found = explained(tmp_path, f"--checkpoint={bpe_checkpoint}", f"--text={text}")
    assert "".join(found["tokens"]) == text and len(found["tokens"]) < len(text)
    assert found["about"]["characters"] == len(text) and found["unknown"] == []
    rounding = 5e-5 * len(found["bits"]) / len(text)  # the page holds each token's bits to 4 decimals
    assert found["about"]["bits_per_char"] == pytest.approx(sum(found["bits"]) / len(text), abs=rounding)


@pytest.mark.parametrize("damage", ["missing", "not a checkpoint"])
def test_a_missing_or_broken_checkpoint_is_a_one_line_error_with_exit_code_2(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    if damage == "not a checkpoint":
        path.write_bytes(b"\x00 no torch.save in here" * 10)
    command = [sys.executable, str(ROOT / "explain.py"), f"--checkpoint={path}", f"--out={tmp_path / 'p.html'}"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.html").exists()


def test_png_without_matplotlib_is_a_one_line_error_naming_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib then fails, as where it is missing
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        explained(tmp_path, f"--checkpoint={SHIPPED}", f"--png={tmp_path / 'pictures'}")
    assert not (tmp_path / "page.html").exists()  # refused before the work, not after it


def test_png_writes_each_picture_of_the_page(tmp_path, learned_positions_checkpoint):
    pytest.importorskip("matplotlib")
    explained(tmp_path, f"--checkpoint={learned_positions_checkpoint}", "--text=Tom saw a dog.",
              f"--png={tmp_path / 'pictures'}")
    written = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert written == ["attention_head_0.png", "attention_head_1.png", "embeddings.png", "positions.png"]
    assert all((tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)


def test_the_embeddings_axes_span_the_middle_96_percent_of_the_ids(tmp_path):
    _, found = explained(tmp_path, f"--checkpoint={SHIPPED}", "--text=Tom saw a dog.")
    for axis, (low, high) in zip(zip(*found["pca"]), found["pca_span"], strict=True):
        inside = sum(low <= v <= high for v in axis)
        assert 0.96 * len(axis) <= inside < len(axis)  # the few far out do not set the axes


def test_a_page_of_2000_characters_is_at_most_2_MB(tmp_path):
    stories = data.stories(data.open_split("tinystories", "validation"), lines=False)
    text = ""
    while len(text) < 2000:
        text += next(stories) + "\n"
    html, found = explained(tmp_path, f"--checkpoint={SHIPPED}", f"--text={text[:2000]}")
    assert len(found["bits"]) == 2000 and len(html.encode()) <= 2_000_000


def test_a_text_with_markup_in_it_is_data_not_part_of_the_page(tmp_path):
    text = 'Tom wrote "</script><script>alert(1)</script>" on the wall.'
    html, found = explained(tmp_path, f"--checkpoint={SHIPPED}", f"--text={text}")
    assert "".join(found["tokens"]) == text and "<script>alert" not in html
