"""Crash-safe, exactly resumable training, and hostile input that cannot hurt it."""

import errno
import gzip
import io
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import assert_same_params
from conftest import assert_same_params_as
from conftest import read_metrics
from conftest import run_cli_output
from conftest import small_disk
from conftest import runner_command
from conftest import tiny_config
from conftest import wait_for_epochs
from conftest import without_times
from mlp_jax.base import files
from mlp_jax.data import datasets
from mlp_jax.data import readers
from mlp_jax.run import checkpoint
from mlp_jax.run import experiment
from mlp_jax.run import processes
from mlp_jax.run import trained
from mlp_jax.run import workdir as workdir_lib
from mlp_jax.training import train

metrics = read_metrics


def quiet(config):
  """experiment.run without its log; returns the lines it would have printed."""
  lines = []
  experiment.run(config, log=lines.append)
  return lines


def corrupt(workdir, epoch):
  """Truncates every file of checkpoint `epoch` to half its size."""
  for d, _, files in os.walk(workdir / "checkpoints" / str(epoch)):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def checkpoints(workdir):
  """The epochs of the complete checkpoints in `workdir`."""
  path = workdir / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


@pytest.mark.parametrize("seconds, expected", [(30.0, [3]), (0.0, [1, 2, 3])])
def test_checkpoints_by_time_and_always_after_the_last_epoch(seconds, expected, tiny_npz,
                                                            tmp_path):
  quiet(tiny_config(tiny_npz, tmp_path, epochs=3, checkpoint_seconds=seconds))
  assert checkpoints(tmp_path) == expected and len(metrics(tmp_path)) == 3


