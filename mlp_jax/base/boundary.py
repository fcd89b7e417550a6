"""The one error boundary of every entry point, and Ctrl-C / SIGTERM outside training.

    train.py, predict.py, benchmark.py, python -m mlp_jax.gradcheck:

        if __name__ == "__main__":
          boundary.script(lambda: app.run(main))     # exits with main's status

Whatever is raised underneath, a failure ends in ONE line on stderr, naming the problem
and the fix, and the full traceback goes to a log file whose path that line gives
(WORKDIR/error.log once a run has its workdir, else a new temporary file; a UserError
before any workdir exists, a refused setting say, needs none and writes nothing):

    UserError (RunError, DataError), OSError, MemoryError   error: ..., status 1
    a signal that stopped the run (`signum`)                 stopped: ..., 128 + signum
    anything else: a bug                                     error: internal error ...,
                                                             status 1, "please report"

Background threads (orbax's savers, asyncio) are silenced around that line: their
exceptions go to the log, and the process ends with os._exit once the line is out, so
no atexit hook prints after it.

This module imports nothing heavy (no JAX): the scripts install it first, so a Ctrl-C
during their imports is one line too. `phase` names what the run is doing; outside the
epochs (which checkpoint, see processes.StopSignals) a first Ctrl-C or SIGTERM stops
at once with one line naming the phase.
"""

import atexit
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
import traceback
from types import FrameType
from typing import Any, Callable, NoReturn, Optional, cast

from mlp_jax.base import environment
from mlp_jax.base.errors import (  # pylint: disable=unused-import  (boundary.X names)
    STDOUT, UsageError, UserError, Verdict, classify, describe, escaped, first_line)


# The signals a script handles: each stops a run after its checkpoint (or at once
# outside the epochs) with one line. Others keep the system's default.
SIGNAL_NAMES: dict[int, str] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM",
                                signal.SIGHUP: "SIGHUP", signal.SIGQUIT: "SIGQUIT",
                                signal.SIGUSR1: "SIGUSR1", signal.SIGALRM: "SIGALRM"}

# What a signal in each phase leaves, and what to do: said when it stops the run there.
PHASES = {
    "start": "while starting; nothing was written: rerun the command",
    "data": "while loading the data; the workdir is as it was: rerun the same command",
    "calibrate": "while calibrating the DP noise σ; the workdir is as it was: rerun the "
                 "same command",
    "restore": "before the first epoch; the workdir's newest checkpoint is kept: rerun "
               "the same command to resume",
    "train": "during training; the workdir's newest checkpoint is kept: rerun the same "
             "command to resume",
    "refit": "after the selection, before its refit; the selection is complete: rerun "
             "the same command to refit",
    "outputs": "while writing the final outputs; the checkpoint of the last epoch is "
               "complete: rerun the same command to write them",
}
# Tests only: MLP_JAX_SIGNAL_AT=PHASE[:SIGNUM] sends this process the signal (default
# SIGINT) as it enters PHASE, so that each phase's handling is tested for real.
SIGNAL_AT_ENV = "MLP_JAX_SIGNAL_AT"

_state: dict[str, Any] = {"phase": "start", "log_dir": None, "deferred": []}


def phase(name: str) -> None:
  """The run enters phase `name` (a key of PHASES)."""
  _state["phase"] = name
  wanted, _, signum = os.environ.get(SIGNAL_AT_ENV, "").partition(":")
  if wanted == name:
    os.kill(os.getpid(), int(signum or signal.SIGINT))


def set_log_dir(directory: Optional[str]) -> None:
  """Where error.log goes from now on (the run's workdir); None: a temporary file."""
  _state["log_dir"] = directory


def _stop_at_once(signum: int, frame: Optional[FrameType]) -> None:
  """The handler outside the epochs: one line, exit 128 + signum, nothing raised (an
  exception raised in a handler can land anywhere: a GC callback, a C++ call)."""
  del frame
  what = PHASES.get(_state["phase"], _state["phase"])
  files = sys.modules.get("mlp_jax.base.files")   # loaded where a file may be half-written
  if files is not None:
    files.remove_own_partials()   # no `finally` runs after os._exit
  _print_line(f"stopped: {SIGNAL_NAMES.get(signum, signum)} {what}.")
  os._exit(128 + signum)


def install_stop_at_once() -> None:
  """Each signal of SIGNAL_NAMES stops the process at once with one line (scripts only,
  before any third-party import: a library caller keeps Python's KeyboardInterrupt).
  The process is then in the phase "start"."""
  if threading.current_thread() is threading.main_thread():
    for signum in SIGNAL_NAMES:
      signal.signal(signum, _stop_at_once)
    phase("start")


def _flush(stream: Any) -> None:
  """Flushes sys.stdout or sys.stderr, whatever state it is in (closed: None, full, or
  gone)."""
  try:
    stream.flush()
  except (OSError, ValueError, AttributeError):
    pass


