"""`qlora export`: the parts that need no llama.cpp build (scripts/check_export.sh runs the whole
export against a built llama.cpp): arguments and checks before any work, the converter's failures
turned into messages, the Ollama Modelfile's templates, the report and the check's verdict.

A stand-in llama.cpp tree (a converter that writes a metadata-only GGUF with gguf-py) drives the
command end to end here: what is checked is our side (order of checks, the folder renamed into
place, the report, overwrite), never llama.cpp's conversion."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from qlora_cli.data.templates import BUILTINS
from qlora_cli.export.ollama import GO_TEMPLATES, go_template_name, modelfile
from qlora_cli.export.run import render_check, verdict
from qlora_cli.outputs.served_files import portable_jinja
from test_merge import fabricate_run

# --- The Modelfile's Go templates render what the Jinja templates render ----------------------------


def go_to_jinja(go: str) -> str:
    """Translate the small Go-template subset GO_TEMPLATES uses into Jinja, for this test only: Go's
    `{{-`/`-}}` trim whitespace as Jinja's do, `if`/`else if`/`range`/`end` map one to one."""
    stack, out = [], []
    for piece in re.split(r"({{-?.*?-?}})", go):
        m = re.fullmatch(r"{{(-?)\s*(.*?)\s*(-?)}}", piece)
        if not m:
            out.append(piece)
            continue
        left, body, right = m.groups()
        expr = lambda e: (e.replace(".System", "system").replace(".Content", "m.content")  # noqa: E731
                          .replace(".Role", "m.role").replace(".Prompt", "prompt"))
        cond = lambda e: re.sub(r'eq (\S+) (".*?")', r"\1 == \2", expr(e))  # noqa: E731
        if body.startswith("if "):
            stack.append("if")
            tag = f"if {cond(body[3:])}"
        elif body.startswith("else if "):
            tag = f"elif {cond(body[8:])}"
        elif body == "else":
            tag = "else"
        elif body == "range .Messages":
            stack.append("for")
            tag = "for m in messages"
        elif body == "end":
            tag = "endif" if stack.pop() == "if" else "endfor"
        else:
            out.append(f"{{{{{left} {expr(body)} {right}}}}}")
            continue
        out.append(f"{{%{left} {tag} {right}%}}")
    return "".join(out)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the opposite of up?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hot?"},
     {"role": "assistant", "content": "Cold."}, {"role": "user", "content": "Up?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


@pytest.mark.parametrize("name", sorted(GO_TEMPLATES))
def test_go_templates_render_the_training_prompt(name):
    from jinja2 import Environment

    # Ours as transformers compiles chat templates; the Go twin as Go reads text (every character kept).
    ours = Environment(trim_blocks=True, lstrip_blocks=True).from_string(portable_jinja(BUILTINS[name].jinja))
    go = GO_TEMPLATES[name].replace("{eos}", "</s>")
    theirs = Environment(keep_trailing_newline=True).from_string(go_to_jinja(go))
    for messages in CONVERSATIONS:
        if name == "raw" and messages[0]["role"] == "system":
            continue  # raw ignores system messages in both
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        # Ollama's runtime adds BOS itself, so the Go twin starts after it.
        expected = ours.render(messages=messages, bos_token="", eos_token="</s>", add_generation_prompt=True)
        assert theirs.render(messages=messages, system=system) == expected, messages


def test_the_modelfile_names_the_gguf_the_template_and_each_stop(tiny):
    from qlora_cli.model.load import load_tokenizer
    from qlora_cli.recipe.schema import ModelSection

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    text = modelfile("model-q8_0.gguf", BUILTINS["chatml"], tok, "my run")
    assert "FROM ./model-q8_0.gguf" in text and "ollama create my-run -f Modelfile" in text
    assert '<|im_start|>{{ .Role }}' in text and 'TEMPLATE """' in text
    assert re.findall(r'PARAMETER stop "(.*)"', text) == ["<|im_end|>", tok.eos_token]
    assert re.findall(r'PARAMETER stop "(.*)"', modelfile("m.gguf", BUILTINS["alpaca"], tok, "r")) == [tok.eos_token]
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile("m.gguf", None, tok, "r")  # a plain-text run


def test_a_tokenizer_template_gets_the_twin_it_renders_like(tiny):
    from dataclasses import replace

    from qlora_cli.model.load import load_tokenizer
    from qlora_cli.recipe.schema import ModelSection

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    same = replace(BUILTINS["chatml"], name="tokenizer")
    other = replace(BUILTINS["chatml"], name="tokenizer", jinja=BUILTINS["chatml"].jinja.replace("<|im_start|>", "<|im_start|> "))
    assert go_template_name(same, tok) == "chatml"
    assert go_template_name(other, tok) is None
    text = modelfile("m.gguf", other, tok, "r")
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and "Ollama reads the chat template stored in the GGUF" in text


# --- The check's table and verdict -------------------------------------------------------------------


def _report(**check):
    base = {"rows": 16, "metadata": {"chat_template_identical": True, "has_chat_template": True, "bos_matches": True,
                                     "eos_matches": True},
            "tokenization": {"texts": 16, "identical": 16, "first_difference": None},
            "greedy": {"prompts": 8, "identical": 8, "merged_stopped": 8, "llama_cpp_stopped": 8, "mean_common_prefix": 1.0},
            "chat": {"prompts": 3, "identical": 3, "first_difference": None},
            "weights": {"top1_agreement": 0.9991, "positions": 1009, "mean_kl": 1e-6, "max_abs_logit_diff": 0.01}}
    base.update(check)
    return {"gguf": "model-q8_0.gguf", "template": "alpaca", "check": base}


def test_the_verdict_names_what_differs():
    assert verdict(_report()) == ("llama.cpp reads, tokenizes and stops like the merged model", False)
    line, bad = verdict(_report(tokenization={"texts": 16, "identical": 15, "first_difference": {}}))
    assert bad and "tokenizes 1 of 16 texts differently" in line
    line, bad = verdict(_report(greedy={"prompts": 8, "identical": 2, "merged_stopped": 8, "llama_cpp_stopped": 3,
                                        "mean_common_prefix": 0.5}))
    assert bad and "did not stop" in line
    # Answers that part ways under a quantized type are reported, with what the weights cost, not blamed.
    line, bad = verdict({**_report(greedy={"prompts": 8, "identical": 5, "merged_stopped": 8, "llama_cpp_stopped": 8,
                                           "mean_common_prefix": 0.8}), "quant": "q4_k_m"})
    assert not bad and "equal the merged model's on 5 of 8 prompts (q4_k_m weights agree on 99.91%" in line
    line, bad = verdict(_report(runtime_error="llama-simple failed: unknown model architecture: 'x'"))
    assert bad and "runtime failed on the GGUF: llama-simple failed" in line
    line, bad = verdict(_report(chat={"prompts": 3, "identical": 2, "first_difference": {}}))
    assert bad and "chat mode builds 1 of 3 prompts otherwise" in line
    line, bad = verdict(_report(metadata={"chat_template_identical": False, "has_chat_template": True}))
    assert bad and "chat template differs" in line
    assert verdict({"check": None})[0].startswith("the export was not checked")


def test_the_table_shows_every_figure():
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(render_check(_report()))
    text = console.export_text()
    for needle in ("16/16 (100.0%)", "8/8", "3/3", "99.91% of 1,009", "identical", "llama-tokenize", "llama-simple",
                   "llama-completion -cnv"):
        assert needle in text, text


def test_a_skipped_chat_check_is_shown_as_skipped():
    from rich.console import Console

    report = _report()
    del report["check"]["chat"]
    report["check"]["chat_skipped"] = "llama-completion (llama.cpp's chat mode) was not found: build it"
    console = Console(width=160, record=True)
    console.print(render_check(report))
    text = console.export_text()
    assert "skipped" in text and "llama-completion (llama.cpp's chat mode) was not found" in text


def test_metadata_check_reads_the_template_and_special_ids(tiny, tmp_path):
    import gguf

    from qlora_cli.export.verify import check_metadata
    from qlora_cli.model.load import load_tokenizer
    from qlora_cli.recipe.schema import ModelSection

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    tok.chat_template = "{{ messages[0]['content'] }}"
    for name, template, eos in (("same", tok.chat_template, tok.eos_token_id), ("other", "{{ 'x' }}", 7)):
        writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        writer.add_chat_template(template)
        writer.add_bos_token_id(tok.bos_token_id)
        writer.add_eos_token_id(eos)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    same, other = check_metadata(tmp_path / "same.gguf", tok), check_metadata(tmp_path / "other.gguf", tok)
    assert same["chat_template_identical"] and same["bos_matches"] and same["eos_matches"]
    assert not other["chat_template_identical"] and not other["eos_matches"]


# --- The command: checks before any work, and a stand-in llama.cpp -------------------------------------

# A converter that writes the model's chat template and special ids into a GGUF with no tensors, or
# fails as llama.cpp's does on a tokenizer it does not know (FAIL_WITH in the environment).
FAKE_CONVERTER = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import gguf
    if os.environ.get("FAIL_WITH"):
        print(os.environ["FAIL_WITH"], file=sys.stderr)
        sys.exit(1)
    model, out = Path(sys.argv[1]), sys.argv[sys.argv.index("--outfile") + 1]
    config = json.loads((model / "tokenizer_config.json").read_text())
    writer = gguf.GGUFWriter(out, "llama")
    template = (model / "chat_template.jinja")
    writer.add_chat_template(template.read_text() if template.is_file() else config.get("chat_template", ""))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
''')


@pytest.fixture()
def fake_llama_cpp(tmp_path):
    tree = tmp_path / "llama.cpp"
    (tree / "gguf-py").mkdir(parents=True)
    (tree / "conversion").mkdir()
    (tree / "conversion" / "llama.py").write_text('@ModelBase.register("LlamaForCausalLM")\nres = "gpt-2"\n')
    (tree / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    return tree


@pytest.fixture()
def run(tiny, tmp_path):
    return fabricate_run(tiny, tmp_path / "run")[0]


def _refused(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_without_llama_cpp_it_says_how_to_get_it_and_writes_nothing(run, tmp_path, qlora_main, monkeypatch):
    monkeypatch.delenv("QLORA_LLAMA_CPP", raising=False)
    before = sorted(p.name for p in run.iterdir())
    _refused(qlora_main("export", str(run), cwd=tmp_path), "--llama-cpp", "git clone", "build/bin")
    _refused(qlora_main("export", str(run), "--llama-cpp", str(tmp_path)), "not a llama.cpp source tree")
    _refused(qlora_main("export", str(tmp_path / "nothing")), "neither a run directory")
    assert sorted(p.name for p in run.iterdir()) == before  # no merge, no folder


def test_checks_that_need_no_model_come_first(run, tmp_path, fake_llama_cpp, qlora_main, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no llama-quantize anywhere
    cpp = ("--llama-cpp", str(fake_llama_cpp))
    _refused(qlora_main("export", str(run), *cpp, "--quant", "q4_k_m"), "llama-quantize", "f16")
    _refused(qlora_main("export", str(run), *cpp, "--pre-tokenizer", "gpt2"), "'gpt2' is not one", "gpt-2")
    _refused(qlora_main("export", str(run), *cpp, "--quant", "q9"), "--quant")  # typer's choice
    (run / "gguf-q8_0").mkdir()
    _refused(qlora_main("export", str(run), *cpp), "already exists", "--overwrite")
    _refused(qlora_main("export", str(run), *cpp, "--overwrite"), "only replaces an earlier `qlora export`")
    (fake_llama_cpp / "conversion" / "llama.py").write_text("")  # a llama.cpp that knows no Llama
    _refused(qlora_main("export", str(run), *cpp, "--output", str(tmp_path / "x")), "cannot convert LlamaForCausalLM")
    assert not (run / "merged").exists()  # every refusal came before the merge


def test_an_unknown_tokenizer_gets_the_options_not_the_converters_traceback(run, tmp_path, fake_llama_cpp, qlora_main):
    result = qlora_main("export", str(run), "--llama-cpp", str(fake_llama_cpp), "--no-verify",
                        env={"FAIL_WITH": "NotImplementedError: BPE pre-tokenizer was not recognized - update "
                                          "get_vocab_base_pre()"})
    _refused(result, "--pre-tokenizer gpt-2", "register it in llama.cpp")
    assert not (run / "gguf-q8_0").exists() and not list(run.glob(".gguf-q8_0.partial-*"))


def test_an_export_is_written_whole_with_its_report_and_replaced_only_when_asked(run, fake_llama_cpp, qlora_main):
    cpp = ("--llama-cpp", str(fake_llama_cpp))
    result = qlora_main("export", str(run), *cpp, "--format", "ollama")
    assert result.returncode == 0, result.stderr[-3000:]
    out = run / "ollama-q8_0"
    assert result.stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export_report.json", "model-q8_0.gguf"]
    assert (run / "merged" / "merge_report.json").is_file()  # merged onto the dequantized base first
    report = json.loads((out / "export_report.json").read_text())
    assert report["quant"] == "q8_0" and report["template"] == "alpaca" and report["merged_model"].endswith("merged")
    check = report["check"]
    assert check["metadata"]["chat_template_identical"]  # the converter carried the run's template
    assert "skipped" in check and "llama-tokenize" in check["skipped"]  # no runtime here, and it says so
    assert "skipped" in check["weights"]  # a GGUF without tensors cannot be read back, and it says so
    assert "was not checked" not in result.stderr and "llama-tokenize" in result.stderr
    assert "FROM ./model-q8_0.gguf" in (out / "Modelfile").read_text()

    (out / "model-q8_0.gguf").write_bytes(b"old")
    assert qlora_main("export", str(run), *cpp, "--format", "ollama", "--no-verify", "--overwrite").returncode == 0
    assert (out / "model-q8_0.gguf").read_bytes() != b"old"
    assert not [p for p in run.iterdir() if p.name.startswith(".ollama-q8_0")]  # no partial or old folder left


def test_the_converter_runs_with_the_pre_tokenizer_answered(run, tmp_path, fake_llama_cpp, qlora_main):
    # The stand-in converter imports conversion.base like llama.cpp's: the override must be in
    # place when it asks (here it records the answer in the GGUF's name field).
    (fake_llama_cpp / "conversion" / "__init__.py").write_text("")
    (fake_llama_cpp / "conversion" / "base.py").write_text(
        "class TextModel:\n    def get_vocab_base_pre(self, tokenizer):\n        raise NotImplementedError\n")
    (fake_llama_cpp / "convert_hf_to_gguf.py").write_text(
        "import sys\nimport conversion.base as b\nname = b.TextModel().get_vocab_base_pre(None)\n"
        + FAKE_CONVERTER.replace('writer = gguf.GGUFWriter(out, "llama")', 'writer = gguf.GGUFWriter(out, "llama")\nwriter.add_name(name)'))
    result = qlora_main("export", str(run), "--llama-cpp", str(fake_llama_cpp), "--pre-tokenizer", "gpt-2", "--no-verify")
    assert result.returncode == 0, result.stderr[-3000:]
    import gguf

    reader = gguf.GGUFReader(str(run / "gguf-q8_0" / "model-q8_0.gguf"))
    assert reader.get_field("general.name").contents() == "gpt-2"
    assert json.loads((run / "gguf-q8_0" / "export_report.json").read_text())["pre_tokenizer"] == "gpt-2"