@pytest.mark.slow
def test_sigkill_between_time_based_checkpoints_then_rerun_ends_bit_identical(tiny_npz,
                                                                              tmp_path):
  """--checkpoint_seconds: a kill -9 loses the epochs since the last checkpoint (at most
  that many seconds of them), and the rerun retrains them to the straight run's bits."""
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  flags = ("--epochs=600", "--schedule=cosine", "--checkpoint_seconds=0.25")
  quiet(tiny_config(tiny_npz, straight, epochs=600, schedule="cosine",
                    checkpoint_seconds=30.0))
  assert checkpoints(straight) == [600]               # a short run saves only at its end
  process = subprocess.Popen(runner_command(tiny_npz, killed, *flags),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  epochs = random.Random(0).randint(200, 400)
  wait_for_epochs(killed, process, epochs)
  while process.poll() is None and not checkpoints(killed):
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  saved, rows = checkpoints(killed), len(metrics(killed))
  assert saved and saved[-1] < rows < 600            # killed between two checkpoints
  assert all(b > a + 1 for a, b in zip(saved, saved[1:]))   # not one per epoch
  code, stdout, stderr = run_cli_output(*runner_command(tiny_npz, killed, *flags)[2:])
  assert code == 0, stderr                            # the rerun, in this process
  assert f"resuming from the checkpoint after epoch {saved[-1]}" in stdout
  assert "epochs this run retrains" in stdout
  assert_same_params(straight, killed)
  assert [row["epoch"] for row in metrics(killed)] == list(range(1, 601))
  assert without_times(metrics(killed)) == without_times(metrics(straight))


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                                   (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_saves_and_exits_cleanly_then_resumes(signum, status, name, tiny_npz,
                                                       tmp_path):
  process = subprocess.Popen(runner_command(tiny_npz, tmp_path, "--epochs=2000", "--plots"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_epochs(tmp_path, process, 3)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == status, stderr
  lines = [line for line in stderr.splitlines() if line.strip() and "libtpu" not in line]
  assert lines[0].startswith(f"{name}: stopping after this epoch's checkpoint")
  last = lines[-1]
  assert len(lines) == 2, stderr
  assert last.startswith(f"stopped: {name} after epoch ") and last.count("stopped") == 1
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
  assert "params.npz and plots are saved" in last and "rerun the same command" in last
  done = int(last.split("after epoch ")[1].split(";")[0])
  assert done >= 3 and len(metrics(tmp_path)) == done
  # The results of the last finished epoch are there: the params of its checkpoint.
  for picture in ("curves.png", "confusion.png"):
    assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
  with np.load(tmp_path / "params.npz") as interrupted:
    interrupted = dict(interrupted)
  lines = quiet(tiny_config(tiny_npz, tmp_path, epochs=done))
  assert f"resuming from the checkpoint after epoch {done}" in lines
  assert_same_params_as(tmp_path, interrupted)
  lines = quiet(tiny_config(tiny_npz, tmp_path, epochs=done + 2))
  assert f"resuming from the checkpoint after epoch {done}" in lines
  assert [row["epoch"] for row in metrics(tmp_path)] == list(range(1, done + 3))


@pytest.mark.slow
def _lines_of(stream):
  """A queue that a thread fills with each line of a child's text stream as it comes."""
  lines = queue.Queue()
  lines.reader = threading.Thread(target=lambda: [lines.put(line) for line in stream])
  lines.reader.start()
  return lines


def _next_line(lines, timeout):
  """The next non-empty line of a _lines_of queue, waited for up to `timeout` s."""
  deadline = time.monotonic() + timeout
  while True:
    line = lines.get(timeout=max(deadline - time.monotonic(), 0))
    if line.strip():
      return line


def test_a_second_signal_stops_at_once_in_one_line():
  """While epochs train (StopSignals.deferring), the first SIGTERM asks to stop after the
  epoch's checkpoint and says so in a line; a second one, sent once that line is out (an
  event, not a fixed sleep), stops the process at once in one line, status 143. The
  child trains nothing: a Python loop is where a handler runs at once, whatever the load
  (in the runner it runs between the epochs' compiled programs)."""
  code = ("import time\n"
          "from mlp_jax.run import processes\n"
          "stop = processes.StopSignals()\n"
          "stop.install()\n"
          "stop.deferring = True\n"
          "print('ready', flush=True)\n"
          "while True:\n"
          "  time.sleep(0.01)\n")
  process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  out, err = _lines_of(process.stdout), _lines_of(process.stderr)
  try:
    assert _next_line(out, timeout=120) == "ready\n"
    process.send_signal(signal.SIGTERM)
    first = _next_line(err, timeout=60)
    assert first == ("SIGTERM: stopping after this epoch's checkpoint (SIGTERM again to "
                     "stop at once)\n")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
  finally:
    if process.poll() is None:     # a failed test leaves no child looping behind it
      process.kill()
      process.wait()
  last = _next_line(err, timeout=60)
  for lines, stream in ((out, process.stdout), (err, process.stderr)):
    lines.reader.join(timeout=60)        # the pipe's end: the child has exited
    stream.close()
  assert last == (
      "stopped: a second SIGTERM: stopped at once; the newest checkpoint on disk is kept: "
      "rerun the same command to resume.\n")


def test_a_signal_during_the_last_epoch_finishes_the_run(tiny_npz, tmp_path, monkeypatch):
  monkeypatch.setattr(processes, "stop_or_save", lambda stop, due: (signal.SIGTERM, due))
  lines = quiet(tiny_config(tiny_npz, tmp_path, epochs=1))   # no Interrupted raised
  assert "SIGTERM came during the last epoch: the run is complete" in lines
  assert (tmp_path / "params.npz").exists()


# Checkpoint recovery. A constant schedule: a run of 3 epochs then 4 follows the 4-epoch
# run's path, so every recovered run must end equal to the straight one.

def constant(tiny_npz, workdir, epochs):
  return tiny_config(tiny_npz, workdir, epochs=epochs, schedule="constant")


def test_corrupt_checkpoint_is_moved_aside_retrained_and_saved_again(tiny_npz, tmp_path):
  straight, damaged = tmp_path / "straight", tmp_path / "damaged"
  quiet(constant(tiny_npz, straight, 4))
  quiet(constant(tiny_npz, damaged, 3))
  corrupt(damaged, 3)
  lines = quiet(constant(tiny_npz, damaged, 3))        # falls back to 2, retrains 3
  assert any(line.startswith("checkpoint after epoch 3 is corrupt (") and
             "moved to " in line for line in lines), lines
  assert "resuming from the checkpoint after epoch 2" in lines
  assert os.listdir(damaged / "checkpoints" / "corrupt") == ["3"]
  # Killed after that run: the next one finds the retrained epoch 3, not the corrupt one.
  lines = quiet(constant(tiny_npz, damaged, 4))
  assert "resuming from the checkpoint after epoch 3" in lines
  assert not any("is corrupt" in line for line in lines)
  assert [row["epoch"] for row in metrics(damaged)] == [1, 2, 3, 4]
  assert_same_params(straight, damaged)


def test_all_checkpoints_corrupt_restarts_and_keeps_the_old_metrics(tiny_npz, tmp_path):
  straight, damaged = tmp_path / "straight", tmp_path / "damaged"
  quiet(constant(tiny_npz, straight, 3))
  quiet(constant(tiny_npz, damaged, 3))
  old_rows = metrics(damaged)
  for epoch in (1, 2, 3):
    corrupt(damaged, epoch)
  lines = quiet(constant(tiny_npz, damaged, 3))
  assert sum("is corrupt" in line for line in lines) == 3
  assert not any("resuming" in line for line in lines)
  assert sorted(os.listdir(damaged / "checkpoints" / "corrupt")) == ["1", "2", "3"]
  kept = (damaged / "metrics.replaced-1.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in kept] == old_rows
  assert [row["epoch"] for row in metrics(damaged)] == [1, 2, 3]
  assert_same_params(straight, damaged)
  assert sorted(int(s) for s in os.listdir(damaged / "checkpoints") if s.isdigit()) == [
      1, 2, 3]


def test_a_checkpoints_directory_it_cannot_read_is_one_line_not_a_restart(tiny_npz,
                                                                           tmp_path):
  quiet(constant(tiny_npz, tmp_path, 2))
  os.rename(tmp_path / "checkpoints", tmp_path / "saved")
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(experiment.RunError, match="checkpoints is not a readable and "
                     "writable directory; fix its permissions"):
    quiet(constant(tiny_npz, tmp_path, 3))
  assert [row["epoch"] for row in metrics(tmp_path)] == [1, 2]


def test_an_error_that_is_not_corruption_is_one_line_and_moves_nothing(tiny_npz, tmp_path,
                                                                        monkeypatch):
  quiet(constant(tiny_npz, tmp_path, 2))

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
  with pytest.raises(experiment.RunError, match="cannot read the checkpoint after epoch 2 "
                     ".*Permission denied"):
    quiet(constant(tiny_npz, tmp_path, 3))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert [row["epoch"] for row in metrics(tmp_path)] == [1, 2]


def test_a_checkpoint_of_another_structure_is_refused_not_skipped(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3)}
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 1, state)
  mngr.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointError, match="holds a state of another structure"):
    checkpoint.restore_latest(mngr, {"w": jnp.zeros((3, 3))})
  assert mngr.all_steps() == [1]
  mngr.close()


def test_checksum_catches_silent_corruption(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.array(3, jnp.int32)}
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 1, state)
  checkpoint.save(mngr, 2, jax.tree.map(lambda a: a + 1, state))
  mngr.wait_until_finished()
  (checksum_file,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "2")
                      for f in fs if os.path.basename(d) == "checksum" and f == "metadata"]
  with open(checksum_file) as f:
    record = json.load(f)
  with open(checksum_file, "w") as f:
    json.dump({**record, "sha256": "0" * 64}, f)
  lines = []
  epoch, restored = checkpoint.restore_latest(mngr, state, lines.append)
  assert epoch == 1 and "checksum does not match" in lines[0]
  np.testing.assert_array_equal(restored["w"], state["w"])
  with pytest.raises(checkpoint.CheckpointError, match="did not save"):
    checkpoint.save(mngr, 1, state)                 # not newer than the latest: refused
  mngr.close()


