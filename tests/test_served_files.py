"""What serving tools read from a run directory and a merged model (issue 19, items 6, 7 and 9).

- generation_config.json carries the run's stop token, so plain `transformers` generate() stops
  where `qlora generate` stops (a ChatML run ends turns with <|im_end|>, not the base's </s>).
- adapter_config.json names a local base by its absolute path, so
  AutoPeftModelForCausalLM.from_pretrained(RUN) works from any directory.
- The base's tokenizer files (a SentencePiece tokenizer.model) survive transformers 5's
  save_pretrained, and tokenizer_config.json names a class older readers (llama.cpp's converter,
  pinned to transformers 4) know, without changing a single token id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import tiny_recipe
from qlora_cli.recipe.load import validate_recipe
from qlora_cli.merge.run import merge
from qlora_cli.outputs.run_dir import RunDir
from qlora_cli.outputs.served_files import portable_jinja


def chatml_run(tiny, run_dir, model_dir=None):
    """A run directory trained with the ChatML template (its adapter untouched: B starts at zero)."""
    from qlora_cli.model.load import attach_lora, load_base_model
    from qlora_cli.model.tokenizer import prepare_tokenizer

    raw = tiny_recipe(tiny, run_dir)
    raw["data"]["template"] = "chatml"
    if model_dir is not None:
        raw["model"]["name_or_path"] = str(model_dir)
    raw["lora"].update({"r": 4, "alpha": 8, "modules_to_save": []})
    recipe = validate_recipe(raw)
    tokenizer, template = prepare_tokenizer(recipe)
    assert template.stop == "<|im_end|>"
    model = attach_lora(load_base_model(recipe.model, recipe.quant), recipe.lora, gradient_checkpointing=False)
    run_dir.mkdir(parents=True)
    run = RunDir(run_dir)
    run.save_final(model.save_pretrained, tokenizer, model)
    run.write_recipe(recipe)
    return run_dir, tokenizer


def test_plain_generate_on_a_merged_chatml_model_stops_at_the_end_of_turn(tiny, tmp_path):
    run_dir, tokenizer = chatml_run(tiny, tmp_path / "run")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    base_eos = GenerationConfig.from_pretrained(tiny / "model").eos_token_id
    assert im_end != base_eos

    out = merge(run_dir, output=tmp_path / "merged", verify=False).output
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [base_eos, im_end]
    assert json.loads((run_dir / "generation_config.json").read_text())["eos_token_id"] == [base_eos, im_end]

    # Make the merged model answer <|im_end|> first, as a trained model ends a short reply: its
    # output row for <|im_end|> points along the prompt's last hidden state.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say cold."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=prompt).last_hidden_state[0, -1]
        model.lm_head.weight[im_end] = 100 * hidden / hidden.norm()
        # Plain generate(), reading the merged directory's generation_config.json: stops after it.
        stopped = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
        # The base's own file (EOS </s> only), as before: runs on past the end of the turn.
        model.generation_config = GenerationConfig.from_pretrained(tiny / "model")
        ran_on = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=base_eos)[0, prompt.shape[1]:]
    assert stopped == [im_end]
    assert ran_on[0] == im_end and len(ran_on) == 8


LOAD_FROM_ELSEWHERE = """
import json, sys
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps({"base": model.peft_config["default"].base_model_name_or_path}))
"""


def test_a_run_trained_with_a_relative_model_path_loads_from_any_directory(tiny_run, tiny, tmp_path):
    # tiny_run was trained from tiny's parent directory with a relative model path (conftest).
    config = json.loads((tiny_run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tiny / "model").resolve())
    proc = subprocess.run([sys.executable, "-c", LOAD_FROM_ELSEWHERE, str(tiny_run)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["base"] == str((tiny / "model").resolve())
    # and the run's generation_config.json stops on its template's stop token (alpaca: the EOS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    assert json.loads((tiny_run / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_the_bases_sentencepiece_file_and_a_portable_tokenizer_class_are_kept(tiny, tmp_path):
    # A base laid out like stories260K or Mistral 7B v0.1: tokenizer.model beside tokenizer.json,
    # and a class transformers 4 knows. (The bytes stand in for a SentencePiece model: what is
    # checked is that the file travels unchanged and that nothing reads it instead of tokenizer.json.)
    base = tmp_path / "base"
    shutil.copytree(tiny / "model", base)
    spm = bytes(range(256)) * 64
    (base / "tokenizer.model").write_bytes(spm)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))

    run_dir, trained = chatml_run(tiny, tmp_path / "run", model_dir=base)
    merged = merge(run_dir, output=tmp_path / "merged", verify=False).output
    texts = ["Count from 3 to 7.", " leading space and\n\ntwo newlines", "<|im_start|>user\nhi<|im_end|>"]
    for folder in (run_dir, merged):
        assert (folder / "tokenizer.model").read_bytes() == spm
        assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
        reloaded = AutoTokenizer.from_pretrained(folder)
        for text in texts:
            assert reloaded(text)["input_ids"] == trained(text)["input_ids"], (folder.name, text)
        assert reloaded.chat_template == portable_jinja(trained.chat_template) and reloaded.eos_token == "<|im_end|>"


def test_the_model_cards_snippet_runs_as_written_and_gives_the_runs_logits(tiny_run, tmp_path):
    """The card's Python, run as a user would paste it (item 8: it crashed on AVX512-BF16 CPUs, this
    machine's kind, at the first forward without gradients), gives the logits qlora's own loading does."""
    from qlora_cli.infer.target import load_target

    card = (tiny_run / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    ids = [1, 5, 9, 13, 17, 21]
    probe = f"\nimport json\nwith torch.no_grad():\n    out = model(torch.tensor([{ids}])).logits\nprint(json.dumps(out[0].tolist()))\n"
    proc = subprocess.run([sys.executable, "-c", snippet + probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        expected = load_target(str(tiny_run)).model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
