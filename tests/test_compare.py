"""mlp-jax compare: one metric of several runs against their epochs, on one axes, from
the runs' own metrics.jsonl; every fault of its inputs is one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mlp_jax.base import boundary
from mlp_jax.commands import compare
from mlp_jax.run import plots
from mlp_jax.run import workdir as workdir_lib


def rows(accuracies):
  """metrics.jsonl rows of one model's epochs 1.. with these test accuracies."""
  return [{"epoch": e, "test_accuracy": a, "train_loss": 1.0}
          for e, a in enumerate(accuracies, 1)]


def stack_rows(accuracies):
  """The rows a run of two models writes: each model's values, and their mean."""
  return [{"epoch": e, "test_accuracy_mean": a, "train_loss_mean": 1.0,
           "per_model": {"test_accuracy": [a - 0.05, a + 0.05], "train_loss": [1.0, 1.0]}}
          for e, a in enumerate(accuracies, 1)]


@pytest.fixture
def two_runs(tmp_path):
  """Two workdirs: one model's 3 epochs, and a stack's 2 (mean and std)."""
  for name, history in (("plain", rows([0.5, 0.6, 0.7])), ("augment", stack_rows([0.4, 0.8]))):
    os.makedirs(tmp_path / name)
    workdir_lib.write_history(str(tmp_path / name), history)
  return [str(tmp_path / "plain"), str(tmp_path / "augment")]


def test_each_run_is_one_curve_of_its_metric_with_a_band_for_several_models(two_runs):
  figure = plots.comparison_figure(compare.histories(two_runs, ["a", "b"], "test_accuracy"))
  (axes,) = figure.axes
  assert [line.get_label() for line in axes.lines] == ["a", "b"]
  np.testing.assert_allclose(axes.lines[0].get_ydata(), [0.5, 0.6, 0.7])
  np.testing.assert_allclose(axes.lines[1].get_ydata(), [0.4, 0.8])   # the models' mean
  assert [list(line.get_xdata()) for line in axes.lines] == [[1, 2, 3], [1, 2]]
  (band,) = axes.collections                  # the std band of the stack alone
  np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].min(), 0.35)
  assert axes.get_ylabel() == "test accuracy"


def test_every_bad_input_is_one_line(two_runs, tmp_path):
  faults = {
      "no metrics": lambda: compare.histories([str(tmp_path)], ["x"], "test_accuracy"),
      "no such metric": lambda: compare.histories(two_runs, ["a", "b"], "validation_loss"),
      "rows no run writes": lambda: compare.histories([str(odd)], ["x"], "test_accuracy"),
      "too few labels": lambda: compare.legend_names(two_runs, ["a"]),
      "labels not distinct": lambda: compare.legend_names(two_runs, ["a", "a"]),
      "workdirs of one name": lambda: compare.legend_names(["x/run", "y/run"], None),
  }
  odd = tmp_path / "odd"
  os.makedirs(odd)
  (odd / "metrics.jsonl").write_text('{"epoch": 1, "per_model": {"test_accuracy": "x"}}\n')
  said = {}
  for fault, call in faults.items():
    with pytest.raises(boundary.UserError) as e:
      call()
    said[fault] = str(e.value)
  assert said["no metrics"].startswith(f"no metrics.jsonl in {tmp_path}")
  assert said["no such metric"].endswith("recorded no validation_loss (its metrics.jsonl "
                                         "has others); pick another --metric.")
  assert said["rows no run writes"].startswith(f"{odd / 'metrics.jsonl'} holds rows that "
                                               "mlp-jax train does not write (")
  assert all("give --labels, one distinct name per workdir." in said[f]
             for f in ("too few labels", "labels not distinct", "workdirs of one name"))
  assert compare.legend_names(two_runs, None) == ["plain", "augment"]


def test_the_command_writes_the_png_and_refuses_in_one_line(two_runs, tmp_path):
  command = [sys.executable, "-m", "mlp_jax", "compare", f"--workdirs={','.join(two_runs)}"]
  out = tmp_path / "compare.png"
  done = subprocess.run([*command, f"--output={out}"], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout == f"wrote {out}: test_accuracy of 2 runs\n"
  assert out.read_bytes().startswith(b"\x89PNG")
  refused = subprocess.run([*command, "--labels=a", f"--output={out}"], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
  assert refused.returncode == 1
  assert refused.stderr == ("error: 1 names (1 distinct) for 2 --workdirs: give --labels, "
                            "one distinct name per workdir.\n")
