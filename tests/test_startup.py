"""Start-up: `mapsim --version` and the help pages import nothing heavy (counted modules,
not wall-clock time), and `import mapsim` loads neither torch nor pandas."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "pandas", "matplotlib", "seaborn", "scipy", "pydantic", "skimage")


def _loaded_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print('LOADED=' + __import__('json').dumps(sorted(m for m in {HEAVY!r} "
             "if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("LOADED=")]
    assert line, done.stdout + done.stderr
    return json.loads(line[-1][len("LOADED="):])


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"],
                                  ["plot", "--help"], ["train", "--help"]])
def test_help_and_version_import_nothing_heavy(args):
    code = ("from mapsim.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass")
    assert _loaded_after(code) == []


def test_import_mapsim_is_light_and_names_load_on_use():
    assert _loaded_after("import mapsim") == []
    assert "torch" in _loaded_after("import mapsim\nmapsim.MapMetric")
