"""Checkpoints of the TrainState through orbax-checkpoint, numbered by finished epochs
(the runner saves by time: hooks.RunHooks).

Each checkpoint holds the state, the SHA-256 of its bytes and the signature of its
structure (tree, shapes, dtypes). On restore:

    corrupt (unreadable, or its checksum fails)  -> moved to checkpoints/corrupt/, the
                                                    next older one is tried
    another structure, permissions, I/O errors   -> CheckpointError: one line, no fallback

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves no half-written step behind.
"""

import contextlib
import hashlib
import logging
import os
import re
import shutil
from typing import Any, Callable, Iterator, NamedTuple, Optional
import weakref

import jax
from jax.experimental import multihost_utils
import numpy as np

from mlp_jax.base import boundary, files
from mlp_jax.training import parallel

CORRUPT_DIR = "corrupt"


class CheckpointError(boundary.UserError):
  """A checkpoint problem that is not corruption; the message is one line for the user."""


class _Corrupt(Exception):
  """A checkpoint that cannot be read or fails its checksum."""


# A run's state: a train.TrainState (any pytree of arrays, for this module).
State = Any
# An orbax.checkpoint.CheckpointManager: orbax is imported when first used (manager()).
Manager = Any


def _orbax() -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


class _Place(NamedTuple):
  """Where a manager's checkpoints are: the workdir and its checkpoints/ by path and by
  identity ((device, inode) of each, when opened), how many steps to keep, and the steps
  it may delete (those there when opened, checked, and those this run saved)."""

  workdir: str
  checkpoints: str
  identity: tuple[tuple[int, int], tuple[int, int]]
  keep: int
  steps: set[int]
  fd: int   # checkpoints/, held open: orbax is given /proc/self/fd/FD (`manager`)
  attempted: set[int]   # the steps this run asked orbax to save


_PLACES: "weakref.WeakKeyDictionary[Manager, _Place]" = weakref.WeakKeyDictionary()


def _identity(workdir: str, checkpoints: str) -> tuple[tuple[int, int], tuple[int, int]]:
  a, b = os.lstat(workdir), os.lstat(checkpoints)
  return (a.st_dev, a.st_ino), (b.st_dev, b.st_ino)


def check_place(mngr: Manager) -> None:
  """CheckpointError unless the workdir and its checkpoints/ are still the directories
  the manager opened (by device and inode): one moved, replaced or swapped for a link
  since then stops the run before anything is saved, read or deleted through it."""
  place = _PLACES[mngr]
  try:
    same = _identity(place.workdir, place.checkpoints) == place.identity
  except OSError:
    same = False
  if not same:
    raise CheckpointError(
        f"{place.checkpoints} is no longer the directory this run opened (it, or its "
        "workdir, was moved, replaced or linked elsewhere while the run used it); nothing "
        "was saved, read or deleted through it: put the workdir back, or rerun with a "
        "--workdir nothing else changes.")


def _prune(mngr: Manager) -> None:
  """Deletes the steps past the newest `keep`, only those this manager may delete
  (_Place.steps), each after check_place."""
  place = _PLACES[mngr]
  for old in sorted(mngr.all_steps())[:-place.keep]:
    if old in place.steps:
      check_place(mngr)
      mngr.delete(old)
      place.steps.discard(old)