# One workdir, one run at a time.

def test_a_workdir_in_use_is_refused_at_once_and_left_untouched(tiny_npz, tmp_path):
  quiet(constant(tiny_npz, tmp_path, 1))
  before = {p: (tmp_path / p).read_bytes() for p in ("metrics.jsonl", "config.json")}
  lock = experiment.WorkdirLock(str(tmp_path))
  lock.acquire()                                    # as if another run held it
  said = []
  try:
    with pytest.raises(experiment.RunError, match=f"--workdir {tmp_path} is in use by "
                       f"another run \\(process {os.getpid()}\\); wait for it"):
      experiment.run(constant(tiny_npz, tmp_path, 2), log=said.append)
  finally:
    lock.release()
  assert said == []      # nothing before the refusal (no "input scaling: ..." note)
  assert {p: (tmp_path / p).read_bytes() for p in before} == before
  quiet(constant(tiny_npz, tmp_path, 2))            # released: the run goes on
  assert [row["epoch"] for row in metrics(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_two_runs_on_one_workdir_and_a_killed_run_leaves_no_stale_lock(tiny_npz, tmp_path):
  process = subprocess.Popen(runner_command(tiny_npz, tmp_path, "--epochs=2000"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    wait_for_epochs(tmp_path, process, 1)
    start = time.time()
    with pytest.raises(experiment.RunError, match=f"in use by another run \\(process "
                       f"{process.pid}\\)"):
      quiet(tiny_config(tiny_npz, tmp_path, epochs=2000))
    assert time.time() - start < 30 and process.poll() is None
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  # The kernel dropped the killed run's lock: the workdir is usable at once.
  done = len(metrics(tmp_path))
  quiet(tiny_config(tiny_npz, tmp_path, epochs=done + 1))
  assert metrics(tmp_path)[-1]["epoch"] == done + 1


def test_divergence_stops_with_a_clear_message(tiny_npz, tmp_path):
  with pytest.raises(experiment.RunError) as error:
    quiet(tiny_config(tiny_npz, tmp_path, epochs=30, optimizer="sgd", learning_rate=1e6,
                      schedule="constant", weight_decay=0))
  message = str(error.value)
  assert "training diverged in epoch" in message and "learning rate 1e+06" in message
  epoch = int(message.split("diverged in epoch ")[1].split(":")[0])
  rows = metrics(tmp_path) if (tmp_path / "metrics.jsonl").exists() else []
  assert len(rows) == epoch - 1 and all(np.isfinite(row["train_loss"]) for row in rows)
  if epoch == 1:  # no checkpoint to speak of: the message must not claim one
    assert message.endswith("No checkpoint was written.")
  else:
    assert message.endswith(f"The checkpoint after epoch {epoch - 1} is kept.")


def test_out_of_memory_in_xla_is_one_line(tiny_npz, tmp_path, monkeypatch):
  def exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating "
                                      "313 GiB")

  monkeypatch.setattr(train, "init_state", exhausted)
  with pytest.raises(experiment.RunError, match="^out of memory .*use a smaller "
                     "--hidden_dim or --batch_size"):
    quiet(tiny_config(tiny_npz, tmp_path, epochs=1))


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_npz, tmp_path):
  runs = {name: tmp_path / name for name in ("a", "b", "c")}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    quiet(tiny_config(tiny_npz, runs[name], epochs=3, seed=seed))
  assert without_times(metrics(runs["a"])) == without_times(metrics(runs["b"]))
  assert_same_params(runs["a"], runs["b"])
  assert metrics(runs["a"])[0]["train_loss"] != metrics(runs["c"])[0]["train_loss"]


def test_unwritable_workdir_is_refused(tiny_npz):
  with pytest.raises(experiment.RunError, match="is not writable"):
    quiet(tiny_config(tiny_npz, "/proc/mlp_jax_workdir", epochs=1))


# Hostile files: whatever the bytes, a DataError or a valid array, nothing else.

def _write(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


def _valid_idx(content):
  """What the IDX reader must accept, decided apart from it: two zero bytes, a known
  type code, rank 1 to 4, its dims, then exactly the bytes they declare."""
  if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] not in readers.IDX_TYPES:
    return False
  rank = content[3]
  if not 1 <= rank <= 4 or len(content) < 4 + 4 * rank:
    return False
  dims = np.frombuffer(content[4:4 + 4 * rank], ">u4").astype(np.float64)
  declared = np.prod(dims) * np.dtype(readers.IDX_TYPES[content[2]]).itemsize
  return declared == len(content) - 4 - 4 * rank


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=300), gz=st.booleans())
def test_idx_reader_on_random_bytes(tmp_path_factory, content, gz):
  tmp_path = tmp_path_factory.mktemp("idx")
  name = "f.gz" if gz else "f"
  path = _write(tmp_path, name, gzip.compress(content) if gz else content)
  if not _valid_idx(content):
    with pytest.raises(datasets.DataError):
      readers.read_idx(path)
    return
  array = readers.read_idx(path)
  assert array.nbytes == len(content) - 4 - 4 * array.ndim


