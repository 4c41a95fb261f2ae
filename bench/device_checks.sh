#!/usr/bin/env bash
# The GPU checks of the engine, in one run (for a session that is lent an accelerator):
#   the engine bench on SD 1.5 (512 px, 20 steps) and SDXL (1024 px, 30 steps) in fp16, LoRA/LoCon/LoHa;
#   the diffusers/peft comparison at 512 px; the CUDA tests (diffusers' model and sequential
#   offload give the same image as without). Outputs land in $OUT (or ./device-results).
# Usage: bash bench/device_checks.sh   (needs torch with CUDA and the package installed)
set -uo pipefail
out="${OUT:-device-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pytest -q -p no:cacheprovider tests/test_engine_memory.py tests/test_engine.py 2>&1 | tee "$out/tests.log"
python bench/engine_bench.py --device cuda --model sd15 --size 512 --steps 20 --runs 3 --json "$out/engine_sd15.json" 2>&1 | tee "$out/engine_sd15.log"
python bench/engine_bench.py --device cuda --model sdxl --size 1024 --steps 30 --runs 3 --json "$out/engine_sdxl.json" 2>&1 | tee "$out/engine_sdxl.log"
python bench/diffusers_bench.py --device cuda --dtype float16 --size 512 --steps 20 --runs 3 --json "$out/diffusers.json" 2>&1 | tee "$out/diffusers.log"
