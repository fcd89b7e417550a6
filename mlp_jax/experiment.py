"""One training run from a config to a workdir: what `experiments/train.py` calls.

WORKDIR/ after a run:
    config.json      every setting, package versions, the device; `runs` lists the first
                     run and each resume
    metrics.jsonl    one JSON line per epoch (lines a restart replaces are kept aside in
                     metrics.replaced-N.jsonl)
    checkpoints/     orbax checkpoints of the TrainState (resume from the newest; corrupt
                     ones are moved to checkpoints/corrupt/)
    params.npz       final w1, b1, w2, b2 and the input preprocessing: mj.load(WORKDIR)
    curves.png       loss and accuracy per epoch
    confusion.png    the test confusion matrix
    filters.png      the rows of W1 as images (image datasets)

A workdir is locked while a run uses it: a second run on it is refused at once.

Data parallel on every local device by default (mlp_jax/parallel.py). With
`distributed` or coordinator_address / num_processes / process_id set, many processes
train together through jax.distributed; process 0 alone writes the files above, and all
of them save the checkpoints together, through orbax.
"""

import datetime
import fcntl
import itertools
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from typing import NamedTuple, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from mlp_jax import checkpoint
from mlp_jax import data
from mlp_jax import parallel
from mlp_jax import plots
from mlp_jax import privacy
from mlp_jax import train
from mlp_jax import trained


class RunError(Exception):
  """A run that cannot go on; the message is one line for the user."""


class Interrupted(RunError):
  """Ctrl-C: the last finished epoch's checkpoint is on disk; rerun to resume."""


class PeerLost(RunError):
  """A collective failed in a multi-process run (this process or another one failed);
  restart them all."""


# What a failed collective raises (XlaRuntimeError, a RuntimeError, before jax 0.4.36).
_RUNTIME_ERROR = getattr(jax.errors, "JaxRuntimeError", RuntimeError)


def _first_line(e):
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


_HP = train.Hyperparams()  # the defaults shared with the library


class RunConfig(NamedTuple):
  """Every setting of a run: the one source of the runner's flags (their names and
  defaults) and of train.Hyperparams (see `hyperparams`)."""

  dataset: str = "digits"
  data_dir: Optional[str] = None
  hidden_dim: int = 256
  batch_size: int = 16
  epochs: int = 20
  optimizer: str = _HP.optimizer
  learning_rate: float = _HP.learning_rate
  schedule: str = _HP.schedule
  warmup_epochs: float = 1.0
  weight_decay: float = _HP.weight_decay
  clip_norm: float = _HP.clip_norm
  label_smoothing: float = _HP.label_smoothing
  grads: str = _HP.grads
  compute_dtype: str = _HP.compute_dtype
  seed: int = 0
  workdir: Optional[str] = None
  validation_fraction: Optional[float] = None  # None: 0, or 0.1 for a sweep
  progress: bool = True
  num_devices: Optional[int] = None          # per process; None: every local device
  distributed: bool = False                  # jax.distributed, settings from the cluster
  coordinator_address: Optional[str] = None  # host:port of process 0 (jax.distributed)
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  dp_noise_multiplier: Optional[float] = None  # σ: DP-SGD (mlp_jax/privacy.py) when set
  dp_target_epsilon: Optional[float] = None    # or ε: σ calibrated for the planned steps
  dp_clip_norm: float = 1.0                    # C
  dp_clipping: str = "flat"                    # flat | per_layer
  dp_delta: float = 1e-5
  num_seeds: int = 1                           # models seed, seed + 1, ... trained together
  sweep: tuple = ()                            # ("learning_rate=1e-3,2e-3", ...): a grid
  stacking: Optional[str] = None               # vmap | map; None: train.default_stacking


# What must match for a workdir's checkpoint to be resumed by this config: the data,
# the network's shape, the optimizer state's structure, and the RNG and batch order.
# The learning-rate schedule is fixed by the first run too (see `schedule_epochs`).
RESUME_FIELDS = ("dataset", "data_dir", "hidden_dim", "validation_fraction", "optimizer",
                 "weight_decay", "clip_norm", "seed", "batch_size", "learning_rate",
                 "schedule", "warmup_epochs", "dp_noise_multiplier", "dp_target_epsilon",
                 "dp_clip_norm", "dp_clipping", "dp_delta", "num_seeds", "sweep")


def _versions():
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "optax": optax.__version__, "numpy": np.__version__,
          "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", None)}


