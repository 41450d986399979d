"""`qlora generate`: the training template, the training stop token, and plain transformers + peft
agreeing token for token."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml


@pytest.fixture()
def run_dir(tiny_run):
    """configs/tiny.yaml trained through the CLI (the demo's run; shared, so read only)."""
    return tiny_run


PROMPT = "What is the opposite of up?"


def test_greedy_generate_equals_plain_transformers_and_peft(run_dir, qlora_main):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    proc = qlora_main("generate", str(run_dir), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "32")
    assert proc.returncode == 0, proc.stderr[-2000:]

    # The plain way: the run's saved tokenizer and chat template, the base in 4 bits, the adapter.
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(run_dir)
    from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT

    messages = [{"role": "system", "content": ALPACA_SYSTEM_NO_INPUT}, {"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(recipe["model"]["name_or_path"], quantization_config=bnb,
                                                dtype=torch.float32, device_map={"": "cpu"})
    for m in base.modules():  # see tests/test_train.py::_fresh_base: the CPU's second 4-bit kernel
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    assert new[-1].item() == tok.eos_token_id, "the plain model did not stop by itself"
    assert proc.stdout.strip() == tok.decode(new, skip_special_tokens=True).strip()

    # ...and our rendering is the one training used: the same ids as the saved template gives.
    from qlora_cli.infer.target import load_target

    assert load_target(str(run_dir)).prompt_ids(PROMPT) == ids["input_ids"][0].tolist()


def test_trained_tiny_model_stops_by_itself(run_dir, tmp_path, qlora_main):
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    data = [json.loads(line) for line in open(recipe["data"]["sources"][0]["path"])][:24]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r["input"]}) + "\n" for r in data))
    out = tmp_path / "out.jsonl"
    proc = qlora_main("generate", str(run_dir), "--input", str(prompts), "--output", str(out), "--greedy",
                      "--max-new-tokens", "48")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(data)
    assert all(r["stopped"] for r in results), [(r["instruction"], r["completion"]) for r in results if not r["stopped"]]
    assert all(r["completion"] for r in results), [(r["instruction"], r["input"]) for r in results if not r["completion"]]
    assert [r["instruction"] for r in results] == [r["instruction"] for r in data]  # in order, fields kept


def test_merged_model_generates_what_the_run_generates(run_dir, tmp_path, qlora_main):
    assert qlora_main("merge", str(run_dir), "--output", str(tmp_path / "merged"), "--no-verify").returncode == 0
    a = qlora_main("generate", str(run_dir), "--prompt", PROMPT, "--greedy")
    b = qlora_main("generate", str(tmp_path / "merged"), "--prompt", PROMPT, "--greedy")
    assert a.returncode == b.returncode == 0, b.stderr[-2000:]
    assert a.stdout == b.stdout and a.stdout.strip()


