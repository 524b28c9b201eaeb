#!/usr/bin/env bash
# The one device command for a session with a lent GPU (docs/benchmarks.md, "On a lent GPU"):
#
#   here:    bash bench/gpu/prepare.sh                  (fills .whl/)
#   device:  bash bench/gpu/check.sh   carry [".whl"], timeout_s 540
#
# Installs the carried wheels, prints the GPU and the versions, runs `pytest tests/test_gpu.py`, then
# `bench/mfu.py --device cuda --data all --compare-compile`, and ends with a one-screen summary.
# Every step runs whatever the one before did. What comes back, in $OUT (6 files):
#   env.log  pytest.log  pytest.xml  mfu.log  mfu.json (mfu.py's last line)  summary.txt
#
# The device gives 15 minutes in all, 1-2 of them to start the machine, so the steps' own timeouts
# add up to about 8 minutes (about 30 s + 210 s + 270 s): that leaves about 4 minutes, for one short
# follow-up (a step again, say, with the overrides below), not for a whole rerun. Overrides, also for
# a trial elsewhere: PYTHON (python3), WHEELS (.whl), SITE (/tmp/site), OUT (/tmp/gpu-check),
# PYTEST_S, MFU_S (the two timeouts), MFU_ARGS (extra mfu.py arguments).
set -uo pipefail  # no -e: a failed step must not stop the next
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu-check}
PYTEST_S=${PYTEST_S:-210}
# mfu.py's defaults should fit (an estimate: nothing has run there yet): 60 steps of GPT-2 small,
# 16 x 1024 tokens each, are some seconds a run at the 200-460k tokens/s expected of an H200; the
# time goes to the fixed part (model build, synthetic data, HF Trainer's setup) and above all to
# torch.compile of the 12-layer model, once per data kind (a minute each, guessed). Fewer steps
# would save little and leave fewer timed windows (60: 5 windows of 10 after 10 warm-up steps).
MFU_S=${MFU_S:-270}
MFU_ARGS=${MFU_ARGS:-}
mkdir -p "$OUT"

export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore  # the device runs us as root

# Each line of a step's output, stamped with the seconds since this script began: the next session
# sees where the time went, even in a step its timeout cut short.
stamp() { while IFS= read -r line; do printf '[%3ds] %s\n' "$SECONDS" "$line"; done; }
# step NAME LOG CMD...: runs CMD, its output shown and in LOG; records rc and seconds for the summary.
declare -A rc secs
step() {
  local name=$1 log=$2 start=$SECONDS; shift 2
  echo "=== $name: $*" | tee -a "$log"
  "$@" 2>&1 | stamp | tee -a "$log"
  rc[$name]=${PIPESTATUS[0]}
  secs[$name]=$((SECONDS - start))
  echo "=== $name: exit ${rc[$name]} after ${secs[$name]} s" | tee -a "$log"
}

