"""Every example command of the README and the docs runs as written on this machine (a
CPU alone is enough), each in a fresh process in a folder holding the files it names.

A training runs until its first epoch is in metrics.jsonl, then Ctrl-C stops it (what
a user sees of a run that works); a benchmark until its first row is printed, then
SIGTERM; predict.py, startup.py, tables.py and compare to their end. Together they take tens of
minutes on a 2-core CPU, so `pytest` runs them only with MLP_JAX_DOCS_COMMANDS=1
(.ci/run does); test_docs.py parses every one of them in every run.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import ROOT
from mlp_jax.data import datasets
from test_data import write_idx
from test_docs import runner_commands

pytestmark = pytest.mark.skipif(os.environ.get("MLP_JAX_DOCS_COMMANDS") != "1",
                                reason="MLP_JAX_DOCS_COMMANDS=1 runs the docs' commands")

# Commands for a cluster (another host, a shared folder, a scheduler's environment, a
# pair of processes started together): tests/test_parallel.py runs their kind.
CLUSTER = ("HOST0", "/shared/", "--distributed", "--coordinator_address")
SCRIPTS = ("train", "predict", "benchmark", "startup", "tables", "compare")


def _docs_commands():
  """[(script, path:line, args)] of the README's and the docs' commands."""
  return [(script, place, args) for script in SCRIPTS
          for place, args in runner_commands(script)
          if place.startswith(("README.md", "docs/"))
          and not any(c in " ".join(args) for c in CLUSTER)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A folder holding every file the commands name: datasets, tables, a finished run W
  and new inputs for it, two runs' metrics to compare, and experiments/ (the presets) as in a checkout."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top
  here = tmp_path_factory.mktemp("docs_commands")
  os.symlink(os.path.join(ROOT, "experiments"), here / "experiments")
  x_train, y_train, x_test, y_test = datasets.load_digits()
  for name in ("x.npz", "t.npz"):
    np.savez(here / name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  wine = sklearn_datasets.load_wine()
  table = np.column_stack([wine.data, wine.target])
  header = ",".join([*wine.feature_names, "class"])
  for name, rows in (("wine.csv", table), ("train.csv", table[::2]), ("test.csv", table[1::2])):
    np.savetxt(here / name, rows, delimiter=",", header=header, comments="", fmt="%g")
  np.savetxt(here / "TRAIN.csv", table, delimiter=",", fmt="%g",
             header=header.replace(",class", ",y"), comments="")
  iris = sklearn_datasets.load_iris()
  (here / "table.csv").write_text(",".join([*iris.feature_names, "species"]) + "\n" + "".join(
      ",".join([*map(str, row), iris.target_names[k]]) + "\n"
      for row, k in zip(iris.data, iris.target)))
  np.savez(here / "wine.npz", x_train=wine.data[::2], y_train=wine.target[::2],
           x_test=wine.data[1::2], y_test=wine.target[1::2])
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"),
                  "--epochs=2", "--noplots", "--noprogress", f"--workdir={here / 'W'}"],
                 check=True, capture_output=True, cwd=here)
  for run in ("plain", "augment", "dp", "dp_augment", "dp_augmult"):   # compare's examples
    os.makedirs(here / "runs" / run)
    shutil.copy(here / "W" / "metrics.jsonl", here / "runs" / run)
  os.makedirs(here / "docs" / "images")
  np.savez(here / "new.npz", x=x_test[:20])
  np.save(here / "labels.npy", y_test[:20])
  np.savetxt(here / "new.csv", x_test[:20], delimiter=",", comments="", fmt="%g",
             header=",".join(f"p{i}" for i in range(64)))
  for name, image in zip(("a.png", "b.png"), x_test[:2]):
    Image.fromarray((image.reshape(8, 8) * 255 / 16).astype(np.uint8), mode="L").save(here / name)
  write_idx(here / "t10k-images-idx3-ubyte.gz", x_test.reshape(-1, 8, 8))
  write_idx(here / "t10k-labels-idx1-ubyte.gz", y_test)
  return here


def _as_here(args, here, script):
  """The args with the docs' placeholders made files of `folder`, and every training's
  workdir a fresh one (a workdir the docs name may hold another run here)."""
  given = {"/data/x.npz": str(here / "x.npz"), "/data/t.npz": str(here / "t.npz"),
           "--data_dir=/data": f"--data_dir={datasets.FASHION_MNIST_DIR}"}
  out = []
  for arg in args:
    for old, new in given.items():
      arg = arg.replace(old, new)
    if arg.startswith("--workdir=") and script == "train":
      continue
    out.append(arg)
  return out


def _wait_for(proc, ready, timeout):
  """Waits until `ready()` or the process ends (polling at 0.2 s); True if ready."""
  deadline = timeout
  while proc.poll() is None and deadline > 0:
    if ready():
      return True
    try:
      proc.wait(timeout=0.2)
    except subprocess.TimeoutExpired:
      deadline -= 0.2
  return ready()


def _train(args, here):
  workdir = tempfile.mkdtemp(dir=here)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "train.py"),
                           *args, f"--workdir={workdir}"], cwd=here, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = os.path.join(workdir, "metrics.jsonl")
  started = _wait_for(proc, lambda: os.path.exists(metrics) and os.path.getsize(metrics),
                      timeout=900)
  if started and proc.poll() is None:
    proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert started, f"no epoch finished: {err[-2000:]}"
  assert proc.returncode in (0, 130), err[-2000:]
  return out


def _benchmark(args, here):
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "benchmark.py"),
                           *args], cwd=here, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  lines = []
  for line in proc.stdout:    # the header, the table's, a size's ceilings, a row
    lines.append(line)
    table = any(seen.startswith("---") for seen in lines[:-1])
    if table and not line.startswith(("---", "B=")):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode in (0, 128 + signal.SIGTERM), err[-2000:]
  return "".join(lines) + out


@pytest.mark.parametrize("script, place, args", _docs_commands(),
                         ids=[place for _, place, _ in _docs_commands()])
def test_every_docs_command_runs_as_written(script, place, args, folder):
  args = _as_here(args, folder, script)
  if script == "train":
    if "--help" not in args:
      _train(args, folder)
      return
  if script == "benchmark":
    _benchmark(args, folder)
    return
  command = ([sys.executable, "-m", "mlp_jax", script] if script == "compare" else
             [sys.executable, os.path.join(ROOT, "experiments", f"{script}.py")])
  result = subprocess.run([*command, *args], cwd=folder, capture_output=True, text=True,
                          timeout=1800)
  assert result.returncode == 0, f"{place}: {result.stderr[-2000:]}"
