"""Many models on many devices on JAX's own engine: a ("model", "data") mesh.

    mesh = parallel.run_mesh(num_devices, num_models=M)   # Mesh (G, D/G), G = gcd(M, D)
    X = parallel.shard_rows(x, mesh)             # rows (N, D) split over the data axis
    states = parallel.shard_models(states, mesh) # the M models split over the model axis
    train_epoch = train.make_train_epoch(hp, train.Batching(B, n, mesh))

The math is the one-model train step and scanned epoch; `mesh` only adds sharding
annotations and jit compiles the collectives: the stack's model axis is split over the
mesh's model axis (jax.vmap with spmd_axis_name), and each step's batch X[i] (B, D) of a
model is laid out B/(D/G) rows per device of its slice, the gradient contractions over
the batch becoming all-reduces within the slice. The batch order is
`epoch_order(key, epoch, n)` for every device count.

Many hosts: call `initialize` (jax.distributed) first; the mesh then spans the chosen
devices of every process, and each process places only its own rows of the dataset.
"""

import contextlib
import errno
import itertools
import math
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator, Optional

import jax
from jax import Array
from jax.experimental import multihost_utils
from jax.typing import ArrayLike
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODEL_AXIS = "model"
DATA_AXIS = "data"


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               timeout_seconds: float = 300) -> None:
  """jax.distributed.initialize: joins this process to the others before JAX starts.

  None lets JAX detect the value from the cluster (SLURM, TPU pods, Open MPI). With an
  explicit address, process 0 first checks that the port is free and the others wait up
  to `timeout_seconds` for it to open, so a wrong address is a ConnectionError naming
  it rather than an abort from inside the coordination service.
  """
  if coordinator_address is not None:
    check_resolves(coordinator_address)
  if coordinator_address is not None and process_id is not None:
    if process_id == 0:
      check_port_free(coordinator_address)
    else:
      wait_for_coordinator(coordinator_address, timeout_seconds)
  others = f"the other {num_processes - 1}" if num_processes else "the other"
  with deadline(timeout_seconds, f"{others} process(es) did not join within "
                f"--peer_timeout={timeout_seconds:g} s at "
                f"{coordinator_address or 'the detected coordinator'}; start every "
                "process with the same --coordinator_address and --num_processes, or "
                "raise --peer_timeout."):
    # JAX aborts the process (SIGABRT, a C++ trace) at its own timeout: ours comes first.
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(timeout_seconds) + 60)


@contextlib.contextmanager
def deadline(seconds: Optional[float], message: str) -> Iterator[None]:
  """Ends the process with "error: MESSAGE" (one line, status 1) if the block has not
  finished after `seconds` (None: no limit): a collective whose peer died or never came
  hangs in C++, where no exception can reach it."""
  if seconds is None:
    yield
    return
  def expire() -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)
  timer = threading.Timer(seconds, expire)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def check_resolves(address: str) -> None:
  """ConnectionError if the host of host:port has no address."""
  host, port = _host_port(address)
  try:
    socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except (socket.gaierror, UnicodeError) as e:
    raise ConnectionError(f"the coordinator host {host!r} does not resolve "
                          f"({getattr(e, 'strerror', None) or e}); fix "
                          "--coordinator_address.") from None


def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def check_port_free(address: str) -> None:
  """Raises ConnectionError if process 0 cannot listen on the port of `address`."""
  host, port = _host_port(address)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRNOTAVAIL:
        raise ConnectionError(f"process 0 runs on the coordinator, but {host} is not an "
                              "address of this machine; start process 0 on that host, or "
                              "fix --coordinator_address.") from None
      raise ConnectionError(f"process 0 cannot listen on port {port} ({e.strerror}); "
                            "pick a free port for the coordinator address.") from None


def wait_for_coordinator(address: str, timeout_seconds: float) -> None:
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


