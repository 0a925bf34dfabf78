"""The character tokenizer: one id per character seen in the first stories of the training
data, plus an end-of-story token and an unknown-character token.

Ids are the characters sorted by code point, so the same characters give the same ids on
every run and machine. The vocabulary travels inside every checkpoint (state_dict) and is
restored from there, never rebuilt on resume.
"""

EOS = 0  # ends a story; also starts every sampled one
UNK = 1  # any character outside the vocabulary
SPECIAL = ("<|endoftext|>", "\ufffd")  # how EOS and UNK decode


class Tokenizer:
    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i + len(SPECIAL) for i, c in enumerate(self.chars)}
        self.itos = list(SPECIAL) + list(self.chars)
        self.unknown = {}  # character -> how often it was encoded as UNK

    @classmethod
    def from_texts(cls, texts):
        return cls(set().union(*map(set, texts)))

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["chars"])

    def state_dict(self):
        return {"chars": self.chars}

    @property
    def vocab_size(self):
        return len(self.itos)

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
