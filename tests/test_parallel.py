"""Data parallel on 1, 2 and 4 devices, and on two processes, equals one device.

JAX fixes its device count when it starts, so the multi-device checks run in fresh
processes: this file's `__main__` part (below) under
XLA_FLAGS=--xla_force_host_platform_device_count=4, and the runner itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlp_jax.core.network import Network
from mlp_jax.training import parallel
from mlp_jax.training import evaluation
from mlp_jax.training import train
from conftest import read_metrics as metrics
from conftest import ROOT
from conftest import RUNNER
from conftest import runner_command
from conftest import wait_for_epochs
RTOL = 1e-5  # float32 reduction-order noise: the sum over the batch is split in parts


def host_devices(count):
  return {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                     f"--xla_force_host_platform_device_count={count}"}


# `runner`'s settings beyond conftest.tiny_config's (its in-process twin, reference_run).
RUNNER_SETTINGS = {"epochs": 3, "schedule": "constant", "learning_rate": 0.01}


def runner(dataset, workdir, *extra, env=None):
  return subprocess.Popen(
      [sys.executable, RUNNER, "--noprogress", f"--dataset={dataset}",
       f"--workdir={workdir}", "--hidden_dim=16", "--batch_size=8",
       *(f"--{k}={v}" for k, v in RUNNER_SETTINGS.items()), *extra],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or os.environ)


def finish(process, timeout=240):
  stdout, stderr = process.communicate(timeout=timeout)
  assert process.returncode == 0, stderr
  return stdout


def finish_all(processes, timeout=240):
  """finish() of each; a failed one's peers are killed, never left running on into the
  next test."""
  try:
    return [finish(p, timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()


def assert_same_run(dir_a, dir_b):
  """Same loss and accuracy curves and final params, to float32 reduction noise."""
  rows_a, rows_b = metrics(dir_a), metrics(dir_b)
  assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
  for row_a, row_b in zip(rows_a, rows_b):
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(row_a[key], row_b[key], rtol=RTOL, err_msg=key)
  with np.load(os.path.join(dir_a, "params.npz")) as a, \
       np.load(os.path.join(dir_b, "params.npz")) as b:
    for k in ("w1", "b1", "w2", "b2"):
      assert np.max(np.abs(a[k] - b[k])) <= RTOL * np.max(np.abs(a[k])), k


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_wrong_coordinator_address_is_named_not_waited_on_forever():
  port = free_port()  # closed again: nothing listens there
  with pytest.raises(ConnectionError, match=f"nothing listens at .*127.0.0.1:{port} after 1 s"):
    parallel.wait_for_coordinator(f"127.0.0.1:{port}", timeout_seconds=1)
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    parallel.wait_for_coordinator(address, timeout_seconds=1)  # it listens: returns
    with pytest.raises(ConnectionError, match="cannot listen on port .*pick a free port"):
      parallel.check_port_free(address)


def test_one_device_mesh_changes_nothing():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((10, 5)).astype(np.float32)
  y = rng.integers(0, 3, 10).astype(np.int32)
  hp = train.Hyperparams(optimizer="adam", schedule="constant")
  state = train.init_state([0], 5, 7, 3, hp)
  mesh = parallel.run_mesh(1)
  sharded, m_sharded = train.make_train_epoch(hp, train.Batching(4, 10, mesh))(
      parallel.shard_models(state, mesh), parallel.shard_rows(x, mesh),
      parallel.shard_rows(y, mesh), 0, {})
  plain, m_plain = train.make_train_epoch(hp, train.Batching(4))(state, x, y, 0, {})
  for a, b in zip(jax.tree.leaves((plain, m_plain)), jax.tree.leaves((sharded, m_sharded))):
    np.testing.assert_array_equal(a, b)
  ev_sharded = evaluation.evaluate(sharded.params, parallel.shard_rows(x, mesh),
                              parallel.shard_rows(y, mesh), train.Batching(3, 10, mesh),
                              net=Network())
  ev_plain = evaluation.evaluate(plain.params, x, y, train.Batching(3), net=Network())
  for a, b in zip(jax.tree.leaves(ev_plain), jax.tree.leaves(ev_sharded)):
    np.testing.assert_array_equal(a, b)


def test_the_mesh_rule_uses_every_device():
  # G = gcd(M, D) slices hold the models; the D/G devices of a slice split each batch.
  for models, devices, shape in ((1, 4, (1, 4)), (4, 4, (4, 1)), (2, 4, (2, 2)),
                                 (6, 4, (2, 2)), (3, 4, (1, 4)), (8, 2, (2, 1))):
    assert parallel.mesh_shape(models, devices) == shape


@pytest.mark.slow
def test_library_on_1_2_4_devices():
  result = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                          env=host_devices(4), timeout=240)
  assert result.returncode == 0, result.stderr
  assert "OK 4 devices" in result.stdout


@pytest.mark.slow
def test_num_devices_on_a_cpu_host_makes_the_devices_itself(tiny_npz, tmp_path):
  """The README's `--num_devices=N` on a CPU-only machine, no XLA_FLAGS count given: the
  runner splits the CPU before JAX starts and says so, and the run equals 1 device's."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(runner_command(tiny_npz, tmp_path / "three", "--num_devices=3",
                                         "--num_seeds=3"),
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr
  assert ("--num_devices=3: made 3 CPU devices for it "
          "(XLA_FLAGS=--xla_force_host_platform_device_count=3)") in result.stdout
  assert "devices: 3" in result.stdout


