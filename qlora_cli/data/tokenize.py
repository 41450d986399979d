"""Rendered text + loss spans -> token ids and loss flags, a batch at a time.

    enc = encode(tokenizer, ["<s>...### Response:\n5</s>"], [[(120, 126)]], train_on_inputs=False)
    enc.ids, enc.trained, enc.lengths      # flat numpy arrays: text k is ids[starts[k]:starts[k+1]]
    ids, labels = enc.lists()              # the same as one list per text, -100 where no loss

A token carries a loss (its label is its id) when it lies in a span; every other label is -100,
which PyTorch's cross-entropy skips.

The seam policy: a token boundary always falls where a reply's span starts, and the tokens before it
are the tokens of the prompt text alone, which is what `qlora generate`, `qlora eval` and plain
`tokenizer(apply_chat_template(..., add_generation_prompt=True))` feed the model. The whole text is
tokenized at once, and where a token straddles a span's edge (byte-level BPE merges 'Answer:' +
'\n\nParis' into ':\n\n', 'assistant\n' + '\n\n' into '\n\n\n'; a prompt ending in a space
gives ' Paris'), that text is tokenized again in pieces cut there: the prompt alone, then the reply
as text that follows a special token (behind an anchor token that is then dropped), which is where
a reply starts in a chat template. Otherwise the prompt would end on a token the model never saw
before a reply, and `generate` would feed a different one. Tokens where nothing straddles are the
whole text's own, exactly as the tokenizer writes them.

A conversation in which an earlier reply's seam straddles becomes one example per reply (each
reply's prompt is then exactly its own): `Encoded.source` says which input text each came from.

A batch goes to the Rust tokenizer in one call (two when pieces must be redone), which is what makes
preprocessing fast. The batch stays flat (one array of ids for all texts) because the
pipeline's later steps (truncation, labels, counts, Arrow columns) are then a few numpy operations per
batch rather than Python loops over every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


@dataclass
class Encoded:
    """A batch of tokenized texts, flat."""

    ids: np.ndarray  # int32, every text's ids one after the other
    trained: np.ndarray  # bool, per token: does it carry a loss
    lengths: np.ndarray  # int64, tokens per text
    source: np.ndarray | None = None  # int64, per text: the input text it comes from (encode may split one)

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
    backend = tokenizer.backend_tokenizer
    whole = backend.encode_batch(texts, add_special_tokens=False)
    texts, spans, whole, source = _one_per_reply_where_history_straddles(backend, texts, spans, whole)
    # Per text, one entry per piece: (encoding, piece start, piece end, row offset of the encoded
    # string's character 0, anchor tokens to drop). Most texts are one piece: the whole text.
    parts = [[(enc, 0, len(text), 0, 0)] for enc, text in zip(whole, texts)]
    cut = {}
    for k, (enc, row_spans) in enumerate(zip(whole, spans)):
        edges = sorted({c for span in row_spans for c in span if 0 < c < len(texts[k])})
        straddled = [c for c in edges if _straddles(enc, c)]
        if straddled:
            cut[k] = straddled
    if cut:
        anchor, drop = _anchor(tokenizer)
        pieces, owners = [], []
        for k, cuts in cut.items():
            bounds = [0, *cuts, len(texts[k])]
            for a, b in zip(bounds, bounds[1:]):
                pieces.append(texts[k][a:b] if a == 0 else anchor + texts[k][a:b])
                owners.append((k, a, b, a - len(anchor) if a else 0, drop if a else 0))
            parts[k] = []
        for enc, (k, *where) in zip(backend.encode_batch(pieces, add_special_tokens=False), owners):
            parts[k].append((enc, *where))
    # The batch's ids one list per piece, and the trained tokens as [first, end) ranges of positions in
    # the flat batch (a piece's anchor tokens dropped), turned into per-token flags by one cumsum.
    pieces_ids, lengths, first, end_ = [], [], [], []
    at = 0  # where the current piece's kept tokens begin in the flat batch
    for row_parts, row_spans in zip(parts, spans):
        row_start = at
        for enc, start, end, shift, drop in row_parts:
            ids = enc.ids
            if not train_on_inputs:
                inside = [(s - shift, e - shift) for s, e in row_spans if start <= s and e <= end]
                for a, b in _token_ranges(enc, inside):
                    a = max(a, drop)  # tokens before `drop` are the anchor's, dropped
                    if b + 1 > a:
                        first.append(at + a - drop)
                        end_.append(at + b + 1 - drop)
            pieces_ids.append(ids[drop:] if drop else ids)
            at += len(ids) - drop
        lengths.append(at - row_start)
    ids = _concatenated(pieces_ids)
    if train_on_inputs:
        trained = np.ones(at, dtype=bool)
    else:
        edges = np.zeros(at + 1, dtype=np.int32)
        np.add.at(edges, np.asarray(first, dtype=np.int64), 1)
        np.add.at(edges, np.asarray(end_, dtype=np.int64), -1)
        trained = np.cumsum(edges[:-1]) > 0
    return Encoded(ids, trained, np.asarray(lengths, dtype=np.int64), np.asarray(source, np.int64))


def _one_per_reply_where_history_straddles(backend, texts, spans, whole):
    """(texts, spans, encodings, source text of each): a conversation in which a token straddles the
    start of a reply that another reply follows becomes one example per reply, each ending with it.

    The later reply's prompt is the whole conversation before it, which `generate` tokenizes at once,
    straddling token included; the earlier reply's prompt ends inside that token. One sequence cannot
    give both replies their own prompt's tokens, so each gets its own. (Rare: a reply that starts
    with a character its prompt's last one merges with, like Mistral's ']' + '{'.)
    """
    split = [
        k for k, (enc, row_spans) in enumerate(zip(whole, spans))
        if any(0 < start < len(texts[k]) and _straddles(enc, start) for start, _ in sorted(row_spans)[:-1])
    ]
    if not split:
        return texts, spans, whole, list(range(len(texts)))
    extra = [(k, texts[k][:end], [(start, end)]) for k in split for start, end in sorted(spans[k])]
    encoded = iter(backend.encode_batch([text for _, text, _ in extra], add_special_tokens=False))
    extra_of = {}
    for k, text, row_spans in extra:
        extra_of.setdefault(k, []).append((text, row_spans, next(encoded)))
    out_texts, out_spans, out_whole, source = [], [], [], []
    for k in range(len(texts)):
        for text, row_spans, enc in extra_of.get(k, [(texts[k], spans[k], whole[k])]):
            out_texts.append(text)
            out_spans.append(row_spans)
            out_whole.append(enc)
            source.append(k)
    return out_texts, out_spans, out_whole, source


def _straddles(enc, char: int) -> bool:
    """Whether one token holds both the character before CHAR and CHAR itself."""
    token = enc.char_to_token(char)
    # token_to_chars, not enc.offsets[token]: `offsets` builds a Python list of every token's pair on
    # each access, which cost more than the rest of the masking together.
    return token is not None and enc.token_to_chars(token)[0] < char


def _anchor(tokenizer) -> tuple[str, int]:
    """(text, tokens to drop): a special token to put before a piece so it is tokenized as text that
    follows a special token. EOS when the tokenizer splits it off as one token (it always has one: a
    template needs it); else no anchor (byte-level BPE tokenizes a piece the same either way)."""
    backend = tokenizer.backend_tokenizer
    for token in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token):
        if not token:
            continue
        enc = backend.encode(token + "x", add_special_tokens=False)
        if len(enc.ids) >= 2 and enc.offsets[0] == (0, len(token)) and enc.offsets[1][0] >= len(token):
            return token, 1
    return "", 0


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
    return _concatenated(rows), lengths


def _concatenated(rows: list[list[int]]) -> np.ndarray:
    """The rows' ids end to end as int32. numpy converts each list in one C loop: 0.07 s against 0.12 s
    through one iterator over all of them (np.fromiter over itertools.chain), on 6,000 Alpaca rows
    with Mistral's tokenizer, ids included."""
    return np.concatenate([np.array(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, np.int32)


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