def manager(workdir: str, max_to_keep: int = 3) -> Manager:
  """A CheckpointManager on WORKDIR/checkpoints; its step numbers are finished epochs.
  orbax is given the directory as opened (/proc/self/fd/FD, where the system has it):
  its saves, reads and deletes reach that directory whatever is renamed, replaced or
  linked on its path meanwhile. orbax deletes nothing itself: `save` keeps the newest
  `max_to_keep` (_prune)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if os.path.exists(path) and not (os.path.isdir(path) and
                                   os.access(path, os.R_OK | os.W_OK | os.X_OK)):
    raise CheckpointError(f"{path} is not a readable and writable directory; fix its "
                          "permissions, or use a fresh --workdir.")
  links = sorted(e.name for e in os.scandir(path) if e.is_symlink()) if os.path.isdir(
      path) else []
  if links:   # orbax would read a checkpoint through it, and delete through it when old
    raise CheckpointError(f"{os.path.join(path, links[0])} is a symbolic link, which "
                          "mlp_jax never reads or deletes through: remove it, then rerun.")
  ocp = _orbax()
  try:
    files.make_dirs(path)
    fd = files.open_directory(path)
    pinned = f"/proc/self/fd/{fd}"   # the directory opened, whatever its name becomes
    mngr = ocp.CheckpointManager(pinned if os.path.isdir(pinned) else path,
                                 options=ocp.CheckpointManagerOptions(
                                     max_to_keep=None, create=True,
                                     cleanup_tmp_directories=True))
  except OSError as e:
    raise CheckpointError(f"cannot open the checkpoints in {path} ({e}).") from None
  _PLACES[mngr] = _Place(os.path.abspath(workdir), path, _identity(workdir, path),
                         max_to_keep, set(mngr.all_steps()), fd, set())
  return mngr


def _where(mngr: Manager) -> str:
  """The checkpoints/ directory's path, as the user gave it (for messages)."""
  return _PLACES[mngr].checkpoints


def state_digest(state: State) -> str:
  """SHA-256 over every leaf's dtype, shape and bytes, in pytree order (the whole
  array, whichever devices and processes hold its parts)."""
  digest = hashlib.sha256()
  for value in jax.tree.leaves(parallel.to_host(state)):
    leaf = np.asarray(value)
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def state_signature(state: State) -> str:
  """SHA-256 of the tree structure and each leaf's shape and dtype (no values)."""
  leaves = [(tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(state)]
  return hashlib.sha256(f"{jax.tree.structure(state)}{leaves}".encode()).hexdigest()


def write_error(e: BaseException) -> Optional[str]:
  """The reason, e.g. "No space left on device", if `e` is a failed write: an OSError,
  or orbax's error carrying tensorstore's os_error_code; None for anything else."""
  if isinstance(e, OSError):
    return e.strerror or str(e)
  code = re.search(r"os_error_code='(\d+)'", str(e))
  return os.strerror(int(code.group(1))) if code else None


@contextlib.contextmanager
def _writes(mngr: Manager) -> Iterator[None]:
  """A failed write inside the block becomes one CheckpointError line."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps OSErrors)
    reason = write_error(e)
    if reason is None:
      raise
    _settle(mngr)
    raise CheckpointError(
        f"cannot write a checkpoint in {_where(mngr)} ({reason}); the newest complete "
        "checkpoint is kept: free space or fix the permissions, then rerun the same "
        "command to resume.") from None


def _settle(mngr: Manager) -> None:
  """After a failed write: lets orbax's background save threads end (their errors are
  the one just reported), so none of them prints after the caller's one line, and
  removes the temporary directories of the steps this run attempted
  (STEP.orbax-checkpoint-tmp...: only complete checkpoints are left)."""
  for step in (mngr.wait_until_finished, mngr.close):
    try:
      step()
    except Exception:  # pylint: disable=broad-except
      pass
  place = _PLACES[mngr]
  with contextlib.suppress(OSError, CheckpointError):
    check_place(mngr)
    for name in os.listdir(place.checkpoints):
      step_of = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", name)
      if step_of and int(step_of.group(1)) in place.attempted:
        shutil.rmtree(os.path.join(place.checkpoints, name), ignore_errors=True)


def check_space(mngr: Manager, state: State) -> None:
  """CheckpointError, before orbax starts, unless the checkpoints' filesystem has room
  for one more checkpoint (its arrays × 1.2 + 64 KiB of metadata): a full disk is one
  line, not a failure inside orbax's background threads."""
  need = int(1.2 * sum(leaf.nbytes for leaf in jax.tree.leaves(state))) + 64 * 1024
  stats = os.statvfs(str(mngr.directory))
  free = stats.f_bavail * stats.f_frsize
  if free < need:
    _settle(mngr)   # a save still writing ends first: its temporary is removed
    raise CheckpointError(
        f"cannot write a checkpoint in {_where(mngr)} (No space left on device: "
        f"{free / 2**20:.2f} MiB free, a checkpoint needs about {need / 2**20:.2f} MiB); "
        "the newest complete checkpoint is kept: free space, then rerun the same command "
        "to resume.")