@settings(max_examples=60, deadline=None)
@given(type_code=st.integers(0, 255), dims=st.lists(st.integers(0, 2**32 - 1), max_size=5),
       payload=st.integers(0, 64), cut=st.integers(0, 40))
def test_idx_reader_on_lying_headers(tmp_path_factory, type_code, dims, payload, cut):
  header = bytes([0, 0, type_code, len(dims)]) + np.asarray(dims, ">u4").tobytes()
  content = (header + bytes(payload))[:max(len(header) + payload - cut, 0)]
  path = _write(tmp_path_factory.mktemp("idx"), "f", content)
  if not _valid_idx(content):
    with pytest.raises(datasets.DataError):
      readers.read_idx(path)
    return
  array = readers.read_idx(path)
  assert array.shape == tuple(dims) and array.nbytes == len(content) - len(header)


def test_idx_reader_refuses_huge_claims_without_allocating(tmp_path):
  header = bytes([0, 0, 0x0D, 3]) + np.asarray([2**20, 2**20, 2**10], ">u4").tobytes()
  with pytest.raises(datasets.DataError, match="claims dims"):
    readers.read_idx(_write(tmp_path, "huge", header + bytes(100)))


@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=400))
def test_npz_loader_on_random_bytes(tmp_path_factory, content):
  path = _write(tmp_path_factory.mktemp("npz"), "f.npz", content)
  with pytest.raises(datasets.DataError):
    datasets.load(f"npz:{path}")


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
  with pytest.raises(datasets.DataError, match="declares shape"):
    datasets.load(f"npz:{path}")


def _usable(x, y_train, y_test, n_test):
  """What the loader must accept, decided apart from it: examples in both splits, one
  label per training row, values finite in float32, whole-number labels in
  [0, MAX_CLASSES), at least 2 classes and every one of them in train."""
  if len(x) == 0 or n_test == 0 or len(y_train) != len(x):
    return False
  if not np.all(np.abs(x) <= np.finfo(np.float32).max):  # NaN compares False too
    return False
  if y_train.dtype.kind not in "iuf" or not np.all(y_train == np.round(y_train)):
    return False
  labels = np.concatenate([y_train.astype(np.float64), y_test.astype(np.float64)])
  if labels.min() < 0 or labels.max() >= datasets.MAX_CLASSES:
    return False
  k = int(labels.max()) + 1
  return k >= 2 and set(range(k)) <= set(y_train.astype(np.int64).tolist())


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
  x, y_test = fill((n_train, d), x_values), fill((n_test,), labels)
  np.savez(path, x_train=x, y_train=y, x_test=fill((n_test, d), x_values), y_test=y_test)
  if not _usable(x, y, y_test, n_test):
    with pytest.raises(datasets.DataError):
      datasets.load(f"npz:{path}")
    return
  ds = datasets.load(f"npz:{path}")
  assert np.all(np.isfinite(ds.x_train)) and np.all(np.isfinite(ds.x_test))
  assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
  assert 2 <= ds.num_classes <= datasets.MAX_CLASSES
  assert ds.y_train.min() >= 0 and ds.y_train.max() < ds.num_classes


def test_resuming_with_another_optimizer_seed_batch_or_rate_is_refused(tiny_npz, tmp_path):
  quiet(tiny_config(tiny_npz, tmp_path, epochs=1))
  for field, value, old in (("optimizer", "sgd", "'adamw'"), ("seed", 7, "0"),
                            ("batch_size", 4, "8"), ("learning_rate", 0.1, "0.001")):
    with pytest.raises(experiment.RunError, match=f"holds a run with {field}={old}"):
      quiet(tiny_config(tiny_npz, tmp_path, epochs=2, **{field: value}))
  assert [row["epoch"] for row in metrics(tmp_path)] == [1]


