"""Crash-safe, exactly resumable training, and hostile input that cannot hurt it."""

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlp_jax import checkpoint
from mlp_jax import data
from mlp_jax import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "experiments", "train.py")
TIME_FIELDS = ("seconds", "examples_per_second")


def command(dataset, workdir, *extra):
  return [sys.executable, RUNNER, "--noprogress", f"--dataset={dataset}",
          f"--workdir={workdir}", "--hidden_dim=16", "--batch_size=8", *extra]


def run(*args):
  return subprocess.run(command(*args), capture_output=True, text=True, timeout=300)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def without_times(rows):
  return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


def assert_same_params(dir_a, dir_b):
  with np.load(os.path.join(dir_b, "params.npz")) as b:
    assert_same_params_as(dir_a, b)


def assert_same_params_as(workdir, params):
  with np.load(os.path.join(workdir, "params.npz")) as a:
    for k in ("w1", "b1", "w2", "b2"):
      np.testing.assert_array_equal(a[k], params[k])


def wait_for_epochs(workdir, process, count, timeout=120):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= count:
          return
    time.sleep(0.02)
  raise AssertionError(f"the run did not reach epoch {count}")


def test_sigkill_then_rerun_ends_bit_identical(tiny_npz, tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  flags = ("--epochs=25", "--schedule=cosine")
  assert run(tiny_npz, straight, *flags).returncode == 0
  process = subprocess.Popen(command(tiny_npz, killed, *flags), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  wait_for_epochs(killed, process, random.Random(0).randint(3, 12))
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert len(metrics(killed)) < 25
  result = run(tiny_npz, killed, *flags)
  assert result.returncode == 0, result.stderr
  assert "resuming from the checkpoint after epoch" in result.stdout
  assert_same_params(straight, killed)
  assert [row["epoch"] for row in metrics(killed)] == list(range(1, 26))
  assert without_times(metrics(killed)) == without_times(metrics(straight))


def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tiny_npz, tmp_path):
  process = subprocess.Popen(command(tiny_npz, tmp_path, "--epochs=2000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_epochs(tmp_path, process, 3)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 130, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("stopped: Ctrl-C after epoch ") and last.count("stopped") == 1
  assert "params.npz and plots are saved" in last and "rerun the same command" in last
  done = int(last.split("after epoch ")[1].split(";")[0])
  assert done >= 3 and len(metrics(tmp_path)) == done
  # The results of the last finished epoch are there: the params of its checkpoint.
  for picture in ("curves.png", "confusion.png"):
    assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
  with np.load(tmp_path / "params.npz") as interrupted:
    interrupted = dict(interrupted)
  lines = []
  experiment.run(experiment.RunConfig(dataset=tiny_npz, workdir=str(tmp_path),
                                      hidden_dim=16, batch_size=8, epochs=done,
                                      progress=False), log=lines.append)
  assert f"resuming from the checkpoint after epoch {done}" in lines
  assert_same_params_as(tmp_path, interrupted)
  result = run(tiny_npz, tmp_path, f"--epochs={done + 2}")
  assert result.returncode == 0, result.stderr
  assert f"resuming from the checkpoint after epoch {done}" in result.stdout
  assert [row["epoch"] for row in metrics(tmp_path)] == list(range(1, done + 3))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tiny_npz, tmp_path):
  straight, damaged = tmp_path / "straight", tmp_path / "damaged"
  # A constant schedule: a run of 3 epochs then 4 follows the 4-epoch run's path.
  assert run(tiny_npz, straight, "--epochs=4", "--schedule=constant").returncode == 0
  assert run(tiny_npz, damaged, "--epochs=3", "--schedule=constant").returncode == 0
  files = [os.path.join(d, f) for d, _, fs in os.walk(damaged / "checkpoints" / "3")
           for f in fs]
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  result = run(tiny_npz, damaged, "--epochs=4", "--schedule=constant")
  assert result.returncode == 0, result.stderr
  assert "checkpoint after epoch 3 is corrupt or unreadable" in result.stdout
  assert "resuming from the checkpoint after epoch 2" in result.stdout
  assert [row["epoch"] for row in metrics(damaged)] == [1, 2, 3, 4]
  assert_same_params(straight, damaged)


def test_checksum_catches_silent_corruption(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.array(3, jnp.int32)}
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 1, state)
  checkpoint.save(mngr, 2, jax.tree.map(lambda a: a + 1, state))
  mngr.wait_until_finished()
  (checksum_file,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "2")
                      for f in fs if os.path.basename(d) == "checksum" and f == "metadata"]
  with open(checksum_file, "w") as f:
    json.dump({"sha256": "0" * 64}, f)
  lines = []
  epoch, restored = checkpoint.restore_latest(mngr, state, lines.append)
  assert epoch == 1 and "checksum does not match" in lines[0]
  np.testing.assert_array_equal(restored["w"], state["w"])
  mngr.close()


