"""Rendered text + loss spans -> token ids and loss flags, a batch at a time.

    enc = encode(tokenizer, ["<s>...### Response:\n5</s>"], [[(120, 126)]], train_on_inputs=False)
    enc.ids, enc.trained, enc.lengths      # flat numpy arrays: text k is ids[starts[k]:starts[k+1]]
    ids, labels = enc.lists()              # the same as one list per text, -100 where no loss

A token carries a loss (its label is its id) when it overlaps a span; every other label is -100,
which PyTorch's cross-entropy skips. This is the rule `apply_chat_template(...,
return_assistant_tokens_mask=True)` applies (the tokens from the one holding a span's first
character to the one holding its last); doing it here lets a whole batch be encoded in one call
to the Rust tokenizer, which is what makes preprocessing fast. tests/test_masking.py checks the
two agree.

The batch stays flat (one array of ids for all texts) because the pipeline's later steps
(truncation, labels, counts, Arrow columns) are then a few numpy operations per batch rather than
Python loops over every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


@dataclass
class Encoded:
    """A batch of tokenized texts, flat."""

    ids: np.ndarray  # int32, every text's ids one after the other
    trained: np.ndarray  # bool, per token: does it carry a loss
    lengths: np.ndarray  # int64, tokens per text

    @property
    def starts(self) -> np.ndarray:
        """Where each text begins in `ids`, plus the end: text k is ids[starts[k]:starts[k+1]]."""
        return np.concatenate([[0], np.cumsum(self.lengths)])

    def lists(self) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, labels), one list per text."""
        if len(self.lengths) == 0:
            return [], []
        labels = np.where(self.trained, self.ids, IGNORE_INDEX)
        cuts = self.starts[1:-1]
        return [a.tolist() for a in np.split(self.ids, cuts)], [a.tolist() for a in np.split(labels, cuts)]


def encode(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]], train_on_inputs: bool) -> Encoded:
    """Tokenize rendered conversations (no special tokens added: the template holds BOS)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids, lengths = _flatten([enc.ids for enc in encodings])
    trained = np.full(len(ids), train_on_inputs, dtype=bool)
    if not train_on_inputs:
        for enc, start, row_spans in zip(encodings, np.cumsum(lengths) - lengths, spans):
            for first, last in _token_ranges(enc, row_spans):
                trained[start + first : start + last + 1] = True
    return Encoded(ids, trained, lengths)


def encode_text(tokenizer, texts: list[str]) -> Encoded:
    """Plain text for continued pre-training: BOS + text + EOS, every token trained."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids, lengths = _flatten([bos + enc.ids + eos for enc in encodings])
    return Encoded(ids, np.ones(len(ids), dtype=bool), lengths)


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in `text` (U+D800-U+DFFF, half of a UTF-16 pair), or None.

    A Python string can hold one (json.loads of a "\\ud800" escape; a byte that is not UTF-8 in
    argv, decoded with surrogateescape), but it is not text: UTF-8 cannot encode it, and the Rust
    tokenizer refuses the whole batch holding it with a TypeError. So texts are checked first.
    """
    if text.isascii():  # a flag CPython keeps on every string: most texts cost nothing
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # UTF-8 encodes every code point but the surrogates
        return exc.start
    return None


def _flatten(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum())), lengths


def _token_ranges(enc, spans):
    """(first, last) token of each span, inclusive; spans no token covers (empty content) are skipped."""
    for start, end in spans:
        first = _token_at(enc, start, end, step=1)
        last = _token_at(enc, end - 1, start - 1, step=-1)
        if first is not None and last is not None:
            yield first, last


def _token_at(enc, char: int, stop: int, step: int) -> int | None:
    # The token holding `char`, or the nearest one towards `stop` (a character can belong to no
    # token when a tokenizer trims whitespace from its offsets).
    while char != stop:
        token = enc.char_to_token(char)
        if token is not None:
            return token
        char += step
    return None