def test_a_run_from_before_input_scaling_resumes_only_per_feature(tiny_npz, tmp_path):
  """mlp_jax 0.3 recorded no input_scaling and scaled per feature: its workdir resumes
  with per_feature, and the new default (global) is refused, not applied mid-run."""
  quiet(tiny_config(tiny_npz, tmp_path, epochs=1, input_scaling="per_feature"))
  record = json.loads((tmp_path / "config.json").read_text())
  del record["config"]["input_scaling"]
  (tmp_path / "config.json").write_text(json.dumps(record))
  with pytest.raises(experiment.RunError, match="holds a run with input_scaling='per_feature'"):
    quiet(tiny_config(tiny_npz, tmp_path, epochs=2))
  quiet(tiny_config(tiny_npz, tmp_path, epochs=2, input_scaling="per_feature"))
  assert [row["epoch"] for row in metrics(tmp_path)] == [1, 2]


def test_resuming_with_more_epochs_starts_a_new_cycle_and_records_it(tiny_npz, tmp_path):
  config = tiny_config(tiny_npz, tmp_path, epochs=3)
  experiment.run(config, log=lambda *_: None)
  lines = []
  experiment.run(config._replace(epochs=5), log=lines.append)
  assert ("--epochs 5 extends a run planned for 3: epochs 4-5 follow a new warmup_cosine "
          "cycle at peak learning rate 0.001 (schedule_epochs in config.json)") in lines
  assert json.loads((tmp_path / "config.json").read_text())["schedule_epochs"] == [3, 5]
  # The documented schedule: warmup (1 epoch) then cosine over epochs 1-3, again over 4-5.
  steps = 8                                                      # ceil(60 / 8)
  first = optax.warmup_cosine_decay_schedule(0.0, 1e-3, steps, 3 * steps)
  second = optax.warmup_cosine_decay_schedule(0.0, 1e-3, steps, 2 * steps)
  expected = [first(e * steps - 1) for e in (1, 2, 3)] + [second(e * steps - 1) for e in (1, 2)]
  np.testing.assert_allclose([row["learning_rate"] for row in metrics(tmp_path)], expected,
                             rtol=1e-6)
  # Resumed again with the same --epochs, the recorded cycles are kept.
  experiment.run(config._replace(epochs=5), log=lines.append)
  assert json.loads((tmp_path / "config.json").read_text())["schedule_epochs"] == [3, 5]
  # One epoch more is said as one epoch.
  experiment.run(config._replace(epochs=6), log=lines.append)
  assert ("--epochs 6 extends a run planned for 5: epoch 6 follows a new warmup_cosine "
          "cycle at peak learning rate 0.001 (schedule_epochs in config.json)") in lines


def test_a_workdir_of_an_older_version_is_refused_in_one_line(tiny_npz, tmp_path):
  # mlp_jax 0.2 wrote config.json without "format": its checkpoints hold one model.
  (tmp_path / "config.json").write_text(json.dumps({"config": {"hidden_dim": 16}}))
  with pytest.raises(experiment.RunError, match="holds a run of mlp_jax 0.2 or older, "
                     "whose checkpoints this version cannot resume; finish it with that "
                     "version .* or use a fresh --workdir") as error:
    quiet(tiny_config(tiny_npz, tmp_path, epochs=1))
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(tmp_path)) == [".lock", "config.json"]


# Write errors: a real full disk (a small tmpfs), and injected OSErrors.

def test_a_full_disk_is_one_line_and_the_rerun_resumes_bit_identical(tmp_path):
  config = tiny_config("digits", tmp_path / "disk" / "w", hidden_dim=256, epochs=5,
                       schedule="constant")
  with small_disk(tmp_path / "disk") as disk:
    with pytest.raises(experiment.RunError) as error:
      quiet(config)
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message
    assert "the newest complete checkpoint is kept" in message
    saved = sorted(os.listdir(disk / "w" / "checkpoints"))
    assert saved and all(name.isdigit() for name in saved)   # only complete checkpoints
    assert not [f for f in os.listdir(disk / "w") if "tmp" in f or "write_test" in f]
    assert len(metrics(disk / "w")) == int(saved[-1])        # no line past the checkpoint
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space freed
    lines = quiet(config)
    assert f"resuming from the checkpoint after epoch {saved[-1]}" in lines
    quiet(config._replace(workdir=str(tmp_path / "straight")))
    assert_same_params(disk / "w", tmp_path / "straight")


def test_a_failing_metrics_append_is_one_line_naming_the_file(tiny_npz, tmp_path,
                                                               monkeypatch):
  def broken(workdir, row):
    raise OSError(errno.EIO, "Input/output error", os.path.join(workdir, "metrics.jsonl"))
  monkeypatch.setattr(workdir_lib, "append_row", broken)
  with pytest.raises(experiment.RunError, match=f"^cannot write {tmp_path}/metrics.jsonl "
                     r"\(Input/output error\); the newest complete checkpoint is kept"):
    quiet(tiny_config(tiny_npz, tmp_path, epochs=2))


