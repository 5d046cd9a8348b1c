"""The layering of the repository, checked from its own imports (tests/layering.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from layering import MAX_LINES, check


def test_repository_layers_have_no_upward_import_circle_or_long_file():
    problems, summary = check()
    assert problems == []
    assert summary["files"] > 40 and summary["imports"] > 80  # the whole tree was read
    assert summary["largest"][1] <= MAX_LINES


def test_the_command_line_check_passes():
    proc = subprocess.run([sys.executable, "-m", "tests.layering"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("0 problem(s)")


def _write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_each_kind_of_violation_is_found(tmp_path):
    """A small tree with one violation of each rule: every one is reported, nothing else."""
    _write(tmp_path, "utils/__init__.py", "")
    _write(tmp_path, "utils/a.py", "from models.m import X\n")  # upward
    _write(tmp_path, "modules/__init__.py", "")
    _write(tmp_path, "modules/x.py", "from .y import f\n")
    _write(tmp_path, "modules/y.py", "def f():\n    from .x import g  # a circle hidden in a function\n")
    _write(tmp_path, "quantization/__init__.py", "")
    _write(tmp_path, "quantization/q.py", "import modules.x\n")  # sideways
    _write(tmp_path, "models/__init__.py", "")
    _write(tmp_path, "models/m.py", "import numpy\n\n\ndef h():\n    import yaml\n    from matplotlib.figure import Figure\n")
    _write(tmp_path, "data/d.py", "x = 1\n" * (MAX_LINES + 1))
    problems, _ = check(tmp_path)
    text = "\n".join(problems)
    assert "utils.a (line 1) imports models.m: upward" in text
    assert "quantization.q (line 1) imports modules.x: sideways" in text
    assert "import circle: modules.x -> modules.y" in text
    assert "modules/y.py:2: imports modules.x inside a function" in text
    assert "models/m.py:5: imports yaml inside a function" in text
    assert "matplotlib" not in text  # an optional heavy dependency may be imported late
    assert f"data/d.py: {MAX_LINES + 1} lines" in text
    assert len(problems) == 6, problems