@pytest.mark.slow
def test_runner_on_4_devices_matches_1(tiny_npz, tmp_path):
  one = runner(tiny_npz, tmp_path / "one", "--num_devices=1", env=host_devices(4))
  four = runner(tiny_npz, tmp_path / "four", "--num_devices=4", env=host_devices(4))
  finish(one), finish(four)
  assert_same_run(tmp_path / "one", tmp_path / "four")
  config = json.loads((tmp_path / "four" / "config.json").read_text())["runs"][-1]
  assert config["num_devices"] == 4 and config["num_processes"] == 1


@pytest.mark.slow
def test_runner_stack_of_4_seeds_on_2_and_4_devices_matches_1(tiny_npz, tmp_path):
  runs = {d: runner(tiny_npz, tmp_path / str(d), f"--num_devices={d}", "--num_seeds=4",
                    env=host_devices(4)) for d in (1, 2, 4)}
  outputs = {d: finish(p) for d, p in runs.items()}
  assert "devices: 4 (4 model slice(s) × 1 splitting each batch)" in outputs[4]
  for d in (2, 4):
    mesh = json.loads((tmp_path / str(d) / "config.json").read_text())["runs"][-1]["mesh"]
    assert mesh == {"model": d, "data": 1}
    with np.load(tmp_path / "1" / "params_all.npz") as a, \
         np.load(tmp_path / str(d) / "params_all.npz") as b:
      for k in ("w1", "b1", "w2", "b2"):
        assert np.max(np.abs(a[k] - b[k])) <= RTOL * np.max(np.abs(a[k])), k
    for one, many in zip(metrics(tmp_path / "1"), metrics(tmp_path / str(d))):
      np.testing.assert_allclose(one["per_model"]["train_loss"],
                                 many["per_model"]["train_loss"], rtol=RTOL)


@pytest.mark.slow
def test_two_processes_train_together_match_one_and_resume(tiny_npz, tmp_path,
                                                           reference_run):
  """2 processes × 2 devices, 2 epochs, then resumed to 3: equals 1 device, 3 epochs (the
  suite's in-process run of the settings of `runner`). The single-device run comes
  after, not beside them: the two must reach their first collective within Gloo's 30 s
  of each other, which a third process on 2 cores can break."""
  shared = tmp_path / "shared"
  for epochs in (2, 3):
    port = free_port()
    processes = [runner(tiny_npz, shared, f"--epochs={epochs}",
                        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        f"--process_id={i}", env=host_devices(2)) for i in range(2)]
    outputs = finish_all(processes)
    assert "accuracy" in outputs[0] and "accuracy" not in outputs[1]  # process 0 reports
    assert "workdir" not in outputs[1]
    assert not any("[Gloo]" in output for output in outputs), outputs  # XLA's C++ lines
  assert "resuming from the checkpoint after epoch 2" in outputs[0]
  assert_same_run(reference_run(tiny_npz, **RUNNER_SETTINGS), shared)
  config = json.loads((shared / "config.json").read_text())["runs"][-1]
  assert config["num_devices"] == 4 and config["num_processes"] == 2


