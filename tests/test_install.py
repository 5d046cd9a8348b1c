"""``pip install -e .`` in a fresh virtual environment, then the README's Python snippet and a
console script, run from another directory."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ASSETS, ROOT


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_editable_install_then_readme_snippet_from_another_directory(tmp_path, release_hub_cache):
    venv = tmp_path / "venv"
    # The new environment sees exactly this interpreter's packages (a .pth file naming its
    # site-packages), not the base interpreter's: `venv --system-site-packages` made from
    # inside a venv inherits the base python's (maybe an old setuptools and no torch). So the
    # install resolves every declared dependency without downloading anything, and this
    # environment's setuptools (requirements-dev.txt: >= 70.1, bdist_wheel built in) builds it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    outer = [
        p
        for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
        if os.path.isdir(p)
    ]
    (Path(purelib) / "outer_environment.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(release_hub_cache),
        HF_HOME=str(tmp_path / "home"),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", str(ROOT)],
                             capture_output=True, text=True, env=env)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tests" / "assets").mkdir(parents=True)  # the snippet reads the sample by its path in a clone
    shutil.copy(ASSETS / "speech_en.flac", elsewhere / "tests" / "assets" / "speech_en.flac")
    script = (
        _readme_snippet()
        + "\nimport models\nprint('MODELS', models.__file__)\nprint('CODES', tuple(codes.shape), tuple(audio.shape))\n"
    )
    run = subprocess.run([python, "-c", script], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"MODELS {ROOT / 'models' / '__init__.py'}" in run.stdout  # the editable install, not the cwd
    frames = (78480 // 320) + 1
    assert f"CODES (1, 8, {frames}) (1, 1, 78480)" in run.stdout, run.stdout

    help_text = subprocess.run(
        [venv / "bin" / "xcodec-inference", "--help"], cwd=elsewhere, capture_output=True, text=True, env=env
    )
    assert help_text.returncode == 0 and "--codes-out" in help_text.stdout
