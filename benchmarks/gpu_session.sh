#!/usr/bin/env bash
# One prepared GPU session (issue "Steps that buy seeds", item 4), in one call:
#   1. python benchmarks/device_speed.py: the 227 network's training images/s per setup, as ratios;
#   2. the LRN claim at the CIFAR-10 scale: python src/train.py -m +ablation=lrn experiment=cifar10 with
#      seeds 1-5 (2 arms x 5 seeds = 10 runs), the decoded images resident on the GPU (data.on_device=true)
#      and augmented there, into an MLflow store whose database is $OUT/mlflow.db;
#   3. python src/report.py ablation_cifar10 on that store, into $OUT/report.
#
# What it leaves in $OUT (the device tool brings back at most 8 files, 2 folders down):
#   session.log        the device, every command with its exit status and seconds, the claim's last lines
#   device_speed.txt   device_speed.py's table
#   mlflow.db          the runs' parameters, metrics and tags (artifacts and checkpoints stay in $WORK)
#   report/            report.md, report.html, claims.yaml, the effects plot
#
# Usage:
#   OUT=/some/folder bash benchmarks/gpu_session.sh            # on a GPU machine
#   OUT=/some/folder bash benchmarks/gpu_session.sh --smoke    # tiny, on the CPU (tests/test_benchmarks.py)
# With the device tool (no CIFAR-10 there: its 60,000 JPEGs travel packed in one ignored file, 57 MB):
#   python benchmarks/cifar_pack.py pack ../shared/data/cifar10 data/cifar10.pack      # once, here
#   run(command="bash benchmarks/gpu_session.sh", carry=["data/cifar10.pack"], timeout_s=600)
#
# Environment (all optional):
#   OUT                where the results go (default: reports/gpu_session)
#   GPU_SESSION_SMOKE  1: the same as --smoke
#   GPU_SESSION_WORK   scratch for artifacts, checkpoints and Hydra folders (default: a new /tmp folder)
#   ALEXNET_DATA_DIR   the folder that holds cifar10/ (default: data/, then ../shared/data; a packed
#                      data/cifar10.pack is unpacked into data/cifar10 when no copy is found)
#   CLAIM_JOBS         runs trained at once on the GPU (hydra/launcher=joblib; default 10, all of them)
#   CLAIM_THREADS      CPU threads per run (default 1; the data and the augmentation are on the GPU)
#   CLAIM_SECONDS      the claim's time limit, so that the report still runs within the call (default 420;
#                      0: none). Runs cut short end KILLED; the report reads the FINISHED ones.
#   CLAIM_OVERRIDES    more overrides for the claim, e.g. "trainer.max_epochs=30" (say so with the numbers)
#   PYTHON             the interpreter (default: python)
#   GPU_SESSION_SITE   a folder of extra Python packages, put on PYTHONPATH: a device image may have torch and
#                      lightning but not hydra-core, mlflow, optuna or hydra-joblib-launcher (the script checks
#                      them first and names any that are missing)
set -uo pipefail # not -e: a failed step is recorded and the steps after it still run

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
smoke=${GPU_SESSION_SMOKE:-0}
for arg in "$@"; do
    case $arg in
    --smoke) smoke=1 ;;
    -h | --help)
        sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "gpu_session.sh: unknown argument $arg (--smoke or --help)" >&2
        exit 2
        ;;
    esac
done
OUT=${OUT:-$PWD/reports/gpu_session}
WORK=${GPU_SESSION_WORK:-$(mktemp -d /tmp/gpu_session.XXXXXX)}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/session.log
: >"$LOG"
failed=0

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME STDOUT STDERR COMMAND...: run it with its output in those files, record its exit status and
# seconds; a failure is remembered, not fatal.
step() {
    local name=$1 stdout=$2 stderr=$3 start rc
    shift 3
    log "$name: $*"
    start=$(date +%s)
    if [ "$stdout" = "$stderr" ]; then
        "$@" >"$stdout" 2>&1
    else
        "$@" >"$stdout" 2>"$stderr"
    fi
    rc=$?
    log "$name: exit $rc after $(($(date +%s) - start)) s"
    [ "$rc" -eq 0 ] || failed=1
    return "$rc"
}

