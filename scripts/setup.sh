#!/usr/bin/env bash
# The two set-up commands of a fresh clone (`make demo`, `make test` call this):
#   bash scripts/setup.sh demo   venv + CPU torch + requirements, then encode, decode, codes and
#                                a spectrogram of the bundled sample into demo/
#   bash scripts/setup.sh test   venv + CPU torch + requirements + dev tools, then .ci/run's tests
# XCODEC_CHECKPOINT (+ XCODEC_CONFIG for a .pth) picks the demo's model; default: the release,
# else (offline) a 2-step smoke-run export of configs/tiny.yaml. VENV (default .venv), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"
case "$what" in demo | test) ;; *) echo "usage: bash scripts/setup.sh demo|test" >&2; exit 2 ;; esac

export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv" || { echo "error: cannot create the virtual environment $venv (install python3-venv)" >&2; exit 2; }
fi
py="$venv/bin/python"
pip_quiet() { "$py" -m pip install -q "$@" >/dev/null 2>"$venv/pip.log"; }

# A plain `pip install torch` resolves a multi-GB CUDA build: the CPU wheel, pinned. Where the
# configured indexes lack it, PyTorch's CPU index is tried once, briefly (no minutes of retries).
if ! "$py" -c "import torch" 2>/dev/null; then
    if ! pip_quiet --retries 1 --timeout 30 "torch==2.13.0"; then
        echo "torch==2.13.0 is not on the configured indexes: trying https://download.pytorch.org/whl/cpu once" >&2
        pip_quiet --retries 0 --timeout 20 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" ||
            { echo "error: cannot install torch==2.13.0 (CPU); see $venv/pip.log" >&2; exit 2; }
    fi
fi
reqs=(-r requirements.txt)
[ "$what" = test ] && reqs+=(-r requirements-dev.txt)
pip_quiet "${reqs[@]}" || { echo "error: cannot install ${reqs[*]}; see $venv/pip.log" >&2; exit 2; }

if [ "$what" = test ]; then
    PATH="$PWD/$venv/bin:$PATH" exec bash .ci/run  # CI's own install check and test command, in this venv
fi

# ---- demo: the bundled sample through the main job; every output under demo/ (git-ignored)
out=demo
mkdir -p "$out"
sample=tests/assets/speech_en.flac
ckpt=(--checkpoint "${XCODEC_CHECKPOINT:-xcodec_hubert_librispeech}")
[ -n "${XCODEC_CONFIG:-}" ] && ckpt+=(--config "$XCODEC_CONFIG")
if [ -z "${XCODEC_CHECKPOINT:-}" ] && ! "$py" -c "from models.pretrained import download_release as d; d('xcodec_hubert_librispeech')" 2>/dev/null; then
    echo "offline: no release download; using a 2-step smoke-run export of configs/tiny.yaml (random-quality audio; for a real model: XCODEC_CHECKPOINT=/path/model.pth XCODEC_CONFIG=/path/config.yaml make demo)" >&2
    export="$out/tiny_run/model_ckpts/export_00000002"
    [ -d "$export" ] || "$py" main_launch_vqdp.py --config configs/tiny.yaml "log_dir=$out/tiny_run" max_steps=2 num_plots=0 >"$out/train.log" 2>&1 ||
        { echo "error: the smoke run failed; see $out/train.log" >&2; exit 1; }
    ckpt=(--checkpoint "$export")
fi
"$py" inference.py "${ckpt[@]}" --input "$sample" --output "$out/speech_en.wav" --codes-out "$out/speech_en.npy" --overwrite
"$py" inference.py --codes-in "$out/speech_en.npy" "${ckpt[@]}" --output "$out/speech_en_from_codes.wav" --overwrite
"$py" - "$sample" "$out" <<'PY'
import sys

import numpy as np

from utils.audio import load_audio
from utils.plotting import save_figure, spectrogram_figure

sample, out = sys.argv[1], sys.argv[2]
codes = np.load(f"{out}/speech_en.npy")
panels = [("original", load_audio(sample, 16000)[0]), ("decoded", load_audio(f"{out}/speech_en.wav", 16000)[0])]
save_figure(spectrogram_figure(panels, 16000, title="speech_en.flac"), f"{out}/speech_en.png")
print(f"codes {codes.shape[0]} x {codes.shape[1]} ({codes.dtype}) in {out}/speech_en.npy; audio {out}/speech_en.wav, "
      f"{out}/speech_en_from_codes.wav; spectrograms {out}/speech_en.png")
PY
