#!/usr/bin/env bash
# End-to-end check on a real bf16 chat model (issue 28), never part of the test suite:
# SmolLM2-135M-Instruct built locally (../shared/scripts/get-smollm2.sh), its own ChatML template
# (data.template: tokenizer), 20 QLoRA steps on ../shared/data/alpaca_en_demo.json with
# model.dtype bfloat16 and fp32 compute, `qlora merge` judged against the precision floor, then
# plain transformers (no qlora, no peft) generating from the merged model must stop at <|im_end|>,
# and the saved chat template must parse in plain jinja2.
#   scripts/check_smollm2.sh [DIR]      (default build/smollm2-check; the model is built once, in DIR/model)
# Prints the merge's agreement, the floor and the verdict; exits 1 when the merge warns or
# generation does not stop. About 30 s to build the model; training on 2 busy CPU cores takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/smollm2-check}; py=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
[[ -f $dir/model/config.json ]] || ../shared/scripts/get-smollm2.sh "$dir/model" "$py"
data=$(cd ../shared/data && pwd)/alpaca_en_demo.json
cat > "$dir/recipe.yaml" <<YAML
model:
  name_or_path: $dir/model
  dtype: bfloat16            # the checkpoint's own dtype
quant:
  compute_dtype: float32     # as configs/tiny.yaml
lora:
  r: 16
  alpha: 32
  dropout: 0.0
  target_modules: all-linear
data:
  sources:
    - path: $data
      format: alpaca
  template: tokenizer        # SmolLM2's own ChatML template
  max_seq_len: 256
  val_size: 32               # the rows the merge is checked on
train:
  max_steps: 20
  learning_rate: 2.0e-4
  batch_size: 4
  gradient_checkpointing: false
  logging_steps: 5
  eval_steps: 20
  save_steps: 20
output:
  dir: $dir/run
YAML
qlora() { "$py" -m qlora_cli "$@"; }
qlora validate "$dir/recipe.yaml" --quiet
qlora train "$dir/recipe.yaml" --overwrite --quiet > /dev/null
qlora merge "$dir/run" --overwrite > /dev/null
"$py" - "$dir/run/merged" <<'PY'
import json, sys
import jinja2, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out = sys.argv[1]
report = json.load(open(f"{out}/merge_report.json"))
fid = report["fidelity"]
merged, floor = fid["results"][report["base"]], fid["floor"]
print(f"merge: top-1 {100 * merged['top1_agreement']:.2f}%, max |logit diff| {merged['max_abs_logit_diff']:.3g}, "
      f"mean KL {merged['mean_kl']:.3g}, {merged['positions']} positions ({fid['prompts']})")
print(f"floor ({floor['dtype']}): top-1 {100 * floor['top1_agreement']:.2f}%, max |logit diff| "
      f"{floor['max_abs_logit_diff']:.3g}, mean KL {floor['mean_kl']:.3g}")
print(f"verdict: {report.get('warning') or 'within the precision floor'}")

tokenizer = AutoTokenizer.from_pretrained(out)
jinja2.Environment().parse(open(f"{out}/chat_template.jinja").read())  # plain jinja2 parses it
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
# A reply that ends must end at <|im_end|>, with nothing after it: generate() reads the stop tokens from
# the merged generation_config.json. (20 steps leave SmolLM2 looping on some prompts: those run to the limit.)
stopped, ran_past = 0, 0
for prompt in ["What is the capital of France?", "Translate 'good morning' into Spanish.", "List the first five prime numbers."]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=128, do_sample=False)[0, ids.shape[1]:].tolist()
    ended = im_end in new
    past = ended and new.index(im_end) != len(new) - 1
    stopped, ran_past = stopped + (ended and not past), ran_past + past
    print(f"generate: {prompt!r} -> {tokenizer.decode(new)!r} ({len(new)} tokens, "
          f"{'RAN PAST <|im_end|>' if past else 'stopped at <|im_end|>' if ended else 'no end of turn within 128'})")
print(f"generation: {stopped} of 3 replies stopped at <|im_end|>, {ran_past} ran past it")
sys.exit(0 if stopped and not ran_past and not report.get("warning") else 1)
PY
