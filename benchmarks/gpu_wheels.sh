#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64, no network there): the packages skincache
# needs that its image lacks. Everything else skincache imports (torch, torchvision, numpy, h5py,
# scikit-learn, pillow, rich, typer, pyarrow, safetensors, huggingface_hub, matplotlib, and
# open_clip's regex, tqdm, timm) is already installed there (see the README's "GPU check").
#
#     bash benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored), about 21 MB
#
# Then carry `.whl` to the device and install with
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${1:-.whl}
# One version of each: two wheels of one package stop the whole install there.
PKGS=(
  "open_clip_torch==3.3.0"   # the versions this project's tests run with
  "ftfy==6.3.1"              # open_clip's tokenizer
  "wcwidth==0.9.4"           # ftfy's one dependency
  "faiss-cpu==1.15.1"        # knn head, near-duplicate audit
)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${PKGS[@]}"
echo "requirements the wheels declare (all but these four are on the GPU machine already):"
for w in "$DEST"/*.whl; do
  unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | sed "s|^|  $(basename "$w" | cut -d- -f1): |" || true
done
ls -l "$DEST"
du -sh "$DEST"