@pytest.mark.slow
def test_four_seeds_on_two_processes_are_one_model_per_device(tiny_npz, tmp_path,
                                                              reference_run):
  """--num_seeds=4 on 2 processes × 2 devices (the model axis spans the processes)
  equals the same stack on 1 device."""
  port = free_port()
  processes = [runner(tiny_npz, tmp_path / "shared", "--num_seeds=4",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      f"--process_id={i}", env=host_devices(2)) for i in range(2)]
  finish_all(processes)
  single = reference_run(tiny_npz, num_seeds=4, num_devices=1, **RUNNER_SETTINGS)
  run = json.loads((tmp_path / "shared" / "config.json").read_text())["runs"][-1]
  assert run["mesh"] == {"model": 4, "data": 1} and run["num_processes"] == 2
  with np.load(single / "params_all.npz") as a, \
       np.load(tmp_path / "shared" / "params_all.npz") as b:
    for k in ("w1", "b1", "w2", "b2"):
      assert np.max(np.abs(a[k] - b[k])) <= RTOL * np.max(np.abs(a[k])), k


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                                   (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_to_one_process_stops_both_after_the_same_epoch(signum, status, name,
                                                                 tiny_npz, tmp_path):
  port = free_port()
  processes = [runner(tiny_npz, tmp_path, "--epochs=200",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      f"--process_id={i}") for i in range(2)]
  lasts = []
  try:
    wait_for_epochs(tmp_path, processes[0], 1)
    processes[1].send_signal(signum)
    for p in processes:
      _, stderr = p.communicate(timeout=120)
      assert p.returncode == status, stderr
      lasts.append(stderr.strip().splitlines()[-1])
  finally:   # a failed test leaves neither process running into the next one
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.communicate()
  assert lasts[0] == lasts[1] and lasts[0].startswith(f"stopped: {name} after epoch ")
  done = int(lasts[0].split("after epoch ")[1].split(";")[0])
  assert done < 200 and len(metrics(tmp_path)) == done
  assert (tmp_path / "params.npz").exists()


@pytest.mark.slow
def test_a_process_that_dies_mid_epoch_stops_the_other_with_one_line(tmp_path):
  port = free_port()
  # Digits in batches of 8: ~2 s epochs, and no checkpoint before 30 s of training
  # (--checkpoint_seconds), so a kill once epoch 1 is written lands in epoch 2. (Killed
  # while a checkpoint is being written, orbax's barrier waits for JAX's 100 s heartbeat
  # timeout instead, and JAX aborts the survivor with its own log.)
  processes = [runner("digits", tmp_path, "--epochs=50", "--batch_size=8",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      f"--process_id={i}") for i in range(2)]
  try:
    wait_for_epochs(tmp_path, processes[0], 1)
    processes[1].kill()
    _, stderr = processes[0].communicate(timeout=60)   # JAX alone would abort after ~100 s
  finally:   # a failed test leaves neither process running into the next one
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.communicate()
  assert processes[0].returncode == 1, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: epoch ") and "this process or another one failed" in last
  assert "restart every process with the same command to resume" in last


@pytest.mark.slow
def test_batch_not_divisible_by_the_devices_is_one_line(tiny_npz, tmp_path):
  process = runner(tiny_npz, tmp_path, "--batch_size=6", env=host_devices(4))
  _, stderr = process.communicate(timeout=120)
  lines = [line for line in stderr.splitlines() if line.strip() and "libtpu" not in line]
  assert process.returncode == 1 and len(lines) == 1, stderr
  assert ("batch size 6 does not divide over the 4 devices that share each model; use a "
          "multiple of 4") in lines[0]
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def _run_stack(seeds, devices, x, y, b, hp, values):
  """3 epochs of a stack of len(seeds) models on a mesh of `devices` devices: (the
  epoch's gathered batches of model 0, the loss curves, params, test loss, predictions)."""
  n = x.shape[0]
  mesh = parallel.run_mesh(devices, len(seeds))
  X, Y = parallel.shard_rows(x, mesh), parallel.shard_rows(y, mesh)
  shards = parallel.data_shards(mesh)
  assert [s.data.shape[0] for s in X.addressable_shards] == [-(-n // shards)] * devices
  state = parallel.shard_models(train.init_state(seeds, x.shape[1], 16, 3, hp, values), mesh)
  values = parallel.shard_models(values, mesh)
  # Model 0's global batches, gathered as train_epoch gathers them.
  idx, _ = train.batch_indices(train.epoch_order(state.key[0], 0, n), b)
  batches = jax.jit(lambda X, Y, idx, m=mesh: jax.lax.map(
      lambda i: (train.gather_batch(X, i, m), train.gather_batch(Y, i, m)), idx))(X, Y, idx)
  epoch = train.make_train_epoch(hp, train.Batching(b, n, mesh))
  curve = []
  for e in range(3):
    state, m = epoch(state, X, Y, e, values)
    curve.append([np.asarray(m["train_loss"]), np.asarray(m["train_accuracy"])])
  # Every device holds a part: the model axis split over G slices, each whole within one.
  assert len({s.device for s in state.params.w1.addressable_shards}) == devices
  assert state.params.w1.addressable_shards[0].data.shape[0] == len(seeds) // (
      devices // shards)
  ev = evaluation.evaluate(state.params, X, Y, train.Batching(8, n, mesh), net=Network())
  return (jax.device_get(batches), np.array(curve), jax.device_get(state.params),
          np.asarray(ev["loss"]), np.asarray(ev["predictions"]))


def _check_1_2_4_devices():
  """The same global batches, losses and params on meshes of 1, 2 and 4 devices, for one
  model (data parallel), four seeds (a model per device) and two swept learning rates
  (a 2 × 2 mesh on 4 devices)."""
  assert jax.device_count() == 4, "run with --xla_force_host_platform_device_count=4"
  rng = np.random.default_rng(0)
  n, d, b = 30, 6, 8   # 30 rows: 2 padding rows on 4 devices
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  hp = train.Hyperparams(optimizer="adamw", learning_rate=0.01, schedule="constant",
                         weight_decay=0.1, label_smoothing=0.1)
  stacks = {"one model": ([0], {}), "four seeds": ([0, 1, 2, 3], {}),
            "two rates": ([0, 0], {"learning_rate": np.array([0.01, 0.03], np.float32)})}
  for name, (seeds, values) in stacks.items():
    results = {devices: _run_stack(seeds, devices, x, y, b, hp, values)
               for devices in (1, 2, 4)}
    ref_batches, ref_curve, ref_params, ref_loss, ref_pred = results[1]
    for devices in (2, 4):
      batches, curve, params, loss, pred = results[devices]
      for got, want in zip(batches, ref_batches):
        np.testing.assert_array_equal(got, want)  # the same global batches, bit for bit
      np.testing.assert_allclose(curve, ref_curve, rtol=RTOL, err_msg=name)
      for got, want in zip(params, ref_params):
        assert np.max(np.abs(got - want)) <= RTOL * np.max(np.abs(want)), name
      np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg=name)
      np.testing.assert_array_equal(pred, ref_pred)
  print("OK 4 devices")


if __name__ == "__main__":
  _check_1_2_4_devices()


@pytest.mark.slow
def test_native_stdout_is_hidden_in_its_window_and_python_output_is_not():
  """processes.NativeStdoutHidden: what C code writes to descriptor 1 in the window is
  dropped (XLA's Gloo lines); Python's prints in it come out at once, in order."""
  code = """
import os, sys
from mlp_jax.run import processes
print("before", flush=True)
hidden = processes.NativeStdoutHidden()
hidden.start()
os.write(1, b"[Gloo] Rank 0 is connected to 1 peer ranks\\n")
print("python, in the window")
hidden.end()
os.write(1, b"native, after\\n")
print("after")
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ["before", "python, in the window", "native, after",
                                        "after"]
