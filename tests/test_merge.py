"""`qlora merge`: merged logits equal the adapter model's, shards stream, plain transformers loads
the output, and bad input leaves nothing behind.

Most tests fabricate a run directory (fresh adapters with random, non-zero updates) instead of
training: merging is about the arithmetic, and a random update exercises every weight. One test
trains configs/tiny.yaml for real and checks the issue's fidelity targets through the CLI.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import tiny_recipe
from qlora_cli.recipe.load import validate_recipe
from qlora_cli.errors import UserError
from qlora_cli.merge.run import merge
from qlora_cli.outputs.run_dir import RunDir
from qlora_cli.outputs.served_files import portable_jinja

MERGED_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    "merge_report.json", "README.md",
}


def fabricate_run(tiny, run_dir, model_dir=None, **lora):
    """A run directory as `qlora train` leaves it, with adapters whose updates are random but fixed.

    Returns (run_dir, the live PeftModel on the 4-bit base): the reference the merge must match.
    """
    from qlora_cli.model.load import attach_lora, load_base_model
    from qlora_cli.model.tokenizer import prepare_tokenizer

    raw = tiny_recipe(tiny, run_dir)
    raw["lora"].update({"r": 8, "alpha": 16, "modules_to_save": [], **lora})
    if model_dir is not None:
        raw["model"]["name_or_path"] = str(model_dir)
    recipe = validate_recipe(raw)
    tokenizer, _ = prepare_tokenizer(recipe)
    model = attach_lora(load_base_model(recipe.model, recipe.quant), recipe.lora, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        # PEFT starts B at zero (no update) and the DoRA magnitude at the weight norm: move both,
        # and the fully trained copies, so every part of the merge has something to fold in.
        if "lora_B" in name or "lora_embedding_A" in name:  # the factor PEFT zero-initialises
            p.data = (torch.randn(p.shape, generator=gen) * 0.05).to(p.device)
        elif "lora_magnitude_vector" in name:
            p.data = p.data * (1 + 0.2 * torch.randn(p.shape, generator=gen)).to(p.device)
        elif "modules_to_save" in name or (name.endswith(".bias") and p.requires_grad):
            p.data = p.data + 0.05 * torch.randn(p.shape, generator=gen).to(p.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    RunDir(run_dir).write_recipe(recipe)
    return run_dir, model.eval()


def probe_ids(tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count from 3 to 7."}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    return torch.tensor([ids])


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


def load_merged(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --- Fidelity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param({}, id="lora"),
        pytest.param({"use_rslora": True}, id="rslora"),
        pytest.param({"use_dora": True}, id="dora"),
        pytest.param({"modules_to_save": ["lm_head"], "target_modules": ["q_proj", "v_proj"]}, id="modules_to_save"),
    ],
)
def test_merged_logits_match_the_adapter_on_the_quantized_base(tiny, tmp_path, lora):
    run_dir, adapter_model = fabricate_run(tiny, tmp_path / "run", **lora)
    ids = probe_ids(AutoTokenizer.from_pretrained(run_dir))
    expected = logits_of(adapter_model, ids)

    merged = merge(run_dir, output=tmp_path / "out", verify=False)
    got = logits_of(load_merged(merged.output), ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)

    # The base the adapter never saw is measurably worse: that is the point of the default.
    original = merge(run_dir, output=tmp_path / "orig", base_mode="original", verify=False)
    worse = (logits_of(load_merged(original.output), ids) - expected).abs().max()
    assert worse > 10 * max((got - expected).abs().max(), 1e-6)
    # ...and the adapter mattered: the plain base gives other logits.
    with torch.no_grad(), adapter_model.disable_adapter():
        assert (logits_of(adapter_model, ids) - expected).abs().max() > 1e-2


@pytest.mark.slow  # the fidelity comparison against the floor
def test_fidelity_report_and_compare_for_dora(tiny, tmp_path):
    run_dir, _ = fabricate_run(tiny, tmp_path / "run", use_dora=True)
    result = merge(run_dir, output=tmp_path / "out", compare=True)
    report = json.loads((result.output / "merge_report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["adapter"]["kind"] == "DoRA" and report["adapter"]["modules"] == 14
    fid = report["fidelity"]["results"]
    assert set(fid) == {"dequantized", "original"}
    assert fid["dequantized"]["top1_agreement"] == 1.0 and fid["dequantized"]["positions"] > 500
    assert fid["dequantized"]["max_abs_logit_diff"] < 1e-3
    assert fid["original"]["max_abs_logit_diff"] > 10 * fid["dequantized"]["max_abs_logit_diff"]
    assert fid["original"]["mean_kl"] > fid["dequantized"]["mean_kl"]
    assert "validation rows" in report["fidelity"]["prompts"]


def test_bf16_output_is_written_in_bf16(tiny, tmp_path):
    from safetensors import safe_open

    run_dir, _ = fabricate_run(tiny, tmp_path / "run")
    out = merge(run_dir, output=tmp_path / "out", dtype="bf16", verify=False).output
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def variant_base(tiny, folder, **changes):
    """The tiny model with config changes (biases, tied embeddings, ...), fresh random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig.from_pretrained(tiny / "model")
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "base, lora",
    [
        pytest.param({"attention_bias": True, "mlp_bias": True}, {"bias": "all"}, id="trained-biases"),
        pytest.param({}, {"target_modules": ["q_proj", "embed_tokens"]}, id="embedding-lora"),
        pytest.param({}, {"target_modules": ["q_proj", "embed_tokens"], "use_dora": True}, id="embedding-dora"),
        pytest.param({"tie_word_embeddings": True}, {"target_modules": ["q_proj", "embed_tokens"]}, id="tied-embedding-lora"),
        pytest.param({"tie_word_embeddings": True}, {"modules_to_save": ["embed_tokens"]}, id="tied-embed-saved"),
        pytest.param({"tie_word_embeddings": True}, {"modules_to_save": ["lm_head"]}, id="tied-head-saved"),
        pytest.param({"tie_word_embeddings": True}, {}, id="tied-untouched"),
    ],
)
def test_biases_embeddings_and_tied_heads_merge_faithfully(tiny, tmp_path, base, lora):
    model_dir = variant_base(tiny, tmp_path / "base", **base)
    run_dir, adapter_model = fabricate_run(tiny, tmp_path / "run", model_dir=model_dir, **lora)
    ids = probe_ids(AutoTokenizer.from_pretrained(run_dir))
    expected = logits_of(adapter_model, ids)
    out = merge(run_dir, output=tmp_path / "out", verify=False).output
    torch.testing.assert_close(logits_of(load_merged(out), ids), expected, rtol=0, atol=1e-4)
    touched = {"embed_tokens", "lm_head"} & set(lora.get("target_modules", []) + lora.get("modules_to_save", []))
    if base.get("tie_word_embeddings"):
        # Changing one side of a tied pair unties it; an untouched pair stays tied (and stored once).
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is not bool(touched)


