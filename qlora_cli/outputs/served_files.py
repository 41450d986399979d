"""What other tools read from a run directory or a merged model, written so they agree with qlora.

    stop_token_ids(generation_config, tokenizer)   # every token a turn may end on
    write_generation_config(folder, base, tokenizer)
    make_base_path_absolute(folder)                # adapter_config.json usable from any directory
    keep_base_tokenizer_files(folder, base)        # tokenizer.model, and a class older readers know
    save_tokenizer(tokenizer, folder)              # save_pretrained, with the template in plain Jinja

Plain `transformers` `generate()`, and servers that read `generation_config.json`, stop on its
`eos_token_id` only. A base model's file names the base's EOS (`</s>`), while a run trained with
ChatML ends its turns with `<|im_end|>`: without that token in the file, plain `generate()` runs
on past the end of the reply (`cold<|im_end|><|im_end|>...`). `qlora generate` stops on the same
set (targets.Target.stop_ids), so both agree.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

# Files that hold a tokenizer's vocabulary in a model repository besides tokenizer.json. transformers
# 5's save_pretrained writes tokenizer.json alone; readers that build the vocabulary from these
# (llama.cpp's converter reads tokenizer.model for SentencePiece scores and types; transformers 4's
# slow tokenizers) need them as the base had them.
VOCAB_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt")
# transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 (and so llama.cpp's
# converter, pinned to it) does not know; this is the class every version loads tokenizer.json with.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """The base's own end-of-sequence ids, plus the tokenizer's EOS, which apply_template has set
    to the run's stop token (the template's end of turn)."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def write_generation_config(folder: Path, base, model_config, tokenizer) -> None:
    """generation_config.json for FOLDER: the base's (a directory path or a GenerationConfig), or
    one derived from the model config when the base has none, with the run's stop tokens."""
    from transformers import GenerationConfig

    if isinstance(base, GenerationConfig):
        generation = GenerationConfig.from_dict(base.to_dict())
    else:
        try:
            generation = GenerationConfig.from_pretrained(base)
        except OSError:  # the base has none: derive it from the model config, as from_pretrained would
            generation = GenerationConfig.from_model_config(model_config)
    ids = stop_token_ids(generation, tokenizer)
    generation.eos_token_id = ids[0] if len(ids) == 1 else ids  # a list only where there are several
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id  # else generate() warns and pads with EOS anyway
    generation.save_pretrained(folder)


def make_base_path_absolute(folder: Path) -> None:
    """PEFT records the base as it was given to from_pretrained: a relative path when the recipe
    had one, which `AutoPeftModelForCausalLM.from_pretrained(RUN)` from another directory then
    takes for a hub id. Local bases are written absolute; hub ids stay as they are."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or Path(base).is_absolute() or not Path(base).expanduser().is_dir():
        return
    config["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def keep_base_tokenizer_files(folder: Path, base: str, revision: str | None = None) -> None:
    """After tokenizer.save_pretrained(FOLDER): copy the base's vocabulary files that were not
    written, and replace a tokenizer class only transformers 5 knows by the base's own (or the
    generic fast class). The tokens are unchanged: tokenizer.json, which every reader prefers
    when the class is a fast one, is the file that was saved."""
    folder = Path(folder)
    for name in VOCAB_FILES:
        source = model_file(base, name, revision)
        if source is not None and not (folder / name).exists():
            shutil.copyfile(source, folder / name)
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in (None, "TokenizersBackend"):
        return
    base_class = None
    if (base_config := model_file(base, "tokenizer_config.json", revision)) is not None:
        try:
            base_class = json.loads(base_config.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            pass
    config["tokenizer_class"] = base_class if base_class not in (None, "TokenizersBackend") else PORTABLE_TOKENIZER_CLASS
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def model_file(name_or_path: str, name: str, revision: str | None = None) -> Path | None:
    """NAME in a model given by local directory or hub id: the local file, or the cached one (no
    download); None when there is none."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / name if (path / name).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, name, revision=revision)
    except Exception:  # an id the hub client rejects: nothing there
        return None
    return Path(cached) if isinstance(cached, str) else None


# transformers' `{% generation %}` ... `{% endgeneration %}` (the built-in templates wrap assistant
# replies in it so training can find them). Only transformers and llama.cpp know the tag: plain
# Jinja, and the servers built on it, stop at "Encountered unknown tag 'generation'".
_GENERATION_TAG = re.compile(r"{%([-+]?)\s*(end)?generation\s*([-+]?)%}")


def save_tokenizer(tokenizer, folder) -> None:
    """tokenizer.save_pretrained(FOLDER), with its chat template written in portable form
    (portable_jinja). The tokenizer object keeps the template it had: training still finds the
    replies by their generation blocks."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: each one
        tokenizer.chat_template = {name: portable_jinja(text) for name, text in template.items()}
    elif isinstance(template, str):
        tokenizer.chat_template = portable_jinja(template)
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = template


def portable_jinja(text: str) -> str:
    """TEXT without generation tags, rendering the same text as before.

    A generation block renders its body unchanged (it only records where the body landed), so
    dropping its two tags leaves the output as it was, provided the tags did nothing else: their
    whitespace control (`{%-`, `-%}`, and the trim_blocks/lstrip_blocks that chat templates are
    rendered with) acts on the text beside a tag, so each tag must sit between two other tags
    (or at an end of the template); and the block is a scope, so no `{% set %}` directly inside it
    may leak out. Templates where either fails (none of the built-ins) keep the blocks as standard
    `{% with %}` ... `{% endwith %}`, which have the same whitespace control and the same scope.
    """
    tags = list(_GENERATION_TAG.finditer(text))
    if not tags:
        return text
    between_tags = all(
        (m.start() == 0 or text[: m.start()].endswith(("}}", "%}", "#}")))
        and (m.end() == len(text) or text[m.end():].startswith(("{{", "{%", "{#")))
        for m in tags
    )
    if between_tags and not _assigns_in_generation_blocks(text):
        return _GENERATION_TAG.sub("", text)
    return _GENERATION_TAG.sub(lambda m: f"{{%{m[1]} {'endwith' if m[2] else 'with'} {m[3]}%}}", text)


def _assigns_in_generation_blocks(text: str) -> bool:
    """Whether a generation block assigns a variable in its own scope (not inside a loop, macro or
    other scope of its own), which would be visible after the block once its tags are gone. A
    template that does not parse counts as yes (it is then only rewritten, never trusted)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols

    class Generation(Extension):  # parses the tag as transformers does: a call block around the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(nodes.Name("__generation__", "load"), [], [], body).set_lineno(lineno)

    scopes = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.With, nodes.Scope)

    def assigns(node) -> bool:
        for child in node.iter_child_nodes():
            if isinstance(child, (nodes.Assign, nodes.AssignBlock)):
                return True
            if not isinstance(child, scopes) and assigns(child):
                return True
        return False

    try:
        tree = jinja2.Environment(extensions=[Generation, loopcontrols]).parse(text)
    except jinja2.TemplateSyntaxError:
        return True
    return any(
        assigns(block) for block in tree.find_all(nodes.CallBlock)
        if isinstance(block.call, nodes.Name) and block.call.name == "__generation__"
    )
