#!/usr/bin/env bash
# GPU check for issue 7, on one CUDA machine with no network, in under 8 minutes:
#   bash bench/gpu_check.sh OUT_DIR
# 1. installs the wheels carried in .whl/ (what the machine's image lacks: fastapi, uvicorn, pydantic, ...);
# 2. runs the GPU tests (tests/gpu, the CUDA-only ones included);
# 3. serves random-weight SmolLM2-135M and MiniLM-L6 "torch" artifacts with `fmgate serve` and runs
#    streaming chat at 1/8/64 clients and embeddings with 256 inputs in flight;
# 3b. the same chat load again with `--engine-process --api-workers $API_WORKERS` (default 4; SKIP_MP=1 skips);
# 4. in the same run, plain transformers `generate` (bf16, eager, batched) at batch 1/8/64.
# Writes env.json, tests.log, chat.json, chat_mp.json, embed.json, runner.json, hf.json, server.log, results.md to OUT_DIR.
# Needs .gpu_assets/ (tokenizer files; see docs/gpu.md) beside the repo's files.
# Without a GPU it still runs end to end on the CPU as a smoke test (FMGATE_TORCH_DEVICE=cpu and small
# loads via CHAT_ARGS / EMBED_ARGS / BATCHES / STEPS); its figures then mean nothing.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# 1. carried wheels
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
$PY - >"$OUT/env.json" <<'EOF'
import json, torch, transformers, platform
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(json.dumps({"gpu": p.name if p else "none", "cc": f"{p.major}.{p.minor}" if p else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "python": platform.python_version(), "cpus": __import__("os").cpu_count()}))
EOF
say "env: $(cat "$OUT/env.json")"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader 2>/dev/null || true

# 2. GPU tests (the CPU-math ones too: they run the same code under this machine's versions)
say "tests/gpu"
[ -n "${SKIP_TESTS:-}" ] || timeout 200 $PY -m pytest tests/gpu -q -p no:cacheprovider -o addopts="-ra --strict-markers" --tb=short 2>&1 | tail -250 >"$OUT/tests.log"
say "tests: $(tail -1 "$OUT/tests.log")"

# 3. artifacts, server, load
MODELS=/tmp/fmgate-gpu-models
timeout 120 $PY -m bench.gpu_bench models "$MODELS" || { say "model build failed"; exit 1; }
PORT=18431
CFG=/tmp/fmgate-gpu.yaml
cat >"$CFG" <<EOF
models:
  - name: smollm2-135m-random
    source: $MODELS/smollm2
    task: chat
    max_model_len: 2048
  - name: minilm-l6-random
    source: $MODELS/minilm
    task: embed
EOF
say "starting fmgate serve"
FMGATE_HOME=/tmp/fmgate-home FMGATE_AUTH=off FMGATE_LOG_LEVEL=info FMGATE_CONFIG=$CFG \
  $PY -m bench.gpu_bench serve --port $PORT --host 127.0.0.1 >"$OUT/server.log" 2>&1 &
SERVER=$!
code=none
for _ in $(seq 1 180); do
  code=$($PY -c "import urllib.request as u
try: print(u.urlopen('http://127.0.0.1:$PORT/readyz', timeout=2).status)
except Exception as e: print(getattr(e, 'code', 'down'))" 2>/dev/null)
  [ "$code" = 200 ] && break
  kill -0 $SERVER 2>/dev/null || break
  sleep 1
done
say "server ready ($code)"
URL=http://127.0.0.1:$PORT
if [ "$code" = 200 ]; then
  # shellcheck disable=SC2086
  timeout 120 $PY -m bench.gpu_bench chat $URL smollm2-135m-random ${CHAT_ARGS:---clients 1,8,64 --requests 4,3,3} \
    --out "$OUT/chat.json" || say "chat bench failed"
  # shellcheck disable=SC2086
  timeout 90 $PY -m bench.gpu_bench embed $URL minilm-l6-random ${EMBED_ARGS:---shapes 1x256,8x32,32x8,256x1 --seconds 3} \
    --inproc $MODELS/minilm --out "$OUT/embed.json" || say "embed bench failed"
fi
kill -INT $SERVER 2>/dev/null; sleep 2; kill -9 $SERVER 2>/dev/null
wait $SERVER 2>/dev/null

# 3b. the same chat load with the engine core in its own process and API_WORKERS API processes
#     (docs/processes.md); SIGTERM lets the server stop its cores, SIGKILL after 20 s is the fallback.
if [ -z "${SKIP_MP:-}" ]; then
  say "starting fmgate serve --engine-process --api-workers ${API_WORKERS:-4}"
  FMGATE_HOME=/tmp/fmgate-home FMGATE_AUTH=off FMGATE_LOG_LEVEL=info FMGATE_CONFIG=$CFG \
    $PY -m bench.gpu_bench serve --port $PORT --host 127.0.0.1 --engine-process --api-workers "${API_WORKERS:-4}" \
    >"$OUT/server_mp.log" 2>&1 &
  SERVER=$!
  code=none
  for _ in $(seq 1 180); do
    code=$($PY -c "import urllib.request as u
try: print(u.urlopen('http://127.0.0.1:$PORT/readyz', timeout=2).status)
except Exception as e: print(getattr(e, 'code', 'down'))" 2>/dev/null)
    [ "$code" = 200 ] && break
    kill -0 $SERVER 2>/dev/null || break
    sleep 1
  done
  say "engine-process server ready ($code)"
  if [ "$code" = 200 ]; then
    # shellcheck disable=SC2086
    timeout 120 $PY -m bench.gpu_bench chat $URL smollm2-135m-random ${CHAT_MP_ARGS:-${CHAT_ARGS:---clients 1,8,64 --requests 4,3,3}} \
      --out "$OUT/chat_mp.json" || say "engine-process chat bench failed"
  fi
  kill -TERM $SERVER 2>/dev/null
  for _ in $(seq 1 20); do kill -0 $SERVER 2>/dev/null || break; sleep 1; done
  kill -9 $SERVER 2>/dev/null
  wait $SERVER 2>/dev/null  # its engine cores die with it (PR_SET_PDEATHSIG) if it had to be killed
fi

# 4. same-run baselines, with the server gone: the runner alone, and transformers generate
timeout 60 $PY -m bench.gpu_bench runner $MODELS/smollm2 --batches ${BATCHES:-1,8,64} --out "$OUT/runner.json" \
  || say "runner bench failed"
timeout 120 $PY -m bench.gpu_bench hf $MODELS/smollm2 --batches ${BATCHES:-1,8,64} --out "$OUT/hf.json" || say "hf bench failed"
$PY -m bench.gpu_bench report "$OUT"
say "done"
