"""One structured error: what the user refused or broke, and how an exception that ends an
entry point is classified by where its fault lies (Verdict: a signal, the user's
setting, the user's input, the environment, or a bug in mlp_jax). Formatted only at the
boundary (boundary.run: "error: ..." or "stopped: ..."). Nothing heavy is imported.
"""

import errno
import os
import re
import signal
from typing import NamedTuple, Optional


class UserError(Exception):
  """A problem of the input, the settings or the machine; the message is one line for
  the user, naming the problem and the fix. `internal`: it stands for a bug underneath
  (its traceback is always logged). Exit status 1."""

  internal = False


class UsageError(UserError):
  """A bad setting (a value, or settings that cannot go together): exit status 2, as a
  flag that cannot be parsed."""


STDOUT = "the standard output"


# What to do about an OSError, by its errno (the rest: the general advice).
_OS_FIXES = {
    errno.ENAMETOOLONG: "the name is too long for the file system: use a shorter path",
    errno.EFBIG: "the file would pass the file-size limit (ulimit -f): raise it",
    errno.ENOSPC: "the disk is full: free space, or use another directory",
    errno.EDQUOT: "the disk quota is used up: free space, or use another directory",
    errno.EROFS: "the file system is read-only: use a writable directory",
    errno.EACCES: "permission denied: use a path you may write, or fix its permissions",
    errno.EPERM: "not permitted: use a path you may write, or fix its permissions",
    errno.ENOENT: "it does not exist: check the path",
    errno.ELOOP: "a symbolic link is in the way: give the real path",
}


def escaped(text: str) -> str:
  """`text` with what would break its line or not print (a newline, a byte that is not
  text in the locale) written as an escape, so a path keeps the line one line."""
  return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (200 characters at most), or its type's
  name where it has none."""
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


class Verdict(NamedTuple):
  """How an exception ended an entry point: where the fault lies (source: "stopped" by
  a signal, the user's "setting", the user's "input" (data, files), the "environment"
  (memory, disk, the system), or a "bug" in mlp_jax), its one-line message, and the
  exit status. Formatted only by `line`."""

  source: str
  message: str
  status: int

  @property
  def line(self) -> str:
    """The line the user sees: "stopped: ..." or "error: ..."."""
    return f"{'stopped' if self.source == 'stopped' else 'error'}: {self.message}"


def classify(e: BaseException) -> Verdict:
  """The Verdict of an exception that ended an entry point."""
  signum = getattr(e, "signum", None)
  if isinstance(signum, int):
    return Verdict("stopped", str(e), 128 + signum)
  if isinstance(e, KeyboardInterrupt):
    return Verdict("stopped", "Ctrl-C", 128 + signal.SIGINT)
  if isinstance(e, UsageError):
    return Verdict("setting", str(e), 2)
  if isinstance(e, UserError):
    return Verdict("bug" if e.internal else "input", str(e), 1)
  if isinstance(e, MemoryError):
    return Verdict("environment", "out of memory"
                   + (f" ({first_line(e)})" if str(e) else "")
                   + "; use smaller settings (--hidden_dim, --batch_size, fewer models) or "
                     "a smaller input.", 1)
  if isinstance(e, OSError):
    where = f" {escaped(os.fsdecode(e.filename))}" if e.filename else ""
    fix = _OS_FIXES.get(e.errno or 0, "check the path and its permissions, and that the "
                        "disk has room")
    if e.filename == STDOUT:
      fix = ("redirect the standard output somewhere that takes it (a file on a disk "
             "with room, or /dev/null)")
    return Verdict("environment", f"cannot use{where} ({e.strerror or first_line(e)}); "
                   f"{fix}.", 1)
  environment = _environment_problem(e)
  if environment:
    return Verdict("environment", environment, 1)
  return Verdict("bug", f"internal error ({type(e).__name__}: {first_line(e)}): a bug in "
                 "mlp_jax; please report it with the traceback", 1)


def describe(e: BaseException) -> tuple[str, int]:
  """(the one line, the exit status) of an exception that ended an entry point."""
  verdict = classify(e)
  return verdict.line, verdict.status


def _environment_problem(e: BaseException) -> Optional[str]:
  """The one line for the JAX errors that a machine's setting causes, or None."""
  text = str(e)
  if "Unable to initialize backend" in text or "Backend '" in text and "not in" in text:
    return (f"JAX cannot start the backend it was asked for ({first_line(e)}); unset "
            "JAX_PLATFORMS (or set it to a platform this machine has, e.g. cpu), or "
            "install the jax build for that accelerator.")
  flag = re.search(r'Invalid value "(.*?)" for JAX flag (jax_\w+)', text)   # JAX's parse
  if flag:
    name = flag.group(2).upper()
    return (f"the environment variable {name}={escaped(flag.group(1))!r} is not a value "
            f"JAX takes for it ({escaped(first_line(e))}); fix or unset {name}.")
  truth = re.search(r"invalid truth value '(.*?)' for environment '(\w+)'", text)
  if truth:
    return (f"the environment variable {truth.group(2)}={escaped(truth.group(1))!r} is not "
            f"a truth value; set it to 0 or 1, or unset it.")
  return None
