"""scripts/check_templates.py: OK where qlora's mask is the assistant's tokens, MISMATCH (exit 1) where not.

The tokenizer is the tiny model's, given a ChatML-style template of its own (no {% generation %}
blocks, as most models' templates), so qlora's pipeline locates the turns by prefix renders.
"""

from __future__ import annotations

import io
import json

import check_templates
from transformers import AutoTokenizer

CHATML_OWN = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def run(tmp_path, tiny, rows: list) -> tuple[int, str]:
    tok_dir = tmp_path / "tok"
    if not tok_dir.exists():
        tok = AutoTokenizer.from_pretrained(tiny / "model")
        tok.chat_template = CHATML_OWN
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
