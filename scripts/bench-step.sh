#!/usr/bin/env bash
# `make bench`: our training step (`albef bench`) beside the same step in eager PyTorch
# (tests/python/torch_step.py, --mode reference and --mode best) on the same shapes, device and
# thread count, in interleaved rounds (a slower moment of the machine hits every implementation),
# then the ratios torch time / our time of the median p50 step time (> 1: ours is faster).
#
#   CASES="preset:batch:steps ..."  (default: albef-small:16:10 albef-base:2:3)
#   ROUNDS=3 THREADS=<cores> DEVICE=cpu|cuda ALBEF=target/debug/albef PYTHON=.venv/bin/python
#   DATASHEET_TFLOPS=<peak, for the MFU against it>  BENCH_OUT=runs/bench
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-"albef-small:16:10 albef-base:2:3"}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
DEVICE=${DEVICE:-cpu}
ALBEF=${ALBEF:-target/debug/albef}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${BENCH_OUT:-runs/bench}
WARMUP=${WARMUP:-2}
mkdir -p "$OUT"
datasheet=()
[[ -n "${DATASHEET_TFLOPS:-}" ]] && datasheet=(--datasheet-tflops "$DATASHEET_TFLOPS")

for case in $CASES; do
  IFS=: read -r preset batch steps <<<"$case"
  "$ALBEF" config --set "model.preset=$preset" >"$OUT/$preset.config.json"
  shape=(--device "$DEVICE" --batch "$batch" --steps "$steps" --warmup "$WARMUP" --threads "$THREADS")
  for round in $(seq "$ROUNDS"); do
    echo "bench: $preset batch $batch on $DEVICE, round $round of $ROUNDS" >&2
    "$ALBEF" bench --preset "$preset" "${shape[@]}" "${datasheet[@]}" --json "$OUT/$preset.albef.$round.json" >/dev/null
    for mode in reference best; do
      "$PYTHON" tests/python/torch_step.py --config "$OUT/$preset.config.json" --mode "$mode" "${shape[@]}" \
        --json "$OUT/$preset.torch-$mode.$round.json" >/dev/null
    done
  done
done

"$PYTHON" - "$OUT" $CASES <<'PY'
import glob, json, statistics, sys

out, cases = sys.argv[1], sys.argv[2:]
summary = []
print(f"{'preset':<12} {'batch':>5} {'impl':<16} {'p50 step':>10} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'torch/ours':>10}")
for case in cases:
    preset, batch, _ = case.split(":")
    runs = {}
    for impl in ("albef", "torch-reference", "torch-best"):
        reports = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{preset}.{impl}.*.json"))]
        runs[impl] = reports
    ours = statistics.median(r["step_seconds"]["p50"] for r in runs["albef"])
    for impl, reports in runs.items():
        p50 = statistics.median(r["step_seconds"]["p50"] for r in reports)
        last = reports[-1]
        mfu = last["mfu"]["datasheet"] if last["mfu"]["datasheet"] is not None else last["mfu"]["measured"]
        ratio = p50 / ours
        print(f"{preset:<12} {batch:>5} {impl:<16} {p50 * 1e3:>8.1f}ms {int(batch) / p50:>8.1f} "
              f"{last['flops_per_step'] / p50 / 1e12:>8.3f} {mfu * 100:>5.1f}% {ratio:>9.2f}x")
        summary.append({"preset": preset, "batch": int(batch), "implementation": impl, "p50_seconds": p50,
                        "torch_over_ours": ratio, "rounds": len(reports), "threads": last["threads"],
                        "device": last["device"], "mfu": mfu, "parameters": last["parameters"]})
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"(MFU against the datasheet peak where given, else the matmul peak measured in each process; reports in {out})")
PY
