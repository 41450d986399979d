"""Loss masks with the chat templates real models ship (issue 19, items 1-5), token by token.

Each template below is a small Jinja string that reproduces one behaviour of a real model's template:
a default system prompt and a tools block (Qwen2.5), a dated preamble and tool results through
`tojson` (Llama 3.1), EOS after the last turn only (Phi-3.5), past reasoning dropped (Qwen3), no
system role (Mistral v0.2). Two tokenizers are used: the tiny model's byte-level BPE, and a
SentencePiece-style one (BPE with Metaspace word-start markers and byte fallback, the form
transformers gives Llama and Mistral tokenizers) trained in memory. The suite never reads ../shared.
"""

from __future__ import annotations

import json

import pytest

from qlora_cli.recipe.schema import ModelSection
from qlora_cli.data.formats import to_canonical
from qlora_cli.data.report import example_segments
from qlora_cli.data.templates import BadRow, Renderer, TemplateMismatch, resolve_template
from qlora_cli.data.tokenize import IGNORE_INDEX, encode
from qlora_cli.model.load import load_tokenizer

# Newlines are written as Jinja strings ({{ '\n' }}), as the real templates do: transformers renders
# with trim_blocks, which drops a newline written right after a {% tag %}.

# Qwen2.5: a default system prompt when the conversation has none, and tools in the system turn.
QWEN25 = (
    "{%- if tools %}{{ '<|im_start|>system\\nYou are Qwen.\\n<tools>' }}"
    "{%- for t in tools %}{{ '\\n' + t | tojson }}{%- endfor %}{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant' }}{%- if m.content %}{{ '\\n' + m.content }}{%- endif %}"
    "{%- for c in m.tool_calls or [] %}{{ '\\n<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' }}"
    "{{- c.function.arguments | tojson }}{{ '}\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif not (loop.first and m.role == 'system') %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1: BOS and a dated system preamble always; a tool result is rendered through tojson.
LLAMA31 = (
    "{{ bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content | tojson + '<|eot_id|>' }}"
    "{%- else %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Phi-3.5: EOS after the last turn only (when no generation prompt follows).
PHI35 = (
    "{%- for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- else %}{{ eos_token }}{%- endif %}"
)

# Qwen3: the reply after the last user turn gets a <think> block (empty without reasoning); earlier
# replies are rendered without one, so a conversation's rendering is not a prefix of a longer one's.
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral v0.2: no system role, strict alternation.
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}"
    "{% endif %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
    "{% elif m.role == 'assistant' %}{{ m.content + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

MARKERS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


@pytest.fixture(scope="module")
def bpe(tiny):
    """The tiny model's byte-level BPE, with Phi-3's turn markers added as special tokens."""
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    tok.add_tokens(MARKERS, special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def spm():
    """A SentencePiece-style tokenizer, as transformers builds Llama's and Mistral's: BPE over '▁'-marked
    words (a '▁' before the first word too), byte fallback, and a decoder that drops that first '▁'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "The capital of France is Paris . Answer the question : what is two and two ? four".split()
    corpus = [" ".join(words[i:] + words[:i]) + "\n\n" for i in range(len(words))] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)] + ["▁"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=specials[3:])


def examples(tok, jinja: str, messages: list[dict], tools=None, name: str = "model") -> list[tuple[list[int], list[bool]]]:
    """[(ids, trained per token)] for each example the pipeline makes of one conversation."""
    tok.chat_template = jinja
    renderer = Renderer(resolve_template("tokenizer", tok), tok)
    out = []
    for text, spans in renderer.examples(messages, tools):
        ids, labels = encode(tok, [text], [spans], train_on_inputs=False).lists()
        out.append((ids[0], [label != IGNORE_INDEX for label in labels[0]]))
    return out


def trained_runs(tok, ids: list[int], flags: list[bool]) -> list[str]:
    """The text of each run of trained tokens."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(tok.decode(ids[start:i]))
            start = None
    return runs


def msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# --- 1. A conversation that opens with the assistant trains only the assistant's tokens ----------


@pytest.mark.parametrize("jinja, stop", [(QWEN25, "<|im_end|>"), (LLAMA31, "<|eot_id|>")], ids=["qwen25", "llama31"])
def test_a_conversation_opening_with_the_assistant_trains_no_preamble(bpe, jinja, stop):
    conversation = msgs(("assistant", "Hello, how can I help?"), ("user", "Name a color."), ("assistant", "Blue."))
    [(ids, flags)] = examples(bpe, jinja, conversation)
    assert trained_runs(bpe, ids, flags) == [f"Hello, how can I help?{stop}", f"Blue.{stop}"]
    assert not flags[0]  # BOS / the default system prompt


def test_the_tools_block_before_an_opening_assistant_turn_is_not_trained(bpe):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conversation = msgs(("assistant", "Ask me about the weather."), ("user", "Paris?"), ("assistant", "Sunny."))
    [(ids, flags)] = examples(bpe, QWEN25, conversation, tools)
    assert trained_runs(bpe, ids, flags) == ["Ask me about the weather.<|im_end|>", "Sunny.<|im_end|>"]


# --- 2. Popular templates are not refused ----------------------------------------------------------


def test_a_tool_result_rendered_through_tojson_is_found(bpe):
    conversation = [*msgs(("user", "Weather in Paris?"), ("assistant", "Checking.")),
                    {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'}, *msgs(("assistant", "21 and clear."))]
    [(ids, flags)] = examples(bpe, LLAMA31, conversation)
    assert '"{\\"temp\\": 21' in bpe.decode(ids)  # quoted by tojson, as Llama 3.1 renders it
    assert trained_runs(bpe, ids, flags) == ["Checking.<|eot_id|>", "21 and clear.<|eot_id|>"]


def test_a_template_that_adds_eos_after_the_last_turn_only_trains_each_reply_once(bpe):
    conversation = msgs(("user", "Hot?"), ("assistant", "cold"), ("user", "Up?"), ("assistant", "down"))
    [(ids, flags)] = examples(bpe, PHI35, conversation)
    # The first reply ends on its own end-of-turn, not on the EOS its shorter rendering ended with.
    assert trained_runs(bpe, ids, flags) == ["cold<|end|>", "down<|end|>\n</s>"]


def test_a_template_that_drops_past_reasoning_trains_each_turn_in_its_inference_context(bpe):
    conversation = msgs(("user", "Hot?"), ("assistant", "cold"), ("user", "Up?"), ("assistant", "down"))
    got = examples(bpe, QWEN3, conversation)
    assert len(got) == 2  # the whole conversation (last reply), and the first reply in its own context
    (full_ids, full_flags), (first_ids, first_flags) = got
    assert trained_runs(bpe, full_ids, full_flags) == ["<think>\n\n</think>\n\ndown<|im_end|>"]
    assert "<|im_start|>assistant\ncold<|im_end|>" in bpe.decode(full_ids)  # history as inference renders it
    assert trained_runs(bpe, first_ids, first_flags) == ["<think>\n\n</think>\n\ncold<|im_end|>"]
    # Each example's prompt is exactly what generation is given for that turn.
    renderer = Renderer(resolve_template("tokenizer", bpe), bpe)
    for (ids, flags), k in ((got[0], 3), (got[1], 1)):
        prompt = bpe(renderer.prompt(conversation[:k]), add_special_tokens=False).input_ids
        assert ids[: len(prompt)] == prompt and flags.index(True) == len(prompt)


def test_split_conversations_are_counted_and_said(bpe, tmp_path):
    from qlora_cli.recipe.schema import DataSection
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.data.report import data_warnings

    rows = [{"messages": msgs(("user", "Hot?"), ("assistant", "cold"), ("user", "Up?"), ("assistant", "down"))},
            {"messages": msgs(("user", "Big?"), ("assistant", "small"))}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bpe.chat_template = QWEN3
    template = resolve_template("tokenizer", bpe)
    data = DataSection(sources=[{"path": str(path), "format": "messages"}], template="tokenizer", cache=False)
    prepared = build_datasets(data, bpe, template, seed=0)
    assert prepared.stats.sources[0].rows == 2 and prepared.stats.split_rows == 1
    assert prepared.stats.train_rows == 3  # two examples from the first row, one from the second
    assert any("1 conversation(s) are trained as one example per assistant turn" in w for w in data_warnings(prepared.stats))


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn(bpe):
    bpe.chat_template = MISTRAL
    template = resolve_template("tokenizer", bpe)
    assert template.folds_system
    alpaca = to_canonical({"instruction": "Name a color.", "input": "", "output": "Blue."}, "alpaca")["messages"]
    [(text, spans)] = Renderer(template, bpe).examples(alpaca)
    system = alpaca[0]["content"]
    assert text.count(system) == 1 and text.startswith(f"<s>[INST] {system}\n\nName a color. [/INST]")
    assert text[spans[0][0]:spans[0][1]] == "Blue.</s>"
    # Generation folds it the same way, so the prompt is the trained prompt.
    assert Renderer(template, bpe).prompt(alpaca[:2]) == text[: spans[0][0]]


def test_a_template_that_rejects_a_row_for_another_reason_still_refuses_it(bpe):
    bpe.chat_template = MISTRAL
    renderer = Renderer(resolve_template("tokenizer", bpe), bpe)
    with pytest.raises(BadRow, match="roles must alternate"):
        renderer.examples(msgs(("user", "a"), ("user", "b"), ("assistant", "c")))


# --- 3. The prompt/response seam ------------------------------------------------------------------


@pytest.mark.parametrize("prompt, reply", [
    ("Answer:", "\n\nParis"),  # byte-level BPE merges ':' with the reply's newlines
    ("The capital of France is ", "Paris"),  # a prompt ending in a space: ' Paris' / '▁Paris'
    ("The capital of France is", " Paris"),  # the usual completion: nothing straddles
])
@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_the_prompt_is_tokenized_as_generate_feeds_it_and_the_reply_after_it(request, which, prompt, reply):
    from qlora_cli.data.templates import BUILTINS

    tok = request.getfixturevalue(which)
    raw = BUILTINS["raw"]
    conversation = msgs(("user", prompt), ("assistant", reply))
    renderer = Renderer(raw, tok)
    [(text, spans)] = renderer.examples(conversation)
    ids, labels = encode(tok, [text], [spans], train_on_inputs=False).lists()
    fed = tok(renderer.prompt(conversation[:1]), add_special_tokens=False).input_ids  # what generate feeds
    assert ids[0][: len(fed)] == fed
    assert labels[0][: len(fed)] == [IGNORE_INDEX] * len(fed)
    assert all(label != IGNORE_INDEX for label in labels[0][len(fed):])  # the reply and EOS, all trained
    assert tok.decode(ids[0][len(fed):]).strip() == (reply + tok.eos_token).strip()


def test_chatml_reply_starting_with_newlines_keeps_the_generation_prompt_tokens(bpe):
    conversation = msgs(("user", "Write a haiku."), ("assistant", "\n\nRain taps the glass"))
    [(ids, flags)] = examples(bpe, QWEN25, conversation)
    bpe.chat_template = QWEN25
    fed = bpe(Renderer(resolve_template("tokenizer", bpe), bpe).prompt(conversation[:1]),
              add_special_tokens=False).input_ids
    assert ids[: len(fed)] == fed and flags.index(True) == len(fed)
    assert trained_runs(bpe, ids, flags) == ["\n\nRain taps the glass<|im_end|>"]


# --- 4. `qlora data` shows SentencePiece word-start spaces ----------------------------------------


def test_the_data_view_keeps_the_space_before_a_sentencepiece_reply(spm):
    from datasets import Dataset
    from qlora_cli.data.templates import BUILTINS

    [(text, spans)] = Renderer(BUILTINS["raw"], spm).examples(
        msgs(("user", "The capital of France is"), ("assistant", " Paris.")))
    ids, labels = encode(spm, [text], [spans], train_on_inputs=False).lists()
    ds = Dataset.from_dict({"input_ids": ids, "labels": labels, "source": [0], "file": [0], "row": [1],
                            "trained": [3], "length": [len(ids[0])]})
    [example] = example_segments(ds, spm, 1)
    shown = "".join(s["text"] for s in example["segments"])
    assert "France is Paris." in shown
    assert [s["text"] for s in example["segments"] if s["trained"]] == [" Paris.</s>"]


# --- 5. OpenAI-style tool calls ---------------------------------------------------------------------

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object",
                                                             "properties": {"city": {"type": "string"}}}}}]


def openai_row(content) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": content, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 3}"},
            {"role": "assistant", "content": "3 degrees."},
        ],
        "tools": WEATHER,
    }


