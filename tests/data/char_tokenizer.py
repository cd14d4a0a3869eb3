"""A tokenizer with one token per character, for the data tests."""


class CharTokenizer:
    """One token per character (its code point), PAD 0 / BOS 1 / EOS 2 (text code points
    are >= 10)."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, add_bos=True, add_eos=True):
        return [self.bos_id] * add_bos + [ord(c) for c in text] + [self.eos_id] * add_eos

    @staticmethod
    def decode(ids):
        return "".join(chr(i) for i in ids if i > 2)