def test_outputs_are_written_whole_or_not_at_all(tiny_npz, tmp_path, monkeypatch):
  quiet(tiny_config(tiny_npz, tmp_path, epochs=1))
  before = (tmp_path / "params.npz").read_bytes()

  def half_then_full(f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a zip")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(trained, "save", half_then_full)
  with pytest.raises(experiment.RunError, match="No space left on device"):
    quiet(tiny_config(tiny_npz, tmp_path, epochs=2))
  assert (tmp_path / "params.npz").read_bytes() == before   # the old file, untouched
  assert not [f for f in os.listdir(tmp_path) if files.TEMPORARY_MARK in f]


# Torn or missing records: the checkpoint holds what a resume must match.

def test_a_torn_metrics_line_is_set_aside_and_the_run_resumes(tiny_npz, tmp_path):
  config = constant(tiny_npz, tmp_path, 2)
  quiet(config)
  text = (tmp_path / "metrics.jsonl").read_text()
  (tmp_path / "metrics.jsonl").write_text(text[:-20])     # cut mid-line, as a crash does
  lines = quiet(config._replace(epochs=3))
  assert any("metrics.jsonl held a torn line (line 2" in line for line in lines)
  assert any("lacks the lines of epoch(s) 2" in line for line in lines)
  assert (tmp_path / "metrics.replaced-1.jsonl").read_text() == text[:-20]
  assert [row["epoch"] for row in metrics(tmp_path)] == [1, 3]


@pytest.mark.parametrize("damage", ["", '{"format": 2, "config": {"hidden_', "[1, 2]"])
def test_an_unreadable_config_json_is_set_aside_and_the_checkpoint_checked(
    damage, tiny_npz, tmp_path):
  config = constant(tiny_npz, tmp_path, 2)
  quiet(config)
  (tmp_path / "config.json").write_text(damage)
  lines = quiet(config._replace(epochs=3))
  assert any(line.startswith("config.json is unreadable") for line in lines)
  assert "resuming from the checkpoint after epoch 2" in lines
  assert (tmp_path / "config.unreadable-1.json").read_text() == damage
  assert json.loads((tmp_path / "config.json").read_text())["config"]["epochs"] == 3


def test_a_deleted_config_json_still_refuses_other_settings(tiny_npz, tmp_path):
  quiet(constant(tiny_npz, tmp_path, 2))
  os.remove(tmp_path / "config.json")
  for field, value in (("seed", 1), ("learning_rate", 0.5)):
    with pytest.raises(experiment.RunError, match=f"the checkpoint after epoch 2 was "
                       f"trained with {field}="):
      quiet(constant(tiny_npz, tmp_path, 3)._replace(**{field: value}))
  assert len(metrics(tmp_path)) == 2


def test_the_summary_names_the_epoch_that_compiled_after_a_gap(tiny_npz, tmp_path):
  config = constant(tiny_npz, tmp_path, 3)
  quiet(config)
  rows = metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # epochs 2, 3 lost
  lines = quiet(config._replace(epochs=5))
  assert any("lacks the lines of epoch(s) 2, 3" in line for line in lines)
  assert "epoch 4 " in lines[-1].split("; ")[1] and "(with compiling)" in lines[-1]


def test_a_resume_in_another_float_precision_is_refused(tiny_npz, tmp_path):
  quiet(constant(tiny_npz, tmp_path, 1))
  jax.config.update("jax_enable_x64", True)
  try:
    with pytest.raises(experiment.RunError, match="trained with jax_enable_x64=False, not "
                                                  "True"):
      quiet(constant(tiny_npz, tmp_path, 2))
  finally:
    jax.config.update("jax_enable_x64", False)


def test_a_checkpoint_write_refused_by_the_filesystem_is_one_line(tiny_npz, tmp_path,
                                                                  monkeypatch):
  def refused(self, *args, **kwargs):  # what orbax raises for tensorstore's EROFS
    raise ValueError("PERMISSION_DENIED: Error writing local file \"x/_sharding\" "
                     "[os_error_code='30']")
  monkeypatch.setattr(ocp.CheckpointManager, "save", refused)
  with pytest.raises(experiment.RunError, match=r"^cannot write a checkpoint in .* \("
                     r"Read-only file system\); the newest complete checkpoint is kept"):
    quiet(tiny_config(tiny_npz, tmp_path, epochs=1))


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_corrupt_checkpoint_is_never_moved_through_a_planted_link(tiny_npz, tmp_path,
                                                                     planted):
  """checkpoints/corrupt made a link to a victim directory (or a file) before the rerun
  finds a corrupt checkpoint: one line, and nothing is moved into the victim."""
  damaged, victim = tmp_path / "damaged", tmp_path / "victim"
  victim.mkdir()
  quiet(constant(tiny_npz, damaged, 2))
  corrupt(damaged, 2)
  place = damaged / "checkpoints" / "corrupt"
  if planted == "symlink":
    os.symlink(victim, place)
  else:
    place.write_text("a user's file\n")
  refusal = "is a symbolic link" if planted == "symlink" else "is a link or not a directory"
  with pytest.raises(experiment.RunError, match=refusal) as refused:
    quiet(constant(tiny_npz, damaged, 2))
  assert "\n" not in str(refused.value)
  assert os.listdir(victim) == []
  assert os.path.isdir(damaged / "checkpoints" / "2")            # left where it was
  if planted == "file":
    assert place.read_text() == "a user's file\n"


@pytest.mark.parametrize("damage", ["deleted", "truncated", "schedule_edited",
                                    "schedule_absurd"])
def test_the_schedule_lives_in_the_checkpoint_not_in_config_json(tiny_npz, tmp_path, damage):
  """3 epochs, resumed to 5 (a second learning-rate cycle), then config.json lost or
  edited before a resume to 7: bit-identical to the untouched run's resume to 7."""
  untouched, damaged = tmp_path / "untouched", tmp_path / "damaged"
  for work in (untouched, damaged):
    quiet(tiny_config(tiny_npz, work, epochs=3))
    quiet(tiny_config(tiny_npz, work, epochs=5))
  path = damaged / "config.json"
  if damage == "deleted":
    path.unlink()
  elif damage == "truncated":
    path.write_bytes(path.read_bytes()[:40])
  else:
    record = json.loads(path.read_text())
    record["schedule_epochs"] = [-5] if damage == "schedule_absurd" else [10**12]
    path.write_text(json.dumps(record))
  quiet(tiny_config(tiny_npz, untouched, epochs=7))
  quiet(tiny_config(tiny_npz, damaged, epochs=7))
  assert_same_params(untouched, damaged)


def test_a_checkpoint_without_its_schedule_takes_config_jsons_only_if_sane(tiny_npz,
                                                                           tmp_path):
  """A checkpoint of mlp_jax 0.4.0 and older records no schedule: config.json's is used
  when it is there and sane, else the resume is refused in one line."""
  from mlp_jax.run import hooks, workdir  # pylint: disable=g-import-not-at-top
  config = tiny_config(tiny_npz, tmp_path, epochs=7)
  old = hooks.Restored(None, 5, None, None)
  run = {"config": {"epochs": 3}, "schedule_epochs": [3, 5]}
  assert workdir.schedule_epochs(config, run, old, lambda _: None) == [3, 5, 7]
  assert workdir.schedule_epochs(config, {"config": {"epochs": 5}}, old,
                                 lambda _: None) == [5, 7]
  for bad, words in (({}, "config.json, which holds it, is missing"),
                     ({**run, "schedule_epochs": [-5]}, "not a list of increasing"),
                     ({**run, "schedule_epochs": [10**12]}, "not a list of increasing"),
                     ({**run, "schedule_epochs": [5, 3]}, "not a list of increasing"),
                     ({**run, "schedule_epochs": "3"}, "not a list of increasing")):
    with pytest.raises(experiment.RunError, match=words) as refused:
      workdir.schedule_epochs(config, bad, old, lambda _: None)
    assert "\n" not in str(refused.value)
  saved = hooks.Restored(None, 5, None, [3, 5])          # the checkpoint's record wins
  assert workdir.schedule_epochs(config, {}, saved, lambda _: None) == [3, 5, 7]
  assert saved.schedule == [3, 5]


def test_a_huge_metrics_line_is_set_aside_without_being_held(tiny_npz, tmp_path,
                                                             monkeypatch):
  """A metrics.jsonl line longer than any record a run writes (MAX_RECORD_BYTES, made
  small here) is a torn line: set aside with the file, the run resumes, and the line is
  never read whole."""
  from mlp_jax.run import workdir  # pylint: disable=g-import-not-at-top
  work = tmp_path / "w"
  quiet(tiny_config(tiny_npz, work, epochs=2))
  rows = (work / "metrics.jsonl").read_text()
  (work / "metrics.jsonl").write_text(rows + "x" * 5000 + "\n")
  monkeypatch.setattr(workdir, "MAX_RECORD_BYTES", 1000)
  lines = quiet(tiny_config(tiny_npz, work, epochs=3))
  assert any("metrics.jsonl held a torn line (line 3" in line for line in lines), lines
  assert [r["epoch"] for r in metrics(work)] == [1, 2, 3]
  assert (work / "metrics.replaced-1.jsonl").read_text().endswith("x" * 5000 + "\n")


@pytest.fixture(scope="module")
def two_epochs(tiny_npz, tmp_path_factory):
  """A finished 2-epoch run (checkpoints 1 and 2, tensorboard): copy it, never write it."""
  workdir = tmp_path_factory.mktemp("two_epochs")
  quiet(constant(tiny_npz, workdir, 2))
  return workdir


# Places at every depth of the workdir that the run reads, writes or deletes.
DEEP_PLACES = ["checkpoints/2/state/_METADATA", "checkpoints/2/checksum/metadata",
               "checkpoints/1/state/d", "checkpoints/2/state/ocdbt.process_0/manifest.ocdbt",
               "tensorboard/EVENTS"]


@pytest.mark.parametrize("fault", ["symlink", "fifo"])
@pytest.mark.parametrize("place", DEEP_PLACES)
def test_a_link_or_special_file_at_any_depth_of_the_workdir_is_one_line(
    two_epochs, tiny_npz, tmp_path, place, fault):
  """Checked before the run uses its workdir: nothing read, written or deleted through
  it, the victim as it was, the workdir as it was."""
  work = tmp_path / "w"
  shutil.copytree(two_epochs, work, symlinks=True)
  if place == "tensorboard/EVENTS":
    place = f"tensorboard/{os.listdir(work / 'tensorboard')[0]}"
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "keep").write_text("a user's file")
  target = work / place
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  if fault == "symlink":
    os.symlink(victim if place.endswith("/d") else victim / "keep", target)
  else:
    os.mkfifo(target)
  before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
  with pytest.raises(experiment.RunError) as refused:
    quiet(constant(tiny_npz, work, 3))
  line = str(refused.value)
  assert "\n" not in line and str(target) in line, line
  assert sorted(os.listdir(victim)) == ["keep"] and (victim / "keep").read_text() == \
      "a user's file"
  assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before


