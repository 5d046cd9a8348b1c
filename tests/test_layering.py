"""The layering of the repository, checked from its own imports (tests/layering.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from layering import ALIASES, MAX_LINES, check


def test_repository_layers_have_no_upward_import_circle_or_long_file():
    problems, summary = check()
    assert problems == []
    assert summary["files"] > 40 and summary["imports"] > 80  # the whole tree was read
    assert summary["largest"][1] <= MAX_LINES


@pytest.mark.slow
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
    _write(tmp_path, "models/up.py", "import data.d\n")  # upward
    _write(tmp_path, "data/d.py", "x = 1\n" * (MAX_LINES + 1))
    problems, _ = check(tmp_path)
    text = "\n".join(problems)
    assert "utils.a (line 1) imports models.m: utils imports nothing of the project but utils" in text
    assert "models.up (line 1) imports data.d: upward" in text
    assert "quantization.q (line 1) imports modules.x: sideways" in text
    assert "import circle: modules.x -> modules.y" in text
    assert "modules/y.py:2: imports modules.x inside a function" in text
    assert "models/m.py:5: imports yaml inside a function" in text
    assert "matplotlib" not in text  # an optional heavy dependency may be imported late
    assert f"data/d.py: {MAX_LINES + 1} lines" in text
    assert len(problems) == 7, problems


def test_utils_imports_only_utils_but_for_the_two_command_line_aliases(tmp_path):
    """utils/ is the leaf: any import of the project outside utils is refused, even from a layer that
    LAYERS would allow; the old ``python -m utils.codes`` / ``utils.tokens`` may import their new module only."""
    assert ALIASES == {"utils.codes": "corpus.codes", "utils.tokens": "corpus.tokens"}
    _write(tmp_path, "utils/files.py", "x = 1\n")
    _write(tmp_path, "utils/audio.py", "from utils.files import x\nfrom .files import x as y\n")  # utils from utils
    _write(tmp_path, "utils/codes.py", "from corpus.codes import main\n")  # an alias: allowed
    _write(tmp_path, "utils/tokens.py", "from corpus.tokens import main\nfrom corpus.shards import s\n")
    _write(tmp_path, "utils/inputs.py", "from corpus.codes import main\n")  # not an alias
    _write(tmp_path, "corpus/__init__.py", "")
    _write(tmp_path, "corpus/codes.py", "from utils.files import x\n\n\ndef main():\n    return 0\n")
    _write(tmp_path, "corpus/tokens.py", "from corpus.codes import main\n")
    _write(tmp_path, "corpus/shards.py", "s = 1\n")
    problems, _ = check(tmp_path)
    assert sorted(problems) == [
        "utils.inputs (line 1) imports corpus.codes: utils imports nothing of the project but utils",
        "utils.tokens (line 2) imports corpus.shards: utils imports nothing of the project but utils",
    ], problems
