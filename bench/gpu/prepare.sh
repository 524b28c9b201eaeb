#!/usr/bin/env bash
# Run HERE, where PyPI is reachable, before the device call: fills .whl/ with the wheels that
# `pytest tests/test_gpu.py` and `bench/mfu.py --device cuda` need but the H200 image lacks
# (/work/.library/device/KINDS.md, "Python packages already there"). The device call then carries
# .whl/ and bench/gpu/check.sh installs it there with --no-index --no-deps (docs/benchmarks.md).
#
#   bash bench/gpu/prepare.sh                     # all wheels (~48 MB)
#   bash bench/gpu/prepare.sh --no-bitsandbytes   # without the 43 MB QLoRA wheel: its test then skips
#
# What is needed was found by reading the imports and by an import trace of the two commands:
#   pydantic     pipeline/config (every import of the pipeline); with pydantic-core,
#                annotated-types, typing-inspection, and typing-extensions >= 4.16 (pydantic-core's
#                floor; the image's own may be older, so we carry ours: it shadows it, and is compatible)
#   deepspeed    test_deepspeed_zero2_trains_on_gpu; of its dependencies only hjson is missing there
#                (einops, msgpack, ninja, py-cpuinfo, psutil, packaging, tqdm, numpy are in the image)
#   bitsandbytes test_qlora_trains_lora_on_a_4bit_base (importorskip: optional)
# Not carried: prefect, datasets, datasketch, zstandard, s3fs (no import on these paths), and
# flash-attn (no cp312/cu130/torch-2.11 wheel on PyPI, hundreds of MB: its two tests expect sdpa
# without it, and mfu.py then measures sdpa).
# Versions: those of `make setup`'s .venv (pyproject.toml's floors); bitsandbytes, not in .venv,
# the newest (0.50.2: has libbitsandbytes_cuda130.so for the image's torch 2.11.0+cu130).
set -euo pipefail
cd "$(dirname "$0")/../.."

with_bnb=1
for arg in "$@"; do
  case $arg in
    --no-bitsandbytes) with_bnb=0 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

wheels=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 hjson==3.1.0
)
[ "$with_bnb" = 1 ] && wheels+=(bitsandbytes==0.50.2)
deepspeed=deepspeed==0.19.8

# pip's noise about this machine's local indexes, once per package.
quiet() { grep -v "is ignored: it is neither" || true; }

rm -rf .whl && mkdir .whl
# The device's interpreter, not this one: CPython 3.12 on x86_64 Linux (glibc 2.28+ wheels are fine
# there; bitsandbytes ships manylinux_2_24).
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${wheels[@]}" 2>&1 | quiet

# DeepSpeed is an sdist on PyPI. DS_BUILD_OPS=0 builds no op, so the wheel is pure Python
# (py3-none-any); the ZeRO-2 test uses torch's AdamW, and any op DeepSpeed wants it JIT-builds on the
# device (nvcc 13.0 and ninja are there). Its setup.py imports torch: build with .venv's, no isolation.
py=.venv/bin/python
[ -x "$py" ] || { echo "prepare.sh: $py missing: run 'make setup' first (deepspeed's build needs torch)" >&2; exit 1; }
DS_BUILD_OPS=0 "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w .whl "$deepspeed" 2>&1 | quiet

# One version of each, and nothing that would not install on the device's Python 3.12.
ls .whl/*.whl | sed 's|.*/||; s/-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d | grep . \
  && { echo "prepare.sh: more than one version of the above in .whl/" >&2; exit 1; }
ls .whl/*.whl | grep -vE -- '-(py3-none-any|cp312-cp312-manylinux[^/]*x86_64|py3-none-manylinux[^/]*x86_64)\.whl$' \
  && { echo "prepare.sh: wheels above do not fit CPython 3.12 on x86_64" >&2; exit 1; }

# The device call carries the working tree (tracked files and untracked ones git does not ignore)
# plus .whl/, 64 MiB at most in all.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$((tree + whl)); limit=$((64 * 1024 * 1024))
awk -v w="$whl" -v t="$tree" 'BEGIN { m = 1048576
  printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n", w/m, t/m, (w+t)/m }'
if [ "$total" -ge "$limit" ]; then
  echo "prepare.sh: over the limit: rerun with --no-bitsandbytes (the QLoRA test then skips)" >&2
  exit 1
fi