def save(mngr: Manager, epoch: int, state: State,
         settings: Optional[dict[str, Any]] = None,
         schedule: Optional[list[int]] = None) -> None:
  """Saves `state` as the checkpoint after `epoch` finished epochs (asynchronously; a
  failed write of it or of the save before it is a CheckpointError), with `settings`
  {name: JSON value}: what a resume must match (see restore_latest), and `schedule`:
  the epochs where the learning rate's cycles end (saved_schedule), which decides the
  epochs after it.

  Raises CheckpointError when orbax declines to save (it skips a step that is not newer
  than its latest), rather than leaving the epoch silently without a checkpoint.
  """
  check_place(mngr)
  check_space(mngr, state)
  _PLACES[mngr].attempted.add(epoch)
  ocp = _orbax()
  with _writes(mngr):
    saved = mngr.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        checksum=ocp.args.JsonSave({"sha256": state_digest(state),
                                    "signature": state_signature(state),
                                    "settings": settings or {},
                                    "schedule_epochs": schedule})))
  if not saved:
    raise CheckpointError(f"orbax did not save the checkpoint after epoch {epoch} (the "
                          f"newest in {_where(mngr)} is epoch {mngr.latest_step()}); "
                          "use a fresh --workdir.")
  _PLACES[mngr].steps.add(epoch)
  with _writes(mngr):
    _prune(mngr)


def finish(mngr: Manager) -> None:
  """Waits for the last save and closes the manager and its directory (a failed write:
  CheckpointError)."""
  with _writes(mngr):
    mngr.wait_until_finished()
    mngr.close()
  os.close(_PLACES[mngr].fd)


