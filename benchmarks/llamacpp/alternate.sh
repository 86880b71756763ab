#!/usr/bin/env bash
# kimivl and llama.cpp on the same weights, in turn, ROUNDS times (default 3), each in a fresh process: a shared
# host's speed moves by up to 1.5x over minutes, so the two are compared round by round. Needs bench_decode's
# checkpoint (run bench_decode.py once) and the GGUF and venv made as bench.py's docstring says.
#   bash benchmarks/llamacpp/alternate.sh OUT_DIR [ROUNDS]
set -euo pipefail
out=$1; rounds=${2:-3}
here=$(cd "$(dirname "$0")" && pwd)
LLAMA_VENV=${LLAMA_VENV:-/tmp/llama/venv}; GGUF=${GGUF:-/tmp/llama/model-bf16.gguf}
mkdir -p "$out"
for r in $(seq "$rounds"); do
    "$LLAMA_VENV/bin/python" "$here/bench.py" --model "$GGUF" --json "$out/llama-$r.json" > "$out/llama-$r.md"
    "$here/../../.venv/bin/python" "$here/kimivl_side.py" "$out/kimivl-$r.json" > "$out/kimivl-$r.md"
done
