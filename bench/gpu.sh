#!/usr/bin/env bash
# The benchmark rows that apply on a CUDA GPU, in under 5 minutes on one H100:
#
#   bash bench/gpu.sh OUT_DIR
#
#   1. MFU (row 8 on a GPU): bench/flops.py --device cuda --precision bf16: a bf16 GEMM, then kiln's
#      U-Net step (the U-Net row's network, batch 256 of 32 px) and a transformer step (CLIP ViT-B/16,
#      configs/clip/vit-b-16.yaml, batch 128 of 224 px), as fractions of the card's bf16 dense peak
#      (bench/flops.py: GPU_BF16_PEAK; H100 SXM and H200: 989 TFLOP/s).
#   2. Framework overhead (row 1 on a GPU): bench/overhead.py --device cuda --precision bf16-mixed:
#      `kiln fit` vs a bare loop on the CLIP and GLIDE tiny configs (random batches of their shapes:
#      the emoji data is not built on the GPU machine), 2 rounds of 40 timed steps.
#
# Writes into OUT_DIR: env.txt (card, driver, versions), flops.md and overhead.md (each a
# BENCHMARKS.md section, headed "... (GPU)"), flops.json and overhead.json (the result files), and
# gpu.log (everything printed). `python3 bench/run.py --record OUT_DIR` then writes the two sections
# into BENCHMARKS.md. Without a CUDA device it says so, writes OUT_DIR/gpu.log and exits 0.
#
# kiln need not be installed: if `import kiln` fails, a shim on PYTHONPATH maps kiln.* onto this
# checkout. `kiln fit` needs jsonargparse (+ docstring-parser, typeshed-client) and webdataset
# (+ braceexpand), which a bare GPU image may lack: wheels for them in ./.whl (carried) are
# installed into a private folder; without them the overhead row is skipped with a message. W&B is
# used in offline mode when wandb is importable, else disabled (the section says which).
set -u
OUT=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG="$OUT/gpu.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG" >&2; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    say "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False, or torch is missing): nothing to" \
        "measure. The CPU rows run with: python3 bench/run.py"
    exit 0
fi

export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE WANDB_SILENT=true
if ! "$PY" -c "import kiln.modules" 2>/dev/null; then
    shim=$(mktemp -d)/site
    mkdir -p "$shim/kiln" "$shim/kiln-0.1.0.dist-info"
    for pkg in trainers modules datamodules launch slurm; do ln -s "$PWD/$pkg" "$shim/kiln/$pkg"; done
    printf 'Metadata-Version: 2.1\nName: kiln\nVersion: 0.1.0\n' >"$shim/kiln-0.1.0.dist-info/METADATA"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    say "kiln is not installed: using a shim that maps kiln.* onto $PWD"
fi
if ! "$PY" -c "import jsonargparse, webdataset" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kiln-site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/kiln-site:$PYTHONPATH"
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version()); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
    git log -1 --format='commit %h %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$LOG"
say "== $(head -1 "$OUT/env.txt" | tr -d '\n'); $(sed -n 2p "$OUT/env.txt")"

status=0
say "== MFU: bf16 GEMM, U-Net step, CLIP ViT-B/16 step"
timeout 130 "$PY" bench/flops.py --device cuda --precision bf16 --models unet,clip-b16 --batch-unet 256 \
    --batch-clip 128 --steps 20 --warmup 5 --rounds 1 --threads 8 --section "Achieved FLOP/s and MFU (GPU)" \
    --result gpu-flops >"$OUT/flops.md" 2> >(tee -a "$LOG" >&2) || { status=1; say "flops.py failed or timed out"; }
cp bench/results/gpu-flops.scratch.json "$OUT/flops.json" 2>/dev/null

if "$PY" -c "import jsonargparse, webdataset" 2>/dev/null; then
    wandb=offline
    "$PY" -c "import wandb" 2>/dev/null || { wandb=disabled; say "wandb is not importable: W&B disabled in kiln's runs"; }
    say "== Framework overhead: kiln fit vs bare loop, CLIP and GLIDE tiny, bf16-mixed"
    timeout 150 "$PY" bench/overhead.py --device cuda --precision bf16-mixed --models clip,glide --synthetic \
        --steps 40 --warmup 10 --rounds 2 --threads 8 --wandb "$wandb" --section "Framework overhead (GPU)" \
        --result gpu-overhead >"$OUT/overhead.md" 2> >(tee -a "$LOG" >&2) || { status=1; say "overhead.py failed or timed out"; }
    cp bench/results/gpu-overhead.scratch.json "$OUT/overhead.json" 2>/dev/null
else
    say "== Framework overhead: skipped: \`kiln fit\` needs jsonargparse, docstring-parser, typeshed-client, webdataset" \
        "and braceexpand, and this python lacks some. Carry their wheels in ./.whl (bench/README.md: GPU)."
fi
wait
say "== done: $(ls "$OUT" | tr '\n' ' ')"
exit $status