# --- GPT-2's Conv1D: weights stored transposed ---------------------------------------------------


def gpt2_base(tiny, folder, n_embd=64):
    """A random 2-layer GPT-2 (Conv1D layers, weights stored [in, out]; c_proj is square, so only
    the module type can tell the layout) with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=n_embd, n_layer=2, n_head=2, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # GPT-2 built, adapted, merged and scored with fidelity
@pytest.mark.parametrize("lora", [pytest.param({}, id="lora"), pytest.param({"use_dora": True}, id="dora")])
def test_gpt2_conv1d_layers_merge_faithfully(tiny, tmp_path, lora):
    from safetensors import safe_open

    model_dir = gpt2_base(tiny, tmp_path / "gpt2")
    run_dir, adapter_model = fabricate_run(tiny, tmp_path / "run", model_dir=model_dir, **lora)
    ids = probe_ids(AutoTokenizer.from_pretrained(run_dir))
    expected = logits_of(adapter_model, ids)

    result = merge(run_dir, output=tmp_path / "out")
    # The checkpoint keeps GPT-2's layout: Conv1D weights [in, out], the shapes of the base.
    with safe_open(str(model_dir / "model.safetensors"), "pt") as base, \
            safe_open(str(result.output / "model.safetensors"), "pt") as merged:
        assert {k: merged.get_slice(k).get_shape() for k in merged.keys()} == {k: base.get_slice(k).get_shape() for k in base.keys()}
    torch.testing.assert_close(logits_of(load_merged(result.output), ids), expected, rtol=0, atol=1e-4)
    assert result.report["adapter"]["modules"] == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 layers
    assert result.report["fidelity"]["results"]["dequantized"]["top1_agreement"] >= 0.999

    # (The logits above pin the NF4 round trip to the transposed weight, as transformers quantizes
    # it: NF4 blocks of the stored layout hold other values, 0.008-0.018 off here.) The base the
    # adapter never saw is measurably worse.
    original = merge(run_dir, output=tmp_path / "orig", base_mode="original", verify=False)
    worse = (logits_of(load_merged(original.output), ids) - expected).abs().max()
    assert worse > 1e-3


def test_full_precision_conv1d_with_fan_in_fan_out_merges_like_peft(tiny, tmp_path):
    """A Conv1D that stays in full precision gets PEFT's fan_in_fan_out adapter; its factors have
    the same layout, and the fold matches PEFT's own merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import qlora_cli.merge.weights as mw

    model_dir = gpt2_base(tiny, tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    assert model.peft_config["default"].fan_in_fan_out  # PEFT sets it for Conv1D
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    model.save_pretrained(tmp_path / "run")
    reference = model.merge_and_unload().state_dict()

    adapter = mw.read_adapter(tmp_path / "run")
    base = mw.BaseCheckpoint.open(model_dir)
    transposed = {k for k in base.shapes if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))}
    plan = mw.plan_merge(
        adapter, base, tied={}, quantized=mw.QuantizedWeights((), transposed), quant=None,
        model_dtype=torch.float32, out_dtype=torch.float32, device="cpu",
    )
    merged = dict(mw.merged_tensors(plan, "dequantized"))
    assert merged.keys() == load_file(str(model_dir / "model.safetensors")).keys()
    for key in transposed:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-6)


