#!/usr/bin/env bash
# The GPU checks of the MoE layer, in one run for a lent GPU (at most about 9.5 minutes):
# the CUDA tests (grouped vs loop within the CPU tolerances, no host sync in grouped training
# steps, fused attention under compile), then the MoE benchmark at width 768 (8 and 32 experts,
# both dispatch paths) and at the real moe_main shape (compile off, and on for grouped). Figures
# and logs go to $OUT (default: gpu_check_out/). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# The machine's own python3 must hold torch with CUDA; packages it lacks (hydra-core, omegaconf,
# datasets, ...) are installed from wheels in .wheels/ when that folder exists, made here with
#     pip download -d .wheels hydra-core omegaconf antlr4-python3-runtime==4.9.3 datasets
# (and carried along). The package itself is imported from the checkout (PYTHONPATH).
set -uo pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
"$python" -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/device.txt"
if [ -d .wheels ]; then
    "$python" -m pip install -q --no-index --find-links .wheels hydra-core omegaconf datasets \
        >"$out/pip.txt" 2>&1 || echo "pip install from .wheels failed: see pip.txt"
fi

# Each stage has its own limit (about 9.5 minutes in all), so a slow one cannot take the others
# with it; what finished is in $out either way.
timeout 180 "$python" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$out/cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 "$python" benchmarks/bench_moe.py --device cuda --bf16 --batch 8 --compile off \
    >"$out/bench_moe.txt" 2>"$out/bench_moe.err" || status=1
timeout 120 "$python" benchmarks/bench_moe.py --device cuda --real-shape --compile off \
    >"$out/bench_real.txt" 2>"$out/bench_real.err" || status=1
timeout 150 "$python" benchmarks/bench_moe.py --device cuda --real-shape --compile on \
    --dispatch grouped >"$out/bench_real_compiled.txt" 2>"$out/bench_real_compiled.err" || status=1
tail -n 30 "$out/bench_moe.txt" "$out/bench_real.txt" "$out/bench_real_compiled.txt"
exit $status
