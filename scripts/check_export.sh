#!/usr/bin/env bash
# End-to-end check of `qlora export` against a real llama.cpp (issue 21), never part of the test
# suite (it needs llama.cpp's source and a build of it, which CI does not have):
#   - the tiny model (a byte-level BPE llama.cpp's table does not know: --pre-tokenizer gpt-2),
#     trained 60 steps, exported at f16 and q8_0;
#   - stories260K (a real SentencePiece Llama), trained 60 steps on ../shared/data/alpaca_en_demo.json,
#     exported at f16 and q8_0, and as an Ollama model.
# Each export prints its check table (tokenization by llama-tokenize, greedy answers and stops by
# llama-simple, top-1 agreement of the GGUF's weights) and writes export_report.json.
#   scripts/check_export.sh [DIR]       (default build/export-check)
# llama.cpp: $QLORA_LLAMA_CPP (default ../shared/tools/llama.cpp) and its binaries in
# $QLORA_LLAMA_CPP_BIN (default DIR/llama.cpp-build/bin, built there with
# ../shared/scripts/build-llama-cpp.sh when missing: about 9 minutes on 2 cores).
# Exits 1 when any export's check reports a problem.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/export-check}; py=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
export QLORA_LLAMA_CPP=${QLORA_LLAMA_CPP:-$(cd ../shared/tools/llama.cpp && pwd)}
export QLORA_LLAMA_CPP_BIN=${QLORA_LLAMA_CPP_BIN:-$dir/llama.cpp-build/bin}
[[ -x $QLORA_LLAMA_CPP_BIN/llama-simple ]] || ../shared/scripts/build-llama-cpp.sh "$(dirname "$QLORA_LLAMA_CPP_BIN")"
qlora() { "$py" -m qlora_cli "$@"; }

# The tiny model: the demo's recipe, shorter.
[[ -f build/tiny/model/config.json ]] || "$py" scripts/build_tiny.py --out build/tiny
[[ -f $dir/tiny/summary.json ]] || qlora train configs/tiny.yaml --output-dir "$dir/tiny" --overwrite --set train.max_steps=60 -q

# stories260K on real Alpaca rows.
data=$(cd ../shared/data && pwd)/alpaca_en_demo.json
cat > "$dir/stories260K.yaml" <<YAML
model:
  name_or_path: $(cd ../shared/models/stories260K && pwd)
  dtype: float32
quant:
  compute_dtype: float32
lora:
  r: 16
  alpha: 32
  dropout: 0.0
  target_modules: all-linear
data:
  sources:
    - path: $data
      format: alpaca
  max_seq_len: 256
  val_size: 32
train:
  max_steps: 60
  learning_rate: 1.0e-3
  batch_size: 8
  optimizer: adamw_torch
  gradient_checkpointing: false
  logging_steps: 10
output:
  dir: $dir/stories260K
YAML
[[ -f $dir/stories260K/summary.json ]] || qlora train "$dir/stories260K.yaml" --overwrite -q

status=0
for quant in f16 q8_0; do
  echo "== tiny, $quant"
  qlora export "$dir/tiny" --quant "$quant" --pre-tokenizer gpt-2 --overwrite 2>&1 | tee "$dir/tiny-$quant.log" | grep -v '^converting\|^checking'
  grep -q '^warning:' "$dir/tiny-$quant.log" && status=1
  echo "== stories260K, $quant"
  qlora export "$dir/stories260K" --quant "$quant" --overwrite 2>&1 | tee "$dir/stories260K-$quant.log" | grep -v '^converting\|^checking'
  grep -q '^warning:' "$dir/stories260K-$quant.log" && status=1
done
echo "== stories260K, ollama q4_k_m"
qlora export "$dir/stories260K" --format ollama --quant q4_k_m --overwrite 2>&1 | tee "$dir/stories260K-ollama.log" | grep -v '^converting\|^checking'
grep -q '^warning:' "$dir/stories260K-ollama.log" && status=1
cat "$dir/stories260K/ollama-q4_k_m/Modelfile"
exit $status