def test_conv1d_adapter_for_another_shape_is_refused_in_the_adapters_layout(tiny, tmp_path):
    """A GPT-2 adapter on a wider GPT-2: refused before anything is written, each shape named the
    adapter's way round, with the base's stored (transposed) layout said."""
    import qlora_cli.merge.weights as mw
    from transformers import AutoConfig

    run_dir, _ = fabricate_run(tiny, tmp_path / "run", model_dir=gpt2_base(tiny, tmp_path / "gpt2"))
    wide = gpt2_base(tiny, tmp_path / "wide", n_embd=128)
    quantized, tied = mw.inspect_model(AutoConfig.from_pretrained(wide), validate_recipe(tiny_recipe(tiny, tmp_path)).quant, torch.float32)
    assert "transformer.h.0.attn.c_proj.weight" in quantized.transposed  # square: known by its type
    with pytest.raises(UserError) as err:
        mw.plan_merge(mw.read_adapter(run_dir), mw.BaseCheckpoint.open(wide), tied=tied, quantized=quantized,
                      quant=None, model_dtype=torch.float32, out_dtype=torch.float32, device="cpu")
    assert ("transformer.h.0.attn.c_attn: the adapter was trained for shape [192, 64], the base has [384, 128] "
            "(stored transposed, as a Conv1D weight)") in str(err.value)


