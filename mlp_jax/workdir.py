"""The workdir of a run: its lock, its config history (config.json), its metrics file.

WORKDIR/ after a run:
    config.json      every setting, package versions, the device; `runs` lists the first
                     run and each resume
    metrics.jsonl    one JSON line per epoch (lines a restart replaces are kept aside in
                     metrics.replaced-N.jsonl)
    checkpoints/     orbax checkpoints of the TrainState (mlp_jax/checkpoint.py)
    params.npz, plots, and for several models params_all.npz, sweep.json (reports.py)
    tensorboard/     event files written every epoch (live.py)

A workdir serves one run at a time (WorkdirLock), and holds one run's settings: a
resume must match RESUME_FIELDS.
"""

import contextlib
import datetime
import fcntl
import json
import os
import platform
import tempfile
from typing import IO, TYPE_CHECKING, Any, Iterator, Optional

import jax
import numpy as np

from mlp_jax import data
from mlp_jax.config import Config
from mlp_jax.config import Log
from mlp_jax.config import RunError
from mlp_jax.stack import Row

if TYPE_CHECKING:
  from mlp_jax.experiment import RunContext  # experiment imports this module

# config.json's layout: 2 since a checkpoint holds a stack of models (leading axis M).
FORMAT = 2

# What must match for a workdir's checkpoint to be resumed by this config: the data,
# the network's shape, the optimizer state's structure, and the RNG and batch order.
# The learning-rate schedule is fixed by the first run too (see `schedule_epochs`).
# The models (num_seeds, sweep) come first: they set validation_fraction's default, so
# a resume without the --sweep is told so, not blamed on validation_fraction.
RESUME_FIELDS = ("num_seeds", "sweep", "cv_folds", "cv_fold", "dataset", "data_dir", "input_scaling",
                 "hidden_dim", "validation_fraction", "optimizer", "weight_decay",
                 "clip_norm", "seed", "batch_size", "learning_rate", "schedule",
                 "warmup_epochs", "ema_decay", "dp_noise_multiplier", "dp_target_epsilon",
                 "dp_clip_norm", "dp_clipping", "dp_delta")


