"""Loss masks, token by token: exactly the response tokens plus the stop token carry a label."""

from __future__ import annotations

import pytest
import torch

from qlora_cli.config import ModelSection
from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT, ALPACA_SYSTEM_WITH_INPUT, to_canonical
from qlora_cli.data.pipeline import IGNORE_INDEX, tokenize_example
from qlora_cli.data.templates import apply_template, resolve_template
from qlora_cli.modeling import load_tokenizer


@pytest.fixture()
def tokenizer_with(tiny):
    def make(template: str):
        tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
        apply_template(resolve_template(template, tok), tok)
        return tok

    return make


def trained(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    "row, system, user",
    [
        ({"instruction": "Count from 3 to 6.", "input": "", "output": "3 4 5 6"}, ALPACA_SYSTEM_NO_INPUT,
         "Count from 3 to 6."),
        ({"instruction": "Reverse the order of these words.", "input": "apple river", "output": "river apple"},
         ALPACA_SYSTEM_WITH_INPUT, "Reverse the order of these words.\n\n### Input:\napple river"),
    ],
    ids=["alpaca-without-input", "alpaca-with-input"],
)
def test_alpaca_masks_exactly_response_and_eos(tokenizer_with, row, system, user):
    tok = tokenizer_with("alpaca")
    assert tok.pad_token_id == tok.eos_token_id  # the tiny model mimics Llama: no pad token of its own
    ex = tokenize_example(to_canonical(row, "alpaca"), tok, train_on_inputs=False)

    # The rendered text is the original Stanford Alpaca prompt, variant by variant.
    expected_text = f"<s>{system}\n\n### Instruction:\n{user}\n\n### Response:\n{row['output']}</s>"
    assert tok.decode(ex["input_ids"]) == expected_text

    response = encode(tok, row["output"]) + [tok.eos_token_id]
    assert trained(ex) == response
    # ...and they are the contiguous tail of the sequence: nothing in the prompt is trained.
    n = len(response)
    assert ex["labels"][-n:] == ex["input_ids"][-n:]
    assert all(t == IGNORE_INDEX for t in ex["labels"][:-n])


def test_multi_turn_messages_train_every_assistant_turn_only(tokenizer_with):
    tok = tokenizer_with("chatml")
    row = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Count from 1 to 3."},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "What is the opposite of hot?"},
        {"role": "assistant", "content": "cold"},
    ]}
    ex = tokenize_example(to_canonical(row, "messages"), tok, train_on_inputs=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end  # ChatML stops on <|im_end|>: that is the EOS learned

    assert trained(ex) == encode(tok, "1 2 3") + [im_end] + encode(tok, "cold") + [im_end]
    # Position by position: a token is trained iff it lies inside an assistant reply.
    text = tok.decode(ex["input_ids"])
    assert text.count("<|im_start|>assistant\n") == 2
    masked_text = tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l == IGNORE_INDEX])
    for prompt_part in ("You are terse.", "Count from 1 to 3.", "opposite of hot", "<|im_start|>user"):
        assert prompt_part in masked_text
    assert "cold" not in masked_text and "1 2 3" not in masked_text


def test_multi_turn_with_alpaca_template_ends_each_reply_with_eos(tokenizer_with):
    tok = tokenizer_with("alpaca")
    row = {"messages": [
        {"role": "user", "content": "Count from 1 to 3."},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "And back?"},
        {"role": "assistant", "content": "3 2 1"},
    ]}
    ex = tokenize_example(to_canonical(row, "messages"), tok, train_on_inputs=False)
    eos = tok.eos_token_id
    assert trained(ex) == encode(tok, "1 2 3") + [eos] + encode(tok, "3 2 1") + [eos]


def test_train_on_inputs_trains_every_token(tokenizer_with):
    tok = tokenizer_with("alpaca")
    ex = tokenize_example(
        to_canonical({"instruction": "Count from 1 to 3.", "output": "1 2 3"}, "alpaca"), tok, train_on_inputs=True
    )
    assert ex["labels"] == ex["input_ids"]


def test_prompt_completion_raw_trains_completion_and_eos(tokenizer_with):
    tok = tokenizer_with("raw")
    ex = tokenize_example(
        to_canonical({"prompt": "Q: opposite of up?\nA:\n", "completion": "down"}, "prompt_completion"),
        tok,
        train_on_inputs=False,
    )
    assert tok.decode(ex["input_ids"]) == "<s>Q: opposite of up?\nA:\ndown</s>"
    assert trained(ex) == encode(tok, "down") + [tok.eos_token_id]


def test_text_is_trained_in_full_with_eos(tokenizer_with):
    tok = tokenizer_with("alpaca")
    ex = tokenize_example(to_canonical({"text": "green water light"}, "text"), tok, train_on_inputs=False)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"] == [tok.bos_token_id] + encode(tok, "green water light") + [tok.eos_token_id]


def test_eos_keeps_its_label_when_pad_equals_eos(tokenizer_with):
    """The classic bug: masking every pad id also masks the real EOS when pad == eos."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = tokenizer_with("alpaca")
    short = tokenize_example(to_canonical({"instruction": "Hi.", "output": "cold"}, "alpaca"), tok, False)
    long = tokenize_example(
        to_canonical({"instruction": "Count from 1 to 9.", "output": "1 2 3 4 5 6 7 8 9"}, "alpaca"), tok, False
    )
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert ids[n - 1].item() == tok.eos_token_id and labels[n - 1].item() == tok.eos_token_id  # EOS trained
    assert ids[n:].eq(tok.pad_token_id).all() and labels[n:].eq(IGNORE_INDEX).all()  # padding is not
    assert batch["attention_mask"][0, n:].sum().item() == 0
    assert torch.equal(batch["labels"][1], torch.tensor(long["labels"]))