# 1. The carried wheels, into their own folder ahead of the image's packages (--no-deps: prepare.sh
#    lists every dependency; --no-index: nothing can be fetched there).
install() {
  local wheels=("$WHEELS"/*.whl)
  [ -e "${wheels[0]}" ] || { echo "no wheels in $WHEELS/: run bench/gpu/prepare.sh first and carry .whl"; return 1; }
  rm -rf "$SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}
step install "$OUT/env.log" install
export PYTHONPATH="$SITE:$PWD"

versions() {
  command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi: not found"
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not found"
  "$PYTHON" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      *((torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported()) if torch.cuda.is_available() else ()))
for name in ("transformers", "tokenizers", "huggingface_hub", "accelerate", "peft", "numpy", "pydantic",
             "deepspeed", "bitsandbytes", "flash_attn", "triton"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}  ({module.__file__.rsplit('/', 2)[0]})")
    except Exception as error:  # a missing or broken one is reported, not fatal: the tests say which need it
        print(f"{name}: {type(error).__name__}: {error}")
EOF
}
step versions "$OUT/env.log" versions
cuda=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$cuda" = 1 ] || echo "*** torch sees no CUDA device: the GPU tests will skip and mfu.py --device cuda will refuse ***"

# 2. The CUDA tests. SIGINT first: pytest stops as on Ctrl-C and still writes its junit XML and
#    summary; a hung test (NCCL, a JIT build) fails alone after 150 s where pytest-timeout exists (the
#    image has it; the compile + resume test compiles three times, the first cold).
per_test=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 150)
step pytest "$OUT/pytest.log" timeout -s INT -k 15 "$PYTEST_S" "$PYTHON" -m pytest -q -p no:cacheprovider \
  --junitxml "$OUT/pytest.xml" --durations 15 ${per_test[@]+"${per_test[@]}"} tests/test_gpu.py

# 3. MFU and tokens/s against HF Trainer. Its last line is one JSON object.
# shellcheck disable=SC2086  # MFU_ARGS: words on purpose
step mfu "$OUT/mfu.log" timeout -s INT -k 15 "$MFU_S" "$PYTHON" bench/mfu.py --device cuda --data all --compare-compile $MFU_ARGS
if [ "${rc[mfu]}" = 0 ]; then
  grep -E '^\[ *[0-9]+s\] \{' "$OUT/mfu.log" | tail -n 1 | sed 's/^\[ *[0-9]*s\] //' > "$OUT/mfu.json"
fi

# 4. One screen: what ran, how long, what came out.
summary() {
  echo "=== summary ($SECONDS s in all; files in $OUT)"
  grep -m1 "^\[.*\] GPU 0" "$OUT/env.log" | sed 's/^\[ *[0-9]*s\] //' || echo "GPU: none seen (nvidia-smi -L)"
  [ "$cuda" = 1 ] || echo "torch sees no CUDA device: nothing was measured"
  for name in install versions pytest mfu; do
    printf '%-8s exit %-3s %4s s\n' "$name" "${rc[$name]:-?}" "${secs[$name]:-?}"
  done
  case ${rc[pytest]} in 124|137) echo "pytest: cut at ${PYTEST_S} s, in $(grep -m1 -oE '[^ ]+: KeyboardInterrupt$' "$OUT/pytest.log")" ;; esac
  case ${rc[mfu]} in 124|137) echo "mfu: cut at ${MFU_S} s" ;; esac
  echo "--- pytest"
  grep -E "(passed|failed|skipped|error|no tests ran).* in [0-9.]+s" "$OUT/pytest.log" | tail -1 | sed 's/^\[ *[0-9]*s\] //'
  grep -E "^\[ *[0-9]+s\] (FAILED|ERROR|SKIPPED)" "$OUT/pytest.log" | sed 's/^\[ *[0-9]*s\] //' | cut -c1-160 | head -12
  echo "--- mfu"
  if [ -s "$OUT/mfu.json" ]; then
    "$PYTHON" - "$OUT/mfu.json" <<'EOF'
import json, sys
run = json.load(open(sys.argv[1]))
print(run.get("device_name"), "steps", run.get("steps"))
for kind in ("packed", "padded_sft"):
    r = run.get(kind, {})
    pct = lambda v: "-" if v is None else f"{v:.1%}"
    print(f"{kind:10s} ours ({r.get('ours_config')}, {r.get('attention')}) {r.get('ours_tokens_per_s', 0):,.0f} tok/s "
          f"MFU {pct(r.get('ours_mfu'))} | HF {r.get('hf_tokens_per_s', 0):,.0f} tok/s MFU {pct(r.get('hf_mfu'))} | {r.get('vs_hf')}x HF")
EOF
  else
    echo "no JSON line; the log's end:"
    tail -n 5 "$OUT/mfu.log" | cut -c1-160
  fi
}
summary | tee "$OUT/summary.txt"
[ "${rc[pytest]}" = 0 ] && [ "${rc[mfu]}" = 0 ]
