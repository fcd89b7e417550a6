"""The package type-checks with mypy (its settings are in pyproject.toml): every function
of mlp_jax is annotated (disallow_untyped_defs) and must stay so; and a user's code that
misuses the API is told so by mypy, through the py.typed marker."""

import os
import re
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # mypy runs in a process of its own


def _mypy(*args, python=sys.executable, cwd=ROOT):
  return subprocess.run([python, "-m", "mypy", *args], cwd=cwd,
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
      "mj.TrainedModel.predict(mj.load('runs/digits'), X, 1)\n"           # line 7
      "from mlp_jax.training.config import RunConfig\n"
      "config = RunConfig(hidden_dim='256', dataset='digits')\n"           # line 9
      "rate: str = config.learning_rate\n")                                # line 10
  result = _mypy("--ignore-missing-imports", str(user))
  errors = [line for line in result.stdout.splitlines() if ": error:" in line]
  assert [line.split(":")[1] for line in errors] == ["3", "5", "7", "9", "10"], result.stdout
  assert 'Argument 2 to "init_params" has incompatible type "str"; expected "int"' in errors[0]
  assert 'expression has type "Array", variable has type "str"' in errors[1]
  assert 'Too many arguments for "predict"' in errors[2]
  # The configuration is typed (a frozen dataclass), not Any: each field has its type.
  assert ('Argument "hidden_dim" to "RunConfig" has incompatible type "str"; expected '
          '"int"') in errors[3]
  assert 'expression has type "float", variable has type "str"' in errors[4]


def test_mypy_finds_the_package_outside_the_checkout_after_the_readme_install(tmp_path):
  """The README's `pip install -e .`, into a fresh virtual environment (this
  environment's packages visible, the dependencies not installed again: --no-deps),
  then mypy on a user's file in a folder of its own: it finds mlp_jax and its types
  (py.typed) through the plain path line the install wrote. Works from a system Python
  and from inside a venv alike: this environment's own site-packages are named to the
  new one (a line of a .pth file), where --system-site-packages would name the base
  interpreter's."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    install = re.search(r"^ *pip install (-e \.) ", f.read(), re.MULTILINE)
  assert install, "the README's install command"
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                 timeout=120)
  python = str(venv / "bin" / "python")
  inner = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                          "['purelib'])"], capture_output=True, text=True, check=True)
  ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  with open(os.path.join(inner.stdout.strip(), "this_environment.pth"), "w",
            encoding="utf-8") as f:
    f.write("".join(f"{path}\n" for path in sorted(ours)))  # pip, mypy, jax: this pip
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *install.group(1).split()],
                 cwd=ROOT, check=True, timeout=300, capture_output=True)
  (pth,) = venv.glob("lib/python*/site-packages/__editable__.mlp_jax*.pth")
  assert pth.read_text().strip() == ROOT
  user = tmp_path / "elsewhere" / "user.py"
  user.parent.mkdir()
  user.write_text("import jax\nimport mlp_jax as mj\n"
                  "params = mj.init_params(jax.random.key(0), 64, 32, 10)\n"
                  "n: int = mj.logits(params, jax.numpy.zeros((4, 64)))\n")  # line 4
  # A cache of its own kept between runs (JAX's modules analysed once; the checkout's,
  # shared, would be rewritten for this interpreter's paths): it holds only modules mypy
  # found, and mlp_jax is found, or not, through the .pth first.
  result = _mypy("--ignore-missing-imports", f"--cache-dir={ROOT}/.mypy_cache_venv",
                 str(user), python=python, cwd=user.parent)
  errors = [line for line in result.stdout.splitlines() if ": error:" in line]
  assert len(errors) == 1 and ":4:" in errors[0], result.stdout + result.stderr
  assert 'expression has type "Array", variable has type "int"' in errors[0]
