"""The installed command, mlp-jax (mlp_jax/commands/cli.py): each subcommand runs its
script's main with the same flags, from any folder; the presets are package data."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mlp_jax.commands import cli
from mlp_jax.commands import train

MLP_JAX = [sys.executable, "-m", "mlp_jax"]   # what the mlp-jax entry point runs


def test_every_preset_is_package_data_and_experiments_configs_is_the_same_folder():
  assert train.preset_names() == ["digits", "digits_dp", "fashion_mnist", "fashion_mnist_dp"]
  assert os.path.samefile(os.path.join(ROOT, "experiments", "configs"), train.PRESETS)
  assert os.path.dirname(train.PRESETS) == os.path.dirname(cli.__file__).rsplit(os.sep, 1)[0]


def test_a_preset_is_its_flagfile_where_it_stands():
  argv = train.with_presets(["t", "--epochs=3", "--preset=digits", "--hidden_dim=8"])
  assert argv == ["t", "--epochs=3", f"--flagfile={train.PRESETS}/digits.flags",
                  "--hidden_dim=8"]


def _run(*args, cwd):
  return subprocess.run([*MLP_JAX, *args], capture_output=True, text=True, timeout=180,
                        cwd=cwd)


@pytest.mark.slow   # processes of their own
def test_mlp_jax_train_and_predict_run_outside_the_checkout(tmp_path):
  result = _run("train", "--preset=digits", "--epochs=1", "--hidden_dim=16", "--noplots",
                "--noprogress", "--workdir=run", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("workdir: run\n") and not result.stderr.strip()
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  np.savez(tmp_path / "x.npz", x=digits.data[:30])
  np.save(tmp_path / "y.npy", digits.target[:30])
  result = _run("predict", "--workdir=run", "--input=x.npz", "--labels=y.npy", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1].startswith("accuracy ") and "on 30 examples" in \
      result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, status, says", [
    ((), 2, "error: no command: give one of train, predict, benchmark, gradcheck"),
    (("fit",), 2, "error: 'fit' is not a command: give one of train, predict"),
    (("--help",), 0, "mlp-jax train --preset=digits"),
    (("train", "--preset=nope"), 2, "error: --preset='nope' is not a preset; the presets "
                                    "are digits, digits_dp, fashion_mnist, fashion_mnist_dp."),
    (("train", "--preset", "digits"), 2, "error: --preset goes on the command line as "
                                         "--preset=NAME"),
    (("train", "--helpshort"), 0, "--hidden_dim: H, hidden units."),
    (("predict", "--help"), 0, "--labels: The labels of --input"),
    (("benchmark", "--helpshort"), 0, "--batch_sizes"),
    (("gradcheck", "--helpshort"), 0, "--grads"),
    (("gradcheck", "--no_such_flag"), 2, "error: Unknown command line flag 'no_such_flag'"),
])
def test_the_command_line_of_mlp_jax(args, status, says, tmp_path):
  result = _run(*args, cwd=tmp_path)
  assert result.returncode == status, result.stderr
  assert says in result.stdout + result.stderr
  if status:
    assert len(result.stderr.splitlines()) == 1, result.stderr