def test_divergence_stops_with_a_clear_message(tiny_npz, tmp_path):
  result = run(tiny_npz, tmp_path, "--epochs=30", "--optimizer=sgd", "--learning_rate=1e6",
               "--schedule=constant", "--weight_decay=0")
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert "training diverged in epoch" in last and "learning rate 1e+06" in last
  kept = int(last.split("The checkpoint after epoch ")[1].split()[0])
  assert kept == len(metrics(tmp_path)) and kept < 30
  assert all(np.isfinite(row["train_loss"]) for row in metrics(tmp_path))


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_npz, tmp_path):
  runs = {name: tmp_path / name for name in ("a", "b", "c")}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    assert run(tiny_npz, runs[name], "--epochs=3", f"--seed={seed}").returncode == 0
  assert without_times(metrics(runs["a"])) == without_times(metrics(runs["b"]))
  assert_same_params(runs["a"], runs["b"])
  assert metrics(runs["a"])[0]["train_loss"] != metrics(runs["c"])[0]["train_loss"]


def test_unwritable_workdir_is_refused(tiny_npz):
  result = run(tiny_npz, "/proc/mlp_jax_workdir", "--epochs=1")
  assert result.returncode == 1
  assert "is not writable" in result.stderr.strip().splitlines()[-1]


# Hostile files: whatever the bytes, a DataError or a valid array, nothing else.

def _write(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=300), gz=st.booleans())
def test_idx_reader_on_random_bytes(tmp_path_factory, content, gz):
  tmp_path = tmp_path_factory.mktemp("idx")
  name = "f.gz" if gz else "f"
  path = _write(tmp_path, name, gzip.compress(content) if gz else content)
  try:
    array = data.read_idx(path)
  except data.DataError:
    return
  assert array.nbytes <= len(content)


@settings(max_examples=60, deadline=None)
@given(type_code=st.integers(0, 255), dims=st.lists(st.integers(0, 2**32 - 1), max_size=5),
       payload=st.integers(0, 64), cut=st.integers(0, 40))
def test_idx_reader_on_lying_headers(tmp_path_factory, type_code, dims, payload, cut):
  header = bytes([0, 0, type_code, len(dims)]) + np.asarray(dims, ">u4").tobytes()
  content = (header + bytes(payload))[:max(len(header) + payload - cut, 0)]
  path = _write(tmp_path_factory.mktemp("idx"), "f", content)
  try:
    array = data.read_idx(path)
  except data.DataError:
    return
  assert array.shape == tuple(dims) and array.nbytes == len(content) - len(header)


def test_idx_reader_refuses_huge_claims_without_allocating(tmp_path):
  header = bytes([0, 0, 0x0D, 3]) + np.asarray([2**20, 2**20, 2**10], ">u4").tobytes()
  with pytest.raises(data.DataError, match="claims dims"):
    data.read_idx(_write(tmp_path, "huge", header + bytes(100)))


@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=400))
def test_npz_loader_on_random_bytes(tmp_path_factory, content):
  path = _write(tmp_path_factory.mktemp("npz"), "f.npz", content)
  with pytest.raises(data.DataError):
    data.load(f"npz:{path}")


def _npy(header, payload=b""):
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, header)
  return buf.getvalue() + payload


