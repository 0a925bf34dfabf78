"""The tokenizers: characters (TOKENIZER = "char", the default) or byte-level BPE ("bpe").

The character tokenizer has an id per character of the first training stories, sorted by code
point (the same ids on every run), after an end-of-story and an unknown-character id; one grown
for fine-tuning (Tokenizer.grown) appends the new characters, so every old id keeps its meaning.
The BPE tokenizer is Hugging Face's byte-level BPE of VOCAB_SIZE ids trained on the same stories:
nothing is unknown, and id 0 is the same end-of-story token. Either travels in every checkpoint
(state_dict, with its "kind"), never rebuilt on resume, and says how many characters each id
stands for (char_lengths), so losses can be given in bits per character whatever the tokenizer.
"""

from config import UserError

EOS = 0  # ends a story; also starts every sampled one
UNK = 1  # any character outside the vocabulary (character tokenizer only)
SPECIAL = ("<|endoftext|>", "\ufffd")  # how EOS and UNK decode
KINDS = ("char", "bpe")


def build_tokenizer(kind, texts, vocab_size):
    """A new tokenizer of kind (TOKENIZER) built from texts; vocab_size counts only for BPE."""
    if kind == "char":
        return Tokenizer.from_texts(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise UserError(f"--tokenizer is one of {', '.join(KINDS)}, not {kind!r}")


def load_tokenizer(state):
    """The tokenizer a checkpoint holds. Checkpoints from before BPE hold a character
    tokenizer's state without a "kind"."""
    return BPETokenizer.from_state_dict(state) if state.get("kind") == "bpe" else Tokenizer.from_state_dict(state)


class Tokenizer:
    kind, unit = "char", "char"  # unit: what one id, a position of the model, is called

    def __init__(self, chars):
        self.chars = "".join(dict.fromkeys(chars))  # in the order given: a grown vocabulary is not sorted
        self.stoi = {c: i + len(SPECIAL) for i, c in enumerate(self.chars)}
        self.itos = list(SPECIAL) + list(self.chars)
        self.unknown = {}  # character -> how often it was encoded as UNK

    @classmethod
    def from_texts(cls, texts):
        return cls(sorted(set().union(*map(set, texts))))

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["chars"])

    def state_dict(self):
        return {"kind": "char", "chars": self.chars}

    def grown(self, texts):
        """This vocabulary with the characters of texts that it lacks appended, in code point order."""
        return Tokenizer(self.chars + "".join(sorted(set().union(*map(set, texts)) - set(self.chars))))

    @property
    def vocab_size(self):
        return len(self.itos)

    @property
    def char_lengths(self):
        """How many characters each id stands for: one (EOS and UNK count as one, as they always have)."""
        return [1] * self.vocab_size

    def encode(self, text):
        ids = [self.stoi.get(c, UNK) for c in text]
        if UNK in ids:
            for c in text:
                if c not in self.stoi:
                    self.unknown[c] = self.unknown.get(c, 0) + 1
        return ids

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def unknown_report(self):
        """One line on the characters encoded as UNK so far, or None if there were none."""
        if not self.unknown:
            return None
        top = sorted(self.unknown.items(), key=lambda kv: -kv[1])[:10]
        listed = ", ".join(f"{c!r} x{n}" for c, n in top)
        more = f" and {len(self.unknown) - 10} more" if len(self.unknown) > 10 else ""
        return (f"{sum(self.unknown.values())} characters outside the vocabulary were encoded as "
                f"unknown: {listed}{more}")


def byte_symbols():
    """{symbol: byte}: how byte-level BPE writes each of the 256 bytes as a printable character
    (GPT-2's table): a printable Latin-1 byte as itself, every other byte as chr(256 + n), n counting
    those bytes in order. Token strings are made of these symbols."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


class BPETokenizer:
    """Byte-level BPE from Hugging Face's tokenizers: text -> UTF-8 bytes -> merged tokens, and back."""
    kind, unit = "bpe", "token"

    def __init__(self, tok):
        self.tok = tok
        self.unknown = {}  # always empty: every byte has an id
        # How many characters each id stands for: the UTF-8 bytes of its token that start a character (any
        # but 0b10xxxxxx), so a character split across tokens counts once, in the token holding its first
        # byte. EOS counts as one, as in the character tokenizer.
        symbols = byte_symbols()
        self.char_lengths = [sum(symbols[c] & 0xC0 != 0x80 for c in tok.id_to_token(i)) for i in range(self.vocab_size)]
        self.char_lengths[EOS] = 1

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn the merges from texts until there are vocab_size ids (or no pair is left to merge)."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise UserError(f"--vocab_size={vocab_size} is too small for byte-level BPE: it needs an id for each of "
                            "the 256 bytes and one for the end of a story, so at least 257")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # splits words; bytes as symbols
        tok.decoder = decoders.ByteLevel()
        # All 256 bytes from the start, whatever the texts hold, so no text is ever unknown; the end-of-story
        # token first, so it is id 0 (EOS) as in the character tokenizer.
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[SPECIAL[0]], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        assert tok.token_to_id(SPECIAL[0]) == EOS
        return cls(tok)

    @classmethod
    def from_state_dict(cls, state):
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(state["json"]))

    def state_dict(self):
        return {"kind": "bpe", "json": self.tok.to_str()}

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def unknown_report(self):
        return None
