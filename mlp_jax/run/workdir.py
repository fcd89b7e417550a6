"""The workdir of a run: its lock, its config history (config.json), its metrics file.

WORKDIR/ after a run:
    config.json      every setting, package versions, the device; `runs` lists the first
                     run and each resume
    metrics.jsonl    one JSON line per epoch (lines a restart replaces are kept aside in
                     metrics.replaced-N.jsonl)
    checkpoints/     orbax checkpoints of the TrainState (mlp_jax/run/checkpoint.py)
    params.npz, plots, and for several models params_all.npz, sweep.json (reports.py)
    tensorboard/     event files written every epoch (live.py)

A workdir serves one run at a time (WorkdirLock), and holds one run's settings: a
resume must match RESUME_FIELDS.
"""

import datetime
import fcntl
import hashlib
import io
import json
import os
import platform
import tempfile
from typing import Any, Optional

import jax
from jax.sharding import Mesh
import numpy as np

from mlp_jax.base import files, records
from mlp_jax.data import datasets
from mlp_jax.training import config as config_lib
from mlp_jax.training.config import Config, Log, RunError
from mlp_jax.training.stack import Row


# config.json's layout: 2 since a checkpoint holds a stack of models (leading axis M).
FORMAT = 2

# What must match for a workdir's checkpoint to be resumed by this config: the settings
# the spec marks resume (the data, the network's shape, the optimizer state's structure,
# and the RNG and batch order). The learning-rate schedule is fixed by the first run too
# (see `schedule_epochs`).
RESUME_FIELDS = config_lib.RESUME_FIELDS

# Resume settings that older runs did not record, and the value every such run had.
UNRECORDED = {"activation": "relu", "augment": 0}

# Every name a run writes in its workdir (files, and the directories it writes into).
WRITES = (".lock", "config.json", "metrics.jsonl", "params.npz", "params_all.npz",
          "sweep.json", "curves.png", "confusion.png", "filters.png", "error.log",
          "checkpoints", "tensorboard", "refit")

WRITE_PROBE = "write-test"   # a file made and removed at the start: the workdir is writable


