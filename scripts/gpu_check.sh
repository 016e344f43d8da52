#!/usr/bin/env bash
# The GPU check (README "GPU check"): tests/gpu on a GPU machine that reaches no package registry.
#
#   scripts/gpu_check.sh prepare   # here, with registry access: wheels into gpu_wheels/
#   scripts/gpu_check.sh run       # there, from the repo root, with gpu_wheels/ carried along
#
# prepare builds deepspeed's wheel (a source package) for the version installed here, downloads
# CPython 3.12 manylinux x86-64 wheels of the rest of grpo-ds's dependency closure
# (scripts/gpu_deps.py: the image's torch/CUDA and a few large packages are never carried), and
# checks their tags, that there is one of each, and their size.
# run installs them with --no-index --no-deps into its own folder, prints the versions, and runs
# `pytest tests/gpu` under a timeout; the log, the versions and the figures (gpu_results.json)
# go to $GRPO_DS_GPU_RESULTS, else $OUT, else runs/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=gpu_wheels
# prepare: the environment grpo-ds is installed in (README "Install": .venv); run: the image's.
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ "${1:-}" == prepare && -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi

# pip's note on each find-links folder a machine's pip config names that does not exist: noise
FIND_LINKS_NOTE="is ignored: it is neither a file nor a directory"

prepare() {
    local ds_version pins
    ds_version=$("$PYTHON" -c "from importlib.metadata import version; print(version('deepspeed'))")
    pins=$("$PYTHON" scripts/gpu_deps.py closure | grep -v '^deepspeed==')
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # No build isolation: setup.py imports torch, and an isolated build would download one.
    # DS_BUILD_OPS=0: no op is compiled now; on the GPU an op builds (JIT) only if it is used.
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed \
        -w "$WHEELS" "deepspeed==$ds_version" 2> >(grep -v "$FIND_LINKS_NOTE" >&2)
    # shellcheck disable=SC2086  # one requirement per word
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any -d "$WHEELS" $pins \
        2> >(grep -v "$FIND_LINKS_NOTE" >&2)
    "$PYTHON" scripts/gpu_deps.py check-wheels "$WHEELS"
    du -sh "$WHEELS"
}

run() {
    local results site=/tmp/grpo_ds_site
    results=${GRPO_DS_GPU_RESULTS:-${OUT:-$PWD/runs/gpu_check}}
    mkdir -p "$results"
    compgen -G "$WHEELS/*.whl" >/dev/null || { echo "no $WHEELS/: run 'prepare' first"; exit 2; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl
    # The repo first (grpo_ds, tests), then the carried wheels, then the image's site-packages.
    export PYTHONPATH="$PWD:$site" PATH="$site/bin:$PATH" GRPO_DS_GPU_RESULTS="$results"
    export DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/grpo_ds_torch_extensions
    # Unmet requirements are printed, not fatal: the tests then show what they break.
    "$PYTHON" scripts/gpu_deps.py verify || true
    "$PYTHON" - <<'EOF' 2>&1 | tee "$results/versions.txt"
import platform, torch, transformers, deepspeed, accelerate
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {gpu}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}")
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
        | tee -a "$results/versions.txt" || true
    set +e
    # training first: if time runs out, the benches are what is lost
    timeout 510 "$PYTHON" -m pytest -q -p no:cacheprovider -rA tests/gpu/test_gpu_training.py \
        tests/gpu/test_gpu_benches.py 2>&1 \
        | tee "$results/pytest.log"
    local code=${PIPESTATUS[0]}
    set -e
    echo "gpu check: pytest exit $code; results in $results"
    return "$code"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
