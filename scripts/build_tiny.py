"""Build the tiny offline model, tokenizer and datasets used by `make demo`, configs/tiny.yaml and the tests.

    python scripts/build_tiny.py            # writes build/tiny/{model,alpaca.jsonl,chat.jsonl,dpo.jsonl,kto.jsonl}
    python scripts/build_tiny.py --out DIR

No network and no randomness beyond fixed seeds: the same files every time, in about a second.

The model is a random 2-layer Llama (hidden size 64, so every linear layer quantizes into whole
64-value NF4 blocks). The tokenizer is a byte-level BPE trained in memory on the data, so it can
encode any text, has Llama-style <s>/</s> and no pad token (pad == eos, as for Llama and Mistral),
plus the ChatML and Llama 3 markers as single tokens so the chatml and llama3 templates work too.

The task is one a random model learns visibly in a minute on a laptop CPU: short deterministic
answers (counting, reversing a list, repeating a word, antonyms), in both Alpaca variants (with and
without `input`). The eval loss falls by more than half.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "light", "table", "water", "paper", "bread", "smile"]
ANTONYMS = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "light": "dark", "early": "late",
            "happy": "sad", "open": "closed", "full": "empty", "old": "new", "high": "low", "wet": "dry"}
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", *CHAT_MARKERS]


def alpaca_rows(n: int, seed: int) -> list[dict]:
    """Deterministic instruction data; about half the rows use the `input` field."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a = rng.randint(1, 15)
            b = a + rng.randint(2, 5)
            rows.append({"instruction": f"Count from {a} to {b}.", "input": "",
                         "output": " ".join(str(k) for k in range(a, b + 1))})
        elif kind == 1:
            items = rng.sample(WORDS, 3)
            rows.append({"instruction": "Reverse the order of these words.", "input": " ".join(items),
                         "output": " ".join(reversed(items))})
        elif kind == 2:
            word, times = rng.choice(WORDS), rng.randint(2, 4)
            rows.append({"instruction": f"Repeat the word {times} times.", "input": word,
                         "output": " ".join([word] * times)})
        else:
            word = rng.choice(sorted(ANTONYMS))
            rows.append({"instruction": f"What is the opposite of {word}?", "input": "", "output": ANTONYMS[word]})
    return rows


def chat_rows(n: int, seed: int) -> list[dict]:
    """Multi-turn conversations in OpenAI `messages` form, with a system prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.randint(1, 10)
        word = rng.choice(sorted(ANTONYMS))
        rows.append({"messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": f"Count from {a} to {a + 3}."},
            {"role": "assistant", "content": " ".join(str(k) for k in range(a, a + 4))},
            {"role": "user", "content": f"What is the opposite of {word}?"},
            {"role": "assistant", "content": ANTONYMS[word]},
        ]})
    return rows


def preference_rows(rows: list[dict], seed: int) -> list[dict]:
    """Preference pairs on the same task: the right answer chosen, a plausible wrong one rejected (the
    question's own word, the list unreversed, the count backwards, the word repeated once too often).
    ShareGPT-style `conversations` + `chosen` + `rejected`, as LLaMA-Factory writes DPO data. Built from
    words the tokenizer already knows, so adding them changes nothing else here."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        out = row["output"]
        if row["instruction"].startswith("What is the opposite"):
            wrong = row["instruction"].split()[-1].rstrip("?")
        elif row["instruction"].startswith("Reverse"):
            wrong = row["input"]
        elif row["instruction"].startswith("Count"):
            wrong = " ".join(reversed(out.split()))
        else:
            wrong = " ".join(out.split() + [row["input"]])
        if wrong == out:
            continue
        pairs.append({"conversations": [{"from": "human", "value": prompt}],
                      "chosen": {"from": "gpt", "value": out}, "rejected": {"from": "gpt", "value": wrong}})
    rng.shuffle(pairs)
    return pairs


def unpaired_rows(pairs: list[dict]) -> list[dict]:
    """KTO's unpaired form of the same pairs: each reply alone with a desirable/undesirable label."""
    out = []
    for k, pair in enumerate(pairs):
        reply = pair["chosen"] if k % 2 == 0 else pair["rejected"]
        out.append({"messages": [{"role": "user", "content": pair["conversations"][0]["value"]},
                                 {"role": "assistant", "content": reply["value"]}], "label": k % 2 == 0})
    return out


def build_tokenizer(corpus: list[str]):
    """Byte-level BPE trained in memory; deterministic for a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=CHAT_MARKERS, model_max_length=512,
    )


def build_model(tokenizer, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.1 (transformers' default is 0.02): after the final RMSNorm, logits are
    # hidden . lm_head row, so with tiny weights a 64-wide model cannot express a confident
    # prediction at all and the loss plateaus near ln(vocab), whatever the adapters learn.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(out: Path) -> Path:
    """Write model/, alpaca.jsonl, chat.jsonl, dpo.jsonl (preference pairs) and kto.jsonl under `out`."""
    from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT, ALPACA_SYSTEM_WITH_INPUT

    out.mkdir(parents=True, exist_ok=True)
    alpaca, chat = alpaca_rows(400, seed=1), chat_rows(60, seed=2)
    _write_jsonl(out / "alpaca.jsonl", alpaca)
    _write_jsonl(out / "chat.jsonl", chat)
    pairs = preference_rows(alpaca_rows(200, seed=3), seed=3)  # other rows than alpaca.jsonl's, same task
    _write_jsonl(out / "dpo.jsonl", pairs)
    _write_jsonl(out / "kto.jsonl", unpaired_rows(pairs))
    corpus = [ALPACA_SYSTEM_NO_INPUT, ALPACA_SYSTEM_WITH_INPUT, "### Instruction: ### Input: ### Response:"]
    corpus += [" ".join(r.values()) for r in alpaca]
    corpus += [m["content"] for r in chat for m in r["messages"]] + ["system user assistant"]
    build_model(build_tokenizer(corpus), out / "model")
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/tiny", help="output directory (default: build/tiny)")
    print(build(Path(parser.parse_args().out)))