def run_mesh(num_devices: Optional[int] = None, num_models: int = 1) -> Mesh:
  """The ("model", "data") mesh of a run of `num_models` models over the first
  `num_devices` local devices of every process (None: every local device).

  The rule: of D devices in all, G = gcd(M, D) hold the models (M/G each) and the
  D/G devices of each of those slices split every batch of their models. M = 1 is
  plain data parallelism; M = 4 on 4 devices is one model per device; M = 6 on 4
  devices is 3 models per pair of devices, each batch split over the pair. No device
  is left idle. Raises ValueError if a process has fewer devices than asked for.
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
  return Mesh(np.array(devices).reshape(mesh_shape(num_models, len(devices))),
              (MODEL_AXIS, DATA_AXIS))


def mesh_shape(num_models: int, num_devices: int) -> tuple[int, int]:
  """(G, D/G) with G = gcd(M, D): the model slices and the devices of each."""
  groups = math.gcd(num_models, num_devices)
  return groups, num_devices // groups


def model_groups(mesh: Mesh) -> int:
  """G: the slices of the mesh that the models are split over."""
  return mesh.shape[MODEL_AXIS]


def data_shards(mesh: Mesh) -> int:
  """The devices that split each batch of one model."""
  return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch or row) axis is split evenly over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def model_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (model) axis is split evenly over the model axis."""
  return NamedSharding(mesh, P(MODEL_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the data axis."""
  n = data_shards(mesh)
  if batch_size % n:
    lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
    hint = f"{lower} or {upper}" if lower else f"{upper}"
    raise ValueError(f"batch size {batch_size} does not divide over the {n} devices that "
                     f"share each model; use a multiple of {n} (e.g. {hint}).")


def shard_rows(x: ArrayLike, mesh: Mesh) -> Array:
  """A host array x (N, ...) as a global jax.Array with its rows split over the mesh.

  Rows are padded with zeros to a multiple of the device count (the training code never
  indexes the padding: it is told the true N). Each process transfers only the rows of
  its own devices.
  """
  host = np.asarray(x)
  pad = -host.shape[0] % data_shards(mesh)
  shape = (host.shape[0] + pad,) + host.shape[1:]

  def rows(index: Optional[tuple[slice, ...]]) -> np.ndarray:
    start, stop, _ = (index or (slice(None),))[0].indices(shape[0])   # None: every row
    part = host[start:min(stop, host.shape[0])]
    return np.concatenate([part, np.zeros((stop - start - len(part),) + host.shape[1:],
                                          host.dtype)])

  return jax.make_array_from_callback(shape, batch_sharded(mesh), rows)


def put(tree: Any, sharding: NamedSharding) -> Any:
  """Every leaf of host `tree` as a global jax.Array laid out by `sharding`; each
  process transfers only the parts of its own devices."""
  def one(leaf: ArrayLike) -> Array:
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(one, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of `tree` with a full copy on every device."""
  return put(tree, replicated(mesh))


def shard_models(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of `tree` (leading model axis M, a multiple of model_groups(mesh)) split
  over the model axis, whole on each device of a slice."""
  return put(tree, model_sharded(mesh))


def to_host(tree: Any) -> Any:
  """Every leaf of `tree` as a whole numpy array on this host, whichever devices and
  processes hold its parts (one collective in a multi-process run)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def process_values(value: ArrayLike) -> np.ndarray:
  """Every process's `value` (a numpy scalar or array), stacked along a new first axis
  of one per process (one collective)."""
  return np.asarray(multihost_utils.process_allgather(value))


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: int = 600) -> None:
  """Waits until every process gets here (no-op alone), up to `timeout_s`: at the
  coordination service's barrier, not a device collective, so that no process starts
  the CPU's Gloo collectives (which wait a fixed 30 s for their peers) long before
  the others; a device collective where JAX lacks that barrier."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = getattr(distributed.global_state, "client", None)
  if client is None or not hasattr(client, "wait_at_barrier"):
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"{name} #{next(_BARRIERS)}", timeout_s * 1000)
