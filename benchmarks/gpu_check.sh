#!/usr/bin/env bash
# One GPU check for issue 7: device info, CUDA tests, training throughput (plain fp32 eager vs fast path,
# then + torch.compile), sampling cost (PC / ODE / Heun, fp32 vs bf16), and a short real-data MNIST run
# (train ~90 s, sample, classifier-feature FID). Needs only torch (+ torchvision, scipy, pytest): no
# dvc / prefect / mlflow, no network. Run from the repository root:
#
#   mkdir -p data/raw/mnist && cp /path/to/mnist/*.gz data/raw/mnist/
#   PYTHONPATH=. bash benchmarks/gpu_check.sh            # writes everything under $OUT (default ./gpu_check_out)
#
# Total time is bounded by BUDGET_S (default 330 s; each step gets min(its cap, time left) and is skipped
# when less than 20 s are left). Every step runs even if an earlier one failed; a summary closes the log.
# Env overrides: OUT, PYTHON (default python), DEVICE (default cuda if available else cpu), MNIST_ROOT
# (default data/raw), BUDGET_S, MNIST_SECONDS (default 90), QUICK=1 (tiny sizes: a CPU smoke test of this
# script, ~2-3 min on 2 cores).
set -u -o pipefail
set -x

OUT="${OUT:-gpu_check_out}"
PYTHON="${PYTHON:-python}"
MNIST_ROOT="${MNIST_ROOT:-data/raw}"
QUICK="${QUICK:-0}"
BUDGET_S="${BUDGET_S:-330}"
MNIST_SECONDS="${MNIST_SECONDS:-90}"
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
START=$SECONDS

if [ -z "${DEVICE:-}" ]; then
  DEVICE=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
fi

if [ "$QUICK" = "1" ]; then
  THREADS="--threads 1"
  TT_ARGS="--batch-size 8 --steps 2 --warmup 1 $THREADS"
  TT_WIDE_ARGS="--batch-size 4 --steps 1 --warmup 1 --ch 32 --num-res-blocks 1 $THREADS"
  TT_COMPILE_ARGS="--batch-size 4 --steps 1 --warmup 1 --size 8 --channels 1 $THREADS"
  SAMPLING_ARGS="--n 2 --pc-steps 5 --ode-rtol 1e-2 --heun-steps 3 --fast on $THREADS"
  MNIST_ARGS="--quick $THREADS"
  PYTEST_K=(-k "not compile")
else
  THREADS=""
  TT_ARGS="--batch-size 128 --steps 100 --warmup 20"
  TT_WIDE_ARGS="--batch-size 128 --steps 30 --warmup 10 --ch 128 --num-res-blocks 2"
  TT_COMPILE_ARGS="--batch-size 128 --steps 100 --warmup 20"
  SAMPLING_ARGS="--n 128"
  MNIST_ARGS="--seconds $MNIST_SECONDS --n-samples 500"
  PYTEST_K=()
fi

declare -a NAMES STATUS TIMES
left() { echo $(( BUDGET_S - (SECONDS - START) )); }

# step NAME CAP_SECONDS COMMAND...   (stdout+stderr -> $OUT/logs/NAME.log and the console)
step() {
  local name=$1 cap=$2; shift 2
  local rem; rem=$(left)
  local t=$(( cap < rem ? cap : rem ))
  NAMES+=("$name")
  if [ "$t" -lt 20 ]; then
    echo "=== $name: SKIPPED (only ${rem}s of the ${BUDGET_S}s budget left)"
    STATUS+=("skipped"); TIMES+=(0)
    return 0
  fi
  echo "=== $name (cap ${t}s, $(( SECONDS - START ))s elapsed)"
  local t0=$SECONDS
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  TIMES+=($(( SECONDS - t0 )))
  if [ "$rc" -eq 0 ]; then STATUS+=("ok"); elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS+=("TIMEOUT"); else STATUS+=("FAILED rc=$rc"); fi
  return 0
}

# 1. the machine
step info 30 bash -c "nvidia-smi || true; $PYTHON -c 'import sys, torch, torchvision; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"torchvision\", torchvision.__version__); print(\"devices\", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]); print(\"bf16\", torch.cuda.is_available() and torch.cuda.is_bf16_supported())'"

# 2. tests that exercise the CUDA paths (they skip without a GPU); the sampler tests cover inference_mode
step tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_sampling.py ${PYTEST_K[@]+"${PYTEST_K[@]}"}

# 3. training throughput: plain fp32 eager vs fast path, default 32x32 ScoreUNet, then NCSN++-width (ch 128)
step throughput 90 "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" $TT_ARGS --out "$OUT/train_throughput.json"
step throughput_ch128 90 "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" $TT_WIDE_ARGS --out "$OUT/train_throughput_ch128.json"

# 4. sampling cost: PC 1000 steps, probability-flow ODE, Heun 35 NFE; fp32 vs bf16 + channels-last
step sampling 90 "$PYTHON" benchmarks/sampling.py --device "$DEVICE" $SAMPLING_ARGS --out "$OUT/sampling.json"

# 5. short real-data run: MNIST, VE ScoreUNet on the fast path, PC + Heun samples, classifier FID
step mnist $(( MNIST_SECONDS + 120 )) "$PYTHON" benchmarks/mnist_short.py --root "$MNIST_ROOT" --device "$DEVICE" $MNIST_ARGS --out "$OUT/mnist"

# 6. + torch.compile (compilation is the slow part: last, with what is left of the budget)
step throughput_compile 150 "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" $TT_COMPILE_ARGS --compile --only plain,fast,compile --out "$OUT/train_throughput_compile.json"

set +x
# ---- summary ------------------------------------------------------------------------------------
{
  echo "gpu_check summary ($(( SECONDS - START )) s in all, device $DEVICE, QUICK=$QUICK)"
  for i in "${!NAMES[@]}"; do printf '  %-20s %-14s %4ss\n' "${NAMES[$i]}" "${STATUS[$i]}" "${TIMES[$i]}"; done
  "$PYTHON" - "$OUT" <<'EOF' || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
for name in ("train_throughput.json", "train_throughput_ch128.json", "train_throughput_compile.json"):
    d = load(name)
    if d:
        rows = ", ".join(f"{r['variant']} {r['images_per_s']:.0f} img/s ({r.get('speedup_vs_plain', 1):.2f}x)"
                         for r in d["rows"] if "images_per_s" in r)
        print(f"  {name}: {d['device']}, batch {d['batch_size']}, ch {d['model']['ch']}: {rows}")
d = load("sampling.json")
if d:
    for r in d["rows"]:
        if "nfe" in r:
            print(f"  sampling {r['sampler']:<5} {r['variant']:<22} NFE {r['nfe']:>5}  {r['s_per_1000_images']:8.1f} s/1000 img")
d = load("mnist/summary.json")
if d:
    m, t = d.get("metrics", {}), d.get("train", {})
    print(f"  mnist: {t.get('steps')} steps in {t.get('seconds', 0):.0f} s ({t.get('images_per_s', 0):.0f} img/s), "
          f"final loss {t.get('final_loss')}; classifier acc {m.get('classifier_heldout_accuracy')}")
    for k, v in m.items():
        if k.startswith("fid_"):
            print(f"    {k} = {v}")
    for k, v in d.get("sampling", {}).items():
        print(f"    {k}: NFE {v['nfe']}, {v['seconds']:.1f} s for {v['n']}")
EOF
} 2>&1 | tee "$OUT/summary.txt"
exit 0
