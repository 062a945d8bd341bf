#!/usr/bin/env bash
# The dress rehearsal at full size on a lent GPU, in one device call of at most 8 minutes.
#
# 1. Here, once (fills the git-ignored .whl/ with what the device image lacks: the Jupyter stack papermill runs the
#    replication notebook with, fastcore, imagecodecs and FrEIA, for the device's Python 3.12; about 41 MB, which
#    with the repository's ~13 MB stays under the device's 64 MB):
#        bash benchmarks/gpu_rehearsal.sh --fetch-wheels
# 2. On the device (the device tool's `run`, carry [".whl"], timeout_s 480):
#        bash benchmarks/gpu_rehearsal.sh
#    It writes $OUT/dress_rehearsal.{json,md} and $OUT/gpu_rehearsal.log, which the device tool copies back; commit
#    the .md/.json as results/benchmarks/dress_rehearsal.{md,json}.
# 3. Here, to test this script on the CPU (tiny data, the small offline models, one epoch; about 2 minutes):
#        PY=.venv/bin/python bash benchmarks/gpu_rehearsal.sh --tiny
#
# Time budget of the device call (480 s; a session has 15 minutes of device time in all, the machine's start of
# 1-2 minutes included, so one rerun fits):
#   ~15 s  install the carried wheels into $WORK/site, register the Jupyter kernel papermill starts
#   ~10 s  draw the MVTec-sized preset at SCALE=0.05 of MVTec AD's counts and full image sides: 181 training and
#          98 test images (every class and every defect kind keeps at least one image), ~0.3 s per image on one core,
#          16 processes
#  ~135 s  per method x 3: its replication notebook through papermill (kernel start, imports, feature extraction or
#          none, EPOCHS=2 epochs with a validation after each); the run cell is stopped at CAP=120 s. A method stopped
#          there is reported as failed (Timeout) with what its first epoch recorded (estimate.json): its s/epoch and
#          s/validation still make the projection.
#  ~430 s  in all, leaving ~50 s of margin.
#  With AUTHORS=<folder of the authors' checkouts> (e.g. the git-ignored _authoring/, named in carry beside .whl),
#          each method also times the authors' own training step (benchmarks/vs_authors.py, ~30 s each with its
#          set-up), and CAP drops to 90 s so the call still ends by ~430 s.
# The projection to MVTec AD's full counts is linear in the training steps (epoch), test images (validation) and all
# images (feature extraction); dress_rehearsal.py explains it.
# Pretrained timm weights cannot be downloaded on the device: the authors' backbones run with random weights
# (--weights random), which changes neither speed nor memory; the metrics of these runs are not results.
# Without papermill (wheels not carried) the same run_experiment runs in a subprocess (--engine direct), and the
# output says so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SCALE=${SCALE:-0.05}; SIZE_SCALE=${SIZE_SCALE:-1}; EPOCHS=${EPOCHS:-2}; CAP=${CAP:-$([ -n "${AUTHORS:-}" ] && echo 90 || echo 120)}
METHODS=${METHODS:-vqflow,hvqtrans,hgad}   # HGAD last: its 1024 px pyramid is the one most likely to meet the cap
OUT=${OUT:-results/_scratch/gpu_rehearsal}; WORK=${WORK:-/tmp/rehearsal}
EXTRA=()

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    $PY -m pip download -q "${plat[@]}" -d .whl papermill ipykernel nbformat || exit 1
    $PY -m pip download -q --no-deps "${plat[@]}" -d .whl "fastcore>=1.12.3,<2" imagecodecs || exit 1
    $PY -m pip wheel -q --no-deps -w .whl "freia==0.2" || exit 1   # the authors' flows (AUTHORS=...): an sdist, built here
    # the device image has these (its package list, .library/device/KINDS.md): one version of each, theirs
    for n in attrs certifi charset_normalizer click idna packaging psutil pygments python_dateutil pyyaml PyYAML requests \
             tqdm typing_extensions tzdata urllib3; do rm -f .whl/${n}-[0-9]*.whl; done
    ls .whl | wc -l; du -sh .whl; exit 0
fi
if [[ "${1:-}" == "--tiny" ]]; then   # the CPU test of this script: everything small, the offline backbone
    SCALE=0.02; SIZE_SCALE=0.06; EPOCHS=1; CAP=300
    EXTRA=(--classes bottle,grid,toothbrush --preset offline --model-size small --image-size vqflow=64,hgad=64,hvqtrans=64
           --batch-size 4 --device cpu --workers 1)
    WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$OUT"; LOG="$OUT/gpu_rehearsal.log"; : > "$LOG"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
T0=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels into $WORK/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl >>"$LOG" 2>&1 \
        && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if $PY -c "import papermill, ipykernel" 2>>"$LOG"; then
    if ! $PY -c "from jupyter_client.kernelspec import find_kernel_specs as f; import sys; sys.exit('python3' not in f())" 2>>"$LOG"; then
        $PY -m ipykernel install --prefix "$WORK/jupyter" --name python3 >>"$LOG" 2>&1
        export JUPYTER_PATH="$WORK/jupyter/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
        say "registered the python3 kernel under $WORK/jupyter"
    fi
    ENGINE=papermill
else
    ENGINE=direct; say "papermill/ipykernel not importable (carry .whl: see the top of this script): engine direct"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

say "dress rehearsal: scale $SCALE, size_scale $SIZE_SCALE, $EPOCHS epoch(s), cap ${CAP}s per method, engine $ENGINE"
$PY benchmarks/dress_rehearsal.py --methods "$METHODS" --scale "$SCALE" --size-scale "$SIZE_SCALE" --epochs "$EPOCHS" \
    --cap "$CAP" --engine "$ENGINE" --weights random --data "$WORK/data" --work "$WORK/work" --out "$OUT/dress_rehearsal" \
    ${AUTHORS:+--authors "$AUTHORS"} "${EXTRA[@]}" 2>&1 | grep -v "Kernel is running over TCP" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "done in $(( $(date +%s) - T0 )) s (exit $rc); wrote $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