log "gpu_session.sh$([ "$smoke" = 1 ] && echo ' --smoke'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
log "OUT=$OUT WORK=$WORK"
if [ -n "${GPU_SESSION_SITE:-}" ]; then
    export PYTHONPATH="$GPU_SESSION_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PYTHON" - <<'PY'
import importlib.util

names = ["torch", "torchvision", "lightning", "torchmetrics", "hydra", "omegaconf", "mlflow", "optuna",
         "hydra_plugins.hydra_joblib_launcher", "filelock", "scipy", "matplotlib", "PIL"]


def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


print(" ".join(n for n in names if not found(n)))
PY
)
if [ -n "$missing" ]; then
    log "missing Python packages for $PYTHON: $missing (install them, or set GPU_SESSION_SITE)"
    exit 2
fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "| CUDA devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none")' 2>&1 | tee -a "$LOG"

store=(
    "logger.tracking_uri=sqlite:///$OUT/mlflow.db"
    "logger.artifact_location=$WORK/mlartifacts"
    "paths.checkpoint_dir=$WORK/checkpoints"
    "paths.cache_dir=$WORK/cache"
    "hydra.sweep.dir=$WORK/multirun"
)
if [ "$smoke" = 1 ]; then
    device_args=(--device cpu --input-size 32 --width 0.125 --batch 8 --steps 1 --rounds 1 --threads 1)
    claim=(experiment=smoke seed=1,2 trainer.accelerator=cpu data.on_device=true)
    experiment=smoke
    limit=${CLAIM_SECONDS:-0}
else
    command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG"
    device_args=()
    if [ -z "${ALEXNET_DATA_DIR:-}" ]; then
        for dir in "$PWD/data" "$PWD/../shared/data"; do
            if [ -d "$dir/cifar10/train" ]; then
                export ALEXNET_DATA_DIR=$dir
                break
            fi
        done
        if [ -z "${ALEXNET_DATA_DIR:-}" ] && [ -f data/cifar10.pack ]; then
            step unpack "$WORK/unpack.log" "$WORK/unpack.log" \
                "$PYTHON" benchmarks/cifar_pack.py unpack data/cifar10.pack data/cifar10 &&
                export ALEXNET_DATA_DIR=$PWD/data
        fi
    fi
    if [ ! -d "${ALEXNET_DATA_DIR:-/nonexistent}/cifar10" ]; then
        log "no CIFAR-10 here: set ALEXNET_DATA_DIR, or carry data/cifar10.pack (see the top of this script)"
        failed=1
    fi
    claim=(
        experiment=cifar10 seed=1,2,3,4,5 data.on_device=true trainer.accelerator=gpu
        hydra/launcher=joblib "hydra.launcher.n_jobs=${CLAIM_JOBS:-10}"
    )
    experiment=ablation_cifar10
    limit=${CLAIM_SECONDS:-420}
fi
read -r -a extra <<<"${CLAIM_OVERRIDES:-}"

step device_speed "$OUT/device_speed.txt" "$WORK/device_speed.err" \
    "$PYTHON" benchmarks/device_speed.py "${device_args[@]}"
cat "$OUT/device_speed.txt" >>"$LOG"
tail -n 5 "$WORK/device_speed.err" >>"$LOG"

# Each run on few CPU threads: with the images on the GPU the CPU only launches kernels, and the runs share it.
step claim "$WORK/claim.log" "$WORK/claim.log" env "OMP_NUM_THREADS=${CLAIM_THREADS:-1}" timeout "$limit" \
    "$PYTHON" src/train.py -m +ablation=lrn "${claim[@]}" "${store[@]}" "${extra[@]}"
grep -v '^\s*$' "$WORK/claim.log" | tail -n 40 >>"$LOG"

step report "$WORK/report.log" "$WORK/report.log" \
    "$PYTHON" src/report.py "$experiment" --tracking-uri "sqlite:///$OUT/mlflow.db" --out "$OUT/report"
tail -n 40 "$WORK/report.log" >>"$LOG"

rm -f "$OUT/mlflow.db.lock" # the store's lock file: one file fewer to bring back
log "done: $([ "$failed" = 0 ] && echo 'every step succeeded' || echo 'a step FAILED (above)'); results in $OUT"
exit "$failed"
