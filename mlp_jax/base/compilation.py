"""JAX's persistent compilation cache, on by default for the runner, predict.py and the
benchmark: a program compiled once on this machine is read back by every later command
(a rerun, a resume, each job of a sweep) instead of compiled again.

    where      --compilation_cache=DIR (RunConfig.compilation_cache), else the
               environment variable MLP_JAX_COMPILATION_CACHE, else
               $XDG_CACHE_HOME/mlp_jax/jax (~/.cache/mlp_jax/jax)
    off        --compilation_cache= or MLP_JAX_COMPILATION_CACHE= (empty)
    yours      a cache directory already given to JAX (JAX_COMPILATION_CACHE_DIR, or
               jax.config.update("jax_compilation_cache_dir", ...)) is kept as it is

JAX reads the setting at the process's first compilation: `enable` must come before it
(the scripts call it first thing). Entries are keyed by the program, the JAX and XLA
versions, the devices and XLA_FLAGS, so a stale one is never used.

JAX runs the programs it finds in the cache, so mlp_jax points it only at a directory
that is the user's own (`unsafe`): a real directory (not a link), owned by this user and
writable by no one else, every entry in it the same, and a trusted path
(base/trusted.py: no directory above it that another user could rename or swap, so
JAX's later uses of the name reach the same directory). A directory of ours (created
0700) passes; another user's, or a 0777 one, does not: the default and
$MLP_JAX_COMPILATION_CACHE are then skipped with one line on stderr (the run compiles
afresh), and an explicit --compilation_cache is refused.
"""

import contextlib
import os
import stat
import sys
from typing import Iterator, Optional

from mlp_jax.base import trusted

ENV = "MLP_JAX_COMPILATION_CACHE"


def default_dir() -> str:
  """The cache directory when none is given: $MLP_JAX_COMPILATION_CACHE ('' is off),
  else $XDG_CACHE_HOME/mlp_jax/jax, else ~/.cache/mlp_jax/jax."""
  if ENV in os.environ:
    return os.environ[ENV]
  return os.path.join(user_cache_dir(), "jax")


def user_cache_dir() -> str:
  """$XDG_CACHE_HOME/mlp_jax, else ~/.cache/mlp_jax: where mlp_jax keeps its caches."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mlp_jax")


def unsafe(path: str) -> Optional[str]:
  """Why the directory at `path` is not this user's own cache, or None if it is: it
  and every entry in it owned by this user and writable by no one else, and no
  directory on its path changeable by another user (trusted.why_untrusted)."""
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top  (numpy)
  try:
    fd = files.open_directory(path)
  except OSError as e:
    return f"it cannot be opened as a directory ({e.strerror})"
  try:
    why = _not_own(os.fstat(fd), "it")
    with os.scandir(fd) as entries:
      for entry in entries:
        why = why or _not_own(entry.stat(follow_symlinks=False), f"its entry {entry.name}")
    return why or trusted.why_untrusted(path)
  finally:
    os.close(fd)


def _not_own(st: os.stat_result, what: str) -> Optional[str]:
  if st.st_uid != os.geteuid():
    return f"{what} belongs to another user (uid {st.st_uid})"
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"other users can write {what} (mode {stat.S_IMODE(st.st_mode):o})"
  return None


def refusal(path: str, why: str) -> str:
  """The one line that refuses a cache directory, naming why and the fix."""
  return (f"--compilation_cache {path}: {why}. JAX runs the programs it finds in its "
          "cache, so mlp_jax uses only a directory of yours that no one else can write: "
          "chmod go-w it (and its entries), choose another directory, or give "
          "--compilation_cache= to compile without a cache.")


SIZE_ENV = "MLP_JAX_COMPILATION_CACHE_GIB"   # GiB, as the runner's --compilation_cache_gib
DEFAULT_GIB = 1.0


def max_bytes(gib: Optional[float] = None) -> int:
  """The cache's bound in bytes: `gib`, else $MLP_JAX_COMPILATION_CACHE_GIB, else 1 GiB."""
  if gib is None:
    from mlp_jax.base import budget  # pylint: disable=g-import-not-at-top  (numpy)
    gib = budget.gib_of_environment(SIZE_ENV, "2")
  return int((DEFAULT_GIB if gib is None else gib) * (1 << 30))


@contextlib.contextmanager
def not_cached() -> Iterator[None]:
  """Programs compiled in the block are not written to the cache (the benchmark's
  peers: what a user would write, not mlp_jax's programs)."""
  import jax  # pylint: disable=g-import-not-at-top
  before = getattr(jax.config, "jax_persistent_cache_min_compile_time_secs")
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def _give_entries_an_access_time(path: str) -> None:
  """An access-time file (NAME-atime: its mtime in ns, 8 bytes little-endian) for each
  entry NAME-cache without one: JAX's bounded cache reads every entry's to evict, and
  fails every write where one was cached before it was bounded (an earlier mlp_jax)."""
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top  (numpy)
  for name in os.listdir(path):
    atime = os.path.join(path, name.removesuffix("-cache") + "-atime")
    if name.endswith("-cache") and not os.path.lexists(atime):
      mtime = os.stat(os.path.join(path, name), follow_symlinks=False).st_mtime_ns
      with contextlib.suppress(OSError), files.atomic_file(atime) as f:
        f.write(mtime.to_bytes(8, "little"))


def enable(path: Optional[str] = None, gib: Optional[float] = None) -> Optional[str]:
  """Points JAX's persistent cache at `path` (None: default_dir()), bounded to max_bytes
  (`gib`; JAX evicts the least recently used programs beyond it), and caches every
  program however fast it compiled (JAX's default skips those under 1 s: all of this
  project's). Returns the directory in use, or None when off: asked for (''), the
  default directory cannot be created, or is not the user's own (one line on stderr).
  An explicit `path` that is not the user's own is a UserError."""
  import jax  # pylint: disable=g-import-not-at-top
  given = getattr(jax.config, "jax_compilation_cache_dir")  # read() refuses this one
  if given:
    return given
  explicit, path = path is not None, default_dir() if path is None else path
  if not path:
    return None
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top  (numpy)
  why = trusted.why_untrusted(path)   # nothing is made where another user could reach
  if not why:
    try:
      files.make_dirs(path, 0o700)
    except OSError:
      return None   # a read-only home: compile as before
    why = unsafe(path)
  if why and explicit:
    from mlp_jax.base import errors  # pylint: disable=g-import-not-at-top
    raise errors.UsageError(refusal(path, why))
  if why:
    try:
      print(f"mlp_jax: not using the compilation cache {path!r}: {why} (JAX runs the "
            "programs it finds there); compiling afresh.", file=sys.stderr)
    except (OSError, ValueError, AttributeError):
      pass   # no stderr: the run goes on without the cache all the same
    return None
  _give_entries_an_access_time(path)
  jax.config.update("jax_compilation_cache_max_size", max_bytes(gib))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
