"""The package type-checks with mypy (its settings are in pyproject.toml): every function
of mlp_jax is annotated (disallow_untyped_defs) and must stay so; and a user's code that
misuses the API is told so by mypy, through the py.typed marker."""

import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # mypy runs in a process of its own


def _mypy(*args):
  return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)


def test_mypy_passes_on_the_package():
  result = _mypy()
  assert result.returncode == 0, result.stdout + result.stderr
  assert "Success: no issues found" in result.stdout


def test_mypy_finds_the_mistakes_in_a_users_code(tmp_path):
  user = tmp_path / "user.py"
  user.write_text(
      "import jax\n"
      "import mlp_jax as mj\n"
      "params = mj.init_params(jax.random.key(0), '64', 32, 10)\n"         # line 3
      "X = jax.numpy.zeros((4, 64))\n"
      "name: str = mj.logits(params, X)\n"                                 # line 5
      "g: mj.Params = mj.grads(params, X, jax.numpy.zeros((4,), int))\n"   # fine
      "mj.TrainedModel.predict(mj.load('runs/digits'), X, 1)\n")           # line 7
  result = _mypy("--ignore-missing-imports", str(user))
  errors = [line for line in result.stdout.splitlines() if ": error:" in line]
  assert [line.split(":")[1] for line in errors] == ["3", "5", "7"], result.stdout
  assert 'Argument 2 to "init_params" has incompatible type "str"; expected "int"' in errors[0]
  assert 'expression has type "Array", variable has type "str"' in errors[1]
  assert 'Too many arguments for "predict"' in errors[2]
