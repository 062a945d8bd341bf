#!/usr/bin/env bash
# Ours against the authors' code for VQ-Flow, HGAD and HVQ-Trans on a lent GPU, fp32 and bf16, in one device call of
# at most ~5 minutes (benchmarks/gpu_vs_authors.py does the work; this script installs what the device lacks).
#
# 1. Here, once, in the checkout the device tool sends (the session's own checkout, i.e. the main one, not a helper's
#    worktree), with this file merged there:
#        bash benchmarks/gpu_vs_authors.sh --prepare /tmp/authors/vqflow /tmp/authors/HGAD /tmp/authors/HVQ
#    (the three checkouts: cool-xuan/vqflow, xcyao00/HGAD, RuiyingLu/HVQ-Trans, in that order). It copies them into
#    the git-ignored _authoring/authors_{vqflow,hgad,hvqtrans} (imported there, never committed; ~2.2 MB), fetches the
#    wheels the device image lacks into the git-ignored .whl/vs_authors/ (fastcore for vqflow_nb; FrEIA 0.2, an sdist
#    built here, for the authors' VQ-Flow and HGAD flows; ~0.2 MB) and prints what would travel (repository + carried:
#    must stay under 64 MiB; the repository alone is ~13 MB).
# 2. On the device, with the device tool (timeout_s 330: the script's budget is 300 s, plus ~10 s of wheel install):
#        run(command="bash benchmarks/gpu_vs_authors.sh",
#            carry=["_authoring/authors_vqflow", "_authoring/authors_hgad", "_authoring/authors_hvqtrans", ".whl/vs_authors"],
#            timeout_s=330)
#    It writes $OUT/vs_authors_gpu.{json,md} and $OUT/gpu_vs_authors.log, which the tool copies back. Keep them as
#    results/benchmarks/vs_authors_gpu.{json,md}; the docs table comes from
#        python benchmarks/gpu_vs_authors.py --table results/benchmarks/vs_authors_gpu.json
#    In a session that also runs benchmarks/gpu_rehearsal.sh (480 s), run both on the same warm machine (one start):
#    ~90 s start + 330 + 480 s fits the 15 minutes only then. BUDGET=<s> shortens this call (parts are capped, see below).
# 3. Here, to test this script on the CPU (tiny sizes, every part, all three methods; about a minute):
#        PY=.venv/bin/python bash benchmarks/gpu_vs_authors.sh --smoke
#
# Time budget of the device call (BUDGET=300 s for the Python part; each part has its own cap and runs in its own
# process, so a failure or a timeout loses only that part):
#   ~10 s  install the carried wheels into $WORK/site
#   ≤ 60 s VQ-Flow (convnextv2_base widths, 384 px, batch 4): set-up and transplant (309 M numbers), fp32 equality,
#          bf16 equality and bf16-vs-fp32 of each side, fp32 rounds (theirs, ours, ours+quant), bf16 rounds (both sides)
#   ≤ 90 s HGAD (1024 px, batch 8, B6 random weights): the same, sides theirs (backbone in the step), theirs_flows,
#          ours (cached pyramid), ours+backbone, ours+dense; bf16: theirs, theirs_flows, ours
#   ≤ 60 s HVQ-Trans (224 px, batch 16, B4 random weights): sides theirs, ours (faithful), ours+cached, ours+batched,
#          ours+avgpool (inference only); bf16: theirs, ours
#   the rest (≥ 75 s kept for it): peak GPU memory, 15 processes (5 sides x 3 methods, interleaved), 4 at a time
#          (each its own torch.cuda.max_memory_allocated); a process not started by the budget's end is reported as such
#   3 alternating rounds after 1 warm-up each; a method's cap shrinks when earlier ones ran long, so the whole
#   Python part ends by ~300 s. The pretrained weights cannot be downloaded there: backbones are random on both sides
#   (speed and memory do not depend on the values; the equality rows compare identical random weights).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUDGET=${BUDGET:-300}
OUT=${OUT:-results/_scratch/gpu_vs_authors}; WORK=${WORK:-/tmp/gpu_vs_authors}
WHL=.whl/vs_authors

if [[ "${1:-}" == "--prepare" ]]; then
    [[ $# -eq 4 ]] || { echo "usage: $0 --prepare VQFLOW_DIR HGAD_DIR HVQTRANS_DIR"; exit 2; }
    declare -A dirs
    dirs=([vqflow]="$2" [hgad]="$3" [hvqtrans]="$4")
    for m in vqflow hgad hvqtrans; do
        src=${dirs[$m]}
        mark=$(case $m in vqflow) echo train.py;; hgad) echo models/nf_model.py;; hvqtrans) echo models/HVQ_TR_switch.py;; esac)
        [[ -f "$src/$mark" ]] || { echo "$src: no $mark there (not a checkout of the authors' $m code)"; exit 1; }
        mkdir -p _authoring; rm -rf "_authoring/authors_$m"
        # their source only: no .git, no images or data
        (cd "$src" && find . -path ./.git -prune -o -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.yml' -o -name '*.txt' -o -name '*.md' \) -print) \
            | while read -r f; do mkdir -p "_authoring/authors_$m/$(dirname "$f")"; cp "$src/$f" "_authoring/authors_$m/$f"; done
        echo "_authoring/authors_$m: $(du -sh "_authoring/authors_$m" | cut -f1)"
    done
    mkdir -p "$WHL"; rm -f "$WHL"/*.whl
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    $PY -m pip download -q --no-deps "${plat[@]}" -d "$WHL" "fastcore>=1.12.3,<2" || exit 1
    $PY -m pip wheel -q --no-deps -w "$WHL" "freia==0.2" || exit 1
    ls "$WHL"
    tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
    carried=$(du -cb _authoring/authors_vqflow _authoring/authors_hgad _authoring/authors_hvqtrans "$WHL" | tail -1 | cut -f1)
    total=$(( tracked + ${untracked:-0} + carried ))
    echo "travels: tracked $((tracked / 1048576)) MiB + untracked $(( ${untracked:-0} / 1048576 )) MiB + carried $((carried / 1024)) KiB = $((total / 1048576)) MiB (limit 64 MiB)"
    (( total < 64 * 1048576 )) || { echo "too large for the device tool"; exit 1; }
    exit 0
fi
EXTRA=()
if [[ "${1:-}" == "--smoke" ]]; then EXTRA=(--smoke); BUDGET=${BUDGET_SMOKE:-240}; WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi

mkdir -p "$OUT"; LOG="$OUT/gpu_vs_authors.log"; : > "$LOG"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
T0=$(date +%s)
if ls "$WHL"/*.whl >/dev/null 2>&1 && [[ "${1:-}" != "--smoke" ]]; then
    say "installing $(ls "$WHL"/*.whl | wc -l) carried wheels into $WORK/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WHL"/*.whl >>"$LOG" 2>&1 \
        && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
$PY -c "import fastcore, FrEIA" 2>>"$LOG" || say "fastcore/FrEIA not importable (carry $WHL: see the top of this script)"
say "gpu_vs_authors: budget ${BUDGET}s, out $OUT"
$PY benchmarks/gpu_vs_authors.py --budget "$BUDGET" --out "$OUT" --verbose "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "done in $(( $(date +%s) - T0 )) s (exit $rc); wrote $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
