#!/usr/bin/env bash
# The GPU proof: one prepared run, at most 9 minutes, on a lent GPU machine.
#
#   bench/gpu_proof.sh OUT_DIR [--device cuda|cpu] [--tiny] [--cap STEP=SECONDS ...]
#                              [--budget SECONDS] [--gpu-tests all|priority] [--results DIR]
#                              [--skip STEP,...] [--dtypes LIST] [--micros LIST]
#
# On the device machine (carry [".whl"] built beforehand by ../shared/gpu/wheels.sh):
#   bench/gpu_proof.sh "$OUT"                                 # timeout_s 560 leaves room for the caps
# CPU rehearsal (tests/e2e/test_gpu_proof.py):
#   bench/gpu_proof.sh /tmp/proof --device cpu --tiny
#
# Every result goes into OUT_DIR as it is made: data/STEP.json (what the step measured, rewritten as it
# goes), logs/STEP.log, steps/STEP.json (status, exit code, cap, wall time, numbers) when the step ends,
# console.log (everything printed), and summary.json (the device's nvidia-smi name and every step's
# status: ok, failed, timed_out, skipped or not_run), rewritten after each step. A step killed at its
# cap keeps whatever its data file already holds, and the steps after it still run. `--results DIR`
# copies the final summary to DIR/gpu-proof-<device>.json; on the device machine OUT_DIR is $OUT, and
# the lead copies OUT/summary.json to bench/results/gpu-proof-<device>.json (bench/results/README.md).
#
# Steps in priority order, each under its own cap (timeout: SIGTERM, SIGKILL 3 s later, then any
# process the step left behind is killed by its tag). Caps in seconds, on one H100/H200:
#   install       25  the wheels in .whl/ into /tmp/site, as wheels.sh says, plus a .pth file so that
#                     processes whose PYTHONPATH is replaced (tests/runs.py) see them too
#                     (skipped when deepspeed, pydantic and hjson are already there)
#   env           15  mplaunch env
#   nccl          20  all-reduce across every visible GPU (NCCL; gloo with 2 processes on CPU)
#   gpu_tests     75  python -m pytest -m gpu tests/e2e/test_gpu.py (priority subset: ZeRO-2 bf16/fp16 on
#                     both backends and the fp16 overflow tests; --gpu-tests all runs the whole matrix,
#                     which does not fit in the budget)
#   b_deepspeed   60  bench/gpu.py: BERT-base seq 128, DeepSpeed ZeRO-2, bf16 fp16 tf32 fp32
#   b_accelerate  60  bench/gpu.py: the same on Accelerate FSDP2 (zero.stage=2: fully_shard with
#                     reshard_after_forward=False, each block's gathered parameters kept until its backward)
#   b_fp8         60  bench/gpu.py: BERT-large seq 128 on Accelerate FSDP2 (zero.stage=2), bf16 then fp8
#                     (torchao float8 matmuls): step time, MFU, fp8's speedup over bf16
#   c_memory      55  BERT-large seq 128 bf16, micro-batch 16 and 64: MFU, mplaunch plan's predicted
#                     peak vs the run's torch.cuda.max_memory_allocated
#   d_bf16        62  mplaunch parity, BERT-base bf16 vs fp32, 200 steps (DeepSpeed ZeRO-2)
#   d_fp16        62  mplaunch parity, BERT-base fp16 vs fp32, 200 steps
#   d_fp8         90  mplaunch parity, BERT-large fp8 vs bf16 (bf16 is fp8's reference), 200 steps,
#                     Accelerate FSDP2 (zero.stage=2)
#   e_resize      75  2 GPUs -> 1: the tiny BERT recipe's shape in fp32 on FSDP2 (zero.stage=3) and DeepSpeed
#                     ZeRO-2, 2 ranks to step 4, `mplaunch --resume RUN launch.nproc_per_node=1` to step 8;
#                     losses against an uninterrupted 2-rank run, the resized event (bench/gpu_proof.py
#                     resize); skipped with fewer than 2 visible GPUs; 2 CPU ranks -> 1 with --device cpu
# Caps sum to 659 s, more than the budget: --budget (default 540 s) is a hard ceiling on top, a step
# never gets more than what is left of it, and one that would get under 3 s is recorded as skipped,
# so when every step runs to its cap the last ones (d_fp16, e_resize) are the ones cut.
set -uo pipefail