class WorkdirLock:
  """An exclusive flock on WORKDIR/.lock for the life of a run. The kernel drops it when
  the process ends, however it ends, so a killed run never leaves it stuck."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._fd: Optional[int] = None

  def acquire(self) -> None:
    """Takes the lock, writing this pid into it; RunError naming the holder if taken."""
    fd = files.open_for_update(self.path, os.O_RDWR | os.O_CREAT)
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


def prepare(config: Config, log: Log = print, fingerprint: Optional[dict[str, Any]] = None
            ) -> tuple[str, dict[str, Any], WorkdirLock]:
  """Creates and locks the workdir (a fresh temporary one if None); refuses one in use,
  a symlink where it writes a file, or one holding a run of other settings
  (RESUME_FIELDS) or other data (`fingerprint`, data_fingerprint's).

  Returns (workdir, the config.json of the run it holds or {}, the WorkdirLock to release;
  only process 0 locks).
  """
  workdir = config.workdir or tempfile.mkdtemp(prefix="mlp_jax_")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f"--workdir {workdir} is a file, not a directory; choose another path.")
  lock = WorkdirLock(workdir)
  try:
    files.make_dirs(workdir)
    if jax.process_index() == 0:
      lock.acquire()
    # A probe of a new random name, created exclusively: writable, and nothing followed.
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=f".{WRITE_PROBE}{files.TEMPORARY_MARK}"):
      pass
    for name in WRITES:  # refused before anything is trained, not at the end
      files.refuse_link(os.path.join(workdir, name))
      files.refuse_links_below(os.path.join(workdir, name))   # checkpoints/N/*, ...
  except files.UnsafePath as e:
    lock.release()
    raise RunError(f"{e.strerror}.") from None
  except OSError as e:
    lock.release()
    raise RunError(f"--workdir {workdir} is not writable ({e.strerror}); choose another "
                   "path.") from None
  try:
    if jax.process_index() == 0:
      files.remove_stale_temporaries(workdir, WRITES)   # not the probes: each process
      # of a multi-process run makes its own now (a killed one leaves an empty file)
    return (workdir, _check_old_run(workdir, config, log, fingerprint), lock)
  except RunError:
    lock.release()
    raise


def _set_aside(path: str, kind: str) -> str:
  """Renames `path` to STEM.KIND-N.EXT (N: the first free number); returns the new path."""
  stem, ext = os.path.splitext(path)
  n = 1
  while os.path.exists(aside := f"{stem}.{kind}-{n}{ext}"):
    n += 1
  files.move(path, aside)
  return aside


def _check_old_run(workdir: str, config: Config, log: Log,
                   fingerprint: Optional[dict[str, Any]]) -> dict[str, Any]:
  """The workdir's config.json ({} if none, or unreadable: then set aside, and the
  checkpoint's own record of the settings is checked instead); RunError if its
  RESUME_FIELDS differ or it was written by a version whose checkpoints hold one model,
  not a stack."""
  old_run = read_old_config(workdir, log)
  if not old_run:
    return {}
  if isinstance(old_run.get("format"), int) and old_run["format"] > FORMAT:
    raise RunError(f"--workdir {workdir} holds a run of a newer mlp_jax (config.json "
                   f"format {old_run['format']}, this version writes {FORMAT}); finish it "
                   "with that version, or use a fresh --workdir.")
  if old_run.get("format") != FORMAT:
    raise RunError(f"--workdir {workdir} holds a run of mlp_jax 0.2 or older, whose "
                   "checkpoints this version cannot resume; finish it with that version "
                   "(its params.npz loads here), or use a fresh --workdir.")
  old = {**UNRECORDED, **old_run.get("config", {})}
  if "input_scaling" not in old:  # mlp_jax 0.3 scaled per feature, private runs globally
    private = any(old.get(f) is not None for f in ("dp_noise_multiplier", "dp_target_epsilon"))
    old = {**old, "input_scaling": "global" if private else "per_feature"}
  for field in RESUME_FIELDS:
    if field in old and comparable(field, old[field]) != comparable(
        field, json.loads(json.dumps(getattr(config, field)))):
      raise RunError(f"--workdir {workdir} holds a run with {field}={old[field]!r}, not "
                     f"{getattr(config, field)!r}; use a fresh --workdir to start anew.")
  if fingerprint is not None and "data" in old_run:
    check_data(old_run["data"], fingerprint, "this workdir's run")
  return old_run


def read_old_config(workdir: str, log: Log) -> dict[str, Any]:
  """The workdir's config.json ({} if none); one that is empty, truncated, not JSON or
  not the layout this writes is set aside (logged), and {} returned; UnsafePath if it is
  a link, a device, a pipe or a directory."""
  path = os.path.join(workdir, "config.json")
  if not os.path.lexists(path):
    return {}
  try:
    old_run = read_record(path)
    _check_record(old_run)
  except ValueError as e:
    aside = _set_aside(path, "unreadable") if jax.process_index() == 0 else ""
    log(f"config.json is unreadable ({str(e).splitlines()[0][:80]}); kept as {aside}, "
        "and the checkpoint's record of the settings is checked instead")
    return {}
  return old_run


# The types of config.json's entries that a resume reads: anything else is unreadable.
_RECORD_TYPES = {"format": int, "config": dict, "runs": list, "schedule_epochs": list,
                 "data": dict}


def _check_record(record: Any) -> None:
  """ValueError unless `record` has config.json's layout (the entries a resume reads)."""
  if not isinstance(record, dict):
    raise ValueError("not a JSON object")
  for key, kind in _RECORD_TYPES.items():
    if key in record and not isinstance(record[key], kind):
      raise ValueError(f"its {key!r} is {type(record[key]).__name__}, not {kind.__name__}")
  ends = record.get("schedule_epochs") or []
  if not all(isinstance(e, int) and not isinstance(e, bool) for e in ends):
    raise ValueError("its 'schedule_epochs' are not whole numbers")


def comparable(field: str, value: Any) -> Any:
  """A setting's value as a resume compares it: a sweep as its parsed grid (so that
  0.001,0.002 and 1e-3,2e-3 are the same grid)."""
  if field == "sweep" and isinstance(value, (list, tuple)):
    try:
      return config_lib.parse_sweep(value).grid()
    except RunError:
      return value
  return value


def data_fingerprint(ds: datasets.Dataset) -> dict[str, Any]:
  """What a run's training data were as it read them: each training array's shape,
  dtype and the SHA-256 of its bytes (train, and validation where held out; about
  1.1 GB/s here). config.json and every checkpoint record it; a resume on other data is
  refused (check_data)."""
  arrays = {"x_train": ds.x_train, "y_train": ds.y_train}
  if ds.x_val is not None and ds.y_val is not None:
    arrays.update(x_val=ds.x_val, y_val=ds.y_val)
  record: dict[str, Any] = {}
  for name, array in arrays.items():
    array = np.ascontiguousarray(array)
    record[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                    "sha256": hashlib.sha256(array.data).hexdigest()}
  return record


def check_data(saved: Any, fingerprint: dict[str, Any], whose: str) -> None:
  """RunError naming what changed if `fingerprint` (data_fingerprint) is not `saved`."""
  if saved == fingerprint:
    return
  if not isinstance(saved, dict):
    saved = {}
  for name in sorted(set(saved) | set(fingerprint)):
    old, new = saved.get(name), fingerprint.get(name)
    if old == new:
      continue
    if old is None or new is None:
      change = f"{name} is {'new' if old is None else 'gone'}"
    elif old.get("shape") != new["shape"] or old.get("dtype") != new["dtype"]:
      change = (f"{name} is {new['dtype']} {tuple(new['shape'])}, was "
                f"{old.get('dtype')} {tuple(old.get('shape', ()))}")
    else:
      change = (f"{name} holds other values (SHA-256 {new['sha256'][:12]}…, was "
                f"{str(old.get('sha256'))[:12]}…)")
    raise RunError(f"the training data differ from those {whose} was trained on: "
                   f"{change}; resume with the data it started on, or use a fresh "
                   "--workdir.")


def resume_settings(config: Config, fingerprint: Optional[dict[str, Any]] = None
                    ) -> dict[str, Any]:
  """What a checkpoint records and a resume must match: RESUME_FIELDS, the float
  precision (JAX_ENABLE_X64) and the training data (`fingerprint`), as JSON values."""
  settings: dict[str, Any] = {field: getattr(config, field) for field in RESUME_FIELDS}
  settings["jax_enable_x64"] = bool(jax.config.read("jax_enable_x64"))
  if fingerprint is not None:
    settings["data"] = fingerprint
  return json.loads(json.dumps(settings))


def schedule_epochs(config: Config, old_run: dict[str, Any], start: Any, log: Log
                    ) -> list[int]:
  """The epochs where each learning-rate cycle ends, e.g. [10] or, resumed, [10, 15],
  from `start` (hooks.Restored: its epochs done and its checkpoint's schedule).

  A run's schedule is planned for its --epochs. Resuming with more epochs than planned
  keeps the planned cycle and starts a new one (warmup, then cosine to 0) for the extra
  epochs; with fewer, training stops early on the planned schedule. Either is logged.
  The checkpoint's own record decides; config.json only for a checkpoint without one
  (mlp_jax 0.4.0 and older), and then it must be there and sane.
  """
  if not start.epochs_done:
    return [config.num_epochs]
  epochs = config.num_epochs
  ends = list(start.schedule or _schedule_of_config_json(old_run, config, start.epochs_done))
  if epochs > ends[-1]:
    swept = "learning_rate" in config_lib.parse_sweep(config.sweep).names()
    peak = ("each model's own peak learning rate" if swept
            else f"peak learning rate {config.learning_rate:g}")
    added = (f"epoch {epochs} follows" if epochs == ends[-1] + 1
             else f"epochs {ends[-1] + 1}-{epochs} follow")
    log(f"--epochs {epochs} extends a run planned for {ends[-1]}: {added} a new "
        f"{config.schedule} cycle at {peak} (schedule_epochs in config.json)")
    ends.append(epochs)
  elif epochs < ends[-1]:
    log(f"--epochs {epochs} stops early on a schedule planned for {ends[-1]} "
        "epochs; the learning rate has not decayed to its end")
  return ends


def _schedule_of_config_json(old_run: dict[str, Any], config: Config, epochs_done: int
                             ) -> list[int]:
  """schedule_epochs as config.json records it, for a checkpoint that does not; RunError
  if config.json is lost, or its value is not increasing epochs from 1 to 10^6."""
  if "config" not in old_run:
    raise RunError(f"--workdir {config.workdir}: its checkpoint after epoch {epochs_done} "
                   "was saved without its learning-rate schedule (mlp_jax 0.4.0 or "
                   "older), and config.json, which holds it, is missing or unreadable: "
                   "put config.json back, or use a fresh --workdir.")
  ends = old_run.get("schedule_epochs") or [old_run["config"].get("epochs", config.epochs)]
  if not (isinstance(ends, list) and all(type(e) is int and 1 <= e <= 10**6 for e in ends)
          and ends == sorted(set(ends))):
    raise RunError(f"--workdir {config.workdir}: config.json's schedule_epochs {ends!r} is "
                   "not a list of increasing epochs from 1 to 10^6; put back the value the "
                   "run wrote, or use a fresh --workdir.")
  return list(ends)


def _versions() -> dict[str, Optional[str]]:
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "optax": optax.__version__, "numpy": np.__version__,
          "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", None)}


