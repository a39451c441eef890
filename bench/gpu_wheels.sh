#!/usr/bin/env bash
# bench/gpu_wheels.sh: build the wheels a GPU machine may lack, into .whl/ (git-ignored), so
# bench/gpu_check.py can run there without the package registry.
#
#   bash bench/gpu_wheels.sh            # DeepSpeed (the venv's version) + higr-dist
#   bash bench/gpu_wheels.sh --deps     # + DeepSpeed's and the check's small dependencies
#                                       #   (binary wheels for THIS machine's Python/platform)
#
# Why: DeepSpeed publishes only a source distribution, so a machine without the registry (or
# without a compiler toolchain for setup.py) cannot install it; we build a pure-Python wheel
# here with `pip wheel --no-deps deepspeed==<version>` (no ops pre-compiled: DS_BUILD_OPS=0;
# DeepSpeed JIT-builds an op on the GPU node the first time one is used, into
# TORCH_EXTENSIONS_DIR, by default ~/.cache/higr-dist/torch_extensions/<host>). torch itself
# never travels: the GPU machine brings its own CUDA build.
#
# On the GPU machine (the .whl/ folder travels with the checkout, e.g. as a carried path):
#
#   python -m pip install --no-deps .whl/deepspeed-*.whl .whl/higr_dist-*.whl
#   python -m pip install --no-deps --no-index --find-links .whl/ -r .whl/deps.txt  # --deps only
#   python bench/gpu_check.py                   # <= 8 min, writes bench/results/gpu_check.json
#
# (or skip the higr_dist wheel and run from the checkout: gpu_check.py puts it on sys.path).
# gpu_check.py names any module still missing in one line and exits 2 before doing anything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.whl
DS_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
mkdir -p "$OUT"
echo "building deepspeed==$DS_VERSION and higr-dist into $OUT/"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "deepspeed==$DS_VERSION" -w "$OUT/"
"$PY" -m pip wheel -q --no-deps . -w "$OUT/"
if [[ "${1:-}" == "--deps" ]]; then
  # DeepSpeed's requirements (torch excluded) and what the check imports besides torch
  DEPS="einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic-core
        annotated-types typing-extensions typing-inspection nvidia-ml-py tqdm numpy pyyaml
        webdataset braceexpand zstandard orjson tensorboard pyarrow pytest"
  : > "$OUT/deps.txt"
  for d in $DEPS; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$d" \
        2>/dev/null || true)
    echo "$d${v:+==$v}" >> "$OUT/deps.txt"
  done
  "$PY" -m pip download -q --only-binary=:all: -r "$OUT/deps.txt" -d "$OUT/"
fi
ls -l "$OUT/"
