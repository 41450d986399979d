"""The merge judged against the precision floor, what a run computes in, and chat templates saved in
plain Jinja (issue 28).

A bf16 model cannot agree with anything to 100%: the adapter model as loaded agrees with itself in
fp32 on fewer than all next tokens. `qlora merge` measures that floor on the same rows and warns
only when the merged model is measurably worse than it. The bf16 fixture below is the tiny model
saved in bf16, with a ChatML run whose adapter is random but fixed (fabricated, not trained: the
merge is about arithmetic), written by RunDir.save_final as `qlora train` writes it.
"""

from __future__ import annotations

import json

import jinja2
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conftest import tiny_recipe
from qlora_cli.recipe.load import validate_recipe
from qlora_cli.data.templates import BUILTINS
from qlora_cli.merge.fidelity import arithmetic_dtype, judge
from qlora_cli.merge.run import merge
from qlora_cli.outputs.run_dir import RunDir
from qlora_cli.outputs.served_files import portable_jinja


@pytest.fixture(scope="module")
def bf16_base(tiny, tmp_path_factory):
    """The tiny model saved in bf16, as real checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16_base")
    AutoModelForCausalLM.from_pretrained(tiny / "model").to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(folder)
    return folder


def bf16_recipe(tiny, base, run_dir):
    raw = tiny_recipe(tiny, run_dir)
    raw["model"].update({"name_or_path": str(base), "dtype": "bfloat16"})  # compute stays fp32 (tiny.yaml)
    raw["data"]["template"] = "chatml"  # generation blocks and tool calls, in what is saved
    raw["lora"].update({"r": 8, "alpha": 16, "modules_to_save": []})
    raw["data"]["val_size"] = 10  # the rows the merge is checked on: enough positions, and quick on 2 cores
    return validate_recipe(raw)


@pytest.fixture(scope="module")
def bf16_run(tiny, bf16_base, tmp_path_factory):
    """(run directory, the training tokenizer): a ChatML run on the bf16 base, B random but fixed."""
    from qlora_cli.model.load import attach_lora, load_base_model
    from qlora_cli.model.tokenizer import prepare_tokenizer

    run_dir = tmp_path_factory.mktemp("bf16_run") / "run"
    recipe = bf16_recipe(tiny, bf16_base, run_dir)
    tokenizer, template = prepare_tokenizer(recipe)
    assert template.has_generation_blocks
    model = attach_lora(load_base_model(recipe.model, recipe.quant), recipe.lora, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give every module an update to fold in
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    run_dir.mkdir(parents=True)
    run = RunDir(run_dir)
    run.save_final(model.save_pretrained, tokenizer, model)
    run.write_recipe(recipe)
    return run_dir, tokenizer


# --- The floor ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def correct_merge(bf16_run, tmp_path_factory):
    """`qlora merge` of the bf16 run through the CLI's own entry point, in this process:
    (exit code, what it printed on stderr, the output directory)."""
    import contextlib
    import io
    import os
    import sys

    from qlora_cli import cli

    out = tmp_path_factory.mktemp("merged") / "out"
    # Module-scoped, so no capsys: stderr goes to a buffer (the CLI's console writes to whatever
    # sys.stderr is when it prints), 200 columns wide.
    argv, sys.argv = sys.argv, ["qlora", "merge", str(bf16_run[0]), "--output", str(out)]
    buffer, columns = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"
    try:
        with contextlib.redirect_stderr(buffer):
            cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns
    return code, buffer.getvalue(), out


@pytest.mark.slow  # a bf16 run merged and measured
def test_a_correct_bf16_merge_is_judged_against_the_floor_and_does_not_warn(correct_merge):
    code, stderr, out = correct_merge
    assert code == 0, stderr
    report = json.loads((out / "merge_report.json").read_text())
    fid = report["fidelity"]
    floor, merged = fid["floor"], fid["results"]["dequantized"]
    # The floor is measured, on the same rows: bf16 costs agreement even with nothing merged.
    assert floor["dtype"] == "fp32" and floor["positions"] == merged["positions"] > 500
    assert 0.9 < floor["top1_agreement"] < 1.0 and floor["mean_kl"] > 0
    # The merge is not 100% either, and that is precision, not a bad merge: no warning.
    assert merged["top1_agreement"] < 1.0
    assert merged["worse_than_floor"] is None and "warning" not in report
    assert "warning" not in stderr
    # Both figures, and the floor's meaning, in the table and the merged model's card.
    card = (out / "README.md").read_text()
    for text in (stderr, card):
        assert f"{100 * merged['top1_agreement']:.2f}%" in text and f"{100 * floor['top1_agreement']:.2f}%" in text
        assert "precision floor (fp32)" in text
    assert "within the floor" in stderr and floor["means"] in " ".join(stderr.split())
    assert "within the precision floor" in card and floor["means"] in card
    assert "README.md" in report["files"]


@pytest.mark.slow  # a bf16 run merged and measured
def test_a_wrong_merge_still_warns(bf16_run, tmp_path, monkeypatch):
    import qlora_cli.merge.weights as mw

    real = mw.LoraUpdate.delta
    monkeypatch.setattr(mw.LoraUpdate, "delta", lambda self: real(self).mul_(1.5))  # scale * 1.5: a bug
    report = merge(bf16_run[0], output=tmp_path / "out").report
    fid = report["fidelity"]
    assert fid["results"]["dequantized"]["worse_than_floor"]
    assert "measurably worse than the precision floor" in report["warning"]
    assert f"{100 * fid['floor']['top1_agreement']:.2f}%" in report["warning"]
    assert "**Warning:**" in (tmp_path / "out" / "README.md").read_text()


def test_fp32_runs_keep_a_floor_of_100_percent():
    f32, bf16 = torch.float32, torch.bfloat16
    assert arithmetic_dtype(f32, f32, f32) is None  # nothing to measure: the tiny model's merges stay at 100%
    assert arithmetic_dtype(bf16, f32, f32) == f32 and arithmetic_dtype(f32, bf16, f32) == f32
    assert arithmetic_dtype(f32, f32, bf16) == bf16  # an fp32 run merged to bf16: bf16 is what changes
    exact = {"top1_agreement": 1.0, "mean_kl": 0.0, "positions": 2000}
    assert judge({**exact, "mean_kl": 4e-8}, exact) is None  # what an fp32 merge measures
    assert "5 of 2000" in judge({**exact, "top1_agreement": 1 - 5 / 2000}, exact)  # 99.75%: a bug at a 100% floor
    floor = {"top1_agreement": 0.97, "mean_kl": 3e-3, "positions": 2000}  # SmolLM2-like: 60 flips
    assert judge({**floor, "top1_agreement": 0.95}, floor) is None  # 100 flips: two perturbations of that size
    assert judge({**floor, "top1_agreement": 0.90}, floor)


# --- What the run computes in ------------------------------------------------------------------


def test_4bit_layers_compute_in_compute_dtype_and_return_their_inputs_dtype(bf16_base):
    """The facts precision_note states, on a bf16 checkpoint with fp32 compute: the 4-bit matmul is
    x @ dequantize(W).T computed in fp32 (the weights dequantized in fp32, not in the checkpoint's
    bf16), and its result comes back in the dtype of its input."""
    import copy

    import bitsandbytes as bnb

    from qlora_cli.recipe.schema import ModelSection, QuantSection
    from qlora_cli.model.load import load_base_model

    model = load_base_model(ModelSection(name_or_path=str(bf16_base), dtype="bfloat16"), QuantSection(compute_dtype="float32"))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.dtype == torch.bfloat16
    state = layer.weight.quant_state
    state32 = copy.copy(state)
    state32.dtype = torch.float32  # the same codes and scales, read out in fp32
    w32 = bnb.functional.dequantize_4bit(layer.weight.data, state32)
    w16 = bnb.functional.dequantize_4bit(layer.weight.data, state)
    assert w16.dtype == torch.bfloat16 and (w16.float() - w32).abs().max() > 0  # the bf16 reading rounds
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out32, out16 = layer(x), layer(x.bfloat16())
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
    torch.testing.assert_close(out32, x @ w32.T, rtol=1e-5, atol=1e-5)  # exact fp32, not bf16 weights
    assert (out32 - x @ w16.float().T).abs().max() > 1e-4


def test_validate_says_what_a_bf16_checkpoint_with_fp32_compute_computes_in(write_recipe, qlora_main):
    mixed = qlora_main("validate", write_recipe({"model": {"dtype": "bfloat16"}}), "--quiet")
    assert mixed.returncode == 0, mixed.stderr
    said = " ".join(mixed.stderr.split())
    assert "note: model.dtype is bfloat16 and quant.compute_dtype float32" in said
    assert "partly in bfloat16" in said
    if not torch.cuda.is_available():
        assert "set model.dtype: float32" in said
    same = qlora_main("validate", write_recipe(), "--quiet")
    assert same.returncode == 0 and "note:" not in same.stderr


# --- Chat templates in plain Jinja -------------------------------------------------------------


def plain_jinja():
    """Plain jinja2 set up as chat-template servers do (Hugging Face's conventions: trim_blocks,
    lstrip_blocks, loop controls, a tojson that keeps key order and non-ASCII), without
    transformers and so without its generation extension."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": " 4\n"}, {"role": "user", "content": "and 3+3?"}], None),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": '{"temp": 21}'},
      {"role": "assistant", "content": "21 °C, <sunny> & 'dry'"}], TOOLS),
]


