"""qlora: fine-tune causal language models with QLoRA from one YAML recipe.

The package is split by what each module holds: `config` (the recipe schema), `modeling`
(bitsandbytes/PEFT builders), `data` (formats, templates, tokenization), `train` (the run),
`rundir` (the output layout) and `cli` (the commands).
"""

__version__ = "0.1.0"
