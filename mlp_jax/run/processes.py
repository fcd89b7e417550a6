"""The run's processes: a stop by Ctrl-C or SIGTERM, and the other processes of a
multi-process run (joining them, a bounded wait for them, one decision for all)."""

import contextlib
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Optional

import jax
import numpy as np

from mlp_jax.base import boundary
from mlp_jax.training import parallel
from mlp_jax.training.config import Config, Log, RunError


class Interrupted(RunError):
  """Ctrl-C or SIGTERM: the run stopped; the newest checkpoint is on disk, rerun to
  resume. `signum` is the signal (the runner exits with 128 + signum)."""

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = signum


class PeerLost(RunError):
  """A collective failed in a multi-process run (this process or another one failed);
  restart them all."""


# What a failed collective raises (XlaRuntimeError, a RuntimeError, before jax 0.4.36).
RUNTIME_ERROR = getattr(jax.errors, "JaxRuntimeError", RuntimeError)


SIGNAL_NAMES = boundary.SIGNAL_NAMES


class StopSignals:
  """Ctrl-C and SIGTERM (what Slurm, Kubernetes and cloud preemption send before
  SIGKILL) during a run. While epochs train (`deferring`), the first one is a request to
  stop after the current epoch's checkpoint; a second one stops the process at once, in
  one line, with status 128 + signum (the newest checkpoint on disk is complete: orbax
  renames it into place). Outside the epochs a signal goes to the handler that was there
  before: the scripts' boundary.install_stop_at_once (one line naming the phase), or
  Python's KeyboardInterrupt for a library caller. Only the main thread can own signal
  handlers; elsewhere the signals keep their behaviour."""

  def __init__(self) -> None:
    self.signum: Optional[int] = None
    self.deferring = False
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
    name = SIGNAL_NAMES[signum]
    if self.requested:  # exit now: an exception raised here can land anywhere (a GC hook)
      print(f"stopped: a second {name}: stopped at once; the newest checkpoint on disk is "
            "kept: rerun the same command to resume.", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    if not self.deferring:
      self._pass_on(signum, frame)
      return
    self.signum = signum
    print(f"\n{name}: stopping after this epoch's checkpoint ({name} again to stop at "
          "once)", file=sys.stderr, flush=True)

  def _pass_on(self, signum: int, frame: Optional[FrameType]) -> None:
    previous = self._previous.get(signum, signal.SIG_DFL)
    if callable(previous):
      previous(signum, frame)
    elif previous == signal.SIG_DFL:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNAL_NAMES:
        self._previous[signum] = signal.signal(signum, self._handle)

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def join_processes(config: Config, log: Log) -> None:
  """jax.distributed.initialize when asked or a multi-process setting is given.

  Settings left None are detected by JAX from SLURM, a TPU pod or Open MPI.
  """
  explicit = (config.coordinator_address, config.num_processes, config.process_id)
  if not config.distributed and explicit == (None,) * 3:
    return
  if not config.workdir:
    raise RunError("a multi-process run needs --workdir, a directory every process can "
                   "reach (a shared filesystem).")
  log(f"joining the other processes (waiting up to --peer_timeout={config.peer_timeout:g} s)")
  try:
    parallel.initialize(config.coordinator_address, config.num_processes,
                        config.process_id, config.peer_timeout)
  except Exception as e:  # pylint: disable=broad-except  (JAX raises several kinds)
    raise RunError(f"jax.distributed could not start ({boundary.first_line(e)}); check "
                   "--coordinator_address (host:port of process 0, reachable by every "
                   "process), --num_processes and --process_id.") from None


def peers(config: Config, what: str, done: int) -> Any:
  """A bound on the wait for the other processes at `what` (parallel.deadline, with
  --peer_timeout): one line instead of a hang when a peer died. Alone: no bound."""
  if jax.process_count() == 1:
    return contextlib.nullcontext()
  kept = f"the checkpoint after epoch {done} is kept" if done else "no checkpoint was written"
  return parallel.deadline(config.peer_timeout, (
      f"a peer process did not reach {what} within --peer_timeout="
      f"{config.peer_timeout:g} s (it died or hangs); {kept}: restart every process "
      "with the same command to resume."))


def stop_or_save(stop: StopSignals, due: bool) -> tuple[Optional[int], bool]:
  """(the signal that asked this run to stop, or None; whether a checkpoint is due),
  agreed by every process in one collective: the signal of any of them (SIGINT where
  they got different ones), a checkpoint where any of them finds it due (--checkpoint_
  seconds on its clock)."""
  if jax.process_count() == 1:
    return stop.signum, due
  signums, dues = parallel.process_values(np.array([stop.signum or 0, due], np.int32)).T
  return int(np.max(signums)) or None, bool(np.max(dues))


class NativeStdoutHidden:
  """A window in which what native code writes to the standard output is dropped: the
  "[Gloo] Rank 0 is connected to 1 peer ranks ..." lines that XLA's CPU collectives
  print (C++, on file descriptor 1) as collectives first connect the processes. What
  Python prints goes on to the standard output at once, through a copy of its
  descriptor. Nothing happens where the standard output is closed."""

  def __init__(self) -> None:
    self._saved: Optional[tuple[int, Any]] = None

  def start(self) -> None:
    if sys.stdout is None or self._saved is not None:
      return
    try:
      sys.stdout.flush()
      saved = os.dup(1)
    except (OSError, ValueError):
      return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    self._saved = saved, sys.stdout
    if _fileno(sys.stdout) == 1:    # Python's prints go on through the copy
      sys.stdout = os.fdopen(saved, "w", encoding=sys.stdout.encoding,
                             errors=sys.stdout.errors, buffering=1, closefd=False)

  def end(self) -> None:
    if self._saved is None:
      return
    saved, python_stdout = self._saved
    self._saved = None
    if sys.stdout is not python_stdout:
      sys.stdout.close()
      sys.stdout = python_stdout
    os.dup2(saved, 1)
    os.close(saved)


def _fileno(stream: Any) -> Optional[int]:
  try:
    return int(stream.fileno())
  except (OSError, ValueError, AttributeError):
    return None
