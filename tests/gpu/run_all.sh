#!/usr/bin/env bash
# The CUDA path end to end in one go, for a GPU machine lent for a few minutes:
#
#     tests/gpu/run_all.sh [SECONDS]        (from the repository root, on a CUDA machine)
#
# SECONDS (default 540) is the whole run's budget: training gets what the steps before it leave, less
# what test.py needs. Every step prints its figures as it finishes, so a run cut short keeps them.
# A device call is limited to 10 minutes, which leaves training only a few: PHASE=checks runs steps 1-7
# and PHASE=train (the next call, on the same machine while it is still warm: the build, the actor and
# its masks are still there) steps 1 and 8, with its whole budget for training and testing.
#   1. install: the wheels in .whl/ (gsplat, imageio-ffmpeg) into /tmp/site when they are not importable
#   2. the full-size synthetic actor (configs/default_cuda.yml: 802x550, 16 cameras) is generated in the
#      background on all but two cores while the GPU steps run on those two
#   3. gsplat's CUDA kernels are built (first use; TORCH_CUDA_ARCH_LIST is the card's)
#   4. tests/gpu/check_render_parity.py   CPU renderer against gsplat
#   5. bench/render.py --cuda-only         gsplat alone
#   6. bench/gem.py --cuda-only            GEM frames/s against gsplat alone
#   7. render_masks.py, pca_mesh.py, bench/train_step.py --data   the step, its parts and data loading
#   8. train.py (time-limited, a val PSNR point every half minute), test.py (val, test); skipped, saying so,
#      when less than a minute of training is left
# TRAIN_MINUTES sets the training time instead. CPU_DRY_RUN=1 runs the same steps on a CPU machine (no
# build; CONFIG a small config) to test the script.
# Everything goes to $OUT/log.txt (OUT defaults to experiments/gpu_run); the run's PSNR curve, metrics
# and one val and one test image are copied beside it.
set -uo pipefail
cd "$(dirname "$0")/../.."

BUDGET=${1:-540}
PHASE=${PHASE:-all}
case $PHASE in all|checks|train) ;; *) echo "PHASE must be all, checks or train, not '$PHASE'"; exit 2;; esac
TEST_RESERVE=90  # seconds kept for test.py (start-up, val and test with the refit, videos)
CONFIG=${CONFIG:-configs/default_cuda.yml}
# Overrides for every command. The default quarters the actor's timesteps (6 frames per sequence instead
# of 24): on an H200 machine's 16 cores the generator took 370 s for 48 timesteps (14 cores, beside the
# gsplat build), so 24 is what hides behind the GPU steps and leaves training its minutes within a 15-minute
# lease; OVERRIDES= keeps the config's actor.
read -r -a over <<< "${OVERRIDES-synthetic.frames_per_sequence=6}"
PY=${PYTHON:-python3}
OUT=${OUT:-experiments/gpu_run}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
trap 'sleep 1' EXIT  # tee writes the last lines
export PYTHONUNBUFFERED=1

stage() { echo; echo "=== [$SECONDS s] $*"; }
cores=$(nproc)
pin_gpu="taskset -c 0-1"  # the GPU steps' two cores; the generator gets the others
[ "$cores" -ge 4 ] || pin_gpu=""

stage "machine"
if [ "${CPU_DRY_RUN:-0}" = 1 ]; then  # the script's own logic on a CPU machine (tests/gpu/test_run_all.py)
    echo "CPU_DRY_RUN: no GPU asked for; gsplat's build is skipped and everything runs on the CPU"
else
    nvidia-smi -L || { echo "no NVIDIA GPU: this script is for a CUDA machine"; exit 1; }
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', \
torch.version.cuda, '|', torch.cuda.get_device_name(0)); assert torch.cuda.is_available()" || exit 1
fi
echo "cores: $cores"

stage "install"
if ! "$PY" -c "import gsplat, imageio_ffmpeg" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gsplat or imageio-ffmpeg missing and no wheels in .whl/"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import gsplat; print('gsplat', gsplat.__version__)" || exit 1

export MAX_JOBS=${MAX_JOBS:-$cores}  # gsplat's build, here or (PHASE=train on a fresh machine) in train.py
[ "${CPU_DRY_RUN:-0}" = 1 ] || export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}