def test_orbax_metadata_over_its_cap_is_a_corrupt_checkpoint_never_parsed(
    two_epochs, tiny_npz, tmp_path):
  """The checksum record grown to 2 MiB (1 GB took 2.3 GB to parse): the checkpoint is
  moved aside before orbax reads it, and the run falls back to the one before."""
  work = tmp_path / "w"
  shutil.copytree(two_epochs, work, symlinks=True)
  with open(work / "checkpoints" / "2" / "checksum" / "metadata", "ab") as f:
    f.write(b" " * (2 << 20))
  lines = quiet(constant(tiny_npz, work, 2))
  assert any(line.startswith("checkpoint after epoch 2 is corrupt (its checksum/metadata "
                             "is 2,") for line in lines), lines
  assert "resuming from the checkpoint after epoch 1" in lines
  assert os.listdir(work / "checkpoints" / "corrupt") == ["2"]


def _victim(tmp_path):
  """Another run's checkpoints (steps 1 and 2, a file each), and their listing."""
  victim = tmp_path / "victim"
  for step in ("1", "2"):
    (victim / step).mkdir(parents=True)
    (victim / step / "data").write_text(f"the victim's step {step}")
  return victim, sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))


SWAPS = {
    "checkpoints_to_a_link": lambda work, victim: (
        os.rename(work / "checkpoints", work.parent / "moved"),
        os.symlink(victim, work / "checkpoints")),
    "checkpoints_to_another_directory": lambda work, victim: (
        os.rename(work / "checkpoints", work.parent / "moved"),
        os.rename(victim, work / "checkpoints")),
    "workdir_to_a_link": lambda work, victim: (
        os.rename(work, work.parent / "moved"),
        os.makedirs(work.parent / "elsewhere"),
        os.rename(victim, work.parent / "elsewhere" / "checkpoints"),
        os.symlink(work.parent / "elsewhere", work)),
}