def _compare_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """The --compare table as {model: (template, reply)} (COLUMNS=200: one line per row)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 3 and cells[0] and cells[0] != "model":
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_compare_shows_each_adapter_and_the_base(run_dir, qlora_main):
    proc = qlora_main("generate", str(run_dir), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "8",
                      "--adapter", f"again={run_dir}", "--compare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _compare_rows(proc.stdout)
    # TARGET's adapter is labelled by its run's name, not PEFT's "default".
    assert set(rows) == {run_dir.name, "again", "base"}, proc.stdout
    assert rows[run_dir.name] == rows["again"]  # the same adapter under two names
    assert rows["base"][1] != rows[run_dir.name][1]  # the bare base answers otherwise
    assert rows["base"][0] == "alpaca"  # prompted as TARGET's run is


def _run_with_template(run_dir, folder, template: str, fmt: str):
    """A copy of the run whose recipe names another template and data format (same adapter weights)."""
    copy = folder / f"{template}_run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["data"]["template"] = template
    recipe["data"]["sources"][0]["format"] = fmt
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


def test_compare_prompts_each_adapter_with_its_own_template(run_dir, tmp_path, qlora_main):
    other = _run_with_template(run_dir, tmp_path, "raw", "messages")
    greedy = ("--prompt", PROMPT, "--greedy", "--max-new-tokens", "8")
    alone = {path: qlora_main("generate", str(path), *greedy) for path in (run_dir, other)}
    assert all(r.returncode == 0 for r in alone.values()), [r.stderr[-1000:] for r in alone.values()]
    # The same weights answer otherwise in the other format: what the table must keep apart.
    assert alone[run_dir].stdout.strip() != alone[other].stdout.strip()

    proc = qlora_main("generate", str(run_dir), *greedy, "--adapter", f"raw={other}", "--compare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _compare_rows(proc.stdout)
    # Each row is what that run answers on its own, in its own template.
    assert rows[run_dir.name] == ("alpaca", alone[run_dir].stdout.strip())
    assert rows["raw"] == ("raw", alone[other].stdout.strip())


def test_interactive_chat_keeps_the_conversation(run_dir, qlora_main):
    proc = qlora_main("generate", str(run_dir), "--interactive", "--greedy", "--max-new-tokens", "16",
                      input=f"{PROMPT}\n/reset\n{PROMPT}\n/exit\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    replies = [line.split("assistant> ", 1)[1] for line in proc.stdout.splitlines() if "assistant> " in line]
    assert len(replies) == 2 and replies[0] == replies[1]  # /reset really started over


# --- Bad input -----------------------------------------------------------------------------------


def _user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_bad_targets(run_dir, tmp_path, qlora_main):
    _user_error(qlora_main("generate", str(tmp_path / "nowhere"), "--prompt", "hi"), "holds no model and no adapter")
    (tmp_path / "empty").mkdir()
    _user_error(qlora_main("generate", str(tmp_path / "empty"), "--prompt", "hi"), "holds no model and no adapter")
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("checkpoints"))
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tmp_path / "gone")
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _user_error(qlora_main("generate", str(moved), "--prompt", "hi"), "model directory not found", "gone")


def test_bad_prompt_files_and_flags(run_dir, tmp_path, qlora_main):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _user_error(qlora_main("generate", str(run_dir), "--input", str(empty)), "has no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "unterminated\n')
    _user_error(qlora_main("generate", str(run_dir), "--input", str(bad)), f"{bad}:2", "not valid JSON")
    _user_error(qlora_main("generate", str(run_dir)), "exactly one of")
    _user_error(qlora_main("generate", str(run_dir), "--prompt", "  "), "--prompt", "empty")
    _user_error(qlora_main("generate", str(run_dir), "--prompt", "hi", "--adapter", "nameonly"), "NAME=RUN_DIR")
    _user_error(qlora_main("generate", str(run_dir), "--input", str(tmp_path)), str(tmp_path), "is a directory",
                "one prompt per line")


def test_every_bad_prompt_line_is_named_at_once(run_dir, tmp_path, qlora_main):
    bad = tmp_path / "bad.jsonl"
    lines = ['{"prompt": "ok"}', '{"prompt": "unterminated', '{"answer": "no prompt"}', '{"prompt": "fine"}',
             '[1, 2]', *['{"prompt": ' for _ in range(30)]]
    bad.write_text("\n".join(lines) + "\n")
    result = qlora_main("generate", str(run_dir), "--input", str(bad))
    _user_error(result, "33 line(s)", f"{bad}:2", "not valid JSON", f"{bad}:3", f"{bad}:5", "needs a non-empty 'prompt'",
                "(13 more not shown)")
    assert f"{bad}:1:" not in result.stderr and f"{bad}:4:" not in result.stderr  # the good lines are not blamed


def test_an_existing_output_is_replaced_only_when_asked(run_dir, tmp_path, qlora_main):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    args = ("generate", str(run_dir), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "2")
    _user_error(qlora_main(*args), "--output", str(out), "exists", "--overwrite")
    assert out.read_text() == "keep me\n"
    assert qlora_main(*args, "--overwrite").returncode == 0
    assert json.loads(out.read_text())["prompt"] == "hi"

    png = tmp_path / "loss.png"
    png.write_bytes(b"keep me")
    _user_error(qlora_main("plot", str(run_dir), "--output", str(png)), "--output", "exists", "--overwrite")
    assert png.read_bytes() == b"keep me"
    assert qlora_main("plot", str(run_dir), "--output", str(png), "--overwrite").returncode == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_interactive_needs_a_chat_template(run_dir, tmp_path, qlora_main):
    text_run = tmp_path / "text_run"
    shutil.copytree(run_dir, text_run, ignore=shutil.ignore_patterns("checkpoints"))
    recipe = yaml.safe_load((text_run / "recipe.yaml").read_text())
    recipe["data"]["sources"][0]["format"] = "text"
    recipe["data"]["sources"][0]["columns"] = {"text": "output"}
    recipe["data"]["template"] = None
    (text_run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _user_error(qlora_main("generate", str(text_run), "--interactive"), "--interactive", "no chat template")
