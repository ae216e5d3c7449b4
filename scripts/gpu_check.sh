#!/usr/bin/env bash
# A first run on one GPU, in at most 8 minutes:
#   1. install check: JAX sees a GPU (versions, devices, cuDNN);
#   2. `nanodo-sam bench` at 23.9M and 117.9M for adamw, sam and
#      precond_functional_sam, with model.attention=xla and =cudnn;
#   3. `nanodo-sam plan` of the bench's first size for this GPU's target
#      (h100x1, a100x1), its memory and step time set beside the bench's
#      measurement (plan_check.json): the first real run checks the plan;
#   4. a 20-step `nanodo-sam train` with the profiler on (steps 5..14), on
#      byte-level text written here from the repository's own docs (no
#      dataset or network needed).
# Every result is JSON in OUT_DIR (default $OUT, else ./gpu_check):
#   install.json, bench_xla.json, bench_cudnn.json, plan_adamw.json,
#   plan_sam.json, plan_check.json, profile/ (the trace,
#   TensorBoard's profile tab, and the run's metrics), gpu_check.json (what
#   ran, exit codes, seconds), log.txt.
#
#   scripts/gpu_check.sh [OUT_DIR]
#
# Environment: DRY_RUN=1 runs the same commands on the CPU at a tiny size
# (2M with L=64, the byte vocabulary, 8 rows, 2 timed steps; cuDNN is then
# expected to be refused with exit 2) to check the script itself.
# BATCH (default 32 rows of 512 tokens, one device), STEPS (timed steps per
# method, default 5), BUDGET_S (default 480; 1200 for DRY_RUN) override the
# settings.
# Exit 0 when every step succeeded, 1 otherwise, 2 on bad input.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-./gpu_check}}"
DRY_RUN="${DRY_RUN:-0}"
# 8 minutes on a GPU; a shared CPU compiles the dry run's steps slower.
BUDGET_S="${BUDGET_S:-$([[ "$DRY_RUN" == 1 ]] && echo 1200 || echo 480)}"

