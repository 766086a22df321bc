#!/usr/bin/env bash
# BERT-base masked-LM training throughput and MFU on one GPU: plain torch vs DeepSpeed ZeRO-1
# (benchmarks/gpu_mfu.py says what is measured). Run from anywhere; it works in the repo root.
#
#   bash benchmarks/gpu_mfu.sh --fetch-wheels     # here (reaches PyPI): build/download the wheels the
#                                                 # GPU image lacks into benchmarks/wheels/ (~10 MiB)
#   bash benchmarks/gpu_mfu.sh [ARGS...]          # on the GPU machine: install those wheels, print the
#                                                 # GPU, run the benchmark (ARGS go to gpu_mfu.py)
#   bash benchmarks/gpu_mfu.sh --dry-run [ARGS]   # CPU, tiny model, no nvidia-smi, no wheels (tests)
#                                                 # (PTFT_DRY_RUN=1 does the same)
#
# On the GPU machine carry `benchmarks/wheels`. When $OUT is set (the device tool) and no --json is
# given, the results go to $OUT/gpu_mfu.json and the log to $OUT/gpu_mfu.log.
# Environment: PYTHON (default python3), PTFT_SITE (where wheels install, default /tmp/ptft-site),
# PTFT_TIME_LIMIT_S (hard wall-clock cap of the Python run, default 450).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="benchmarks/wheels"
# The device tool carries at most 64 MiB (working tree included): keep the wheels well under it.
WHEELS_LIMIT_MIB=48

mode=run
[[ "${PTFT_DRY_RUN:-0}" == "1" ]] && mode=dry
args=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) mode=dry ;;
        --fetch-wheels) mode=fetch ;;
        *) args+=("$arg") ;;
    esac
done

# Pinned version of a package: constraints.txt first, else what this Python has installed.
pin() {
    local name="$1" py="$2" version
    version="$(grep -iE "^${name//[-_]/[-_]}==" constraints.txt 2>/dev/null | head -1 | cut -d= -f3 || true)"
    if [[ -z "$version" ]]; then
        version="$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
    fi
    echo "$version"
}

fetch_wheels() {
    local py="${PYTHON:-}"
    if [[ -z "$py" ]]; then
        if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
    fi
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    # DeepSpeed is an sdist on PyPI: build a pure-Python wheel here (ops JIT-compile at run time;
    # the ZeRO-1 path with torch's AdamW compiles none). Its setup.py imports torch, so build
    # against this venv's torch instead of an isolated build env (which would fetch a CUDA torch).
    echo "== building deepspeed==$(pin deepspeed "$py") wheel"
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" \
        "deepspeed==$(pin deepspeed "$py")"
    # DeepSpeed's runtime dependencies that the GPU image ('cuda', /work/.library/device/KINDS.md)
    # lacks: hjson and pydantic with its own; typing_extensions is carried too since pydantic_core
    # needs a recent one. einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm and
    # torch are in the image.
    local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    local pure=(hjson pydantic annotated-types typing-inspection typing_extensions)
    local specs=()
    for name in "${pure[@]}"; do specs+=("$name==$(pin "$name" "$py")"); done
    echo "== downloading ${specs[*]}"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        "${platforms[@]}" -d "$WHEELS" "${specs[@]}"
    # pydantic_core is compiled: one wheel per CPython the image might have (it has 3.12).
    local core="pydantic_core==$(pin pydantic_core "$py")"
    for pyver in 3.11 3.12 3.13; do
        echo "== downloading $core for CPython $pyver"
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
            "${platforms[@]}" -d "$WHEELS" "$core"
    done
    ls -l "$WHEELS"
    local kib
    kib="$(du -sk "$WHEELS" | cut -f1)"
    echo "== $WHEELS: $((kib / 1024)) MiB ($kib KiB) in $(ls "$WHEELS"/*.whl | wc -l) wheels" \
         "(carry limit 64 MiB with the working tree; this script allows $WHEELS_LIMIT_MIB MiB)"
    if (( kib > WHEELS_LIMIT_MIB * 1024 )); then
        echo "error: $WHEELS is over $WHEELS_LIMIT_MIB MiB" >&2
        exit 1
    fi
}

install_wheels() {
    local py="$1" site="${PTFT_SITE:-/tmp/ptft-site}"
    if "$py" -c "import deepspeed, hjson, pydantic" >/dev/null 2>&1; then
        echo "== deepspeed is importable already: no wheels installed"
        return
    fi
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "error: deepspeed is not importable and $WHEELS/ has no wheels: run" \
             "'bash benchmarks/gpu_mfu.sh --fetch-wheels' where PyPI is reachable and carry $WHEELS" >&2
        exit 2
    fi
    # Distribution names from the wheel file names; pip picks the wheel that fits this Python.
    local names
    mapfile -t names < <(ls "$WHEELS"/*.whl | sed 's#.*/##; s/-.*//' | sort -u)
    echo "== installing ${names[*]} from $WHEELS into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        --find-links "$WHEELS" "${names[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c "import deepspeed; print('== deepspeed', deepspeed.__version__, 'from', deepspeed.__file__)"
}

case "$mode" in
    fetch)
        fetch_wheels
        ;;
    dry)
        export DS_ACCELERATOR=cpu
        exec "${PYTHON:-python3}" benchmarks/gpu_mfu.py --dry-run "${args[@]}"
        ;;
    run)
        py="${PYTHON:-python3}"
        log=/dev/null
        if [[ -n "${OUT:-}" ]]; then
            log="$OUT/gpu_mfu.log"
            [[ " ${args[*]} " == *" --json"* ]] || args+=(--json "$OUT/gpu_mfu.json")
        fi
        {
            echo "== $(date -u +%FT%TZ) $(hostname)"
            nvidia-smi --query-gpu=name,memory.total --format=csv || echo "warning: nvidia-smi failed"
            "$py" -c "import sys, torch, transformers; print('== python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" || true
            install_wheels "$py"
            export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
            timeout -k 15 "${PTFT_TIME_LIMIT_S:-450}" "$py" benchmarks/gpu_mfu.py "${args[@]}"
        } 2>&1 | tee "$log"
        exit "${PIPESTATUS[0]}"
        ;;
esac
