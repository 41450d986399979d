"""A new user's first day (issue 24): what `qlora init` writes for this machine, what a bare
--gpu-memory means, messages that say what to do next, and `qlora estimate` counting tied
embeddings once. Each test failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_cli_errors import assert_user_error


# --- 13. estimate: tied embeddings counted once ---------------------------------------------


def _config_only_model(tiny: Path, directory: Path, tie: bool) -> Path:
    """The tiny model's config.json alone (estimate reads nothing else), with or without tying."""
    config = json.loads((tiny / "model" / "config.json").read_text())
    config["tie_word_embeddings"] = tie
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_estimate_counts_tied_embeddings_once(tiny, tmp_path, write_recipe):
    from qlora_cli.estimate import estimate
    from qlora_cli.recipe.load import load_recipe

    config = json.loads((tiny / "model" / "config.json").read_text())
    totals, notes = {}, {}
    for tie in (True, False):
        model = _config_only_model(tiny, tmp_path / f"tie_{tie}", tie)
        recipe = load_recipe(write_recipe({"model": {"name_or_path": str(model)}}, name=f"tie_{tie}.yaml"))
        est = estimate(recipe, gpu=False)
        totals[tie] = est.quantized_params + est.other_params
        notes[tie] = est.notes
    # The untied model has its own lm_head: exactly one vocab x hidden matrix more.
    assert totals[False] - totals[True] == config["vocab_size"] * config["hidden_size"], totals
    assert "tied input/output embeddings are counted once" in notes[True] and not notes[False]


# --- 10. a bare --gpu-memory is GB; --max-shard-size keeps bytes -----------------------------


def test_bare_gpu_memory_is_gb_and_estimate_says_which_budget(write_recipe, qlora_main):
    from qlora_cli.merge.weights import parse_size

    assert parse_size("24", "--gpu-memory", bare="GB") == 24 * 10**9
    assert parse_size("24GiB", "--gpu-memory", bare="GB") == 24 * 2**30
    assert parse_size("500") == 500  # --max-shard-size: a bare number stays bytes, as in transformers
    recipe = write_recipe()
    bare = qlora_main("estimate", recipe, "--gpu-memory", "24")
    assert bare.returncode == 0, bare.stderr
    assert "budget: 22.4 GiB, from --gpu-memory 24, read as 24 GB" in bare.stdout, bare.stdout
    assert "fits in 22.4 GiB" in bare.stdout and "does not fit" not in bare.stdout
    unit = qlora_main("estimate", recipe, "--gpu-memory", "50MB")
    assert "budget: 0.0 GiB, from --gpu-memory 50MB\n" in unit.stdout and "does not fit" in unit.stdout
    data = json.loads(qlora_main("estimate", recipe, "--gpu-memory", "24", "--json").stdout)
    assert data["budget_bytes"] == 24 * 10**9 and data["fits"] is True
    for command in ("estimate", "merge"):
        assert "a bare number is" in " ".join(qlora_main(command, "--help").stdout.split())


# --- 8. `qlora init` writes a recipe for this machine; a sharegpt starter --------------------


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_init_suits_the_machine_and_every_starter_validates(gpu, tmp_path, qlora_main, monkeypatch):
    import torch

    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.recipe.starter import FORMATS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert "sharegpt" in FORMATS
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.yaml"
        result = qlora_main("init", "--model", "my/model", "--format", fmt, "--output", out)
        assert result.returncode == 0, result.stderr
        recipe = load_recipe(out)  # valid as written
        assert recipe.data.sources[0].format == fmt
        dtype, optimizer = ("bfloat16", "paged_adamw_8bit") if gpu else ("float32", "adamw_torch")
        assert (recipe.model.dtype, recipe.quant.compute_dtype, recipe.train.optimizer) == (dtype, dtype, optimizer)
        # A comment says what to write on the other kind of machine.
        text = out.read_text()
        other = "on a CPU-only machine use adamw_torch" if gpu else "on a GPU use paged_adamw_8bit"
        assert other in text and ("float32 on a CPU-only machine" if gpu else "on a GPU use bfloat16") in text
    assert ("this GPU" if gpu else "a machine without a GPU") in result.stderr
    sharegpt = load_recipe(tmp_path / "sharegpt.yaml")
    assert sharegpt.data.template == "chatml" and '"from": "human"' in (tmp_path / "sharegpt.yaml").read_text()


# --- 11. messages that lead further -----------------------------------------------------------


def _jsonl(path: Path, rows: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def test_a_row_with_its_own_column_names_is_shown_the_columns_mapping(tmp_path, write_recipe, qlora_main):
    # A malformed line makes the file read row by row, so each row is judged on its own.
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(50)]
    path = _jsonl(tmp_path / "qa.jsonl", rows, extra='{"question": "x",\n')
    recipe = write_recipe({"data": {"sources": [{"path": str(path), "format": "alpaca"}]}})
    proc = qlora_main("validate", recipe, "-q")
    assert_user_error(proc, f"{path}: line 1: has no column 'instruction', 'output' (the row's columns: question, "
                            "answer). Map your column names with the source's columns:, e.g. columns: {instruction: question}")