# --- Shards --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_base(tiny, tmp_path_factory):
    """The tiny model saved in several safetensors shards, with an index."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny / "model").save_pretrained(folder, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 4
    return folder


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_multi_shard_base_is_merged_shard_by_shard(tiny, tmp_path, sharded_base, monkeypatch):
    from safetensors import safe_open

    import qlora_cli.merge.weights as mw

    run_dir, adapter_model = fabricate_run(tiny, tmp_path / "run", model_dir=sharded_base)
    base_index = _index(sharded_base)["weight_map"]
    flushed = []  # the keys in memory at each write: never more than one input shard's worth
    real_save = mw.save_shard

    def spy(path, tensors):
        flushed.append(set(tensors))
        real_save(path, tensors)

    monkeypatch.setattr("qlora_cli.merge.run.save_shard", spy)
    out = merge(run_dir, output=tmp_path / "out", verify=False).output

    assert len(flushed) == len(set(base_index.values()))
    for keys in flushed:
        assert len({base_index[k] for k in keys}) == 1, "an output shard mixed input shards"
    index = _index(out)
    assert index["weight_map"].keys() == base_index.keys()
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, s in index["weight_map"].items() if s == shard}
            total += sum(f.get_tensor(k).numel() * 4 for k in keys)
    assert index["metadata"]["total_size"] == total

    ids = probe_ids(AutoTokenizer.from_pretrained(run_dir))
    torch.testing.assert_close(logits_of(load_merged(out), ids), logits_of(adapter_model, ids), rtol=0, atol=1e-4)


def test_max_shard_size_reshards_the_output(tiny, tmp_path, sharded_base):
    run_dir, _ = fabricate_run(tiny, tmp_path / "run", model_dir=sharded_base)
    one = merge(run_dir, output=tmp_path / "one", verify=False, max_shard_size="10MB").output
    assert not (one / "model.safetensors.index.json").exists() and (one / "model.safetensors").is_file()
    small = merge(run_dir, output=tmp_path / "small", verify=False, max_shard_size="70KB").output
    shards = sorted(small.glob("model-*.safetensors"))
    assert len(shards) > len(set(_index(sharded_base)["weight_map"].values()))
    biggest_tensor = 512 * 64 * 4  # embed_tokens / lm_head: alone in its shard when over the limit
    assert all(p.stat().st_size <= max(70_000, biggest_tensor) + 4096 for p in shards)
    ids = probe_ids(AutoTokenizer.from_pretrained(run_dir))
    assert torch.equal(logits_of(load_merged(one), ids), logits_of(load_merged(small), ids))


# --- Plain transformers --------------------------------------------------------------------------

LOAD_WITHOUT_PEFT = r"""
import json, sys
sys.modules["peft"] = None  # any import of peft now fails: the model must not need it
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
print(json.dumps({"tokens": out[0].tolist(), "template": tok.chat_template}))
"""


@pytest.mark.slow  # a fresh interpreter
def test_plain_transformers_loads_it_without_peft_and_generates_like_the_adapter(tiny, tmp_path):
    run_dir, adapter_model = fabricate_run(tiny, tmp_path / "run")
    out = merge(run_dir, output=tmp_path / "out", verify=False).output
    assert {p.name for p in out.iterdir()} == MERGED_FILES | {"model.safetensors"}

    ids = probe_ids(AutoTokenizer.from_pretrained(run_dir))
    with torch.no_grad():
        expected = adapter_model.generate(
            input_ids=ids.to(adapter_model.device), max_new_tokens=12, do_sample=False, pad_token_id=adapter_model.config.eos_token_id
        )[0].tolist()
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out), json.dumps(ids[0].tolist())],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == expected
    # the run's template, saved without generation blocks (plain Jinja renders it: test_merge_floor.py)
    assert got["template"] == portable_jinja(AutoTokenizer.from_pretrained(run_dir).chat_template)


# --- End to end on the tiny recipe -----------------------------------------------------------------


def test_cli_merge_of_the_trained_tiny_run_meets_the_fidelity_targets(tiny_run, tmp_path, qlora_main):
    # tiny_run was trained with paths relative to where `qlora train` ran; merged here from another
    # directory: the run's recipe.yaml stores them absolute, so the run directory works from anywhere.
    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    proc = qlora_main("merge", str(tmp_path / "run"), "--compare", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run" / "merged"
    assert proc.stdout.strip() == str(out)
    assert "top-1 agreement" in proc.stderr and "original*" in proc.stderr
    report = json.loads((out / "merge_report.json").read_text())["fidelity"]
    assert "validation rows of the run's data" in report["prompts"]  # found the data, too
    fid = report["results"]
    assert fid["dequantized"]["top1_agreement"] >= 0.999 and fid["dequantized"]["positions"] >= 1000
    assert fid["original"]["max_abs_logit_diff"] >= 10 * fid["dequantized"]["max_abs_logit_diff"]


# --- Bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fabricated_run(tiny, tmp_path_factory):
    """One fabricated run for the tests below (fabricate_run loads and quantizes the base: seconds)."""
    return fabricate_run(tiny, tmp_path_factory.mktemp("fabricated") / "run")[0]


@pytest.fixture()
def run_dir(fabricated_run, tmp_path):
    """A private copy of that run at tmp_path/run, as if fabricated there: its recipe names the copy."""
    run = tmp_path / "run"
    shutil.copytree(fabricated_run, run)
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(fabricated_run), str(run)))
    return run


def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_run_directory_without_adapter(tmp_path, run_dir, qlora_main):
    (run_dir / "adapter_model.safetensors").unlink()
    _assert_user_error(qlora_main("merge", str(run_dir)), "has no adapter")
    _assert_user_error(qlora_main("merge", str(tmp_path / "nowhere")), "is not a directory")
    assert not (run_dir / "merged").exists()


def test_base_whose_shapes_do_not_match(tiny, tmp_path, run_dir, qlora_main):
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = tmp_path / "other"
    config = LlamaConfig.from_pretrained(tiny / "model")
    config.intermediate_size = 96
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(other)
    raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    raw["model"]["name_or_path"] = str(other)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))
    _assert_user_error(qlora_main("merge", str(run_dir)), "does not fit the base model", "mlp.gate_proj", "[96, 64]")
    assert not (run_dir / "merged").exists()


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--dtype", "int8"], ["'--dtype'", "'int8' is not one of"]),
        (["--base", "fp16"], ["'--base'", "'fp16' is not one of"]),
        (["--max-shard-size", "lots"], ["--max-shard-size", "not a size"]),
    ],
)
def test_bad_flags(run_dir, flags, needles, qlora_main):
    _assert_user_error(qlora_main("merge", str(run_dir), *flags), *needles)
    assert not (run_dir / "merged").exists()


def test_existing_output_is_refused_and_kept_unless_overwrite(run_dir, tmp_path, qlora_main):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_user_error(qlora_main("merge", str(run_dir), "--output", str(out)), "already exists", "--overwrite")
    # --overwrite replaces only an earlier merged model, never some other directory.
    _assert_user_error(qlora_main("merge", str(run_dir), "--output", str(out), "--overwrite"), "only replaces an earlier")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")  # a downloaded model or a project folder is not ours to delete
    _assert_user_error(qlora_main("merge", str(run_dir), "--output", str(out), "--overwrite"), "only replaces an earlier")
    assert (out / "keep.txt").read_text() == "mine"
    _assert_user_error(qlora_main("merge", str(run_dir), "--output", str(run_dir), "--overwrite"), "which the merge reads")

    first = merge(run_dir, output=tmp_path / "m", verify=False).output
    (first / "model.safetensors").write_bytes(b"an old merge")
    merge(run_dir, output=first, verify=False, overwrite=True)  # replaces what the earlier merge wrote
    assert (first / "model.safetensors").read_bytes() != b"an old merge"
    (first / "notes.txt").write_text("mine")  # but never a file it did not write
    with pytest.raises(UserError, match="also holds notes.txt"):
        merge(run_dir, output=first, verify=False, overwrite=True)
    assert (first / "notes.txt").read_text() == "mine" and (first / "model.safetensors").is_file()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_permission_error_leaves_nothing_and_keeps_the_old_output(run_dir, tmp_path, monkeypatch, code):
    import safetensors.torch

    out = merge(run_dir, output=tmp_path / "out", verify=False).output
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(UserError, match="cannot write") as info:
        merge(run_dir, output=out, verify=False, overwrite=True)
    assert "--output" in info.value.render()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier output is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial directory


def test_a_real_disk_full_error_from_safetensors_is_a_user_error(run_dir, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises when the disk fills up mid-file
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="No space left on device"):
        merge(run_dir, output=tmp_path / "out", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_output_that_appears_during_the_merge_is_left_alone(run_dir, tmp_path, monkeypatch):
    import qlora_cli.merge.run as merge_module

    out = tmp_path / "out"
    real = merge_module.write_companions

    def someone_else_writes(*args, **kwargs):
        real(*args, **kwargs)
        out.mkdir()
        (out / "precious.txt").write_text("theirs")

    monkeypatch.setattr(merge_module, "write_companions", someone_else_writes)
    with pytest.raises(UserError, match="appeared while merging"):
        merge(run_dir, output=out, verify=False)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_unreadable_inputs_are_user_errors(tiny, tmp_path, run_dir, qlora_main):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    _assert_user_error(qlora_main("merge", str(bad)), "cannot read the adapter")

    shutil.copy(run_dir / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    config = json.loads((run_dir / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    _assert_user_error(qlora_main("merge", str(bad)), "lora_alpha")

    shutil.copy(run_dir / "adapter_config.json", bad / "adapter_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad / name).unlink()
    _assert_user_error(qlora_main("merge", str(bad)), "cannot load the tokenizer")
    assert not (bad / "merged").exists()


def test_pre_quantized_base_and_output_inside_the_base_are_refused(tiny, tmp_path, run_dir, qlora_main):
    base = yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["name_or_path"]
    _assert_user_error(qlora_main("merge", str(run_dir), "--output", f"{base}/merged"), "inside the base model")

    import shutil

    prequant = tmp_path / "prequant"
    shutil.copytree(base, prequant)
    config = json.loads((prequant / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (prequant / "config.json").write_text(json.dumps(config))
    raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    raw["model"]["name_or_path"] = str(prequant)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))
    _assert_user_error(qlora_main("merge", str(run_dir)), "pre-quantized", "full-precision")


def test_not_enough_free_space_is_refused_before_writing(run_dir, tmp_path, monkeypatch):
    import shutil

    import qlora_cli.merge.run as merge_module

    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match="not enough space"):
        merge(run_dir, output=tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_merge_leaves_no_directory_that_looks_complete(run_dir, tmp_path, monkeypatch):
    import qlora_cli.merge.run as merge_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "write_companions", interrupted)  # after the weights, before the rename
    with pytest.raises(KeyboardInterrupt):
        merge(run_dir, output=tmp_path / "out", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    # A partial directory from a killed merge (its process is gone) is cleared by the next merge.
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    monkeypatch.undo()
    merge(run_dir, output=tmp_path / "out", verify=False)
    assert not stale.exists() and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.slow  # the fidelity comparison
def test_fidelity_falls_back_to_built_in_prompts_when_the_data_is_gone(tiny, tmp_path):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny / "alpaca.jsonl", data / "alpaca.jsonl")
    run_dir, _ = fabricate_run(tiny, tmp_path / "run")
    raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    raw["data"]["sources"][0]["path"] = str(data / "alpaca.jsonl")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))
    shutil.rmtree(data)  # the run's data moved away since training

    report = merge(run_dir, output=tmp_path / "out").report["fidelity"]
    assert report["prompts"].startswith("8 built-in prompts")
    assert report["results"]["dequantized"]["top1_agreement"] == 1.0
    assert report["results"]["dequantized"]["positions"] > 8 * 10  # whole rendered prompts, not one token each
