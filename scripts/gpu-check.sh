#!/usr/bin/env bash
# Every GPU check in one short run, against binaries built elsewhere (the GPU machine has torch
# but no cargo). Writes logs, JSON reports and summary.{json,txt} under $OUT.
#
# Build (on the development machine; release, stripped and xz-compressed, to carry to the GPU
# machine, which takes 64 MiB in all with the repository: the build fails above 48 MiB):
#   bash scripts/gpu-check.sh --build          -> target/gpu-check/{albef,albef-coordinator,albef-worker,nccl-test}.xz
# Run (on the GPU machine, one H100 by default, from the repository root, with target/gpu-check
# carried; the binaries are unpacked with its Python's lzma first):
#   OUT=/some/dir bash scripts/gpu-check.sh
# Dry run on the CPU (the same steps with CPU devices and TCP, the small preset, a few steps):
#   GPU_BIN=target/debug OUT=/tmp/gpu-check bash scripts/gpu-check.sh --device cpu
#
# Steps: (1) NCCL collectives in a world of one (all-reduce, all-gather, broadcast, abort);
# (2) the bf16 CUDA forward against the CPU fp32 forward, small and base presets; (3) 2 workers
# on the one GPU with TCP collectives and 1 worker with NCCL, 50 steps each, each ending with a
# committed checkpoint, and `albef bench` of 2 ranks over TCP (the overlapped gradient
# all-reduce on CUDA); (4) `albef bench` base at batch 64 against tests/python/torch_step.py in
# both modes (ratios, MFU); (5) peak memory, from the bench reports.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
# What the binaries may take of the 64 MiB carried to the GPU machine (the repository is ~2.4 MB):
# room for growth, and a failure here rather than a refused carry there.
CARRY_LIMIT=$((48 << 20))
case "${1:-}" in
  --build)
    set -e
    cargo build --release -p albef -p albef-coordinator -p albef-worker --bins
    cargo test --release -p albef-dist --test nccl --no-run
    rm -rf target/gpu-check
    mkdir -p target/gpu-check
    cp target/release/albef target/release/albef-coordinator target/release/albef-worker target/gpu-check/
    nccl=$(ls -t target/release/deps/nccl-* | grep -v '\.d$' | head -1)
    cp "$nccl" target/gpu-check/nccl-test
    strip target/gpu-check/*
    xz -T0 target/gpu-check/*
    carried=$(cat target/gpu-check/*.xz | wc -c)
    echo "gpu-check: carrying $((carried / 1024)) KiB of compressed binaries (limit $((CARRY_LIMIT / 1024)) KiB)"
    ((carried <= CARRY_LIMIT)) || { echo "gpu-check: over the limit: carry less" >&2; exit 1; }
    exit 0 ;;
  --device) DEVICE=${2:?--device cpu|cuda} ;;
  "") ;;
  *) echo "usage: $0 [--build | --device cpu|cuda]" >&2; exit 2 ;;
esac
BIN=${GPU_BIN:-target/gpu-check}
OUT=${OUT:?set OUT to the directory for the reports}
mkdir -p "$OUT"

# The GPU machine's torch, else this checkout's; NCCL from the wheel's nvidia packages.
if [[ -d /opt/torch/.venv ]]; then PYTHON=/opt/torch/.venv/bin/python; else PYTHON=.venv/bin/python; fi
site=$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])')
links=$(mktemp -d)
nccl_lib=$(ls "$site"/nvidia/nccl/lib/libnccl.so.2 2>/dev/null | head -1)
[[ -n "$nccl_lib" ]] && ln -sfn "$nccl_lib" "$links/libnccl.so"
export LD_LIBRARY_PATH="$site/torch/lib:$links${nccl_lib:+:$(dirname "$nccl_lib")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Binaries carried compressed (--build) are unpacked into a folder of their own (no cargo or xz
# there, but Python's lzma).
if compgen -G "$BIN/*.xz" >/dev/null; then
  unpacked=$(mktemp -d)
  "$PYTHON" - "$BIN" "$unpacked" <<'PY' || { echo "gpu-check: cannot unpack $BIN" >&2; exit 1; }
import glob, lzma, os, shutil, sys
for packed in glob.glob(f"{sys.argv[1]}/*.xz"):
    out = os.path.join(sys.argv[2], os.path.basename(packed)[:-3])
    with lzma.open(packed) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(out, 0o755)
PY
  BIN=$unpacked
fi

if [[ $DEVICE == cuda ]]; then
  PRESETS="albef-small albef-base"; BENCH_CASES="albef-base:64:20"; STEPS=50; NCCL_BACKEND=nccl
  BENCH_THREADS=0; DATASHEET_TFLOPS=${DATASHEET_TFLOPS:-989.4}   # H100/H200 SXM dense bf16
else
  PRESETS="albef-small"; BENCH_CASES="albef-small:4:2"; STEPS=6; NCCL_BACKEND=tcp
  BENCH_THREADS=$(nproc); DATASHEET_TFLOPS=
fi

declare -A status
check() {  # check NAME COMMAND...: runs it, logs to $OUT/NAME.log, records pass/fail
  local name=$1; shift
  local started=$SECONDS
  echo "gpu-check: $name" >&2
  if "$@" >"$OUT/$name.log" 2>&1; then status[$name]=pass; else status[$name]="fail (exit $?)"; fi
  echo "gpu-check: $name: ${status[$name]} in $((SECONDS - started)) s" >&2
}

# (1) NCCL in a world of one (on the CPU: the clear error where CUDA is missing). A cargo target
# directory as GPU_BIN has the test binary under deps/.
NCCL_TEST=$BIN/nccl-test
[[ -x $NCCL_TEST ]] || NCCL_TEST=$(ls -t "$BIN"/deps/nccl-* 2>/dev/null | grep -v '\.d$' | head -1)
if [[ $DEVICE == cuda ]]; then
  check nccl "$NCCL_TEST" --ignored --exact world_of_one_on_cuda --nocapture
else
  check nccl "$NCCL_TEST" --exact without_cuda_nccl_fails_with_a_clear_error
fi

# (2) The device forward against the CPU fp32 forward.
for preset in $PRESETS; do
  check "device-check-$preset" "$BIN/albef" device-check --preset "$preset" --device "$DEVICE" \
    --json "$OUT/device-check-$preset.json"
done

# (3) Jobs: 2 workers with TCP collectives, 1 worker with NCCL; each ends with a committed checkpoint.
job() {  # job NAME WORKERS BACKEND
  local dir="$OUT/job-$1"
  rm -rf "$dir"
  "$BIN/albef" run --config configs/small.yaml --workers "$2" --set "job.run_dir=$dir" \
    --set "train.device=$DEVICE" --set "job.collective_backend=$3" --set "train.max_steps=$STEPS" \
    --set job.checkpoint_every=0 --set train.log_every=10 || return 1
  [[ -f "$dir/checkpoints/step-$STEPS/manifest.json" ]] || { echo "no committed checkpoint $dir/checkpoints/step-$STEPS"; return 1; }
  # Progress lines count steps from 0: the last one trained is STEPS - 1.
  grep -Eq "^step +$((STEPS - 1))/$STEPS " "$dir/progress.log" || { echo "step $((STEPS - 1)) is not in the progress log"; return 1; }
}
check job-tcp-2 job tcp-2 2 tcp
check "job-$NCCL_BACKEND-1" job "$NCCL_BACKEND-1" 1 "$NCCL_BACKEND"

# (3b) Two ranks on the one GPU over the TCP ring: the gradient all-reduce overlapped with a CUDA
# backward (its hooks run on libtorch's device thread), with its timing.
check bench-world-2 "$BIN/albef" bench --preset albef-small --device "$DEVICE" --world 2 --batch 8 --steps 4 \
  --warmup 2 --set job.bucket_mb=1 --json "$OUT/bench-world-2.json"

# (4) + (5) The step against PyTorch, both modes; peak memory is in each report.
check bench env DEVICE="$DEVICE" CASES="$BENCH_CASES" ROUNDS=1 THREADS="$BENCH_THREADS" ALBEF="$BIN/albef" \
  PYTHON="$PYTHON" BENCH_OUT="$OUT/bench" DATASHEET_TFLOPS="$DATASHEET_TFLOPS" bash scripts/bench-step.sh

names=$(printf '%s\n' "${!status[@]}" | sort)
"$PYTHON" - "$OUT" "$DEVICE" $(for n in $names; do printf '%s=%s ' "$n" "${status[$n]// /_}"; done) <<'PY'
import glob, json, os, sys

out, device, results = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
summary = {"device": device, "checks": {k: v.replace("_", " ") for k, v in results.items()}}
for path in sorted(glob.glob(f"{out}/device-check-*.json")):
    r = json.load(open(path))
    summary[os.path.basename(path)[:-5]] = r["relative_l2_errors"] | {"tolerance": r["tolerance"]}
bench = {}
for path in sorted(glob.glob(f"{out}/bench/*.json")):
    if path.endswith(("summary.json", "config.json")):
        continue
    r = json.load(open(path))
    bench[r["implementation"]] = {k: r[k] for k in ("step_seconds", "images_per_second", "achieved_tflops", "mfu",
                                                    "peak_memory_bytes", "phases_seconds", "parameters")}
summary["bench"] = bench
if os.path.exists(f"{out}/bench/summary.json"):
    summary["bench_ratios"] = json.load(open(f"{out}/bench/summary.json"))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
lines = [f"gpu-check on {device}"] + [f"  {k:<24} {v}" for k, v in summary["checks"].items()]
for k, v in summary.items():
    if k.startswith("device-check"):
        lines.append(f"  {k}: " + ", ".join(f"{n} {e:.1e}" for n, e in v.items()))
for r in summary.get("bench_ratios", []):
    lines.append(f"  bench {r['preset']} b{r['batch']} {r['implementation']:<16} {r['p50_seconds'] * 1e3:8.1f} ms  "
                 f"torch/ours {r['torch_over_ours']:.2f}x  MFU {r['mfu'] * 100:.1f}%")
for impl, b in bench.items():
    m = b["peak_memory_bytes"]
    lines.append(f"  peak memory {impl:<16} " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in m.items() if v))
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
for n in $names; do [[ ${status[$n]} == pass ]] || exit 1; done