if [ "$PHASE" != train ]; then
    stage "synthetic actor: generation started in the background"
    gen_pin=""
    [ "$cores" -ge 4 ] && gen_pin="taskset -c 2-$((cores - 1))"
    (t0=$SECONDS; $gen_pin nice -n 5 "$PY" -m lib.dataset.synthetic_actor "$CONFIG" "${over[@]}" && echo "generated in $((SECONDS - t0)) s") \
        > "$OUT/generate.log" 2>&1 &
    gen_pid=$!

    [ "${CPU_DRY_RUN:-0}" = 1 ] || stage "gsplat: CUDA kernels built"
    [ "${CPU_DRY_RUN:-0}" = 1 ] || "$PY" -c "import time; t = time.time(); from gsplat.cuda._backend import _C; \
    print(f'gsplat JIT build and load: {time.time() - t:.1f} s (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)')"

    stage "parity: tests/gpu/check_render_parity.py"
    $pin_gpu "$PY" tests/gpu/check_render_parity.py

    stage "bench/render.py --cuda-only"
    $pin_gpu "$PY" bench/render.py --cuda-only

    stage "bench/gem.py --cuda-only"
    $pin_gpu "$PY" bench/gem.py --cuda-only

    stage "synthetic actor: waiting for the generator"
    if wait "$gen_pid"; then
        tail -n 2 "$OUT/generate.log"
        stage "render_masks.py"
        $pin_gpu "$PY" render_masks.py "$CONFIG" "${over[@]}" 2>&1 | tail -n 1
        stage "pca_mesh.py"
        "$PY" pca_mesh.py "$CONFIG" "${over[@]}" | tail -n 3
        stage "bench/train_step.py $CONFIG --data"
        $pin_gpu "$PY" bench/train_step.py "$CONFIG" --data
    else
        cat "$OUT/generate.log"
        echo "generation failed: the training steps are skipped"
        stage "bench/train_step.py $CONFIG"
        $pin_gpu "$PY" bench/train_step.py "$CONFIG"
        exit 1
    fi
    [ "$PHASE" = checks ] && { stage "done (PHASE=checks)"; exit 0; }
else
    stage "synthetic actor, masks, mesh PCA (each where missing)"
    "$PY" -m lib.dataset.synthetic_actor "$CONFIG" "${over[@]}" | tail -n 1
    "$PY" render_masks.py "$CONFIG" "${over[@]}" 2>&1 | tail -n 1
    "$PY" pca_mesh.py "$CONFIG" "${over[@]}" | tail -n 1
fi

left=$((BUDGET - SECONDS - TEST_RESERVE - 30))  # 30 s: train.py's start-up and its last curve point
if [ -n "${TRAIN_MINUTES:-}" ]; then  # a training time of your own instead of the budget's
    minutes=$TRAIN_MINUTES
elif [ "$left" -lt 60 ]; then
    stage "train.py and test.py skipped: $left s of the $BUDGET s budget would be left for training"
    exit 1
else
    minutes=$("$PY" -c "print(f'{$left / 60:.2f}')")
fi
stage "train.py for $minutes min"
"$PY" train.py "$CONFIG" "${over[@]}" train.time_limit_minutes="$minutes" train.curve_every_minutes=0.5 \
    train.checkpoint_every=100000 2>&1 | grep -v -E "^\s*(\S+:\s+)?[0-9]+%\|" | tail -n 25
run=$("$PY" -c "import sys; from lib.config import load_config; from lib.paths import ActorPaths; \
print(ActorPaths(load_config(sys.argv[1], sys.argv[2:])).regressor)" "$CONFIG" "${over[@]}")
cat "$run/psnr_curve.csv"

stage "test.py (val, test)"
"$PY" test.py "$CONFIG" "${over[@]}" "test.splits=[val,test]" 2>&1 | grep -v -E "[0-9]+%\|" | tail -n 25
for f in "$run/psnr_curve.csv" "$run/psnr_curve.png" "$run/eval/metrics.json"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
done
for split in val test; do
    first=$(ls "$run/eval/$split"/*.png 2>/dev/null | head -n 1)
    [ -n "$first" ] && cp "$first" "$OUT/${split}_$(basename "$first")"
done
stage "done"
