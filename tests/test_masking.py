"""Loss masks, token by token: exactly the response tokens plus the stop token carry a label.

`tokenize_example` below is the pipeline's own path (canonical form -> Renderer -> encode), one row
at a time.
"""

from __future__ import annotations

import json

import pytest
import torch

from qlora_cli.recipe.schema import ModelSection
from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT, ALPACA_SYSTEM_WITH_INPUT, BadRow, to_canonical
from qlora_cli.data.templates import BUILTINS, Renderer, Template, apply_template, resolve_template
from qlora_cli.data.tokenize import IGNORE_INDEX, encode, encode_text
from qlora_cli.model.load import load_tokenizer


def tokenize_example(example: dict, tok, train_on_inputs: bool, template: Template | None = None) -> dict:
    if "text" in example:
        ids, labels = encode_text(tok, [example["text"]]).lists()
    else:
        installed = next((t for t in BUILTINS.values() if t.jinja == tok.chat_template), None)
        template = template or installed or Template("installed", tok.chat_template)
        [(text, spans)] = Renderer(template, tok).examples(example["messages"], example.get("tools"))
        ids, labels = encode(tok, [text], [spans], train_on_inputs).lists()
    return {"input_ids": ids[0], "labels": labels[0]}


@pytest.fixture()
def tokenizer_with(tiny):
    def make(template: str):
        tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
        apply_template(resolve_template(template, tok), tok)
        return tok

    return make


def trained(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def tokens(tok, text: str) -> list[int]:
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

    response = tokens(tok, row["output"]) + [tok.eos_token_id]
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

    assert trained(ex) == tokens(tok, "1 2 3") + [im_end] + tokens(tok, "cold") + [im_end]
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
    assert trained(ex) == tokens(tok, "1 2 3") + [eos] + tokens(tok, "3 2 1") + [eos]


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
    assert trained(ex) == tokens(tok, "down") + [tok.eos_token_id]


def test_text_is_trained_in_full_with_eos(tokenizer_with):
    tok = tokenizer_with("alpaca")
    ex = tokenize_example(to_canonical({"text": "green water light"}, "text"), tok, train_on_inputs=False)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"] == [tok.bos_token_id] + tokens(tok, "green water light") + [tok.eos_token_id]


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


MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Count from 1 to 3."},
    {"role": "assistant", "content": "1 2 3"},
    {"role": "user", "content": "What is the opposite of hot?"},
    {"role": "assistant", "content": "cold"},
]


def test_llama3_trains_every_assistant_turn_and_eot(tokenizer_with):
    tok = tokenizer_with("llama3")
    ex = tokenize_example({"messages": MULTI_TURN}, tok, train_on_inputs=False)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.eos_token_id == eot
    assert trained(ex) == tokens(tok, "1 2 3") + [eot] + tokens(tok, "cold") + [eot]
    assert tok.decode(ex["input_ids"]).startswith(
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCount from 1 to 3.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n1 2 3<|eot_id|>"
    )


@pytest.mark.parametrize("name", ["alpaca", "chatml", "llama3"])
def test_batched_masks_equal_transformers_assistant_masks(tokenizer_with, name):
    """Our offset-based masks are the ones apply_chat_template(return_assistant_tokens_mask=True) gives."""
    tok = tokenizer_with(name)
    conversations = [MULTI_TURN, MULTI_TURN[1:3], [*MULTI_TURN[1:3], {"role": "user", "content": "\n  spaced  "},
                                                   {"role": "assistant", "content": "  \nodd spacing\n"}]]
    for messages in conversations:
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ex = tokenize_example({"messages": messages}, tok, train_on_inputs=False)
        assert ex["input_ids"] == list(ref["input_ids"])
        assert [int(label != IGNORE_INDEX) for label in ex["labels"]] == list(ref["assistant_masks"])


