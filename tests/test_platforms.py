"""Where the code runs: every module imports without Unix-only modules (CI runs Linux alone, so this
stands in for Windows)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in [*ROOT.glob("*.py"), *(ROOT / "experiments").glob("*.py")])

# Imports each module with fcntl missing, as on Windows, and prints one line per module.
IMPORT_EACH = """
import importlib, sys
sys.modules["fcntl"] = None  # what Windows lacks; an import of it now raises ModuleNotFoundError
sys.path[:0] = [{root!r}, {experiments!r}]
for name in {modules!r}:
    try:
        importlib.import_module(name)
        print(name, "imports")
    except Exception as e:
        print(name, "fails:", type(e).__name__, e)
"""


def test_every_module_imports_without_fcntl():
    code = IMPORT_EACH.format(root=str(ROOT), experiments=str(ROOT / "experiments"), modules=MODULES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{name} imports" for name in MODULES]