class WorkdirLock:
  """An exclusive flock on WORKDIR/.lock for the life of a run. The kernel drops it when
  the process ends, however it ends, so a killed run never leaves it stuck."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._fd: Optional[int] = None

  def acquire(self) -> None:
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

  def release(self) -> None:
    """Drops the lock (a no-op if not held)."""
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock
      self._fd = None


def prepare(config: Config, log: Log = print) -> tuple[str, dict[str, Any], WorkdirLock]:
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
    try:
      with open(probe, "w") as f:
        f.write("ok")
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    lock.release()
    raise RunError(f"--workdir {workdir} is not writable ({e.strerror}); choose another "
                   "path.") from None
  try:
    return (workdir, _check_old_run(workdir, config, log), lock)
  except RunError:
    lock.release()
    raise


def _set_aside(path: str, kind: str) -> str:
  """Renames `path` to STEM.KIND-N.EXT (N: the first free number); returns the new path."""
  stem, ext = os.path.splitext(path)
  n = 1
  while os.path.exists(aside := f"{stem}.{kind}-{n}{ext}"):
    n += 1
  os.replace(path, aside)
  return aside


def _check_old_run(workdir: str, config: Config, log: Log) -> dict[str, Any]:
  """The workdir's config.json ({} if none, or unreadable: then set aside, and the
  checkpoint's own record of the settings is checked instead); RunError if its
  RESUME_FIELDS differ or it was written by a version whose checkpoints hold one model,
  not a stack."""
  old_config = os.path.join(workdir, "config.json")
  if not os.path.exists(old_config):
    return {}
  try:
    with open(old_config) as f:
      old_run = json.load(f)
    if not isinstance(old_run, dict):
      raise ValueError("not a JSON object")
  except ValueError as e:  # empty, truncated, not JSON
    aside = _set_aside(old_config, "unreadable") if jax.process_index() == 0 else ""
    log(f"config.json is unreadable ({str(e).splitlines()[0][:80]}); kept as {aside}, "
        "and the checkpoint's record of the settings is checked instead")
    return {}
  if old_run.get("format") != FORMAT:
    raise RunError(f"--workdir {workdir} holds a run of mlp_jax 0.2 or older, whose "
                   "checkpoints this version cannot resume; finish it with that version "
                   "(its params.npz loads here), or use a fresh --workdir.")
  old = old_run.get("config", {})
  if "input_scaling" not in old:  # mlp_jax 0.3 scaled per feature, private runs globally
    private = any(old.get(f) is not None for f in ("dp_noise_multiplier", "dp_target_epsilon"))
    old = {**old, "input_scaling": "global" if private else "per_feature"}
  for field in RESUME_FIELDS:
    if field in old and old[field] != json.loads(json.dumps(getattr(config, field))):
      raise RunError(f"--workdir {workdir} holds a run with {field}={old[field]!r}, not "
                     f"{getattr(config, field)!r}; use a fresh --workdir to start anew.")
  return old_run


def resume_settings(config: Config) -> dict[str, Any]:
  """What a checkpoint records and a resume must match: RESUME_FIELDS and the float
  precision (JAX_ENABLE_X64), as JSON values."""
  settings = {field: getattr(config, field) for field in RESUME_FIELDS}
  settings["jax_enable_x64"] = bool(jax.config.read("jax_enable_x64"))
  return json.loads(json.dumps(settings))


def schedule_epochs(config: Config, old_run: dict[str, Any], epochs_done: int, log: Log
                    ) -> list[int]:
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
    swept = any(spec.partition("=")[0].strip() == "learning_rate" for spec in config.sweep)
    peak = ("each model's own peak learning rate" if swept
            else f"peak learning rate {config.learning_rate:g}")
    log(f"--epochs {config.epochs} extends a run planned for {ends[-1]}: epochs "
        f"{ends[-1] + 1}-{config.epochs} follow a new {config.schedule} cycle at {peak} "
        "(schedule_epochs in config.json)")
    ends.append(config.epochs)
  elif config.epochs < ends[-1]:
    log(f"--epochs {config.epochs} stops early on a schedule planned for {ends[-1]} "
        "epochs; the learning rate has not decayed to its end")
  return ends


def _versions() -> dict[str, Optional[str]]:
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "optax": optax.__version__, "numpy": np.__version__,
          "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", None)}


def config_record(ctx: "RunContext", old_run: dict[str, Any], cycle_ends: list[int],
                  ds: data.Dataset, epochs_done: int) -> dict[str, Any]:
  """config.json: this run's settings on top, and `runs`, one entry per invocation
  (the first run and each resume), each with its settings, start time and device.
  `ctx` is the run's experiment.RunContext (its config, mesh and DP plan)."""
  config, mesh = ctx.config, ctx.mesh
  dp_record = ctx.dp.record if ctx.dp is not None else None
  this_run = {"config": config._asdict(), "started": datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"), "resumed_from_epoch": epochs_done,
              "versions": _versions(), "device": str(mesh.devices.flat[0]),
              "num_devices": mesh.size, "mesh": dict(mesh.shape),
              "num_processes": jax.process_count(), "platform": jax.default_backend()}
  return {"format": FORMAT, "config": config._asdict(), "schedule_epochs": cycle_ends,
          "dp": dp_record, "num_classes": ds.num_classes, "in_dim": ds.x_train.shape[1],
          "train_examples": len(ds.y_train), "runs": [*old_run.get("runs", []), this_run]}


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
  """A file object on a temporary twin of `path`, renamed to `path` once the block has
  written it completely and flushed it to disk: a crash or a full disk never leaves a
  truncated `path` behind (the temporary twin is removed)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, value: Any) -> None:
  """`value` as indented JSON at `path`, atomically."""
  with atomic_file(path, "w") as f:
    json.dump(value, f, indent=2)


def write_config(workdir: str, record: dict[str, Any]) -> None:
  """WORKDIR/config.json (config_record's), atomically."""
  write_json(os.path.join(workdir, "config.json"), record)


def read_history(workdir: str, epochs_done: int, writer: bool, log: Log
                 ) -> list[Row]:
  """The metrics lines of epochs 1..epochs_done. Lines of later epochs (a run that fell
  back to an older checkpoint, or restarts from scratch) are not lost: the old file is
  kept as metrics.replaced-N.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows, torn = _read_rows(path)
  kept = [row for row in rows if row["epoch"] <= epochs_done]
  if (len(kept) < len(rows) or torn) and writer:
    aside = _set_aside(path, "replaced")
    what = (f"a torn line (line {torn[0]}, not a whole JSON record)" if torn
            else "epochs this run retrains")
    log(f"metrics.jsonl held {what}; the old file is kept as {aside}")
  missing = sorted(set(range(1, epochs_done + 1)) - {row["epoch"] for row in kept})
  if missing:
    log(f"metrics.jsonl lacks the lines of epoch(s) {', '.join(map(str, missing))}, which "
        f"the checkpoint after epoch {epochs_done} covers: their metrics are lost, the "
        "training is not")
  return kept


def _read_rows(path: str) -> tuple[list[Row], list[int]]:
  """(the metrics rows of a metrics.jsonl, the numbers of its lines that are not a
  whole JSON record with an epoch: a line cut by a crash or a full disk)."""
  rows: list[Row] = []
  torn: list[int] = []
  with open(path, errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if isinstance(row, dict) and "epoch" in row:
        rows.append(row)
      else:
        torn.append(number)
  return rows, torn


def write_history(workdir: str, rows: list[Row]) -> None:
  """WORKDIR/metrics.jsonl holding exactly `rows`, one JSON line each, atomically."""
  with atomic_file(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def append_row(workdir: str, row: Row) -> None:
  """One epoch's line appended to WORKDIR/metrics.jsonl."""

  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