usage() { sed -n '2,10p' "$0" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
SITE=${GPU_PROOF_SITE:-/tmp/site}

STEPS=(install env nccl gpu_tests b_deepspeed b_accelerate b_fp8 c_memory d_bf16 d_fp8 d_fp16 e_resize)
declare -A CAP=([install]=25 [env]=15 [nccl]=20 [gpu_tests]=75 [b_deepspeed]=60 [b_accelerate]=60
                [b_fp8]=60 [c_memory]=55 [d_bf16]=62 [d_fp8]=90 [d_fp16]=62 [e_resize]=75)
OUT="" DEVICE=cuda TINY=0 BUDGET=540 GPU_TESTS=priority RESULTS="" SKIP="" DTYPES="" MICROS="" ARGS=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=${2:-}; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --cap) [ $# -ge 2 ] || usage; name=${2%%=*}; [ -n "${CAP[$name]:-}" ] || { echo "unknown step: $name" >&2; exit 2; }
           CAP[$name]=${2#*=}; shift 2 ;;
    --budget) BUDGET=${2:-}; shift 2 ;;
    --gpu-tests) GPU_TESTS=${2:-}; shift 2 ;;
    --results) RESULTS=${2:-}; shift 2 ;;
    --skip) SKIP=",${2:-},"; shift 2 ;;      # steps not to run (recorded as skipped)
    --dtypes) DTYPES=${2:-}; shift 2 ;;      # b: precisions (default bf16,fp16,tf32,fp32)
    --micros) MICROS=${2:-}; shift 2 ;;      # c: micro-batches (default 16,64)
    -h|--help) usage ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || usage
case $DEVICE in cuda|cpu) ;; *) echo "--device: cuda or cpu" >&2; exit 2 ;; esac
mkdir -p "$OUT"/steps "$OUT"/logs "$OUT"/data || exit 2
OUT=$(cd "$OUT" && pwd)

# Everything printed from here on also goes to OUT/console.log, line by line.
if [ -z "${GPU_PROOF_LOGGED:-}" ]; then
  GPU_PROOF_LOGGED=1 "$0" "${ARGS[@]}" 2>&1 | tee -a "$OUT/console.log"
  exit "${PIPESTATUS[0]}"
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-proof.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/tmp" && export TMPDIR="$SCRATCH/tmp"   # run dirs and checkpoints of killed steps too
START=$(date +%s)
DEADLINE=$((START + BUDGET))

# Model sizes: the real ones, or --tiny for the CPU rehearsal (same code paths, seconds per run).
if [ "$TINY" = 1 ]; then
  SUITE=(--sizes tiny --seqs 32 --steps 4 --log-every 2 --warmup-records 0)
  DTYPES=${DTYPES:-bf16,fp16,fp32}   # tf32 is fp32 on a CPU
  MEMORY=(--size tiny --seq 32 --micros "${MICROS:-4,8}" --steps 4 --log-every 2 --warmup-records 0)
  PARITY=(--size tiny --seq 32 --micro 4) PARITY_STEPS=6
  FP8=(--sizes tiny --seqs 32 --steps 4 --log-every 2 --warmup-records 0) FP8_PARITY=(--size tiny --seq 32 --micro 4)
else
  SUITE=(--sizes base --seqs 128 --steps 30 --log-every 5 --warmup-records 2)
  DTYPES=${DTYPES:-bf16,fp16,tf32,fp32}   # slowest last: a step cut at its cap keeps the mixed rows
  MEMORY=(--size large --seq 128 --micros "${MICROS:-16,64}" --steps 15 --log-every 5 --warmup-records 1)
  PARITY=(--size base --seq 128 --micro 8) PARITY_STEPS=200
  FP8=(--sizes large --seqs 128 --steps 30 --log-every 5 --warmup-records 2) FP8_PARITY=(--size large --seq 128 --micro 8)
fi

plan=""
for s in "${STEPS[@]}"; do plan+="${plan:+,}$s:${CAP[$s]}"; done
"$PY" bench/gpu_proof.py init --out "$OUT" --device "$DEVICE" --steps "$plan" --options "${ARGS[*]}"
echo "gpu-proof: $(date '+%F %T') device $DEVICE, out $OUT, budget ${BUDGET}s, caps $plan"

# reap TAG: kill what a step left running (mplaunch starts torchrun in its own session).
reap() {
  local f pid
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    if grep -qzx "GPU_PROOF_TAG=$1" "$f" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; fi
  done
}

# record STEP [record options]: write steps/STEP.json and update summary.json.
record() {
  local step=$1; shift
  "$PY" bench/gpu_proof.py record --out "$OUT" --step "$step" --cap "${CAP[$step]}" "$@"
}

# run_step STEP CMD...: run CMD under the step's cap (cut to what the budget has left) with its output
# in logs/STEP.log, copied live to the console; set RC (124 or 137: the cap was reached) and WALL.
# CMD writes to a file, not a pipe, so a process it leaves behind cannot hold the script up.
run_step() {
  local step=$1; shift
  local left=$((DEADLINE - $(date +%s) - 3)) t0 pid tailer
  CAP[$step]=$(( CAP[$step] < left ? CAP[$step] : left ))
  CMD="$*"
  if [ "${CAP[$step]}" -lt 3 ]; then RC=-1 WHY="the ${BUDGET} s budget was spent"; return; fi
  if [[ $SKIP == *",$step,"* ]]; then RC=-1 WHY="not selected (--skip)"; return; fi
  echo "gpu-proof: $(date '+%T') $step (cap ${CAP[$step]} s): $*"
  t0=$(date +%s%N)
  : > "$OUT/logs/$step.log"   # before tail opens it
  GPU_PROOF_TAG="$$-$step" timeout -s TERM -k 3 "${CAP[$step]}" "$@" >> "$OUT/logs/$step.log" 2>&1 < /dev/null &
  pid=$!
  tail -s 0.2 -n +1 -f --pid="$pid" "$OUT/logs/$step.log" &
  tailer=$!
  wait "$pid"
  RC=$?
  reap "$$-$step"
  wait "$tailer"
  t0=$(( ($(date +%s%N) - t0) / 1000000 ))
  WALL="$((t0 / 1000)).$(printf %03d $((t0 % 1000)))"
}

