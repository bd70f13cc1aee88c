#!/usr/bin/env bash
# The main job on the embedded default: local cluster, vLLM on CPU, servegen's demo model.
# Installs what is needed (scripts/setup.sh), builds the demo model, starts a vLLM server,
# asks it "What's 2 + 2?", runs a generation job over examples/arithmetic.jsonl through it,
# and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

model=$(servegen demo-model)
echo "demo model: $model"
mkdir -p runs/demo
rm -f runs/demo/server.out

servegen start_server --cluster local --model "$model" --server_type vllm --server_gpus 0 \
    --log_dir runs/demo/logs > runs/demo/server.out &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until grep -q "ready at" runs/demo/server.out; do
    kill -0 $server 2>/dev/null || { echo "the server did not start; see runs/demo/logs" >&2; exit 1; }
    sleep 2
done
cat runs/demo/server.out
address=$(grep -o 'http://[^ ]*' runs/demo/server.out)

python - "$address" <<'PY'
import sys
from servegen import get_model, get_prompt

llm = get_model(server_type="vllm", base_url=sys.argv[1])
prompt = get_prompt("generic/default", "llama3-instruct")
outputs = llm.generate(prompts=[prompt.build_string({"question": "What's 2 + 2?"})])
print(f"What's 2 + 2?  ->  {outputs[0]['generation']}")
PY

servegen generate --cluster local --server_address "$address" --server_type vllm \
    --input_file examples/arithmetic.jsonl --output_dir runs/demo/generate --rerun_done \
    ++prompt_template=llama3-instruct ++inference.tokens_to_generate=32
python - <<'PY'
import json
rows = [json.loads(line) for line in open("runs/demo/generate/output.jsonl")]
right = sum(r["generation"].rstrip(".").split("= ")[-1] == str(r["expected_answer"]) for r in rows)
for r in rows[:3]:
    print(f"{r['question']:<20} -> {r['generation']}")
print(f"{right}/{len(rows)} answers right; output in runs/demo/generate/output.jsonl")
PY