def test_an_unknown_role_gets_a_did_you_mean(tmp_path, write_recipe, qlora_main):
    from qlora_cli.data.formats import BadRow, to_canonical

    with pytest.raises(BadRow) as err:
        to_canonical({"messages": [{"role": "usr", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                     "messages")
    assert str(err.value) == ("messages[0] has unknown role 'usr': did you mean 'user'? Expected one of assistant, "
                              "system, tool, user, or map it with the source's roles:, e.g. roles: {usr: user}")
    with pytest.raises(BadRow) as err:  # sharegpt's own names are suggested too
        to_canonical({"conversations": [{"from": "humman", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, "sharegpt")
    assert "did you mean 'human'?" in str(err.value) and "roles: {humman: user}" in str(err.value)


def test_a_section_set_to_a_value_says_it_is_a_section(write_recipe, qlora_main):
    proc = qlora_main("validate", write_recipe(), "--set", "lora=5")
    assert_user_error(proc, "lora (from --set): is a section, not a value (got 5): set one of its keys, "
                            "e.g. --set lora.r=16 (its keys: r, alpha, dropout, target_modules")
    assert "instance of" not in proc.stderr and "LoraSection" not in proc.stderr
    in_file = qlora_main("validate", write_recipe({"lora": 5}), "-q")
    assert_user_error(in_file, "lora (line ", "is a section, not a value (got 5): set one of its keys, e.g. lora: {r: 16}")


def test_target_modules_are_checked_by_validate_against_the_model(write_recipe, qlora_main):
    proc = qlora_main("validate", write_recipe({"lora": {"target_modules": ["foo_proj", "q_porj", "v_proj"]}}), "-q")
    assert_user_error(proc, "lora.target_modules: no module of this model is called 'foo_proj'",
                      "'q_porj' (did you mean 'q_proj'?)",
                      "Its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: "
                      "list some of them, or write all-linear for every one")


def test_target_modules_names_peft_matches_pass(tiny, write_recipe):
    # A suffix of a module's name, a whole dotted name, a non-linear module PEFT can wrap, all-linear.
    from qlora_cli.model.architectures import check_model
    from qlora_cli.recipe.load import load_recipe

    for targets in (["q_proj", "layers.0.mlp.down_proj", "embed_tokens"], "all-linear"):
        check_model(load_recipe(write_recipe({"lora": {"target_modules": targets}})))


def test_eval_data_in_another_format_is_told_what_eval_reads(tiny, write_recipe):
    from types import SimpleNamespace

    from qlora_cli.errors import UserError
    from qlora_cli.infer.evaluate import eval_rows
    from qlora_cli.model.tokenizer import prepare_tokenizer
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(write_recipe())  # alpaca data
    tokenizer, template = prepare_tokenizer(recipe)
    run = SimpleNamespace(recipe=recipe, path=Path("runs/tiny"), tokenizer=tokenizer, template=template)
    with pytest.raises(UserError) as err:
        eval_rows(run, data_path=str(tiny / "chat.jsonl"))
    (problem,) = err.value.problems
    assert problem.where == "--data"
    assert problem.message == (
        f"{tiny / 'chat.jsonl'} has no column 'instruction', 'output' (columns: messages). qlora eval reads --data as "
        "the run read its first source: alpaca rows with instruction, input, output. Give --data a file in that "
        "format, or leave out --data to score the run's validation split"
    )


def test_the_no_data_files_message_lists_every_supported_type(tmp_path, write_recipe, qlora_main):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n")
    proc = qlora_main("validate", write_recipe({"data": {"sources": [{"path": str(folder), "format": "alpaca"}]}}))
    assert_user_error(proc, f"directory {folder} holds no data files for format alpaca (.json, .jsonl, .csv, "
                            ".parquet; it holds .txt files, which only format: text reads)")


def _tokenizer_without_chat_markers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Add 2 and 3. The answer is 5."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_chatml_on_a_tokenizer_without_its_tokens_advises_tokenizer_only_if_it_has_a_template():
    from qlora_cli.data.templates import resolve_template
    from qlora_cli.errors import UserError

    tokenizer = _tokenizer_without_chat_markers()
    with pytest.raises(UserError) as err:
        resolve_template("chatml", tokenizer)
    message = err.value.problems[0].message
    assert "'tokenizer'" not in message, message
    assert message.endswith("This tokenizer has no chat template of its own: use alpaca or raw, which need no "
                            "special tokens")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError) as err:
        resolve_template("chatml", tokenizer)
    assert "Use the template this model was trained with ('tokenizer', its own chat template)" in str(err.value)
