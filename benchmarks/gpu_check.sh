#!/usr/bin/env bash
# The GPU check as one prepared command for an offline GPU machine (see docs/performance.md: GPU):
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
# Installs the wheels in .whl/ (soundfile, soxr, cffi, pycparser) into a target folder when
# present (torch and the rest stay as the machine has them), prints the versions, runs the
# check under a time limit and writes the JSON and the log to $OUT (default: benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xcodec-site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/xcodec-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    python3 -c 'import importlib.metadata as m, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "numpy", "soundfile", "soxr", "pyarrow", "safetensors", "huggingface_hub"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    timeout -k 10 "${GPU_CHECK_TIMEOUT:-540}" python3 benchmarks/gpu_check.py --results "$out" "$@"
    echo "gpu_check exit code: $?"
} 2>&1 | tee "$out/gpu_check.log"