@pytest.mark.parametrize("name", ["alpaca", "chatml", "llama3"])
def test_rendering_a_batch_together_equals_rendering_each_row(tokenizer_with, name):
    """Renderer.examples_many (the pipeline's path: one renderer call per batch) gives each row what
    examples() gives it alone, refusals included; a row the template raises on is refused alone."""
    from qlora_cli.data.templates import TemplateMismatch

    tok = tokenizer_with(name)
    raising = Template("raising", "{%- for m in messages %}{%- if m['content'] == 'boom' %}"
                                  "{{ raise_exception('no boom') }}{%- endif %}{%- endfor %}" + BUILTINS[name].jinja)
    assert raising.has_generation_blocks
    rows = [
        (MULTI_TURN, None),
        (MULTI_TURN[1:3], None),
        ([*MULTI_TURN[1:3], {"role": "user", "content": "more"}, {"role": "assistant", "content": "  "}], None),
        ([{"role": "tool", "content": "42"}, *MULTI_TURN[1:3]], None),  # alpaca refuses a tool message
        ([*MULTI_TURN[1:2], {"role": "user", "content": "boom"}, MULTI_TURN[2]], None),
    ]
    for template in (BUILTINS[name], raising):
        renderer = Renderer(template, tok)
        together = renderer.examples_many(rows)
        for (messages, tools), got in zip(rows, together):
            try:
                alone = renderer.examples(messages, tools)
            except (TemplateMismatch, BadRow) as exc:
                assert type(got) is type(exc) and str(got) == str(exc)
            else:
                assert got == alone
    # the raising template refused exactly the row that says boom, and rendered the others
    assert isinstance(together[4], BadRow) and not isinstance(together[0], Exception)


def _without_generation_blocks(jinja: str) -> str:
    import re

    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", jinja)


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca"])
def test_template_without_generation_blocks_gets_the_same_masks_from_prefix_renders(tokenizer_with, name):
    """The tokenizer's own template (or a custom one) rarely has {% generation %}: masks must not change."""
    tok = tokenizer_with(name)
    plain = Template("custom", _without_generation_blocks(BUILTINS[name].jinja))
    assert not plain.has_generation_blocks
    messages = MULTI_TURN if name != "alpaca" else MULTI_TURN[:3] + MULTI_TURN[3:]
    expected = tokenize_example({"messages": messages}, tok, train_on_inputs=False)
    got = tokenize_example({"messages": messages}, tok, train_on_inputs=False, template=plain)
    assert got == expected


def test_template_that_rewrites_earlier_turns_is_rejected(tokenizer_with):
    from qlora_cli.data.templates import TemplateMismatch

    tok = tokenizer_with("chatml")
    # Renders the conversation newest-first, so a shorter conversation is not a prefix of a longer one.
    reversed_template = Template(
        "reversed", "{%- for m in messages | reverse %}{{ m['role'] + ': ' + m['content'] + eos_token }}{%- endfor %}"
    )
    with pytest.raises(TemplateMismatch, match="differently from its beginning"):
        tokenize_example({"messages": MULTI_TURN}, tok, False, template=reversed_template)


def test_a_template_that_drops_a_message_is_rejected(tokenizer_with):
    from qlora_cli.data.templates import TemplateMismatch

    tok = tokenizer_with("chatml")
    no_system = Template(
        "no-system",
        "{%- for m in messages %}{%- if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
        "{%- endif %}{%- endfor %}",
    )
    with pytest.raises(TemplateMismatch, match="dropped a 'system' message"):
        tokenize_example({"messages": MULTI_TURN}, tok, False, template=no_system)
    # built-ins declare what they render: alpaca has no place for a tool result
    with pytest.raises(TemplateMismatch, match="no place for a 'tool' message"):
        tokenize_example(
            {"messages": [*MULTI_TURN[:3], {"role": "tool", "content": "42"}, *MULTI_TURN[3:]]},
            tok, False, template=BUILTINS["alpaca"],
        )


def test_the_prompt_is_tokenized_as_generate_feeds_it_when_a_token_would_straddle_the_seam(tokenizer_with):
    """The seam policy (tokenize.py): a token boundary falls where the reply starts, and the prompt's
    tokens are the prompt text's own, the tokens `qlora generate` feeds."""
    tok = tokenizer_with("raw")
    # The response completes a word, so tokenizing the whole text merges across the seam (" apple").
    prompt, response = "Spell it: appl", "e"
    joint = tokens(tok, "<s>" + prompt + response + "</s>")
    alone = tokens(tok, "<s>" + prompt)
    assert joint[: len(alone)] != alone  # a real straddling case for this tokenizer
    ex = tokenize_example(
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}, tok, False
    )
    assert ex["input_ids"][: len(alone)] == alone
    assert ex["labels"][: len(alone)] == [IGNORE_INDEX] * len(alone)
    assert tok.decode(trained(ex)) == "e</s>"  # the reply and its stop token, nothing of the prompt
    assert tok.decode(ex["input_ids"]) == "<s>" + prompt + response + "</s>"  # no text added or lost