class _NamedStdout:
  """sys.stdout, whose write errors name it (OSError.filename "the standard output"):
  a full or failing stdout is then told apart from a file the run writes."""

  def __init__(self, stream: Any):
    self._stream = stream

  def _call(self, method: str, *args: Any) -> Any:
    try:
      return getattr(self._stream, method)(*args)
    except BrokenPipeError:   # the reader left: the boundary's silent 141
      raise
    except OSError as e:
      raise OSError(e.errno, e.strerror, STDOUT) from None

  def write(self, text: str) -> int:
    return int(self._call("write", text))

  def flush(self) -> None:
    self._call("flush")

  def __getattr__(self, name: str) -> Any:
    return getattr(self._stream, name)


def _print_line(line: str) -> None:
  """`line` on stderr, escaped (a newline or an escape code from a path, a lock's
  contents or a message underneath never breaks the one line), with what stdout holds
  flushed first; straight to file descriptor 2 where Python has no sys.stderr (started
  with it closed)."""
  line = escaped(line)
  _flush(sys.stdout)
  try:
    if sys.stderr is None:
      os.write(2, (line + "\n").encode("utf-8", "backslashreplace"))
    else:
      print(line, file=sys.stderr, flush=True)
  except (OSError, ValueError):
    pass


def _write_log(text: str) -> Optional[str]:
  """Writes `text` to WORKDIR/error.log (atomically, never through a link) or, where
  that fails or there is no workdir, to a new temporary file; its path, or None."""
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top  (numpy only)
  directory = _state["log_dir"]
  if directory and os.path.isdir(directory):
    path = os.path.join(directory, "error.log")
    try:
      with files.atomic_file(path, "w") as f:
        f.write(text)
      return path
    except OSError:
      pass
  try:
    fd, path = tempfile.mkstemp(prefix="mlp_jax-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return path
  except OSError:
    return None


def _deferred_text() -> str:
  return "".join(_state["deferred"])


def _background_exception(args: Any) -> None:
  """threading.excepthook: a background thread's exception is kept for the log."""
  _state["deferred"].append("".join(traceback.format_exception(
      args.exc_type, args.exc_value, args.exc_traceback)))


def _unraisable(args: Any) -> None:
  """sys.unraisablehook: kept for the log (an exception in a GC callback, __del__)."""
  if args.exc_type is not None:
    _state["deferred"].append("".join(traceback.format_exception(
        args.exc_type, args.exc_value, args.exc_traceback)))


HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")  # absl's


MAX_FLAGFILE_BYTES = 1 << 20


def _flagfile_problem(args: list[str], depth: int = 0) -> Optional[str]:
  """Why a --flagfile among `args` (or one it names, in turn) cannot be read as a small
  text file, or None: absl would block on a FIFO and read /dev/zero without end."""
  paths = [a.split("=", 1)[1] for a in args if a.startswith("--flagfile=")]
  paths += [b for a, b in zip(args, args[1:]) if a == "--flagfile"]
  for path in paths:
    try:
      info = os.stat(path)
    except OSError as e:
      return (f"--flagfile={escaped(path)} cannot be read ({e.strerror}); give the path of "
              "a text file of --name=value lines.")
    if not stat.S_ISREG(info.st_mode):
      return (f"--flagfile={escaped(path)} is not a regular file (a directory, a FIFO or a "
              "device); give a text file of --name=value lines.")
    if info.st_size > MAX_FLAGFILE_BYTES:
      return (f"--flagfile={escaped(path)} is {info.st_size} bytes, over the "
              f"{MAX_FLAGFILE_BYTES} a flagfile may have: is it the right file?")
    from mlp_jax.base import files  # pylint: disable=g-import-not-at-top  (numpy)
    try:
      with files.open_regular(path) as f:
        text = f.read(MAX_FLAGFILE_BYTES + 1).decode("utf-8", "replace")
      lines = [line.strip() for line in text.splitlines()   # absl's: one flag a line,
               if not line.strip().startswith(("#", "//"))]   # comments skipped
    except files.UnsafePath as e:   # one that another user could change or swap
      return f"--flagfile={e.strerror}."
    except OSError:
      continue
    why = depth < 8 and _flagfile_problem(lines, depth + 1)
    if why:
      return why
  return None


def refuse_usage(line: str) -> NoReturn:
  """A usage error before the flags are parsed: `error: LINE` on stderr, status 2."""
  _print_line(f"error: {line}")
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser for a script (app.run(main, flags_parser=boundary.parse_flags)):
  a flag it cannot parse, a required flag not given, an unreadable --flagfile or an
  argument that is not a flag is one line on stderr and exit status 2, as a bad setting
  is (UsageError); the help exits 0 (absl's exits 1)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  environment.check_environment()   # before JAX is imported: what it would abort on
  app.define_help_flags()  # what app.run defines: --help, --helpshort, ... (idempotent)
  why = _flagfile_problem(argv[1:])
  if why:
    refuse_usage(why)
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:  # absl's help flags print the help, then exit 1
    if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except BrokenPipeError:  # `--help | head`: the boundary's silent 141
    raise
  except (flags.Error, UnicodeDecodeError, OSError) as e:
    refuse_usage(f"--flagfile is not a text file of --name=value lines ({e.reason})"
                 if isinstance(e, UnicodeDecodeError) else str(e).splitlines()[0])
  if not flags.FLAGS["verbosity"].present:   # absl's INFO lines (JAX's "Unable to
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)   # initialize backend", orbax's saves)
  if len(rest) > 1:   # e.g. a --flagfile line without its leading --
    refuse_usage(f"unexpected arguments {' '.join(rest[1:])!r}: settings are --name=value, "
                 "on the command line and on each line of a --flagfile.")
  return rest


def run(body: Callable[[], Optional[int]]) -> int:
  """Runs an entry point's body inside the boundary; its exit status (body's return
  value, 0 for None; SystemExit's code passes through)."""
  previous = threading.excepthook, sys.unraisablehook, logging.root.manager.disable
  threading.excepthook, sys.unraisablehook = _background_exception, _unraisable
  _state.update(log_dir=None, deferred=[])
  stdout = sys.stdout
  if stdout is not None:
    sys.stdout = cast(Any, _NamedStdout(stdout))
  try:
    phase("start")
    try:
      status = int(body() or 0)
    except SystemExit as e:   # absl's app.run ends with one
      status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if status == 0 and stdout is not None:
      sys.stdout.flush()      # a full stdout fails the run here, not at the exit
    return status
  except BrokenPipeError:  # `| head`: the reader left; say nothing, as Unix tools do
    try:
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
      pass
    return 128 + signal.SIGPIPE
  except BaseException as e:  # pylint: disable=broad-except  (the boundary)
    logging.disable(logging.CRITICAL)   # orbax's threads: nothing around the line
    line, status = describe(e)
    path = None
    internal = not isinstance(e, UserError) or getattr(e, "internal", False)
    stopped = status > 128          # a signal: what it saved is the whole story
    if not stopped and (_state["log_dir"] or internal or _deferred_text()):
      path = _write_log("".join(traceback.format_exception(e)) + _deferred_text())
    if line.startswith("error: internal error"):
      line += f" in {path}" if path else " (no file could be written for it)"
    elif path:
      line += f" [traceback: {path}]"
    _print_line(line)
    return status
  finally:
    sys.stdout = stdout
    threading.excepthook, sys.unraisablehook = previous[:2]
    logging.disable(previous[2])


def command(body: Callable[[], int], module: str, define_flags: Callable[[], None]
            ) -> NoReturn:
  """A command of flags alone (a stray argument is refused): its flags parsed from
  sys.argv, then `body` (its exit status) in the boundary, as `script` runs it; `module`
  names the command for --help."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def main(argv: list[str]) -> NoReturn:
    del argv   # none: parse_flags refuses a stray argument
    sys.exit(run(body))

  script(lambda: app.run(main, flags_parser=parse_flags), module, define_flags)


def script(main: Callable[[], Any], command: Optional[str] = None,
           define_flags: Callable[[], None] = lambda: None) -> NoReturn:
  """A script's `__main__`: its flags defined, then `main` (absl's app.run(...), which
  raises SystemExit) in the boundary, then the exit: a failure exits with os._exit once
  its line is out, so no background thread or atexit hook prints after it; a success
  skips only the interpreter's teardown (_exit_without_teardown). `command`:
  the module whose docstring and flags --help shows (absl shows those of __main__)."""
  install_stop_at_once()

  def body() -> Any:
    define_flags()
    if command:
      from absl import flags  # pylint: disable=g-import-not-at-top
      sys.modules["__main__"].__doc__ = sys.modules[command].__doc__
      for flag in flags.FLAGS.get_key_flags_for_module(command):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    return main()

  status = run(body)
  if status == 0:
    _exit_without_teardown()
  logging.disable(logging.CRITICAL)
  _flush(sys.stdout)
  os._exit(status)


def _exit_without_teardown() -> NoReturn:
  """A successful end: what the interpreter's exit does (the threads that are not
  daemons joined, the atexit hooks run: JAX's, orbax's, logging's; stdout and stderr
  flushed), then os._exit(0) without its teardown of every module and object (XLA's,
  matplotlib's): docs/benchmarks.md, "Fixed costs of a command", measures it."""
  for thread in threading.enumerate():
    if thread is not threading.main_thread() and not thread.daemon:
      thread.join()
  atexit._run_exitfuncs()  # pylint: disable=protected-access  (the interpreter's own step)
  _flush(sys.stdout)
  _flush(sys.stderr)
  os._exit(0)
