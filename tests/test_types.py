"""The package type-checks with mypy (its settings are in pyproject.toml): every function
of mlp_jax is annotated (disallow_untyped_defs) and must stay so."""

import subprocess
import sys

from conftest import ROOT


def test_mypy_passes_on_the_package():
  result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "Success: no issues found" in result.stdout