class WorkdirLock:
  """An exclusive flock on WORKDIR/.lock for the life of a run. The kernel drops it when
  the process ends, however it ends, so a killed run never leaves it stuck."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, ".lock")
    self._fd = None

  def acquire(self):
    """Takes the lock, writing this pid into it; RunError naming the holder if taken."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
      os.close(fd)
      raise RunError(f"--workdir {os.path.dirname(self.path)} is in use by another run "
                     f"(process {holder}); wait for it to finish, or use another "
                     "--workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd

  def release(self):
    """Drops the lock (a no-op if not held)."""
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock
      self._fd = None


def prepare_workdir(config):
  """Creates and locks the workdir (a fresh temporary one if None); refuses one in use
  or holding a run of other settings (RESUME_FIELDS).

  Returns (workdir, the config.json of the run it holds or {}, the WorkdirLock to release;
  only process 0 locks).
  """
  workdir = config.workdir or tempfile.mkdtemp(prefix="mlp_jax_")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f"--workdir {workdir} is a file, not a directory; choose another path.")
  lock = WorkdirLock(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
      lock.acquire()
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    lock.release()
    raise RunError(f"--workdir {workdir} is not writable ({e.strerror}); choose another "
                   "path.") from None
  try:
    return (workdir, _check_old_run(workdir, config), lock)
  except RunError:
    lock.release()
    raise


def _check_old_run(workdir, config):
  """The workdir's config.json ({} if none); RunError if its RESUME_FIELDS differ."""
  old_config = os.path.join(workdir, "config.json")
  if not os.path.exists(old_config):
    return {}
  with open(old_config) as f:
    old_run = json.load(f)
  old = old_run.get("config", {})
  for field in RESUME_FIELDS:
    if field in old and old[field] != json.loads(json.dumps(getattr(config, field))):
      raise RunError(f"--workdir {workdir} holds a run with {field}={old[field]!r}, not "
                     f"{getattr(config, field)!r}; use a fresh --workdir to start anew.")
  return old_run


def schedule_epochs(config, old_run, epochs_done, log):
  """The epochs where each learning-rate cycle ends, e.g. [10] or, resumed, [10, 15].

  A run's schedule is planned for its --epochs. Resuming with more epochs than planned
  keeps the planned cycle and starts a new one (warmup, then cosine to 0) for the extra
  epochs; with fewer, training stops early on the planned schedule. Either is logged.
  """
  if not epochs_done:
    return [config.epochs]
  planned = old_run.get("config", {}).get("epochs", config.epochs)
  ends = list(old_run.get("schedule_epochs") or [planned])
  if config.epochs > ends[-1]:
    log(f"--epochs {config.epochs} extends a run planned for {ends[-1]}: epochs "
        f"{ends[-1] + 1}-{config.epochs} follow a new {config.schedule} cycle at peak "
        f"learning rate {config.learning_rate:g} (schedule_epochs in config.json)")
    ends.append(config.epochs)
  elif config.epochs < ends[-1]:
    log(f"--epochs {config.epochs} stops early on a schedule planned for {ends[-1]} "
        "epochs; the learning rate has not decayed to its end")
  return ends


class _CtrlC:
  """Turns the first Ctrl-C into a request to stop after the current epoch's checkpoint.

  A second Ctrl-C interrupts at once. Only the main thread can own signal handlers;
  elsewhere Ctrl-C keeps its default behaviour.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\nCtrl-C: stopping after this epoch's checkpoint (press again to abort)",
          file=sys.stderr, flush=True)

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None


def is_private(config):
  """True for a differentially private (DP-SGD) run."""
  return config.dp_noise_multiplier is not None or config.dp_target_epsilon is not None


class Stack(NamedTuple):
  """The models of a multi-model run: model m = configuration m // S, seed m % S."""

  configurations: list   # C dicts {name: value}, in grid order ([{}] for seeds alone)
  seeds: list            # the S seeds: seed, seed + 1, ...
  values: dict           # {name: (M,) float32}, M = C·S, the per-model swept values
  stacking: str = "vmap"  # how the models share the program (train.STACKINGS)


def parse_sweep(specs):
  """("name=v1,v2", ...) -> {name: (v1, v2)}; RunError naming what is wrong."""
  grid = {}
  for spec in specs:
    name, _, text = spec.partition("=")
    name = name.strip()
    if name in RunConfig._fields and name not in train.SWEEPABLE:
      raise RunError(f"--sweep {name} cannot be vmapped: it changes the shapes or the "
                     "program; loop over it instead, one run per value (e.g. for v in A B; "
                     f"do python experiments/train.py --{name}=$v --workdir=runs/$v; done).")
    if name not in train.SWEEPABLE:
      raise RunError(f"--sweep {spec!r}: unknown name {name!r}; sweepable are "
                     f"{', '.join(train.SWEEPABLE)}.")
    if name in grid:
      raise RunError(f"--sweep {name} is given twice; list all its values in one flag.")
    try:
      values = tuple(float(v) for v in text.split(","))
    except ValueError:
      values = ()
    if not text.strip() or not values or not all(np.isfinite(v) and v >= 0 for v in values):
      raise RunError(f"--sweep {spec!r} needs numbers >= 0 after '=', e.g. "
                     f"--sweep={name}=1e-3,2e-3.")
    if name == "learning_rate" and min(values) <= 0:
      raise RunError("--sweep learning_rate values must be > 0.")
    if name == "label_smoothing" and max(values) > 1:
      raise RunError("--sweep label_smoothing values must lie in [0, 1].")
    grid[name] = values
  return grid


def is_stacked(config):
  """True when the run trains several models together (--num_seeds > 1 or --sweep)."""
  return config.num_seeds > 1 or bool(config.sweep)


def make_stack(config):
  """The Stack of a multi-model run: the grid of --sweep values, times the seeds."""
  grid = parse_sweep(config.sweep)
  configurations = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
  seeds = [config.seed + s for s in range(config.num_seeds)]
  values = {name: np.array([c[name] for c in configurations for _ in seeds], np.float32)
            for name in grid}
  return Stack(configurations, seeds, values)


def resolve(config):
  """`config` with its defaults made explicit; RunError for settings that cannot work
  together. A sweep holds out 10% of train for validation unless told otherwise."""
  if config.num_seeds < 1:
    raise RunError(f"--num_seeds must be at least 1, got {config.num_seeds}.")
  fraction = config.validation_fraction
  if config.sweep:
    parse_sweep(config.sweep)
    if fraction is not None and fraction <= 0:
      raise RunError("a --sweep chooses its configuration on validation data: give "
                     "--validation_fraction > 0 (default 0.1), never the test set.")
  if config.stacking not in (None, *train.STACKINGS):
    raise RunError(f"--stacking must be one of {', '.join(train.STACKINGS)}.")
  if is_stacked(config):
    if is_private(config):
      raise RunError("--num_seeds and --sweep do not combine with DP-SGD yet: run one "
                     "private model per command.")
    if config.num_devices not in (None, 1) or config.distributed or config.num_processes:
      raise RunError("--num_seeds and --sweep train the models on one device: add "
                     "--num_devices=1 (and no multi-process flags).")
  if fraction is None:
    fraction = 0.1 if config.sweep else 0.0
  return config._replace(validation_fraction=fraction, sweep=tuple(config.sweep),
                         num_devices=1 if is_stacked(config) else config.num_devices)


def check_schedule(config):
  """Refuses a warmup longer than the run: the learning rate would never reach its peak."""
  if config.schedule == "warmup_cosine" and config.warmup_epochs > config.epochs:
    raise RunError(f"--warmup_epochs {config.warmup_epochs:g} is longer than --epochs "
                   f"{config.epochs}: the learning rate would never reach its peak; use "
                   f"--warmup_epochs of at most {config.epochs} (e.g. 1).")


# Optimizer slots per parameter (momentum, Adam's μ and ν).
_OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def memory_needed(config, in_dim, num_classes, num_rows):
  """Bytes one device needs, about: the float32 params with their optimizer slots, the
  gradient and the update, and the hidden activations of a batch (evaluation takes 1024
  rows), for each of the run's models; the resident data (N, D) once."""
  h = config.hidden_dim
  num_params = h * (in_dim + 1) + num_classes * (h + 1)
  state = 4 * num_params * (1 + _OPTIMIZER_SLOTS.get(config.optimizer, 2) + 2)
  activations = 4 * 3 * h * max(config.batch_size, 1024)
  return count_models(config) * (state + activations) + 4 * num_rows * in_dim


def count_models(config):
  """M: --num_seeds times the size of the --sweep grid."""
  return _num_models(make_stack(config) if is_stacked(config) else None)


def memory_available(device):
  """(bytes free on `device`, what it is): the accelerator's free memory, or the host's
  available RAM for a CPU device; (None, ...) where neither can be read."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.platform} device"
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host"
  except (ValueError, OSError):
    return None, "host"


def _gib(num_bytes):
  return f"{num_bytes / 2**30:,.1f} GiB"


def check_memory(config, in_dim, num_classes, num_rows, mesh):
  """Refuses, before anything is allocated, a network the memory cannot hold (XLA would
  abort the process). This process's CPU devices share its host's RAM."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  free, where = memory_available(local[0])
  need = memory_needed(config, in_dim, num_classes, num_rows)
  if local[0].platform == "cpu":
    need *= len(local)
  if free is not None and need > free:
    models = count_models(config)
    many = f" for {models} models" if models > 1 else ""
    raise RunError(f"--hidden_dim {config.hidden_dim} needs about {_gib(need)}{many} (W1 "
                   f"alone is {_gib(4 * config.hidden_dim * in_dim)}, plus its "
                   f"{config.optimizer} state, gradients and the data) but the {where} has "
                   f"{_gib(free)} free; use a smaller --hidden_dim"
                   + (" or fewer models (--num_seeds, --sweep)." if many else "."))


def _out_of_memory(e):
  """True if an XLA error is an allocation failure."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def check_dp_config(config):
  """Refuses, in one line, DP settings that cannot work, before any data is read."""
  if not is_private(config):
    return
  if not privacy.dp_available():
    raise RunError(f"the --dp_* flags need the dp extra: {privacy.DP_EXTRA}.")
  if config.dp_noise_multiplier is not None and config.dp_target_epsilon is not None:
    raise RunError("give --dp_noise_multiplier or --dp_target_epsilon, not both.")
  for flag in ("dp_noise_multiplier", "dp_target_epsilon", "dp_clip_norm", "dp_delta"):
    value = getattr(config, flag)
    if value is not None and not (np.isfinite(value) and value > 0):
      raise RunError(f"--{flag} must be a number > 0, got {value:g}.")
  if config.dp_clipping not in privacy.CLIPPINGS:
    raise RunError(f"--dp_clipping must be one of {', '.join(privacy.CLIPPINGS)}.")
  if config.grads != "manual":
    raise RunError("a DP run always uses the closed-form clipped gradient; drop "
                   f"--grads={config.grads}.")


def dp_plan(config, num_examples, steps_per_epoch, multiple, log):
  """The privacy.DPSGD of a private run and what config.json records of it.

  q = batch_size / N; σ given, or calibrated so that the PLD ε of the planned
  epochs × steps_per_epoch steps is the target; the padded batch M is the one a
  Poisson batch overflows with probability ≤ 1e-9 over the run.
  """
  if config.dp_delta >= 1 / num_examples:
    raise RunError(f"--dp_delta {config.dp_delta:g} is not below 1/N = "
                   f"{1 / num_examples:.3g} for N = {num_examples} training examples; a δ "
                   "that large allows leaking a whole example. Use e.g. 1e-5 or less.")
  q = config.batch_size / num_examples
  steps = config.epochs * steps_per_epoch
  sigma = config.dp_noise_multiplier
  if sigma is None:
    try:
      sigma = privacy.calibrate_noise_multiplier(config.dp_target_epsilon, q, steps,
                                                 config.dp_delta)
    except ValueError as e:
      raise RunError(f"--dp_target_epsilon: {e}") from None
    log(f"DP: σ = {sigma:.4f} reaches ε = {config.dp_target_epsilon:g} (PLD) at δ = "
        f"{config.dp_delta:g} in {steps} steps of q = {q:.4g}")
  padded, p_overflow = privacy.padded_batch_size(num_examples, q, steps, multiple=multiple)
  dp = privacy.DPSGD(noise_multiplier=sigma, clip_norm=config.dp_clip_norm,
                     clipping=config.dp_clipping, sampling_rate=q,
                     num_examples=num_examples, padded_batch_size=padded)
  record = {"noise_multiplier": sigma, "clip_norm": config.dp_clip_norm,
            "clipping": config.dp_clipping,
            "sensitivity": privacy.sensitivity(config.dp_clip_norm, config.dp_clipping),
            "delta": config.dp_delta, "sampling_rate": q, "expected_batch_size":
            config.batch_size, "padded_batch_size": padded, "overflow_probability":
            p_overflow, "planned_steps": steps,
            "planned_epsilon": privacy.epsilon(sigma, q, steps, config.dp_delta),
            "planned_epsilon_rdp": privacy.epsilon(sigma, q, steps, config.dp_delta, "rdp"),
            "input_scaling": data.fixed_scaling(config.dataset)}
  return dp, record


def hyperparams(config, steps_per_epoch, cycle_ends):
  """The train.Hyperparams of `config`: its fields of the same names, and a
  learning-rate cycle ending at each epoch of `cycle_ends` (see schedule_epochs)."""
  shared = {f: getattr(config, f) for f in train.Hyperparams._fields if f in RunConfig._fields}
  return train.Hyperparams(
      warmup_steps=int(config.warmup_epochs * steps_per_epoch),
      total_steps=cycle_ends[-1] * steps_per_epoch,
      restart_steps=tuple(e * steps_per_epoch for e in cycle_ends[:-1]), **shared)


def _read_history(path, epochs_done, writer, log):
  """The metrics lines of epochs 1..epochs_done. Lines of later epochs (a run that fell
  back to an older checkpoint, or restarts from scratch) are not lost: the old file is
  kept as metrics.replaced-N.jsonl."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  kept = [row for row in rows if row["epoch"] <= epochs_done]
  if len(kept) < len(rows) and writer:
    n = 1
    while os.path.exists(aside := path.replace(".jsonl", f".replaced-{n}.jsonl")):
      n += 1
    os.replace(path, aside)
    log(f"metrics.jsonl held epochs this run retrains; the old file is kept as {aside}")
  return kept


def _write_lines(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def _speed(new_rows, num_examples):
  """One line on this invocation's speed: the first epoch (which compiles) apart, then
  s per epoch and examples/s both from the mean of the later epochs."""
  first = new_rows[0]
  text = f"epoch {first['epoch']} {first['seconds']:.2f} s (with compiling)"
  rest = new_rows[1:]
  if rest:
    mean = sum(row["seconds"] for row in rest) / len(rest)
    text += (f"; epochs {rest[0]['epoch']}-{rest[-1]['epoch']} {mean:.3f} s per epoch, "
             f"{num_examples / mean:,.0f} examples/s")
  return text


def _summary(history, new_rows, num_examples, total_seconds, dp_record=None):
  last = history[-1]
  splits = [s for s in ("train", "validation", "test") if f"{s}_accuracy" in last]
  lines = [f"{'':10}" + "".join(f"{s:>12}" for s in splits),
           f"{'loss':10}" + "".join(f"{last[f'{s}_loss']:12.4f}" for s in splits),
           f"{'accuracy':10}" + "".join(f"{100 * last[f'{s}_accuracy']:11.2f}%" for s in splits)]
  lines.append(f"epochs {last['epoch']}, {total_seconds:.1f} s in all"
               + (f"; {_speed(new_rows, num_examples)}" if new_rows else ""))
  if dp_record is not None:
    lines.append(f"DP-SGD: ε = {last['epsilon']:.3f} (PLD; RDP {last['epsilon_rdp']:.3f}) "
                 f"at δ = {dp_record['delta']:g}, σ = {dp_record['noise_multiplier']:.4g}, "
                 f"q = {dp_record['sampling_rate']:.4g}, {last['steps']} steps, C = "
                 f"{dp_record['clip_norm']:g} ({dp_record['clipping']})")
  return "\n".join(lines)


def _account(row, dp, dp_record, steps, done):
  """Adds the ε spent after `steps` DP-SGD steps to the metrics row; stops the run if a
  Poisson batch overflowed its padding (an example would have been dropped)."""
  overflows = int(row.pop("overflows"))
  if overflows:
    raise RunError(f"{overflows} Poisson batch(es) in epoch {done + 1} exceeded the padded "
                   f"batch of {dp.padded_batch_size} (probability "
                   f"{dp_record['overflow_probability']:.1e}); the epoch is not recorded and "
                   f"the checkpoint after epoch {done} is kept: rerun to resume.")
  row["steps"] = steps
  for key, kind in (("epsilon", "pld"), ("epsilon_rdp", "rdp")):
    row[key] = privacy.epsilon(dp.noise_multiplier, dp.sampling_rate, steps,
                               dp_record["delta"], kind)


def _train_one_epoch(train_epoch, state, train_xyn, splits, epoch, mesh, stack=None):
  """(state, metrics row) of one epoch: train, evaluate, ONE transfer to the host.

  For a Stack of M models the row holds, for each metric, the mean and `_std` over the
  models and every model's value under "per_model"; examples_per_second sums them.
  """
  start = time.time()
  X, y, n = train_xyn
  if stack is None:
    state, device_metrics = train_epoch(state, X, y, epoch)
  else:
    state, device_metrics = train_epoch(state, X, y, epoch, stack.values)
  for name, (X_eval, y_eval, n_eval) in splits.items():
    if stack is None:
      ev = train.evaluate(state.params, X_eval, y_eval, num_examples=n_eval, mesh=mesh)
    else:
      ev = train.evaluate_stacked(state.params, X_eval, y_eval, num_examples=n_eval,
                                  stacking=stack.stacking)
    device_metrics[f"{name}_loss"], device_metrics[f"{name}_accuracy"] = (
        ev["loss"], ev["accuracy"])
  metrics = jax.device_get(device_metrics)
  if stack is None:
    row = {"epoch": epoch + 1, **{k: float(v) for k, v in metrics.items()}}
  else:
    per_model = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
    row = {"epoch": epoch + 1, **_mean_std(per_model),
           "per_model": {k: v.tolist() for k, v in per_model.items()}}
  row["seconds"] = time.time() - start
  row["examples_per_second"] = n * _num_models(stack) / row["seconds"]
  return state, row


def _diverged(row, stack):
  """One model: any loss is not finite. A stack: every model's train loss is not finite
  (a sweep's diverged models rank last instead, see `choose`)."""
  if stack is None:
    return not all(np.isfinite(v) for k, v in row.items() if k.endswith("_loss"))
  return not np.any(np.isfinite(row["per_model"]["train_loss"]))


def _num_models(stack):
  return 1 if stack is None else len(stack.configurations) * len(stack.seeds)


def _mean_std(per_model, models=None):
  """{metric: mean, metric_std: std} over the models `models` (default all)."""
  row = {}
  for key, values in per_model.items():
    values = np.asarray(values, np.float64)[models if models is not None else slice(None)]
    row[key], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
  return row


def _chosen_history(history, models):
  """The history of the models `models` alone (mean and std over them)."""
  return [{"epoch": row["epoch"], **_mean_std(row["per_model"], models)} for row in history]


def choose(history, stack):
  """(index of the chosen configuration, ranking): configurations ranked by their mean
  validation accuracy over seeds at the last epoch, ties broken by the lower mean
  validation loss (one whose models diverged ranks last); without a validation split,
  the only configuration."""
  last = history[-1]["per_model"]
  seeds = len(stack.seeds)
  ranking = []
  for c, values in enumerate(stack.configurations):
    models = list(range(c * seeds, (c + 1) * seeds))
    entry = {"configuration": values, "models": models,
             "diverged": not all(np.isfinite(last["train_loss"][m]) for m in models)}
    for key in ("validation_accuracy", "validation_loss"):
      if key in last:
        entry.update({f"{key}_{stat}": v for stat, v in zip(
            ("mean", "std"), _mean_std({key: last[key]}, models).values())})
    ranking.append(entry)
  if "validation_accuracy" in last:
    ranking.sort(key=lambda e: (not e["diverged"], e["validation_accuracy_mean"],
                                -e["validation_loss_mean"]), reverse=True)
  elif len(ranking) > 1:
    raise RunError("several configurations but no validation split to choose among them.")
  return stack.configurations.index(ranking[0]["configuration"]), ranking


def _join_processes(config):
  """jax.distributed.initialize when asked or a multi-process setting is given.

  Settings left None are detected by JAX from SLURM, a TPU pod or Open MPI.
  """
  explicit = (config.coordinator_address, config.num_processes, config.process_id)
  if not config.distributed and explicit == (None,) * 3:
    return
  if not config.workdir:
    raise RunError("a multi-process run needs --workdir, a directory every process can "
                   "reach (a shared filesystem).")
  try:
    parallel.initialize(config.coordinator_address, config.num_processes,
                        config.process_id)
  except Exception as e:  # pylint: disable=broad-except  (JAX raises several kinds)
    raise RunError(f"jax.distributed could not start ({_first_line(e)}); check "
                   "--coordinator_address (host:port of process 0, reachable by every "
                   "process), --num_processes and --process_id.") from None


def _make_mesh(config):
  try:
    mesh = parallel.data_mesh(config.num_devices)
  except ValueError as e:
    raise RunError(f"--num_devices: {e}") from None
  try:
    parallel.check_batch_size(config.batch_size, mesh)
  except ValueError as e:
    raise RunError(f"--batch_size: {e}") from None
  return mesh


def _any_process(flag):
  """True on every process if `flag` is true on any (one collective; no-op alone)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _write_results(workdir, state, history, splits, inputs, config, mesh, writer):
  """params.npz (with the preprocessing of `inputs`, a data.Dataset without its arrays),
  curves.png, confusion.png and filters.png of `state`, the last finished epoch.

  The test predictions are one evaluation pass on every process (a collective with a
  mesh of many processes); process 0 alone writes.
  """
  X_test, y_test_device, n_test = splits["test"]
  predictions = np.asarray(train.evaluate(state.params, X_test, y_test_device,
                                          num_examples=n_test, mesh=mesh)["predictions"])
  if not writer:
    return
  params = jax.device_get(state.params)
  trained.save(os.path.join(workdir, "params.npz"), params, inputs.mean, inputs.std,
               inputs.input_shape, inputs.class_names, config.dataset,
               data.PIXEL_MAX.get(config.dataset, 0.0))
  plots.plot_curves(history, os.path.join(workdir, "curves.png"), config.label_smoothing)
  plots.plot_confusion(plots.confusion_matrix(inputs.y_test, predictions,
                                              inputs.num_classes),
                       os.path.join(workdir, "confusion.png"), inputs.class_names)
  plots.plot_filters(params.w1, inputs.input_shape, os.path.join(workdir, "filters.png"))


def _finish_stack(workdir, state, history, epochs_done, splits, inputs, config, stack,
                  num_examples, start, interrupted, writer, log):
  """The end of a multi-model run: choose on validation, write the chosen model's
  params.npz and plots, all models' params_all.npz and sweep.json, log the summary."""
  chosen, ranking = choose(history, stack)
  models = ranking[0]["models"]
  X_test, y_test, n_test = splits["test"]
  test = jax.device_get(train.evaluate_stacked(state.params, X_test, y_test,
                                               num_examples=n_test, stacking=stack.stacking))
  params = jax.device_get(state.params)
  if writer:
    best = models[0]
    trained.save(os.path.join(workdir, "params.npz"),
                 jax.tree.map(lambda a: a[best], params), inputs.mean, inputs.std,
                 inputs.input_shape, inputs.class_names, config.dataset,
                 data.PIXEL_MAX.get(config.dataset, 0.0))
    np.savez(os.path.join(workdir, "params_all.npz"), **params._asdict(),
             seed=np.array([s for _ in stack.configurations for s in stack.seeds]),
             **{name: v for name, v in stack.values.items()})
    chosen_test = _mean_std({"test_accuracy": test["accuracy"],
                             "test_loss": test["loss"]}, models)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
      json.dump({"chosen": stack.configurations[chosen], "chosen_models": models,
                 "seeds": stack.seeds, "chosen_test": chosen_test,
                 "ranking": ranking}, f, indent=2)
    plots.plot_curves(_chosen_history(history, models), os.path.join(workdir, "curves.png"),
                      config.label_smoothing)
    plots.plot_confusion(plots.confusion_matrix(inputs.y_test, test["predictions"][best],
                                                inputs.num_classes),
                         os.path.join(workdir, "confusion.png"), inputs.class_names)
    plots.plot_filters(params.w1[best], inputs.input_shape,
                       os.path.join(workdir, "filters.png"))
  if interrupted is not None:
    raise interrupted
  log(_stack_summary(history, epochs_done, stack, ranking, test, num_examples,
                     time.time() - start))
  return {**history[-1], "chosen": {"configuration": stack.configurations[chosen],
                                    "models": models}}


def _stack_summary(history, epochs_done, stack, ranking, test, num_examples, seconds):
  """Mean ± std over the chosen configuration's seeds, then how it was chosen."""
  models = ranking[0]["models"]
  last = _chosen_history(history[-1:], models)[0]
  splits = [s for s in ("train", "validation") if f"{s}_accuracy" in last]
  accuracy = 100 * np.asarray(test["accuracy"])[models]
  seeds = f"seed {stack.seeds[0]}" if len(models) == 1 else (
      f"{len(models)} seeds {stack.seeds[0]}-{stack.seeds[-1]}")
  lines = [f"{'':10}" + "".join(f"{s:>18}" for s in splits),
           f"{'loss':10}" + "".join(f"{last[f'{s}_loss']:10.4f} ± {last[f'{s}_loss_std']:.4f}"
                                    for s in splits),
           f"{'accuracy':10}" + "".join(
               f"{100 * last[f'{s}_accuracy']:9.2f}% ± {100 * last[f'{s}_accuracy_std']:.2f}"
               for s in splits),
           f"test accuracy {accuracy.mean():.2f} ± {accuracy.std():.2f}% (min {accuracy.min():.2f}, "
           f"max {accuracy.max():.2f}) over {seeds}"]
  if len(ranking) > 1:
    chosen = ", ".join(f"{k}={v:g}" for k, v in ranking[0]["configuration"].items())
    lines.append(f"chosen: {chosen}, by validation accuracy "
                 f"{100 * ranking[0]['validation_accuracy_mean']:.2f} ± "
                 f"{100 * ranking[0]['validation_accuracy_std']:.2f}% among {len(ranking)} "
                 "configurations (ranked in sweep.json; test read for the chosen one only)")
  lines.append(f"epochs {history[-1]['epoch']}, {seconds:.1f} s in all" + (
      f"; {_speed(history[epochs_done:], num_examples * _num_models(stack))}"
      if history[epochs_done:] else ""))
  return "\n".join(lines)


def _config_record(config, old_run, cycle_ends, dp_record, ds, mesh, epochs_done):
  """config.json: this run's settings on top, and `runs`, one entry per invocation
  (the first run and each resume), each with its settings, start time and device."""
  this_run = {"config": config._asdict(), "started": datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"), "resumed_from_epoch": epochs_done,
              "versions": _versions(), "device": str(mesh.devices.flat[0]),
              "num_devices": mesh.size, "num_processes": jax.process_count(),
              "platform": jax.default_backend()}
  return {"config": config._asdict(), "schedule_epochs": cycle_ends, "dp": dp_record,
          "num_classes": ds.num_classes, "in_dim": ds.x_train.shape[1],
          "train_examples": len(ds.y_train), "runs": [*old_run.get("runs", []), this_run]}


def run(config, log=print):
  """Trains per `config`, writes the workdir, returns the metrics of the last epoch (for
  several models, with "chosen": the chosen configuration and its models)."""
  start = time.time()
  config = resolve(config)
  stack = make_stack(config) if is_stacked(config) else None
  _join_processes(config)
  writer = jax.process_index() == 0  # the one process that writes files and logs
  if not writer:
    log = lambda *args: None  # pylint: disable=unnecessary-lambda-assignment
  check_schedule(config)
  mesh = _make_mesh(config)
  check_dp_config(config)
  # The data is checked before a workdir exists: bad data leaves nothing behind.
  ds = data.load(config.dataset, config.data_dir,
                 validation_fraction=config.validation_fraction, seed=config.seed,
                 private=is_private(config))
  n, in_dim = ds.x_train.shape
  if config.batch_size > n:
    raise RunError(f"--batch_size {config.batch_size} exceeds the {n} training examples; "
                   f"use at most {n}.")
  check_memory(config, in_dim, ds.num_classes, n, mesh)
  steps_per_epoch = -(-n // config.batch_size)
  dp = dp_record = None
  if is_private(config):
    dp, dp_record = dp_plan(config, n, steps_per_epoch, mesh.size, log)
  workdir, old_run, lock = prepare_workdir(config)
  try:
    return _train(config, ds, mesh, workdir, old_run, dp, dp_record, steps_per_epoch,
                  writer, log, start, stack)
  except checkpoint.CheckpointError as e:
    raise RunError(str(e)) from None
  except _RUNTIME_ERROR as e:
    if _out_of_memory(e):
      raise RunError(f"out of memory ({_first_line(e)}); use a smaller --hidden_dim or "
                     "--batch_size.") from None
    raise
  finally:
    lock.release()


def _init_state(config, stack, in_dim, num_classes, hp, mesh):
  """The fresh TrainState of a run, or the stacked one of a Stack's M models."""
  if stack is None:
    return parallel.replicate(train.init_state(config.seed, in_dim, config.hidden_dim,
                                               num_classes, train.make_optimizer(hp)), mesh)
  seeds = [seed for _ in stack.configurations for seed in stack.seeds]
  return parallel.replicate(train.init_stacked_state(seeds, in_dim, config.hidden_dim,
                                                     num_classes, hp, stack.values), mesh)


def _train(config, ds, mesh, workdir, old_run, dp, dp_record, steps_per_epoch, writer, log,
           start, stack=None):
  """run() from a locked workdir on: restore, train epoch by epoch, write the results."""
  n, in_dim = ds.x_train.shape
  log(f"workdir: {workdir}")
  if stack is not None:
    log(f"{_num_models(stack)} models trained together: {len(stack.configurations)} "
        f"configuration(s) × seeds {stack.seeds[0]}-{stack.seeds[-1]}")
  # The optimizer state's structure does not depend on the schedule: restore first.
  state = _init_state(config, stack, in_dim, ds.num_classes,
                      hyperparams(config, steps_per_epoch, [config.epochs]), mesh)
  mngr = checkpoint.manager(workdir)
  epochs_done = 0
  restored = checkpoint.restore_latest(mngr, state, log)
  if restored is not None:
    epochs_done, state = restored
    log(f"resuming from the checkpoint after epoch {epochs_done}")
  cycle_ends = schedule_epochs(config, old_run, epochs_done, log)
  if dp is not None and config.dp_target_epsilon is not None and cycle_ends != [
      config.epochs]:  # σ depends on --epochs: it must not change within a run
    raise RunError(f"this run's σ was calibrated for ε = {config.dp_target_epsilon:g} over "
                   f"{cycle_ends[0]} epochs; resume it with --epochs={cycle_ends[0]}, or use "
                   "a fresh --workdir for another length.")
  hp = hyperparams(config, steps_per_epoch, cycle_ends)
  optimizer = train.make_optimizer(hp)
  learning_rate = train.make_schedule(hp)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  history = _read_history(metrics_path, epochs_done, writer, log)
  _barrier("mlp_jax: workdir read")  # every process has read it before process 0 writes
  if writer:
    _write_lines(metrics_path, history)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(_config_record(config, old_run, cycle_ends, dp_record, ds, mesh, epochs_done),
                f, indent=2)

  # Each process places only its own devices' rows (parallel.shard_rows).
  def place(x, y):
    return parallel.shard_rows(x, mesh), parallel.shard_rows(y, mesh), len(y)

  train_xyn = place(ds.x_train, ds.y_train)
  splits = {"test": place(ds.x_test, ds.y_test)}
  if ds.x_val is not None:
    splits["validation"] = place(ds.x_val, ds.y_val)
  inputs = ds._replace(x_train=None, x_test=None, x_val=None)  # the rest is small
  del ds
  if stack is None:
    train_epoch = train.make_train_epoch(hp, optimizer, config.batch_size, num_examples=n,
                                         mesh=mesh, dp=dp)
  else:
    stacking = config.stacking or train.default_stacking(
        jax.default_backend(), config.batch_size, in_dim, config.hidden_dim)
    stack = stack._replace(stacking=stacking)
    log(f"stacking: {stacking} (--stacking)")
    train_epoch = train.make_stacked_train_epoch(hp, config.batch_size, num_examples=n,
                                                 stacking=stacking)

  bar = range(epochs_done, config.epochs)
  show_bar = config.progress and writer
  if show_bar:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(bar, initial=epochs_done, total=config.epochs, unit="epoch",
                    dynamic_ncols=True)
  done = epochs_done
  interrupted = None
  stop = _CtrlC()
  try:
    stop.install()
    for epoch in bar:
      state, row = _train_one_epoch(train_epoch, state, train_xyn, splits, epoch, mesh, stack)
      if _diverged(row, stack):
        raise RunError(
            f"training diverged in epoch {epoch + 1}: train loss {row['train_loss']}, "
            f"test loss {row['test_loss']}; the learning rate {config.learning_rate:g} is "
            "likely too high (try 10x lower, or --clip_norm=1). The checkpoint after epoch "
            f"{done} is kept.")
      # The rate of the epoch's last step, to float32's 7 digits (whichever schedule).
      rate = float(learning_rate((epoch + 1) * steps_per_epoch - 1))
      row["learning_rate"] = float(f"{rate:.7g}")
      if stack is not None and "learning_rate" in stack.values:  # rates scale with peak
        row["per_model"]["learning_rate"] = (
            row["learning_rate"] * stack.values["learning_rate"] / config.learning_rate
        ).tolist()
      if dp is not None:
        _account(row, dp, dp_record, (epoch + 1) * steps_per_epoch, done)
      history.append(row)
      if writer:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(row) + "\n")
      checkpoint.save(mngr, epoch + 1, state)
      done = epoch + 1
      if show_bar:
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['train_accuracy']:.4f}",
                        test_acc=f"{row['test_accuracy']:.4f}")
      if _any_process(stop.requested):  # `finally` below waits for this checkpoint
        interrupted = Interrupted(
            f"Ctrl-C after epoch {done}; its checkpoint, params.npz and plots are saved: "
            "rerun the same command to resume.")
        break
  except _RUNTIME_ERROR as e:
    if jax.process_count() == 1:
      raise
    raise PeerLost(f"epoch {done + 1} failed in a collective ({_first_line(e)}): this "
                   "process or another one failed (out of memory, killed, network); the "
                   f"checkpoint after epoch {done} is kept: restart every process with the "
                   "same command to resume.") from None
  finally:
    stop.uninstall()
    mngr.wait_until_finished()
    mngr.close()
  if not history:
    raise RunError(f"--workdir {workdir} holds a finished run without its metrics.jsonl; "
                   "use a fresh --workdir.")
  if stack is not None:
    return _finish_stack(workdir, state, history, epochs_done, splits, inputs, config, stack,
                         n, start, interrupted, writer, log)
  _write_results(workdir, state, history, splits, inputs, config, mesh, writer)
  if interrupted is not None:
    raise interrupted
  log(_summary(history, history[epochs_done:], n, time.time() - start, dp_record))
  return history[-1]