def test_sharegpt_roles_are_mapped_or_rejected():
    from qlora_cli.data.formats import UnmappedRole

    row = {"conversations": [
        {"from": "system", "value": "Use tools."},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 degrees."},
    ]}
    with pytest.raises(UnmappedRole) as info:
        to_canonical(row, "sharegpt")
    assert info.value.roles == ["function_call", "observation"]  # every unmapped role in the row, at once
    out = to_canonical(row, "sharegpt", roles={"function_call": "assistant", "observation": "tool"})
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert [m["content"] for m in out["messages"]] == [t["value"] for t in row["conversations"]]


def test_mapped_tool_calls_are_trained_and_tool_results_are_not(tokenizer_with):
    tok = tokenizer_with("chatml")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "CALL weather Paris"},
        {"role": "tool", "content": "RESULT 21"},
        {"role": "assistant", "content": "21 degrees."},
    ]
    ex = tokenize_example({"messages": messages}, tok, train_on_inputs=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained(ex) == tokens(tok, "CALL weather Paris") + [im_end] + tokens(tok, "21 degrees.") + [im_end]
    assert "<|im_start|>tool\nRESULT 21<|im_end|>" in tok.decode(ex["input_ids"])


TOOLS = [{"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}]


@pytest.mark.parametrize("name, system_open", [("chatml", "<|im_start|>system\n"),
                                               ("llama3", "<|start_header_id|>system<|end_header_id|>\n\n")])
def test_tool_definitions_are_rendered_in_the_system_turn_and_masked(tokenizer_with, name, system_open):
    tok = tokenizer_with(name)
    with_tools = tokenize_example({"messages": MULTI_TURN, "tools": TOOLS}, tok, train_on_inputs=False)
    without = tokenize_example({"messages": MULTI_TURN}, tok, train_on_inputs=False)
    text = tok.decode(with_tools["input_ids"])
    assert text.startswith(f"<s>{system_open}You are terse.\n\nYou can call these tools:\n"
                           '{"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}')
    assert text.count("You are terse.") == 1  # the system message is folded in, not repeated
    assert trained(with_tools) == trained(without)  # the definitions are prompt, never trained
    plain = Template("custom", _without_generation_blocks(BUILTINS[name].jinja))
    assert tokenize_example({"messages": MULTI_TURN, "tools": TOOLS}, tok, False, template=plain) == with_tools


def test_templates_without_a_place_for_tools_refuse_them(tokenizer_with):
    from qlora_cli.data.templates import TemplateMismatch

    tok = tokenizer_with("chatml")
    with pytest.raises(TemplateMismatch, match="no place for the row's tool definitions"):
        tokenize_example({"messages": MULTI_TURN, "tools": TOOLS}, tok, False, template=BUILTINS["alpaca"])
    ignores_tools = Template("mine", "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
                                     "{%- endfor %}")
    with pytest.raises(TemplateMismatch, match=r"dropped the tool definitions \(weather\)"):
        tokenize_example({"messages": MULTI_TURN, "tools": TOOLS}, tok, False, template=ignores_tools)


def test_tools_field_is_parsed_from_json_text_or_a_list():
    from qlora_cli.data.formats import BadRow

    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]
    assert to_canonical({"conversations": turns, "tools": json.dumps(TOOLS)}, "sharegpt")["tools"] == TOOLS
    assert to_canonical({"conversations": turns, "tools": TOOLS}, "sharegpt")["tools"] == TOOLS
    assert "tools" not in to_canonical({"conversations": turns, "tools": ""}, "sharegpt")  # Glaive: no tools
    with pytest.raises(BadRow, match="'tools' is not valid JSON"):
        to_canonical({"conversations": turns, "tools": "[{oops"}, "sharegpt")
    with pytest.raises(BadRow, match="list of tool definitions"):
        to_canonical({"conversations": turns, "tools": "[1, 2]"}, "sharegpt")