if [[ $# -gt 1 ]]; then
  echo "gpu_check.sh takes one argument, the output folder (got $#); e.g. scripts/gpu_check.sh ./gpu_check" >&2
  exit 2
fi
if [[ -e "$OUT_DIR" && ! -d "$OUT_DIR" ]]; then
  echo "gpu_check.sh: $OUT_DIR is a file, not a folder; give a folder for the results" >&2
  exit 2
fi
if [[ -e "$OUT_DIR/gpu_check.json" ]]; then
  echo "gpu_check.sh: $OUT_DIR already holds results (gpu_check.json); give another folder" >&2
  exit 2
fi
for v in BUDGET_S ${BATCH:+BATCH} ${STEPS:+STEPS}; do
  if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check.sh: $v=${!v} must be a positive integer; e.g. $v=8" >&2
    exit 2
  fi
done

PY="${PYTHON:-python}"
if [[ -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]]; then
  PY="$ROOT/.venv/bin/python"
fi
NANODO=("$PY" -m nanodo_sam.cli)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"

if [[ "$DRY_RUN" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  SIZES="2M"
  BENCH_CFG="configs/c4_fixed_length.py:2M"
  SHAPE=(--config.model.L=64 --config.model.V=259 --config.data.vocab=byte
         --config.data.add_bos=False --config.data.batch_size="${BATCH:-8}")
  STEPS="${STEPS:-2}"
  TRAIN_SIZE="2M"
  SHAPE_TRAIN=(--config.model.L=64)
else
  SIZES="23.9M,117.9M"
  BENCH_CFG="configs/c4_fixed_length.py:23.9M"
  SHAPE=(--config.data.batch_size="${BATCH:-32}")
  STEPS="${STEPS:-5}"
  TRAIN_SIZE="23.9M"
fi

mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create $OUT_DIR; give a writable folder" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/log.txt"
STEPS_JSONL="$WORK/steps.jsonl"
: > "$STEPS_JSONL"
START=$SECONDS
FAILED=0

# run NAME CMD...: CMD under the time left of the budget; one JSON line.
# EXPECT_RC (default 0) is the exit code that counts as success; with
# EXPECT_MSG, the command's first output line must also contain it.
run() {
  local name="$1"; shift
  local left=$((BUDGET_S - (SECONDS - START)))
  local t0=$SECONDS rc
  if (( left <= 0 )); then
    rc=124
    echo "== $name: skipped, the ${BUDGET_S}s budget is spent" | tee -a "$LOG"
  else
    echo "== $name (${left}s left): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$left" "$@" > "$WORK/$name.out" 2>&1
    rc=$?
    cat "$WORK/$name.out" >> "$LOG"
  fi
  local expect="${EXPECT_RC:-0}"
  local ok=false
  [[ "$rc" == "$expect" ]] && ok=true
  if [[ -n "${EXPECT_MSG:-}" ]] && ! grep -v '^[WIEF][0-9]\{4\} \|^WARNING: All log' \
      "$WORK/$name.out" 2>/dev/null | head -1 | grep -qF -- "$EXPECT_MSG"; then
    ok=false
  fi
  [[ "$ok" == true ]] || FAILED=1
  "$PY" -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "rc": int(sys.argv[2]), "expected_rc": int(sys.argv[3]), "ok": sys.argv[4] == "true", "wall_s": int(sys.argv[5]), "command": sys.argv[6:]}))' \
    "$name" "$rc" "$expect" "$ok" "$((SECONDS - t0))" "$@" >> "$STEPS_JSONL"
  echo "== $name: rc=$rc (expected $expect) in $((SECONDS - t0))s" | tee -a "$LOG"
}

# 1. Install check.
run install "$PY" - "$OUT_DIR/install.json" "$DRY_RUN" <<'EOF'
import json, sys
import jax, jaxlib
devices = jax.devices()
info = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind}
try:
  from jax._src.lib import cuda_versions
  info["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
except Exception as e:  # Not a CUDA build.
  info["cudnn"] = f"n/a ({type(e).__name__})"
stats = devices[0].memory_stats() or {}
info["bytes_limit"] = stats.get("bytes_limit")
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
if sys.argv[2] != "1" and jax.default_backend() != "gpu":
  sys.exit(f"JAX sees no GPU (backend {jax.default_backend()}); install "
           "the CUDA wheels: pip install -e '.[gpu]'")
EOF

# 2. Bench: both attention kernels (cuDNN is refused on a CPU: exit 2).
for attn in xla cudnn; do
  expect=0 msg=""
  if [[ "$DRY_RUN" == 1 && "$attn" == cudnn ]]; then
    expect=2 msg="model.attention=cudnn"
  fi
  EXPECT_RC=$expect EXPECT_MSG=$msg run "bench_$attn" "${NANODO[@]}" bench \
    --config="$BENCH_CFG" --sizes="$SIZES" \
    --methods=adamw,sam,precond_functional_sam --steps="$STEPS" \
    --config.model.attention="$attn" "${SHAPE[@]}" \
    --out="$OUT_DIR/bench_$attn.json"
done

# 3. The plan against the measurement: `nanodo-sam plan` compiles the
# bench's first size for the target of this GPU (h100x1 or a100x1, from its
# device kind; the dry run: cpu-sim-1) on the host's CPU, and
# plan_check.json sets its memory and step time beside the bench's.
PLAN_TARGET=$("$PY" - "$OUT_DIR/install.json" "$DRY_RUN" <<'EOF' 2>/dev/null
import json, sys
kind = json.load(open(sys.argv[1])).get("device_kind", "") if sys.argv[2] != "1" else ""
print("cpu-sim-1" if sys.argv[2] == "1" else "h100x1" if "H100" in kind
      else "a100x1" if "A100" in kind else "")
EOF
)
PLAN_ATTN=$([[ "$DRY_RUN" == 1 ]] && echo xla || echo cudnn)
if [[ -n "$PLAN_TARGET" ]]; then
  for m in adamw sam; do
    JAX_PLATFORMS=cpu run "plan_$m" "${NANODO[@]}" plan \
      --config="$BENCH_CFG" --target="$PLAN_TARGET" \
      --config.sam.method=$m --config.sam.rho="$([[ $m == adamw ]] && echo 0.0 || echo 0.05)" \
      "${SHAPE[@]}" \
      --out="$OUT_DIR/plan_$m.json"
  done
  run plan_check "$PY" - "$OUT_DIR" "$PLAN_ATTN" <<'EOF'
import json, os, sys
out, attn = sys.argv[1:]
bench = json.load(open(os.path.join(out, f"bench_{attn}.json")))["rows"]
rows = []
for m in ("adamw", "sam"):
  plan = json.load(open(os.path.join(out, f"plan_{m}.json")))
  step = plan["programs"][0]
  (b,) = [r for r in bench if r["method"] == m
          and r["D"] == plan["config"]["D"]]
  planned, measured = step["memory_bytes"]["total"], b["memory_bytes"]["total"]
  rows.append({
      "method": m, "target": plan["target"]["name"],
      "attention": plan["attention"]["kernel"],
      "planned_memory_bytes": planned, "measured_memory_bytes": measured,
      "measured_peak_bytes_in_use": b.get("device_peak_bytes_in_use"),
      "memory_ratio": measured / planned if planned else None,
      "planned_matmul_at_peak_s": step["estimate"].get("matmul_at_peak_s"),
      "measured_step_s": b["step_s_median"],
      "planned_step_s": step["estimate"].get("step_s")})
json.dump({"rows": rows}, open(os.path.join(out, "plan_check.json"), "w"),
          indent=2)
for r in rows:
  print(json.dumps(r))
EOF
fi

# 4. A 20-step run with the profiler, on text made from the repository.
mkdir -p "$WORK/data/train" "$WORK/data/eval"
for i in $(seq 1 16); do
  cat "$ROOT"/README.md "$ROOT"/docs/*.md > "$WORK/data/train/doc$i.txt"
done
cp "$ROOT/README.md" "$WORK/data/eval/doc.txt"
run profile "${NANODO[@]}" train \
  --config="configs/c4_fixed_length.py:$TRAIN_SIZE" --workdir="$WORK/run" \
  --config.data.train_files="$WORK/data/train/*.txt" \
  --config.data.eval_files="$WORK/data/eval/*.txt" \
  --config.data.vocab=byte --config.data.add_bos=False \
  --config.data.eval_mode=packed --config.model.V=259 \
  --config.data.batch_size="${BATCH:-$([[ "$DRY_RUN" == 1 ]] && echo 8 || echo 32)}" \
  ${SHAPE_TRAIN[@]+"${SHAPE_TRAIN[@]}"} --config.data.eval_batch_size=8 --config.data.eval_steps=1 \
  --config.opt.num_train_steps=20 --config.opt.warmup_steps=2 \
  --config.eval_every_steps=20 --config.checkpoint_every_steps=20 \
  --config.log_every_steps=5 \
  --config.profile.start_step=5 --config.profile.num_steps=10
mkdir -p "$OUT_DIR/profile"
if [[ -d "$WORK/run/plugins" ]]; then
  cp -r "$WORK/run/plugins" "$OUT_DIR/profile/"
fi
find "$WORK/run" -maxdepth 1 -type f \( -name '*.json' -o -name '*.jsonl' \) \
  -exec cp {} "$OUT_DIR/profile/" \; 2>/dev/null
TRACES=$(find "$OUT_DIR/profile" -name '*.xplane.pb' | wc -l)
if (( TRACES == 0 )); then
  echo "== profile: no *.xplane.pb trace written" | tee -a "$LOG"
  FAILED=1
fi

# Summary.
"$PY" - "$STEPS_JSONL" "$OUT_DIR" "$DRY_RUN" "$TRACES" "$((SECONDS - START))" <<'EOF'
import datetime, json, os, sys
steps_path, out, dry, traces, wall = sys.argv[1:]
steps = [json.loads(l) for l in open(steps_path) if l.strip()]
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "dry_run": dry == "1", "wall_s": int(wall),
           "profile_traces": int(traces), "steps": steps}
for attn in ("xla", "cudnn"):
  path = os.path.join(out, f"bench_{attn}.json")
  if os.path.exists(path):
    summary[f"bench_{attn}"] = os.path.basename(path)
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
for s in steps:
  print(f"{s['name']:<12} rc={s['rc']:<4} {'ok' if s['ok'] else 'FAILED':<7}"
        f"{s['wall_s']}s")
print(f"profile traces: {traces}; total {wall}s; results in {out}")
EOF
exit $FAILED
