"""End to end: the real entry point, experiments/train.py, run the way a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "experiments", "train.py")


def run(*flags, timeout=180):
  return subprocess.run([sys.executable, RUNNER, "--noprogress", *flags],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def tiny(dataset, workdir, *extra):
  return run(f"--dataset={dataset}", f"--workdir={workdir}", "--hidden_dim=8",
             "--batch_size=8", "--schedule=constant", "--learning_rate=0.01", *extra)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_workdir_contents_are_valid_and_loadable(tiny_npz, tmp_path):
  result = tiny(tiny_npz, tmp_path, "--epochs=3", "--validation_fraction=0.2")
  assert result.returncode == 0, result.stderr
  assert "accuracy" in result.stdout and f"workdir: {tmp_path}" in result.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["config"]["hidden_dim"] == 8 and config["versions"]["jax"]
  assert config["device"] and config["num_classes"] == 3
  rows = read_metrics(tmp_path)
  assert [row["epoch"] for row in rows] == [1, 2, 3]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
              "validation_loss", "validation_accuracy", "seconds", "examples_per_second"):
    assert all(np.isfinite(row[key]) for row in rows), key
  with np.load(tmp_path / "params.npz", allow_pickle=False) as params:
    assert {k: params[k].shape for k in params.files} == {
        "w1": (8, 6), "b1": (8,), "w2": (3, 8), "b2": (3,)}
  for picture in ("curves.png", "confusion.png"):
    assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
  assert os.listdir(tmp_path / "checkpoints")


def test_rerun_with_the_same_workdir_resumes(tiny_npz, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert tiny(tiny_npz, straight, "--epochs=4").returncode == 0
  assert tiny(tiny_npz, resumed, "--epochs=2").returncode == 0
  result = tiny(tiny_npz, resumed, "--epochs=4")
  assert result.returncode == 0, result.stderr
  assert "resuming from the checkpoint after epoch 2" in result.stdout
  assert [row["epoch"] for row in read_metrics(resumed)] == [1, 2, 3, 4]
  with np.load(straight / "params.npz") as a, np.load(resumed / "params.npz") as b:
    for k in a.files:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
  for row_a, row_b in zip(read_metrics(straight), read_metrics(resumed)):
    assert row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=0"], "--batch_size"),
    (["--learning_rate=-1"], "--learning_rate"),
    (["--dataset=cifar"], "--dataset must be one of"),
    (["--optimizer=rmsprop"], "--optimizer"),
    (["--dataset=mnist", "--data_dir=/nonexistent"], "does not exist"),
    (["--dataset=npz:/nonexistent.npz"], "not a readable .npz"),
    (["--batch_size=5000"], "exceeds the 1437 training examples"),
    (["--workdir=/dev/null"], "is a file, not a directory"),
    (["--num_devices=2"], "--num_devices: asked for 2 devices per process but this process "
                          "has 1"),
    (["--num_processes=2"], "a multi-process run needs --workdir"),
    (["--distributed", "--workdir=/nonexistent/run"], "jax.distributed could not start"),
    (["--num_processes=2", "--process_id=2"], "--process_id must be below --num_processes"),
    (["--coordinator_address=localhost"], "--coordinator_address must be host:port"),
])
def test_bad_flags_exit_non_zero_with_one_line(flags, message):
  result = run("--epochs=1", *flags)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines()
           if line.strip() and "libtpu" not in line]
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert "Traceback" not in result.stderr


def test_one_based_labels_give_one_line_and_leave_no_workdir(tmp_path):
  x = np.random.default_rng(0).normal(size=(12, 3))
  y = np.arange(12) % 3 + 1                                      # 1..3: class 0 is absent
  np.savez(tmp_path / "one_based.npz", x_train=x, y_train=y, x_test=x, y_test=y)
  temp = tmp_path / "tmp"
  temp.mkdir()
  result = subprocess.run([sys.executable, RUNNER, "--noprogress",
                           f"--dataset=npz:{tmp_path / 'one_based.npz'}"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "TMPDIR": str(temp)})
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if "libtpu" not in line]
  assert lines == ["error: the training labels run from 1 to 3, not from 0: class 0 would "
                   "be a phantom class; subtract 1 from y_train and y_test."]
  assert not os.listdir(temp)                    # no empty temporary workdir left behind


def test_workdir_of_another_network_is_refused(tiny_npz, tmp_path):
  assert tiny(tiny_npz, tmp_path, "--epochs=1").returncode == 0
  result = tiny(tiny_npz, tmp_path, "--epochs=2", "--hidden_dim=16")
  assert result.returncode != 0
  assert "holds a run with hidden_dim=8, not 16" in result.stderr


def test_default_command_reaches_98_percent_on_digits(tmp_path):
  result = run(f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert read_metrics(tmp_path)[-1]["test_accuracy"] >= 0.98


@pytest.mark.parametrize("preset", ["digits", "fashion_mnist"])
def test_every_preset_runs(preset, tmp_path):
  if preset == "fashion_mnist" and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("apt-get install dataset-fashion-mnist (.ci/run does)")
  flagfile = os.path.join(ROOT, "experiments", "configs", f"{preset}.flags")
  result = run(f"--flagfile={flagfile}", "--epochs=1", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert read_metrics(tmp_path)[-1]["test_accuracy"] > 0.5