def run_entry(config: Config, mesh: Mesh, epochs_done: int) -> dict[str, Any]:
  """One invocation's entry in config.json's `runs`: its settings, start time, versions
  and devices."""
  return {"config": config._asdict(), "started": datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"), "resumed_from_epoch": epochs_done,
          "versions": _versions(), "device": str(mesh.devices.flat[0]),
          "num_devices": mesh.size, "mesh": dict(mesh.shape),
          "num_processes": jax.process_count(), "platform": jax.default_backend()}


def config_record(config: Config, old_run: dict[str, Any], this_run: dict[str, Any],
                  details: dict[str, Any]) -> dict[str, Any]:
  """config.json: this run's settings on top, then `details` (the schedule's cycle ends,
  the data's fingerprint and shape, the DP plan), and `runs`, one entry per invocation
  (run_entry: the first run and each resume)."""
  return {"format": FORMAT, "config": config._asdict(), **details,
          "runs": [*old_run.get("runs", []), this_run]}


atomic_file = files.atomic_file


def write_json(path: str, value: Any) -> None:
  """`value` as indented JSON at `path`, atomically."""
  with atomic_file(path, "w") as f:
    json.dump(value, f, indent=2)


def write_config(workdir: str, record: dict[str, Any]) -> None:
  """WORKDIR/config.json (config_record's), atomically."""
  write_json(os.path.join(workdir, "config.json"), record)