@pytest.mark.parametrize("swap", SWAPS)
def test_a_workdir_swapped_mid_run_stops_before_anything_is_saved_or_deleted_through_it(
    tiny_npz, tmp_path, monkeypatch, swap):
  """The swap comes just before the 4th epoch's save (orbax would write the step and
  delete the oldest, 1, through it): one line, the victim's steps as they were."""
  work = tmp_path / "run" / "w"
  work.parent.mkdir()
  victim, listing = _victim(tmp_path)
  real, calls = checkpoint.save, []

  def swap_then_save(mngr, epoch, *args, **kwargs):
    calls.append(epoch)
    if len(calls) == 4:
      mngr.wait_until_finished()   # the 3rd save's background writes are done
      SWAPS[swap](work, victim)
    return real(mngr, epoch, *args, **kwargs)
  monkeypatch.setattr(checkpoint, "save", swap_then_save)
  with pytest.raises(experiment.RunError, match="is no longer the directory this run "
                                                "opened") as stopped:
    quiet(tiny_config(tiny_npz, work, epochs=6))
  assert "\n" not in str(stopped.value) and calls == [1, 2, 3, 4]
  where = victim if victim.exists() else next(
      p for p in (work.parent / "moved" / "checkpoints", work.parent / "elsewhere" /
                  "checkpoints", work / "checkpoints") if (p / "1" / "data").exists())
  assert sorted(str(p.relative_to(where)) for p in where.rglob("*")) == listing


def test_only_steps_of_this_workdir_are_ever_deleted(tiny_npz, tmp_path, monkeypatch):
  """A numbered directory that appears in checkpoints/ mid-run (orbax would take it for
  a step and delete it once old) is left alone; the run's own old steps go."""
  real, calls = checkpoint.save, []
  planted = tmp_path / "checkpoints" / "0"

  def plant_then_save(mngr, epoch, *args, **kwargs):
    calls.append(epoch)
    if len(calls) == 2:
      mngr.wait_until_finished()
      planted.mkdir()
      (planted / "notes").write_text("a user's")
      mngr.reload()
    return real(mngr, epoch, *args, **kwargs)
  monkeypatch.setattr(checkpoint, "save", plant_then_save)
  quiet(tiny_config(tiny_npz, tmp_path, epochs=6))
  assert (planted / "notes").read_text() == "a user's"
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [0, 4, 5, 6]