def renders(jinja, **special):
    """Every conversation, with and without the generation prompt, as (transformers, plain jinja2)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    for messages, tools in CONVERSATIONS:
        for prompt in (False, True):
            kw = {"tools": tools, "add_generation_prompt": prompt, **special}
            yield (render_jinja_template([messages], chat_template=jinja, **kw)[0][0],
                   plain_jinja().from_string(portable_jinja(jinja)).render(messages=messages, **kw))


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_built_in_templates_in_portable_form_render_the_same_text_in_plain_jinja(name):
    jinja = BUILTINS[name].jinja
    portable = portable_jinja(jinja)
    assert "generation %}" not in portable and "{%- with" not in portable  # stripped, not rewritten
    if BUILTINS[name].has_generation_blocks:
        with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):
            jinja2.Environment().parse(jinja)
    jinja2.Environment().parse(portable)
    for trained, plain in renders(jinja, bos_token="<s>", eos_token="</s>"):
        assert plain == trained


@pytest.mark.parametrize("jinja", [
    # text beside the tags, where their whitespace control acts
    "{% for m in messages %}{{ m.role }}:\n  {% generation %}\n{{ m.content }}  {% endgeneration %}\n{% endfor %}",
    "{% for m in messages %}{{ m.role }}:   {%- generation -%}   {{ m.content }}{%+ endgeneration %}\n\n{% endfor %}",
    # an assignment inside the block, which the block keeps to itself
    "{% set x = 'out' %}{% for m in messages %}{% generation %}{% set x = m.content %}{{ x }}{% endgeneration %}"
    "{{ x }}{% endfor %}",
])
def test_templates_whose_generation_tags_do_more_keep_standard_blocks(jinja):
    portable = portable_jinja(jinja)
    assert "generation" not in portable and ("{% with" in portable or "{%- with" in portable)
    for trained, plain in renders(jinja):
        assert plain == trained


@pytest.mark.slow  # the bf16 run and its merge
def test_saved_templates_parse_in_plain_jinja_and_render_as_in_training(bf16_run, correct_merge):
    """The run directory (RunDir.save_final) and the merged model (qlora merge) save the ChatML
    template without generation blocks; the training tokenizer keeps them."""
    from transformers import AutoTokenizer

    run_dir, trained = bf16_run
    assert BUILTINS["chatml"].has_generation_blocks and trained.chat_template == BUILTINS["chatml"].jinja
    for folder in (run_dir, correct_merge[2]):
        text = (folder / "chat_template.jinja").read_text()
        assert "generation %}" not in text
        template = plain_jinja().from_string(text)
        saved = AutoTokenizer.from_pretrained(folder)
        assert saved.chat_template == text
        for messages, tools in CONVERSATIONS:
            for prompt in (False, True):
                expected = trained.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt, tokenize=False)
                assert saved.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt, tokenize=False) == expected
                assert template.render(messages=messages, tools=tools, add_generation_prompt=prompt,
                                       bos_token=saved.bos_token or "", eos_token=saved.eos_token) == expected