class _QuietOrbaxErrors(logging.Filter):
  """Drops orbax's own error logs (tracebacks of its save threads): every failure they
  report reaches the caller as an exception, which this module turns into one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and (
        "orbax" in record.pathname or "orbax-checkpoint-tmp" in record.getMessage()))


_QUIET = _QuietOrbaxErrors()
logging.getLogger("absl").addFilter(_QUIET)


def _check_settings(saved: dict[str, Any], settings: Optional[dict[str, Any]], epoch: int
                    ) -> None:
  """CheckpointError naming the first setting a resume changes (RunError naming what
  changed for the training data)."""
  from mlp_jax.run import workdir  # pylint: disable=g-import-not-at-top  (it imports the runner's config)
  saved = {**workdir.UNRECORDED, **saved}
  for name, value in (settings or {}).items():
    if name == "data" and name in saved:
      workdir.check_data(saved[name], value, f"the checkpoint after epoch {epoch}")
    elif name in saved and workdir.comparable(name, saved[name]) != workdir.comparable(
        name, value):
      raise CheckpointError(
          f"the checkpoint after epoch {epoch} was trained with {name}={saved[name]!r}, "
          f"not {value!r}; resume with the same setting, or use a fresh --workdir.")


# orbax's JSON files of a step (its metadata, our checksum record) are a few KB; one
# larger is not orbax's, and json.loads would make ~80 bytes of each of its bytes.
MAX_METADATA_BYTES = 1 << 20


def _check_step(mngr: Manager, epoch: int) -> None:
  """Before orbax reads step `epoch`: CheckpointError for a link or a special file at
  any depth in it (orbax would read through it); _Corrupt for a metadata file (any but
  the arrays' data, d/*, and the ocdbt manifest) over MAX_METADATA_BYTES."""
  step = os.path.join(_where(mngr), str(epoch))
  try:
    files.refuse_links_below(step)
  except files.UnsafePath as e:
    raise CheckpointError(f"{e.strerror}.") from None
  for root, _, names in os.walk(step):
    for name in names:
      size = os.lstat(os.path.join(root, name)).st_size
      if (os.path.basename(root) != "d" and name != "manifest.ocdbt"
          and size > MAX_METADATA_BYTES):
        raise _Corrupt(f"its {os.path.relpath(os.path.join(root, name), step)} is "
                       f"{size:,} bytes, more than any orbax metadata "
                       f"({MAX_METADATA_BYTES:,})")


def _restore(mngr: Manager, epoch: int, template: State,
             settings: Optional[dict[str, Any]] = None) -> State:
  """The state of checkpoint `epoch`: raises _Corrupt or CheckpointError."""
  ocp = _orbax()
  check_place(mngr)
  _check_step(mngr, epoch)
  try:
    record = mngr.restore(epoch, args=ocp.args.Composite(
        checksum=ocp.args.JsonRestore()))["checksum"]
  except OSError as e:
    raise CheckpointError(f"cannot read the checkpoint after epoch {epoch} ({e}).") from None
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise _Corrupt(boundary.first_line(e)) from None
  if record.get("signature", state_signature(template)) != state_signature(template):
    raise CheckpointError(
        f"the checkpoint after epoch {epoch} in {_where(mngr)} holds a state of another "
        "structure (written by another version of mlp_jax?); use a fresh --workdir.")
  _check_settings(record.get("settings", {}), settings, epoch)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  try:
    restored = mngr.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except OSError as e:
    raise CheckpointError(f"cannot read the checkpoint after epoch {epoch} ({e}).") from None
  except Exception as e:  # pylint: disable=broad-except
    raise _Corrupt(boundary.first_line(e)) from None
  state = type(template)(*restored) if isinstance(template, tuple) else restored
  if state_digest(state) != record.get("sha256"):
    raise _Corrupt("its checksum does not match its contents")
  return state


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def move_aside(mngr: Manager, epoch: int) -> str:
  """Moves checkpoint `epoch` to checkpoints/corrupt/EPOCH (kept for inspection, out of
  orbax's way so the epochs after it are saved again); returns the new path."""
  corrupt = os.path.join(_where(mngr), CORRUPT_DIR)
  target = os.path.join(corrupt, str(epoch))
  _sync(f"mlp_jax: every process has read checkpoint {epoch}")
  check_place(mngr)
  if jax.process_index() == 0:
    if not os.path.lexists(corrupt):
      files.make_dirs(corrupt)
    if os.path.islink(corrupt) or not os.path.isdir(corrupt):
      raise CheckpointError(f"{corrupt} is a link or not a directory, where mlp_jax moves a "
                            "corrupt checkpoint (never through a link): remove it, then "
                            "rerun the same command.")
    suffix = 0
    while os.path.lexists(target if not suffix else f"{target}.{suffix}"):
      suffix += 1
    target = target if not suffix else f"{target}.{suffix}"
    files.move(os.path.join(_where(mngr), str(epoch)), target)   # never a copy
  _sync(f"mlp_jax: checkpoint {epoch} moved aside")
  mngr.reload()
  return target


def saved_schedule(mngr: Manager, epoch: int) -> Optional[list[int]]:
  """The schedule_epochs checkpoint `epoch` was saved with; None for a checkpoint of an
  mlp_jax that did not save it (0.4.0 and older)."""
  ocp = _orbax()
  record = mngr.restore(epoch, args=ocp.args.Composite(
      checksum=ocp.args.JsonRestore()))["checksum"]
  schedule = record.get("schedule_epochs")
  return [int(e) for e in schedule] if schedule else None


def restore_latest(mngr: Manager, template: State,
                   log: Callable[[str], None] = print,
                   settings: Optional[dict[str, Any]] = None
                   ) -> Optional[tuple[int, State]]:

  """(epochs done, state) of the newest checkpoint that loads and matches its checksum.

  A corrupt one is reported in one line and moved aside (move_aside); None when no good
  one is left. Any other failure raises CheckpointError, as does a checkpoint saved
  with other `settings` (the values it records win over a lost or edited config.json).
  """
  for epoch in sorted(mngr.all_steps(), reverse=True):
    try:
      return epoch, _restore(mngr, epoch, template, settings)
    except _Corrupt as e:
      moved = move_aside(mngr, epoch)
      log(f"checkpoint after epoch {epoch} is corrupt ({e}); moved to {moved}, falling "
          "back to the one before it")
  return None
