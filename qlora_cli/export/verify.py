"""The export check: does the GGUF read and answer as the merged model does?

    report = check_export(cpp, gguf, merged_dir, recipe, tokenizer, template)

Four figures, each against the merged model (the adapter folded into the dequantized 4-bit base,
itself checked against the trained adapter by `qlora merge`):
- metadata: the GGUF's chat template is the run's, byte for byte, and its BOS/EOS are the tokenizer's;
- tokenization, by llama.cpp's runtime (`llama-tokenize`): the run's texts (validation rows,
  rendered with the run's template) give the same token ids. Quantization does not touch the
  vocabulary, so this must be 100% at every --quant;
- greedy continuations, by llama.cpp's runtime (`llama-simple`) against transformers on the
  merged model: the same text, and whether each stopped by itself (at the template's stop token);
- top-1 agreement and mean KL of next-token predictions over every position of the rows, with the
  GGUF's weights read back by transformers (its GGUF loader dequantizes them): what the chosen
  quantization costs, measured like `qlora merge`'s fidelity.
Without llama.cpp's binaries the two runtime figures are skipped, and the report says how to get them.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_cli.export.llama_cpp import CHAT
from qlora_cli.merge.fidelity import compare, next_token_logits

N_ROWS = 16  # rows tokenized and scored
N_PROMPTS = 8  # prompts continued greedily (each is two llama-simple runs)
NEW_TOKENS = 48


@dataclass
class Probe:
    text: str  # a whole row as training rendered it (prompt and reply)
    prompt: str  # the row up to where the model answers


def probes(recipe, tokenizer, template, n: int = N_ROWS) -> list[Probe]:
    """Rows of the run's validation data (else training data), rendered exactly as training rendered
    them, as text: both tokenizers are then given the same characters."""
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.infer.evaluate import last_reply

    prepared = build_datasets(recipe.data, tokenizer, template, seed=recipe.train.seed, use_cache=False)
    ds = prepared.val if prepared.val is not None and len(prepared.val) else prepared.train
    out = []
    for row in ds.select(range(min(n, len(ds)))):
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
        if template is None:  # plain text: continue the document from its first tokens
            prompt_ids = row["input_ids"][: min(16, len(row["input_ids"]) // 2 or 1)]
        else:
            prompt_ids, _ = last_reply(row)
        out.append(Probe(decode(row["input_ids"]), decode(prompt_ids)))
    return out


def check_export(cpp, gguf: Path, merged_dir: Path, recipe, tokenizer, template, console=None) -> dict:
    """The figures above, as export_report.json's "check"."""
    rows = probes(recipe, tokenizer, template)
    report = {"rows": len(rows), "metadata": check_metadata(gguf, tokenizer)}
    merged = _load(merged_dir)
    if cpp is not None and cpp.has_runtime():
        report["runtime"] = cpp.versions().get("binaries", "unknown")
        try:
            # llama.cpp adds BOS by itself where the model asks for it (it tokenizes "" as [BOS]).
            adds_bos = tokenizer.bos_token_id is not None and cpp.tokenize(gguf, "") == [tokenizer.bos_token_id]
            report["tokenization"] = check_tokenization(cpp, gguf, tokenizer, rows, adds_bos)
            report["greedy"] = check_greedy(cpp, gguf, merged, tokenizer, template, rows[:N_PROMPTS], adds_bos)
            if template is not None and cpp.program(CHAT) is not None:
                report["chat"] = check_chat(cpp, gguf, tokenizer, template)
            elif template is not None:
                report["chat_skipped"] = f"{CHAT} (llama.cpp's chat mode) was not found: build it to check the chat prompt"
        except RuntimeError as exc:  # a llama.cpp program that crashed or printed what it should not
            report["runtime_error"] = str(exc)
    else:
        report["skipped"] = ("llama.cpp's llama-tokenize and llama-simple were not found (--llama-cpp-bin, "
                             "$QLORA_LLAMA_CPP_BIN, LLAMA_CPP/build/bin or $PATH): build them to check tokenization "
                             "and greedy answers in llama.cpp itself")
    report["weights"] = check_weights(gguf, merged, tokenizer, rows)
    return report


def check_metadata(gguf: Path, tokenizer) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def field(name: str):
        f = reader.get_field(name)
        return None if f is None else f.contents()

    template = field("tokenizer.chat_template")
    ours = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {
        "chat_template_identical": template == ours,
        "has_chat_template": template is not None,
        "bos_id": field("tokenizer.ggml.bos_token_id"),
        "eos_id": field("tokenizer.ggml.eos_token_id"),
        "bos_matches": field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id or tokenizer.bos_token_id is None,
        "eos_matches": field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id,
        "add_bos": field("tokenizer.ggml.add_bos_token"),
    }


