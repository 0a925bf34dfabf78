"""The tokenizers: the character tokenizer's deterministic ids, exact round trips and unknown
characters; the BPE tokenizer's round trips, end-of-story token and character counts."""

import pytest
from tokenizers import pre_tokenizers

from config import UserError
from conftest import make_stories
from tokenizer import EOS, UNK, BPETokenizer, Tokenizer, build_tokenizer, byte_symbols, load_tokenizer


def test_ids_do_not_depend_on_the_order_the_text_was_seen_in():
    a = Tokenizer.from_texts(["hello world", "Zoé"])
    b = Tokenizer.from_texts(["Zoé", "dlrow olleh"])
    assert a.encode("hello Zoé") == b.encode("hello Zoé")


def test_ids_follow_code_point_order_after_the_special_tokens():
    tok = Tokenizer.from_texts(["cab"])
    assert tok.encode("abc") == [2, 3, 4]
    assert {EOS, UNK} == {0, 1}


def test_every_in_vocabulary_string_round_trips_exactly():
    text = "Once upon a time, Zoé said: \"Hi!\"\n\tThe end."
    tok = Tokenizer.from_texts([text])
    assert tok.decode(tok.encode(text)) == text


def test_the_vocabulary_survives_its_state_dict():
    tok = Tokenizer.from_texts(["some text, é"])
    again = Tokenizer.from_state_dict(tok.state_dict())
    assert again.itos == tok.itos and again.encode("text é") == tok.encode("text é")


def test_a_grown_vocabulary_keeps_every_old_id_and_survives_its_state_dict():
    old = Tokenizer.from_texts(["the lake"])
    grown = old.grown(["près du lac"])
    assert grown.encode("the lake") == old.encode("the lake")
    assert grown.chars == old.chars + "cdprsuè"
    assert Tokenizer.from_state_dict(grown.state_dict()).itos == grown.itos  # not sorted again on resume


def test_characters_outside_the_vocabulary_become_unknown_and_are_counted():
    tok = Tokenizer.from_texts(["abc"])
    assert tok.encode("axxb") == [2, UNK, UNK, 3]
    tok.encode("zx")
    assert tok.unknown == {"x": 3, "z": 1}
    report = tok.unknown_report()
    assert report.startswith("4 characters outside the vocabulary") and "\n" not in report


def test_no_report_when_every_character_was_known():
    tok = Tokenizer.from_texts(["abc"])
    tok.encode("cab")
    assert tok.unknown_report() is None


def bpe(vocab_size=300):
    return build_tokenizer("bpe", make_stories(200, 0), vocab_size)


def test_a_character_tokenizer_state_without_a_kind_still_loads():
    old = {"chars": "abc"}  # what checkpoints held before the BPE option
    tok = load_tokenizer(old)
    assert isinstance(tok, Tokenizer) and tok.encode("cab") == [4, 2, 3]


def test_bpe_round_trips_any_text_exactly_even_characters_it_never_saw():
    tok = bpe()
    text = "Once upon a time, Zoé saw 日本 and an emoji 🐸.\n\tThe end."
    assert tok.decode(tok.encode(text)) == text and not tok.unknown


def test_bpe_merges_common_text_into_fewer_tokens_than_characters():
    tok = bpe(400)
    text = "Once upon a time, there was a little cat named Lily."
    assert len(tok.encode(text)) < len(text) / 2


def test_bpe_has_at_most_vocab_size_ids_and_the_end_of_story_token_first():
    tok = bpe(300)
    assert tok.vocab_size <= 300 and max(tok.encode(" ".join(make_stories(20, 3)))) < tok.vocab_size
    assert tok.decode([EOS]) == "<|endoftext|>"


def test_bpe_char_lengths_add_up_to_the_characters_of_any_text():
    tok = bpe()
    text = "Zoé 日本 🐸 went to the park — ¤ twice."  # multi-byte characters split across tokens
    ids = tok.encode(text)
    assert sum(tok.char_lengths[i] for i in ids) == len(text)
    assert tok.char_lengths[EOS] == 1


def test_bpe_training_is_deterministic_so_every_rank_builds_the_same_one():
    assert bpe().state_dict() == bpe().state_dict()


def test_bpe_survives_its_state_dict():
    tok = bpe()
    again = load_tokenizer(tok.state_dict())
    assert isinstance(again, BPETokenizer) and again.state_dict() == tok.state_dict()
    assert again.encode("Lily found a kite") == tok.encode("Lily found a kite")


def test_the_byte_symbols_are_byte_level_bpes_alphabet():
    symbols = byte_symbols()
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(symbols.values()) == list(range(256))
    assert symbols["\u0120"] == ord(" ")  # GPT-2's "Ġ"


def test_a_bpe_vocabulary_too_small_for_the_bytes_is_refused():
    with pytest.raises(UserError, match="at least 257"):
        bpe(256)


def test_an_unknown_tokenizer_kind_is_refused_naming_the_kinds():
    with pytest.raises(UserError, match="--tokenizer is one of char, bpe, not 'word'"):
        build_tokenizer("word", ["text"], 512)