@pytest.mark.parametrize("content", [None, ""], ids=["null", "empty"])
def test_openai_tool_calls_are_kept_and_trained_with_the_models_template(bpe, content):
    example = to_canonical(openai_row(content), "messages")
    call = example["messages"][1]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Oslo"}  # parsed: templates render it with tojson
    assert example["messages"][2]["tool_call_id"] == "call_1"
    [(ids, flags)] = examples(bpe, QWEN25, example["messages"], example["tools"])
    runs = trained_runs(bpe, ids, flags)
    assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
                    "3 degrees.<|im_end|>"]
    assert "get_weather" in bpe.decode(ids).split("<|im_start|>user")[0]  # the tools block, not trained


@pytest.mark.parametrize("name, call", [
    ("chatml", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>'),
])
def test_openai_tool_calls_are_trained_with_the_built_in_templates(tiny, name, call):
    from qlora_cli.data.templates import apply_template

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    template = resolve_template(name, tok)
    apply_template(template, tok)
    example = to_canonical(openai_row(None), "messages")
    [(text, spans)] = Renderer(template, tok).examples(example["messages"], example["tools"])
    ids, labels = encode(tok, [text], [spans], train_on_inputs=False).lists()
    assert trained_runs(tok, ids[0], [label != IGNORE_INDEX for label in labels[0]])[0] == call


def test_a_template_with_no_place_for_tool_calls_refuses_the_row(tiny):
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    example = to_canonical({**openai_row(None), "tools": None}, "messages")
    from qlora_cli.data.templates import BUILTINS

    with pytest.raises(TemplateMismatch, match="no place for an assistant's tool_calls"):
        Renderer(BUILTINS["alpaca"], tok).examples(example["messages"])


def test_a_model_template_that_drops_tool_calls_refuses_the_row(bpe):
    example = to_canonical(openai_row(None), "messages")
    with pytest.raises(TemplateMismatch, match="dropped the tool calls of message 1"):
        examples(bpe, LLAMA31, example["messages"])


@pytest.mark.parametrize("call, message", [
    ({"type": "function", "function": {"arguments": "{}"}}, "has no function name"),
    ({"type": "function", "function": {"name": "f", "arguments": "{not json"}}, "arguments is not valid JSON"),
    ({"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}, "arguments must be a JSON object"),
    ("get_weather", "must be an object"),
])
def test_a_malformed_tool_call_is_a_bad_row_naming_it(call, message):
    from qlora_cli.data.formats import BadRow as FormatBadRow

    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]}
    with pytest.raises(FormatBadRow, match=message) as info:
        to_canonical(row, "messages")
    assert "messages[1].tool_calls[0]" in str(info.value)


def test_a_straddled_seam_before_a_later_reply_gives_each_reply_its_own_example(bpe):
    """The later reply's prompt holds the earlier straddling token whole, the earlier reply's prompt ends
    inside it: one example per reply, so every reply's prompt is exactly what generate feeds for it."""
    from qlora_cli.data.pipeline import _tokenize_rows
    from qlora_cli.data.sources import BAD_COLUMN, JSON_COLUMN, ROW_COLUMN

    from qlora_cli.data.templates import BUILTINS

    renderer = Renderer(BUILTINS["raw"], bpe)
    # 'appl' + 'e': the whole text merges ' apple' across the first reply's start.
    conversation = msgs(("user", "Spell it: appl"), ("assistant", "e"), ("user", " Again: appl"), ("assistant", "e"))
    table = _tokenize_rows(
        {ROW_COLUMN: [7], JSON_COLUMN: [json.dumps({"messages": conversation})], BAD_COLUMN: [None]},
        fmt="messages", rename={"messages": "messages", "tools": "tools"}, roles={}, renderer=renderer,
        tokenizer=bpe, train_on_inputs=False, max_seq_len=4096, on_too_long="truncate",
    )
    assert table.column("row").to_pylist() == [7, 7] and table.column("examples").to_pylist() == [2, 2]
    for k, (ids, labels) in enumerate(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())):
        fed = bpe(renderer.prompt(conversation[: 2 * k + 1]), add_special_tokens=False).input_ids
        trained = [label != IGNORE_INDEX for label in labels]
        assert ids[: len(fed)] == fed and trained.index(True) == len(fed)
        assert trained_runs(bpe, ids, trained) == ["e</s>"]  # its own reply only: the other is history


def test_a_model_template_that_drops_the_text_beside_a_tool_call_says_so(bpe):
    # Llama 3.1's template renders an assistant turn with tool_calls as the call alone.
    calls_only = (
        "{%- for m in messages %}{%- if m.tool_calls %}{{ '<|assistant|>\\n' + m.tool_calls[0].function.name + '<|end|>\\n' }}"
        "{%- else %}{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
    )
    example = to_canonical(openai_row("Let me check."), "messages")
    with pytest.raises(TemplateMismatch, match="renders the tool calls of message 1 but not the text beside them"):
        examples(bpe, calls_only, example["messages"])
