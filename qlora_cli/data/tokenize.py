"""Rendered text + loss spans -> input_ids and labels, a batch at a time.

    ids, labels = encode(tokenizer, ["<s>...### Response:\n5</s>"], [[(120, 126)]], train_on_inputs=False)

A token carries a loss (its label is its id) when it overlaps a span; every other label is -100,
which PyTorch's cross-entropy skips. This is the rule `apply_chat_template(...,
return_assistant_tokens_mask=True)` applies (the tokens from the one holding a span's first
character to the one holding its last); doing it here lets a whole batch be encoded in one call
to the Rust tokenizer, which is what makes preprocessing fast. tests/test_masking.py checks the
two agree.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


def encode(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]], train_on_inputs: bool):
    """Tokenize rendered conversations (no special tokens added: the template holds BOS)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    all_ids, all_labels = [], []
    for enc, row_spans in zip(encodings, spans):
        ids = enc.ids
        all_ids.append(ids)
        all_labels.append(list(ids) if train_on_inputs else _mask(enc, ids, row_spans))
    return all_ids, all_labels


def encode_text(tokenizer, texts: list[str]):
    """Plain text for continued pre-training: BOS + text + EOS, every token trained."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [bos + enc.ids + eos for enc in encodings]
    return ids, [list(row) for row in ids]


def _mask(enc, ids: list[int], spans) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        first = _token_at(enc, start, end, step=1)
        last = _token_at(enc, end - 1, start - 1, step=-1)
        if first is None or last is None:
            continue  # a span of characters no token covers (empty content): nothing to train
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def _token_at(enc, char: int, stop: int, step: int) -> int | None:
    # The token holding `char`, or the nearest one towards `stop` (a character can belong to no
    # token when a tokenizer trims whitespace from its offsets).
    while char != stop:
        token = enc.char_to_token(char)
        if token is not None:
            return token
        char += step
    return None
