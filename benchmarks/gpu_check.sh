#!/usr/bin/env bash
# The GPU check of issue 21: one H100/H200, at most 8 minutes, from the repository root.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # HERE (CPU, registry access): fill .whl/
#   bash benchmarks/gpu_check.sh                  # THERE (GPU): install, test, measure
#   bash benchmarks/gpu_check.sh --dry-run        # anywhere: every step on CPU, tiny shapes
#
# On the GPU it
#   1. installs torchao and torchtune (and what they need that the GPU image lacks) from the
#      wheels in .whl/ into /tmp/site, with no network (the image's own torch is used);
#   2. runs the CUDA tests (pytest -k cuda);
#   3. runs train_throughput --device cuda, QA-LoRA vs LoRA and QLoRA in bf16, on
#      Llama-2-7B (32 layers) and on Llama-3.2-1B's widths (16 layers);
#   4. runs decode --device cuda (Llama-2-7B sizes), with the fraction of the bandwidth;
#   5. writes docs/results/{train,train_1b,decode}_cuda.{json,md}, each step's log as
#      <step>.log, and gpu_check_cuda.{json,md}: each step's status, seconds and targets.
# Every step has its own time limit (the sum stays under 480 s); a step that fails or runs
# out of time is recorded and the next one runs.
#
# --dry-run runs the same commands on CPU with tiny shapes, one repeat and the output in a
# temporary directory (or --out DIR), so that a typo costs no device time; the install
# step only lists the wheels it would install. tests/benchmarks/test_gpu_check.py runs it.
#
# Carry: `echo /.whl/ >> .git/info/exclude`, `bash benchmarks/gpu_check.sh --fetch-wheels`,
# then name `.whl` in the device call's carry; the command is `bash benchmarks/gpu_check.sh`.
set -uo pipefail

MODE=gpu
OUT=""
WHEELS=.whl
SITE=/tmp/site
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry ;;
        --fetch-wheels) MODE=fetch ;;
        --out) OUT="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (use --dry-run, --fetch-wheels, --out DIR, --wheels DIR)" >&2; exit 2 ;;
    esac
    shift
done

if [ ! -f benchmarks/gpu_check.sh ] || [ ! -d qalora_tune ]; then
    echo "gpu_check: run it from the repository root (bash benchmarks/gpu_check.sh)" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}

# Wheels the GPU image lacks (it has torch, numpy, safetensors, sentencepiece, tiktoken,
# huggingface-hub, tqdm, psutil, pillow, pyyaml, filelock, fsspec, requests, ...):
# torchtune 0.6.1's and torchao 0.15.0's other needs, pinned to what this project's
# CPU environment runs.
PINNED_WHEELS=(
    torchao==0.15.0 torchtune==0.6.1 torchdata==0.11.0 datasets==5.2.0 dill==0.4.1
    multiprocess==0.70.19 kagglehub==1.0.3 blobfile==3.3.0 pycryptodomex==3.24.2
    omegaconf==2.4.0
)

if [ "$MODE" = fetch ]; then
    mkdir -p "$WHEELS"
    for wheel in "${PINNED_WHEELS[@]}"; do
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$wheel" || exit 1
    done
    du -sh "$WHEELS"
    exit 0
fi

if [ "$MODE" = dry ]; then
    DEVICE=cpu
    OUT=${OUT:-$(mktemp -d)}
    SHAPE_7B=(--shape tiny); SHAPE_1B=(--shape tiny); DECODE_SHAPE=(--shape tiny --new-tokens 2)
    TRAIN_ARGS=(--warmup 0 --repeats 1 --no-memory)
    DECODE_ARGS=(--repeats 1 --no-compile --compile-backend aot_eager)
    PYTEST_ARGS=(--collect-only -q)
    SCALE=${GPU_CHECK_DRY_SCALE:-6}  # a shared CPU is slower than the GPU machine: wider limits
else
    DEVICE=cuda
    OUT=${OUT:-docs/results}
    SHAPE_7B=(--shape llama2_7b_layers); SHAPE_1B=(--shape llama3_2_1b_layers)
    DECODE_SHAPE=(--shape llama2_7b_layers)
    TRAIN_ARGS=(--repeats 3)
    DECODE_ARGS=()
    PYTEST_ARGS=(-q -x --timeout 60)
    SCALE=1
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=()   # "name status seconds limit"
START=$SECONDS

