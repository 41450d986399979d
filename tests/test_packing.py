"""Packing: several examples per row, each still seeing only itself.

The batches checked here are the ones the trainer iterates over (its own dataloader and TRL's
collator), fed to the trainer's own 4-bit + LoRA model.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_recipe
from qlora_cli.recipe.load import validate_recipe
from qlora_cli.outputs.run_dir import RunDir
from qlora_cli.train.run import build_trainer


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def packed_setup(tiny, tmp_path_factory, request):
    """Both attention implementations that run without a GPU keep packed examples apart (the third,
    flash_attention_2, needs one: the recipe check refuses it elsewhere)."""
    tmp = tmp_path_factory.mktemp("packing")
    recipe = tiny_recipe(tiny, tmp / "run")
    recipe["model"]["attn_implementation"] = request.param
    recipe["data"]["packing"] = True
    recipe["train"]["batch_size"] = 2
    return build_trainer(validate_recipe(recipe), RunDir(tmp / "run"))


def first_batch(setup):
    return next(iter(setup.trainer.get_train_dataloader()))


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each example in a padding-free row: position ids restart at 0 per example."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:]))


def test_packed_batches_hold_several_examples_with_restarting_position_ids(packed_setup):
    batch = first_batch(packed_setup)
    assert "attention_mask" not in batch  # padding-free: one flat row, examples told apart by position ids
    ids, pos, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    spans = segments(pos)
    assert len(spans) >= 2 * 2  # batch_size 2 packed rows of 128 tokens: two 45-80 token examples each
    bos = packed_setup.tokenizer.bos_token_id
    for start, end in spans:
        assert ids[start].item() == bos  # each example starts where its positions restart...
        assert pos[start:end].tolist() == list(range(end - start))  # ...and counts up from 0
        assert labels[start].item() == -100  # no loss for predicting one example's start from another


def test_packed_examples_do_not_attend_to_each_other(packed_setup):
    """Each example's logits inside the packed row equal its logits computed alone."""
    batch = first_batch(packed_setup)
    model = packed_setup.trainer.model
    model.eval()  # dropout is 0 in the tiny recipe; eval only avoids autograd bookkeeping
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        for start, end in segments(batch["position_ids"][0]):
            alone = model(input_ids=batch["input_ids"][:, start:end].to(device)).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)


def test_training_config_has_no_kv_cache(packed_setup):
    # With a cache object present, transformers stops deriving the per-example mask from position ids.
    assert packed_setup.model.config.use_cache is False


@pytest.mark.slow  # a 30-step training run
def test_packed_training_run_reports_packing_efficiency(write_recipe, tmp_path, qlora_main):
    recipe = write_recipe({"data": {"packing": True}, "train": {"max_steps": 30, "eval_steps": 30}})
    proc = qlora_main("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    trained = summary["data"]["trained_batches"]
    stats = summary["data"]["batching"]
    assert trained["packed"] is True and trained["examples"] == summary["data"]["train_rows"]
    assert trained["rows"] <= trained["examples"] / 2  # at least two examples per packed row
    # the real-token fraction of the packed rows is far above what padding to the longest gives
    assert trained["packing_efficiency"] > stats["padding_efficiency"]
    assert trained["packing_efficiency"] == pytest.approx(stats["packing_efficiency"], abs=0.02)
    assert summary["last_train_loss"] < summary["first_train_loss"]


def test_long_documents_split_into_blocks_reach_the_trainer_whole(tiny, tmp_path):
    """data.on_too_long: split: TRL's bfd_split packing cuts each long document into max_seq_len
    blocks; the trainer's rows hold every token once, and no block learns its first token from the
    example before it in the row."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(f"w{i % 7}" for i in range(n))}) + "\n"
                            for n in [10, 150, 400, 30, 90]))
    recipe = tiny_recipe(tiny, tmp_path / "run")
    recipe["data"] = {"sources": [{"path": str(docs), "format": "text"}], "max_seq_len": 64, "packing": True,
                      "on_too_long": "split"}
    recipe["train"].update(batch_size=2, eval_steps=None)
    setup = build_trainer(validate_recipe(recipe), RunDir(tmp_path / "run"))
    stats, rows = setup.data.stats, setup.trainer.train_dataset
    assert setup.trainer.args.packing_strategy == "bfd_split"
    assert stats.split_documents == 3 and stats.truncated == 0
    assert max(len(r["input_ids"]) for r in rows) <= 64
    assert sum(len(r["input_ids"]) for r in rows) == stats.train_tokens  # every token, once
    assert sum(len(r["seq_lengths"]) for r in rows) == stats.blocks
    batch = first_batch(setup)
    labels, positions = batch["labels"][0], batch["position_ids"][0]
    assert (labels[positions == 0] == -100).all()  # each block's first token: no loss across the seam
    assert (labels[positions > 0] != -100).all()  # every other token is trained
