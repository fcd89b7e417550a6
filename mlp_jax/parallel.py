"""Data parallelism on JAX's own engine: one "data" mesh axis, the batch split across it.

    mesh = parallel.data_mesh(num_devices)       # Mesh(devices, ("data",))
    X = parallel.shard_rows(x, mesh)             # rows (N, D) spread over the devices
    state = parallel.replicate(state, mesh)      # params and optimizer state on every device
    train_epoch = train.make_train_epoch(hp, optimizer, B, num_examples=n, mesh=mesh)

The math is the single-device train step and scanned epoch; `mesh` only adds sharding
annotations and jit compiles the collectives: each step's batch X[i] (B, D) is laid out
B/devices rows per device, and the gradient contractions over the batch become
all-reduces, so every device ends the step with the same parameters. The batch order is
`epoch_order(key, epoch, n)` for every device count.

Many hosts: call `initialize` (jax.distributed) first; the mesh then spans the chosen
devices of every process, and each process places only its own rows of the dataset.
"""

import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               timeout_seconds=300):
  """jax.distributed.initialize: joins this process to the others before JAX starts.

  None lets JAX detect the value from the cluster (SLURM, TPU pods, Open MPI). With an
  explicit address, process 0 first checks that the port is free and the others wait up
  to `timeout_seconds` for it to open, so a wrong address is a ConnectionError naming
  it rather than an abort from inside the coordination service.
  """
  if coordinator_address is not None and process_id is not None:
    if process_id == 0:
      check_port_free(coordinator_address)
    else:
      wait_for_coordinator(coordinator_address, timeout_seconds)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout_seconds)


def _host_port(address):
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def check_port_free(address):
  """Raises ConnectionError if process 0 cannot listen on the port of `address`."""
  _, port = _host_port(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise ConnectionError(f"process 0 cannot listen on port {port} ({e.strerror}); "
                            "pick a free port for the coordinator address.") from None


def wait_for_coordinator(address, timeout_seconds):
  """Waits until process 0 listens at host:port; ConnectionError after timeout_seconds."""
  host, port = _host_port(address)
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host, port), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConnectionError(
            f"nothing listens at the coordinator address {address} after "
            f"{timeout_seconds:g} s ({e.strerror or e}); start process 0 there, or fix "
            "the address.") from None
      time.sleep(0.5)


def data_mesh(num_devices=None):
  """A one-axis ("data",) mesh over the first `num_devices` local devices of every process.

  None uses every local device. Raises ValueError if a process has fewer devices.
  """
  local = jax.local_device_count()
  num_devices = local if num_devices is None else num_devices
  if not 1 <= num_devices <= local:
    raise ValueError(f"asked for {num_devices} devices per process but this process has "
                     f"{local} ({jax.default_backend()}); ask for 1 to {local}.")
  devices = []
  for process in range(jax.process_count()):
    mine = sorted((d for d in jax.devices() if d.process_index == process),
                  key=lambda d: d.id)
    devices.extend(mine[:num_devices])
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh):
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh):
  """The leading (batch or row) axis is split evenly across the devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size, mesh):
  """Raises ValueError unless the global batch splits evenly over the mesh's devices."""
  n = mesh.size
  if batch_size % n:
    lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
    hint = f"{lower} or {upper}" if lower else f"{upper}"
    raise ValueError(f"batch size {batch_size} does not divide over {n} devices; use a "
                     f"multiple of {n} (e.g. {hint}).")


def shard_rows(x, mesh):
  """A host array x (N, ...) as a global jax.Array with its rows split over the mesh.

  Rows are padded with zeros to a multiple of the device count (the training code never
  indexes the padding: it is told the true N). Each process transfers only the rows of
  its own devices.
  """
  x = np.asarray(x)
  pad = -x.shape[0] % mesh.size
  shape = (x.shape[0] + pad,) + x.shape[1:]

  def rows(index):
    start, stop, _ = index[0].indices(shape[0])
    part = x[start:min(stop, x.shape[0])]
    return np.concatenate([part, np.zeros((stop - start - len(part),) + x.shape[1:],
                                          x.dtype)])

  return jax.make_array_from_callback(shape, batch_sharded(mesh), rows)


def replicate(tree, mesh):
  """Every leaf of `tree` as a global jax.Array with a full copy on every device."""
  sharding = replicated(mesh)

  def put(leaf):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)