# run NAME LIMIT COMMAND...: one step with its own time limit, its log in $OUT/NAME.log
run() {
    local name=$1 limit=$(($2 * SCALE)) begin=$SECONDS status
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after 10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    status=$?
    [ $status -eq 124 ] || [ $status -eq 137 ] && status="timeout"
    [ "$status" = 0 ] && status="ok"
    [ "$status" = ok ] || [ "$status" = timeout ] || status="failed($status)"
    STEPS+=("$name $status $((SECONDS - begin)) $limit")
    echo "== $name: $status in $((SECONDS - begin))s"
}

# 1. install
if [ "$MODE" = dry ]; then
    run install 30 bash -c "ls $WHEELS/*.whl 2>/dev/null || echo 'no wheels in $WHEELS (fetch them with --fetch-wheels)'; \
        $PYTHON -c 'import torch, torchao, torchtune, qalora_tune'"
else
    run install 30 bash -c "$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target $SITE $WHEELS/*.whl"
    export PYTHONPATH="$PYTHONPATH:$SITE"
    run environment 20 "$PYTHON" -c "import torch, torchao, torchtune, qalora_tune; \
assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torchao.__version__, torchtune.__version__, torch.cuda.get_device_name())"
fi

# 2. the CUDA tests
run tests_cuda 70 "$PYTHON" -m pytest tests -k cuda -p no:cacheprovider "${PYTEST_ARGS[@]}"

# 3. training throughput, bf16 (on CUDA only the bf16 methods run)
TRAIN=("$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" --no-breakdown
       --methods qalora_bf16 lora_bf16 qlora_bf16 "${TRAIN_ARGS[@]}")
run train_cuda 100 "${TRAIN[@]}" "${SHAPE_7B[@]}" --json "$OUT/train_cuda.json" --markdown "$OUT/train_cuda.md"
run train_1b_cuda 60 "${TRAIN[@]}" "${SHAPE_1B[@]}" --json "$OUT/train_1b_cuda.json" --markdown "$OUT/train_1b_cuda.md"

# 4. decode
run decode_cuda 190 "$PYTHON" benchmarks/decode.py --device "$DEVICE" "${DECODE_SHAPE[@]}" "${DECODE_ARGS[@]}" \
    --json "$OUT/decode_cuda.json" --markdown "$OUT/decode_cuda.md"

# 5. summary
printf '%s\n' "${STEPS[@]}" > "$OUT/.steps"
"$PYTHON" - "$OUT" "$MODE" "$((SECONDS - START))" <<'EOF'
import json, sys
from pathlib import Path

out, mode, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
steps = []
for line in (out / ".steps").read_text().split("\n"):
    if line.strip():
        name, status, used, limit = line.split()
        steps.append(dict(step=name, status=status, seconds=int(used), limit_s=int(limit)))
(out / ".steps").unlink()


def ratios(name, method, against):
    path = out / f"{name}.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text()).get("results", {})
    if method not in results or against not in results:
        return None
    return results[method]["tokens_per_s"] / results[against]["tokens_per_s"]


checks = []
for name in ("train_cuda", "train_1b_cuda"):
    for against, target in (("qlora_bf16", 1.5), ("lora_bf16", 0.95)):
        value = ratios(name, "qalora_bf16", against)
        checks.append(dict(check=f"{name}: qalora_bf16 / {against}", target=target, measured=value))
decode = out / "decode_cuda.json"
if decode.is_file():
    for key, value in sorted(json.loads(decode.read_text())["targets"].items()):
        checks.append(dict(check=f"decode_cuda: {key}", target=value["target"], measured=value["measured_best"]))
for check in checks:
    m, t = check["measured"], check["target"]
    check["met"] = None if m is None or t is None else bool(m >= t)
summary = dict(mode=mode, seconds=seconds, limit_s=480, steps=steps, checks=checks)
if mode == "dry":
    summary["note"] = "dry run: CPU, tiny shapes, one repeat; the numbers test the plumbing only"

(out / "gpu_check_cuda.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"# GPU check ({mode}): {seconds} s of 480", "", *([summary["note"], ""] if "note" in summary else []), "| step | status | seconds | limit |", "|---|---|---:|---:|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in steps]
lines += ["", "| check | target | measured | met |", "|---|---:|---:|---|"]
for c in checks:
    measured = "-" if c["measured"] is None else f"{c['measured']:.2f}"
    met = "-" if c["met"] is None else ("yes" if c["met"] else "NO")
    lines.append(f"| {c['check']} | {c['target']} | {measured} | {met} |")
(out / "gpu_check_cuda.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu_check: results in $OUT"
for step in "${STEPS[@]}"; do
    case "$step" in *" ok "*) ;; *) exit 1 ;; esac
done
