"""scripts/check_templates.py: OK where qlora's mask is the assistant's tokens, MISMATCH (exit 1) where not.

The tokenizer is the tiny model's, given a ChatML-style template of its own (no {% generation %}
blocks, as most models' templates), so qlora's pipeline locates the turns by prefix renders. Variants
of it render tool calls, rewrite earlier turns (an empty <think> block before the last reply only, as
Qwen3) or end the generation prompt with a space (so a token of the whole text straddles the reply's
start, and qlora's seam policy tokenizes prompt and reply apart).
"""

from __future__ import annotations

import hashlib
import io
import json

import check_templates
from transformers import AutoTokenizer

CHATML_OWN = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Tool definitions in a system turn, an assistant's tool calls after its content (Hermes/Qwen style).
CHATML_TOOLS = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\n{{ tools | tojson }}</s>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# As Qwen3: an empty <think> block before the last reply only, so earlier replies are written differently
# once the conversation goes on.
CHATML_THINK = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think></think>\n{% endif %}{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The generation prompt ends with a space: byte-level BPE writes ' the' as one token of the whole text.
CHATML_SPACE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def call(city: str) -> list[dict]:
    return [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]


def run(tmp_path, tiny, rows: list, template: str = CHATML_OWN) -> tuple[int, str]:
    tok_dir = tmp_path / f"tok-{hashlib.sha1(template.encode()).hexdigest()[:8]}"
    if not tok_dir.exists():
        tok = AutoTokenizer.from_pretrained(tiny / "model")
        tok.chat_template = template
        tok.save_pretrained(tok_dir)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = io.StringIO()
    code = check_templates.main([str(tok_dir), str(data)], out=out)
    return code, out.getvalue()


def test_correct_rows_are_ok_and_refused_rows_are_counted_apart(tmp_path, tiny):
    rows = [
        {"messages": [{"role": "user", "content": "Count from 1 to 3."}, {"role": "assistant", "content": "1 2 3"}]},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hot?"},
                      {"role": "assistant", "content": "cold"}, {"role": "user", "content": "Up?"},
                      {"role": "assistant", "content": "down"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
    ]
    code, out = run(tmp_path, tiny, rows)
    assert code == 0, out
    assert "row 1: OK" in out and "row 2: OK" in out
    assert "row 3: REFUSED: bad: messages[1].content must be a string" in out
    assert "2 OK, 0 mismatched, 1 refused, 0 skipped (of 3)" in out


def test_a_wrong_mask_is_a_mismatch_showing_the_prompt_text_trained(tmp_path, tiny, monkeypatch):
    # The bug issue 19 reported, put back: a conversation opening with an assistant turn had that turn's
    # span start at character 0, so the preamble and the turn's header were trained.
    from qlora_cli.data.templates import Renderer

    located = Renderer._reply_span
    monkeypatch.setattr(Renderer, "_reply_span", lambda self, messages, k, upto, tools: (
        (0, located(self, messages, k, upto, tools)[1]) if k == 0 else located(self, messages, k, upto, tools)))
    rows = [
        {"messages": [{"role": "user", "content": "Count from 1 to 3."}, {"role": "assistant", "content": "1 2 3"}]},
        {"messages": [{"role": "assistant", "content": "Hello, how can I help?"},
                      {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
    ]
    code, out = run(tmp_path, tiny, rows)
    assert code == 1, out
    assert "row 1: OK" in out
    assert "row 2: MISMATCH" in out
    assert "<|im_start|>assistant" in out.split("row 2: MISMATCH")[1].split("that is not assistant content")[0]
    assert "preamble trained" in out
    assert "1 OK, 1 mismatched, 0 refused" in out


def test_openai_tool_calls_are_trained_from_the_generation_prompt_through_the_end_of_turn(tmp_path, tiny):
    rows = [
        {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                      {"role": "assistant", "content": None, "tool_calls": call("Oslo")},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
                      {"role": "assistant", "content": "It is 3 degrees in Oslo."}], "tools": TOOLS},
        {"messages": [{"role": "user", "content": "Is it raining in Rome?"},
                      {"role": "assistant", "content": "Let me check.", "tool_calls": call("Rome")},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "rain"}'},
                      {"role": "assistant", "content": "Yes."}], "tools": TOOLS},
    ]
    code, out = run(tmp_path, tiny, rows, CHATML_TOOLS)
    assert code == 0, out
    assert "row 1: OK" in out and "row 2: OK" in out
    assert "note:" not in out  # no "the conversion drops" note: the calls are kept and trained
    assert "2 OK, 0 mismatched, 0 refused, 0 skipped (of 2)" in out
    # and they are trained: the reference (which qlora agrees with) trains the call and its end-of-turn
    tok, renderer = check_templates.load(str(next(tmp_path.glob("tok-*"))), "tokenizer")
    (_, _, ids, trained), = check_templates.qlora_examples(rows[0], "messages", {}, renderer, tok)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call></s>' in tok.decode(
        [t for t, flag in zip(ids, trained) if flag])


def test_a_template_that_rewrites_earlier_turns_gives_each_an_example_with_its_think_block(tmp_path, tiny):
    rows = [{"messages": [{"role": "user", "content": "Hot?"}, {"role": "assistant", "content": "cold"},
                          {"role": "user", "content": "Up?"}, {"role": "assistant", "content": "down"}]}]
    code, out = run(tmp_path, tiny, rows, CHATML_THINK)
    assert code == 0, out
    assert "row 1: OK (2 examples)" in out
    assert "example 2 (messages[:2]): trains the template's text between the generation prompt and the reply: " \
           "'<think></think>\\n'" in out
    assert "note: template text between the generation prompt and the reply trained: 1 rows" in out


def test_a_reply_tokenized_apart_from_its_prompt_is_ok_and_a_wrong_cut_is_a_seam_mismatch(tmp_path, tiny, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": "Count from 1 to 3."},
                          {"role": "assistant", "content": "the count is 1 2 3"}]}]
    code, out = run(tmp_path, tiny, rows, CHATML_SPACE)
    assert code == 0, out
    assert "row 1: OK" in out and "note: seam: prompt and reply tokenized apart at token" in out

    # The reply's span starting one character late ('he count'): qlora cuts inside the first word.
    from qlora_cli.data.templates import Renderer

    located = Renderer._reply_span
    monkeypatch.setattr(Renderer, "_reply_span", lambda self, messages, k, upto, tools: (
        located(self, messages, k, upto, tools)[0] + 1, located(self, messages, k, upto, tools)[1]))
    code, out = run(tmp_path, tiny, rows, CHATML_SPACE)
    assert code == 1, out
    assert "row 1: MISMATCH" in out and "does not start with the last reply's generation prompt" in out
    assert "'he count is 1 2 3</s>' vs 'the count is 1 2 3</s>'" in out
    assert "mismatch: seam: 1 rows" in out


def test_a_plain_text_file_is_skipped(tmp_path, tiny):
    code, out = run(tmp_path, tiny, [{"text": "Once upon a time."}, {"text": "The end."}])
    assert code == 0, out
    assert "0 OK, 0 mismatched, 0 refused, 2 skipped (of 2)" in out
    assert "2 x 'plain text: no template'" in out