# step STEP CMD...: run_step, then record it (or record it as skipped when the budget is spent).
step() {
  local name=$1
  run_step "$@"
  if [ "$RC" = -1 ]; then record "$name" --status skipped --reason "$WHY"; return; fi
  record "$name" --rc "$RC" --wall "$WALL" --cmd "$CMD" --tag "$$-$name"
}

# install: the wheels.sh recipe, unless what the GPU image lacks is already there.
if [[ $SKIP == *",install,"* ]]; then
  record install --status skipped --reason "not selected (--skip)"
elif "$PY" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("deepspeed", "pydantic", "hjson"))))'; then
  record install --status skipped --reason "deepspeed, pydantic and hjson already importable; nothing installed"
elif ! compgen -G ".whl/*.whl" >/dev/null; then
  record install --status failed --reason "no .whl/*.whl: run ../shared/gpu/wheels.sh before and carry .whl"
else
  step install "$PY" bench/gpu_proof.py install --wheels .whl --site "$SITE" --out "$OUT/data/install.json"
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

# a. versions, NCCL on every GPU, the GPU tests
step env "$PY" -m launcher env
step nccl "$PY" bench/gpu_proof.py nccl --device "$DEVICE" --out "$OUT/data/nccl.json"
K=()
[ "$GPU_TESTS" = all ] || K=(-k "2-bf16 or 2-fp16 or overflow")
step gpu_tests "$PY" -m pytest -m gpu tests/e2e/test_gpu.py -v -p no:cacheprovider "${K[@]}"

# b. BERT-base on both backends: samples/s, MFU, peak memory, speedups over fp32 and tf32
for backend in deepspeed accelerate; do
  step "b_$backend" "$PY" bench/gpu.py --device "$DEVICE" "${SUITE[@]}" --dtypes "$DTYPES" \
    --backends "$backend" --zero 2 --out "$OUT/data/b_$backend.json"
done

# b. fp8 against bf16 on BERT-large (Accelerate FSDP2; bf16 first, so a cut step keeps the reference)
step b_fp8 "$PY" bench/gpu.py --device "$DEVICE" "${FP8[@]}" --dtypes bf16,fp8 --backends accelerate --zero 2 \
  --out "$OUT/data/b_fp8.json"

# c. BERT-large seq 128 bf16: MFU, and the planner's peak against max_memory_allocated
step c_memory "$PY" bench/gpu_proof.py memory --device "$DEVICE" "${MEMORY[@]}" --dtype bf16 --zero 2 \
  --scratch "$SCRATCH/c" --out "$OUT/data/c_memory.json"

# d. mplaunch parity: bf16 and fp16 against fp32 (BERT-base), fp8 against bf16 (BERT-large, FSDP2)
recipe=$("$PY" bench/gpu_proof.py recipe --device "$DEVICE" "${PARITY[@]}" --steps "$PARITY_STEPS" \
  --log-every 1 --dtype bf16 --dir "$SCRATCH/d")
recipe8=$("$PY" bench/gpu_proof.py recipe --device "$DEVICE" "${FP8_PARITY[@]}" --steps "$PARITY_STEPS" \
  --log-every 1 --dtype bf16 --backend accelerate --dir "$SCRATCH/d8")
for dtype in bf16 fp8 fp16; do
  r=$recipe; [ "$dtype" = fp8 ] && r=$recipe8
  run_step "d_$dtype" "$PY" -m launcher parity "$r" "precision.dtype=$dtype" --steps "$PARITY_STEPS" \
    --out "$SCRATCH/d/$dtype"
  if [ "$RC" = -1 ]; then record "d_$dtype" --status skipped --reason "$WHY"; continue; fi
  [ -f "$SCRATCH/d/$dtype/parity.json" ] && cp "$SCRATCH/d/$dtype/parity.json" "$OUT/data/d_$dtype.json"
  [ -f "$SCRATCH/d/$dtype/loss.png" ] && cp "$SCRATCH/d/$dtype/loss.png" "$OUT/data/d_$dtype-loss.png"
  record "d_$dtype" --rc "$RC" --wall "$WALL" --cmd "$CMD" --tag "$$-d_$dtype"
done

# e. a 2-rank run resumed on 1 rank, FSDP2 and DeepSpeed ZeRO-2 (the tiny BERT's shape, --tiny or not)
step e_resize "$PY" bench/gpu_proof.py resize --device "$DEVICE" --scratch "$SCRATCH/e" \
  --out "$OUT/data/e_resize.json"

"$PY" bench/gpu_proof.py finish --out "$OUT" ${RESULTS:+--results "$RESULTS"}
echo "gpu-proof: $(date '+%T') done in $(( $(date +%s) - START )) s; summary $OUT/summary.json"