def test_npz_with_a_huge_claimed_array_is_refused_before_reading(tmp_path):
  path = tmp_path / "huge.npz"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("x_train.npy", _npy({"descr": "<f8", "fortran_order": False,
                                    "shape": (10**6, 10**6)}))
    for name in ("y_train", "x_test", "y_test"):
      z.writestr(f"{name}.npy", _npy({"descr": "<i8", "fortran_order": False,
                                      "shape": (1,)}, bytes(8)))
  with pytest.raises(data.DataError, match="claims shape"):
    data.load(f"npz:{path}")


SIZES = st.integers(0, 6)
VALUES = st.sampled_from([0.0, 1.5, -2.0, np.nan, np.inf, 1e39, 3.0])


@settings(max_examples=40, deadline=None)
@given(n_train=SIZES, n_test=SIZES, n_labels=SIZES, d=st.integers(1, 3),
       x_values=st.lists(VALUES, min_size=1, max_size=4),
       labels=st.lists(st.integers(-2, 2000), min_size=1, max_size=4),
       label_dtype=st.sampled_from(["int64", "float32", "uint8", "bool", "U1"]))
def test_npz_loader_on_hostile_contents(tmp_path_factory, n_train, n_test, n_labels, d,
                                        x_values, labels, label_dtype):
  def fill(shape, values):
    return np.resize(np.asarray(values), shape)
  try:
    y = fill((n_labels,), labels).astype(label_dtype)
  except (ValueError, OverflowError):
    return
  path = tmp_path_factory.mktemp("npz") / "d.npz"
  np.savez(path, x_train=fill((n_train, d), x_values), y_train=y,
           x_test=fill((n_test, d), x_values), y_test=fill((n_test,), labels))
  try:
    ds = data.load(f"npz:{path}")
  except data.DataError:
    return
  assert np.all(np.isfinite(ds.x_train)) and np.all(np.isfinite(ds.x_test))
  assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
  assert 2 <= ds.num_classes <= data.MAX_CLASSES
  assert ds.y_train.min() >= 0 and ds.y_train.max() < ds.num_classes


@pytest.mark.parametrize("flag, old", [("--optimizer=sgd", "'adamw'"), ("--seed=7", "0"),
                                       ("--batch_size=4", "8"), ("--learning_rate=0.1", "0.002")])
def test_resuming_with_another_optimizer_seed_or_batch_is_refused(tiny_npz, tmp_path, flag,
                                                                   old):
  assert run(tiny_npz, tmp_path, "--epochs=1").returncode == 0
  result = run(tiny_npz, tmp_path, "--epochs=2", flag)
  assert result.returncode == 1
  assert f"holds a run with {flag[2:].split('=')[0]}={old}" in result.stderr
  assert [row["epoch"] for row in metrics(tmp_path)] == [1]


def test_resuming_with_more_epochs_starts_a_new_cycle_and_records_it(tiny_npz, tmp_path):
  config = experiment.RunConfig(dataset=tiny_npz, workdir=str(tmp_path), hidden_dim=16,
                                batch_size=8, epochs=3, progress=False)
  experiment.run(config, log=lambda *_: None)
  lines = []
  experiment.run(config._replace(epochs=5), log=lines.append)
  assert ("--epochs 5 extends a run planned for 3: epochs 4-5 follow a new warmup_cosine "
          "cycle at peak learning rate 0.002 (schedule_epochs in config.json)") in lines
  assert json.loads((tmp_path / "config.json").read_text())["schedule_epochs"] == [3, 5]
  # The documented schedule: warmup (1 epoch) then cosine over epochs 1-3, again over 4-5.
  steps = 8                                                      # ceil(60 / 8)
  first = optax.warmup_cosine_decay_schedule(0.0, 2e-3, steps, 3 * steps)
  second = optax.warmup_cosine_decay_schedule(0.0, 2e-3, steps, 2 * steps)
  expected = [first(e * steps - 1) for e in (1, 2, 3)] + [second(e * steps - 1) for e in (1, 2)]
  np.testing.assert_allclose([row["learning_rate"] for row in metrics(tmp_path)], expected,
                             rtol=1e-6)
  # Resumed again with the same --epochs, the recorded cycles are kept.
  experiment.run(config._replace(epochs=5), log=lines.append)
  assert json.loads((tmp_path / "config.json").read_text())["schedule_epochs"] == [3, 5]
