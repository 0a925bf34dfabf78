"""The character tokenizer: deterministic ids, exact round trips, unknown characters."""

from tokenizer import EOS, UNK, Tokenizer


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