def llama_text(tokenizer, text: str, adds_bos: bool) -> str:
    """TEXT as llama.cpp should be given it: our rendered text already begins with BOS's text (the
    template writes it), and llama.cpp adds BOS by itself when the model asks for it."""
    bos = tokenizer.bos_token
    return text[len(bos):] if adds_bos and bos and text.startswith(bos) else text


def check_tokenization(cpp, gguf: Path, tokenizer, rows: list[Probe], adds_bos: bool) -> dict:
    same, first_difference = 0, None
    for probe in rows:
        ours = tokenizer.backend_tokenizer.encode(probe.text, add_special_tokens=False).ids
        theirs = cpp.tokenize(gguf, llama_text(tokenizer, probe.text, adds_bos))
        if ours == theirs:
            same += 1
        elif first_difference is None:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            first_difference = {"text": probe.text[:200], "position": at, "ours": ours[at:at + 8], "llama_cpp": theirs[at:at + 8]}
    return {"texts": len(rows), "identical": same, "first_difference": first_difference}


@torch.no_grad()
def check_greedy(cpp, gguf: Path, merged, tokenizer, template, rows: list[Probe], adds_bos: bool) -> dict:
    stops = {tokenizer.eos_token_id}
    if template is not None and template.stop:
        stops.add(tokenizer.convert_tokens_to_ids(template.stop))
    same, ours_stopped, theirs_stopped, prefix, examples = 0, 0, 0, [], []
    for probe in rows:
        ids = tokenizer.backend_tokenizer.encode(probe.prompt, add_special_tokens=False).ids
        out = merged.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=sorted(stops),
                              pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in stops
        ours = _continuation(tokenizer, ids, new[:-1] if stopped else new)
        theirs, their_stop = cpp.complete(gguf, llama_text(tokenizer, probe.prompt, adds_bos), NEW_TOKENS)
        same += ours == theirs
        ours_stopped += stopped
        theirs_stopped += their_stop
        prefix.append(_common_prefix(ours, theirs) / max(len(ours), len(theirs), 1))
        if len(examples) < 3:
            examples.append({"prompt": probe.prompt[-120:], "merged": ours, "llama_cpp": theirs})
    n = len(rows)
    return {"prompts": n, "identical": same, "merged_stopped": ours_stopped, "llama_cpp_stopped": theirs_stopped,
            "mean_common_prefix": sum(prefix) / n if n else None, "examples": examples}


CHAT_PROMPTS = ("What is the opposite of hot?", "Write a haiku about rain.\nKeep it short.", "List three colours: red, ...")


def check_chat(cpp, gguf: Path, tokenizer, template) -> dict:
    """llama.cpp's chat mode (llama-completion -cnv, the GGUF's template in its Jinja engine) builds
    the same prompt ids for a user message as training's renderer: the training prompt, byte for byte."""
    from qlora_cli.data.templates import Renderer

    same, first_difference = 0, None
    for user in CHAT_PROMPTS:
        text = Renderer(template, tokenizer).prompt([{"role": "user", "content": user}])
        ours = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        theirs = cpp.chat_prompt_ids(gguf, user)
        if ours == theirs:
            same += 1
        elif first_difference is None:
            first_difference = {"user": user, "ours": ours, "llama_cpp": theirs}
    return {"prompts": len(CHAT_PROMPTS), "identical": same, "first_difference": first_difference}


def _continuation(tokenizer, prompt_ids: list[int], new: list[int]) -> str:
    """The text NEW adds after the prompt, as it reads in the whole sequence (a SentencePiece decoder
    drops a leading space when the new tokens are decoded alone; llama.cpp prints it)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    before, after = decode(prompt_ids), decode(prompt_ids + new)
    return after[len(before):] if after.startswith(before) else decode(new)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_weights(gguf: Path, merged, tokenizer, rows: list[Probe]) -> dict:
    """Top-1 agreement and mean KL of the GGUF's weights (dequantized by transformers' GGUF loader)
    against the merged model, over every position of the rows."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    if not GGUFReader(str(gguf)).tensors:
        return {"skipped": "the GGUF holds no tensors"}
    try:
        # The merged model's config, so the model built is the right size whatever the GGUF's
        # metadata lacks; its loader draws a raw tqdm bar on stderr, outside transformers' switch.
        with contextlib.redirect_stderr(io.StringIO()):
            exported = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, config=merged.config,
                                                            dtype=torch.float32)
    except Exception as exc:  # an architecture or quant type transformers cannot read back  # noqa: BLE001
        return {"skipped": f"transformers could not read the GGUF back ({type(exc).__name__}: {str(exc)[:200]})"}
    sequences = [torch.tensor(tokenizer.backend_tokenizer.encode(p.text, add_special_tokens=False).ids) for p in rows]
    result = compare(next_token_logits(merged, sequences), next_token_logits(exported, sequences))
    del exported
    return result


def _load(merged_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