# A record (config.json, a metrics.jsonl line) longer than this is not one mlp_jax wrote,
# nor a metrics.jsonl longer than MAX_HISTORY_BYTES.
MAX_RECORD_BYTES = 64 << 20
MAX_HISTORY_BYTES = 1 << 30


def read_record(path: str) -> Any:
  """The JSON value of a workdir's record (config.json): its own regular file (not a
  link, a device or a pipe: files.UnsafePath), at most MAX_RECORD_BYTES read; ValueError
  if longer or not JSON."""
  with files.open_regular(path, follow=False) as f:
    text = f.read(MAX_RECORD_BYTES + 1)
  if len(text) > MAX_RECORD_BYTES:
    raise ValueError(f"over {MAX_RECORD_BYTES} bytes")
  return records.parse_json(text)


def read_history(workdir: str, epochs_done: int, writer: bool, log: Log
                 ) -> list[Row]:
  """The metrics lines of epochs 1..epochs_done. Lines of later epochs (a run that fell
  back to an older checkpoint, or restarts from scratch) are not lost: the old file is
  kept as metrics.replaced-N.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.lexists(path):
    return []
  rows, torn = read_rows(path)
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


def read_rows(path: str) -> tuple[list[Row], list[int]]:
  """(the metrics rows of a metrics.jsonl, the numbers of its lines that are not a
  whole JSON record with an epoch: a line cut by a crash or a full disk)."""
  rows: list[Row] = []
  torn: list[int] = []
  budget = records.Budget()   # for the whole file: lines under the byte cap add up
  with io.TextIOWrapper(files.open_regular(path, follow=False), errors="replace") as f:
    if os.fstat(f.fileno()).st_size > MAX_HISTORY_BYTES:
      return rows, [1]                      # not a file this runner wrote: set aside whole
    for number, line in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES), ""), 1):
      if len(line) == MAX_RECORD_BYTES and not line.endswith("\n"):
        while (chunk := f.readline(1 << 20)) and not chunk.endswith("\n"):
          pass                              # a line no run writes: skipped, never held
        torn.append(number)
        continue
      if not line.strip():
        continue
      try:
        row = records.parse_json(line, budget)
      except ValueError:
        row = None
      epoch = row.get("epoch") if isinstance(row, dict) else None
      if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
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

  files.append(os.path.join(workdir, "metrics.jsonl"), json.dumps(row) + "\n")
