"""The Ollama `Modelfile` of an export: the GGUF, the run's prompt format as an Ollama (Go) template,
and a `stop` for each token that ends a reply.

    text = modelfile("model-q4_k_m.gguf", template, tokenizer)

Ollama renders prompts with Go templates, not Jinja, so each built-in template has its Go twin
here, written to produce the same text as the Jinja one (BOS left out: Ollama's runtime adds it,
as llama.cpp does). A tokenizer's own template (`data.template: tokenizer`) that renders exactly as
a built-in one gets that twin; any other is left to Ollama, which reads the chat template inside
the GGUF and recognises the common families by themselves; `modelfile` says so in a comment.
Tool definitions are not rendered by these templates (Ollama's tool calling has its own format).
"""

from __future__ import annotations

from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT

# Go twins of data/templates.py's built-ins. {eos} is the tokenizer's EOS text, which the Jinja
# templates append to each assistant turn.
GO_TEMPLATES = {
    "alpaca": (
        "{{ if .System }}{{ .System }}{{ else }}" + ALPACA_SYSTEM_NO_INPUT + "{{ end }}"
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}\n\n### Instruction:\n{{ .Content }}"
        "{{- else if eq .Role \"assistant\" }}\n\n### Response:\n{{ .Content }}{eos}"
        "{{- end }}{{- end }}\n\n### Response:\n"
    ),
    "chatml": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    "llama3": (
        "{{- range .Messages }}"
        "<|start_header_id|>{{ if eq .Role \"tool\" }}ipython{{ else }}{{ .Role }}{{ end }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "raw": (
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}{{ .Content }}{{ else if eq .Role \"assistant\" }}{{ .Content }}{eos}{{ end }}"
        "{{- end }}"
    ),
}


def go_template_name(template, tokenizer) -> str | None:
    """Which Go twin renders TEMPLATE (a data.templates.Template), or None: a built-in by name, or
    the built-in a tokenizer's own template renders identically to, on a probe conversation."""
    from qlora_cli.data.templates import BUILTINS, Renderer

    if template is None:
        return None
    if template.name in GO_TEMPLATES:
        return template.name
    # With and without a system message: some templates write a default one of their own (SmolLM2's).
    turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Name a colour."}]
    probes = [[{"role": "system", "content": "Be brief."}, *turns], turns]

    def rendered(t):
        try:
            return [Renderer(t, tokenizer).prompt(p) for p in probes]
        except Exception:  # a template that cannot render a probe (or markers the tokenizer lacks)  # noqa: BLE001
            return None

    theirs = rendered(template)
    if theirs is None:
        return None
    return next((name for name in GO_TEMPLATES if rendered(BUILTINS[name]) == theirs), None)


def stop_strings(template, tokenizer) -> list[str]:
    """The texts of the tokens that end a reply: the template's stop token and the EOS."""
    stops = [template.stop] if template is not None and template.stop else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def modelfile(gguf_name: str, template, tokenizer, run_name: str) -> str:
    """The Modelfile text (Ollama's reference: https://github.com/ollama/ollama/blob/main/docs/modelfile.md)."""
    lines = [f"# Written by `qlora export` for {run_name}. Create the model with:",
             f"#   ollama create {_model_name(run_name)} -f Modelfile", f"FROM ./{gguf_name}"]
    name = go_template_name(template, tokenizer)
    if template is None:  # a plain-text run: the prompt is the text to continue
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif name is not None:
        go = GO_TEMPLATES[name].replace("{eos}", tokenizer.eos_token or "")
        lines += [f"# The run's prompt format ({template.name}), as Ollama renders it.", f'TEMPLATE """{go}"""']
    else:
        lines.append(f"# No TEMPLATE: the run's template ({template.name}) has no Go twin here; Ollama reads the chat "
                     "template stored in the GGUF and applies it when it recognises it. Check with `ollama show`.")
    lines += [f'PARAMETER stop "{_escape(s)}"' for s in stop_strings(template, tokenizer)]
    return "\n".join(lines) + "\n"


def _model_name(run_name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_name.lower()).strip("-.")
    return cleaned or "qlora-model"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
