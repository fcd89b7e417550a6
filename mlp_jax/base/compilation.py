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
versions, the devices and XLA_FLAGS, so a stale one is never used. The cache runs
programs found in it: like JAX, keep it in a directory only you can write (created
0700 here).
"""

import os
from typing import Optional

ENV = "MLP_JAX_COMPILATION_CACHE"


def default_dir() -> str:
  """The cache directory when none is given: $MLP_JAX_COMPILATION_CACHE ('' is off),
  else $XDG_CACHE_HOME/mlp_jax/jax, else ~/.cache/mlp_jax/jax."""
  if ENV in os.environ:
    return os.environ[ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mlp_jax", "jax")


def enable(path: Optional[str] = None) -> Optional[str]:
  """Points JAX's persistent cache at `path` (None: default_dir()) and caches every
  program however fast it compiled (JAX's default skips those under 1 s: all of this
  project's). Returns the directory in use, or None when off: asked for (''), or the
  default directory cannot be created."""
  import jax  # pylint: disable=g-import-not-at-top
  given = getattr(jax.config, "jax_compilation_cache_dir")  # read() refuses this one
  if given:
    return given
  path = default_dir() if path is None else path
  if not path:
    return None
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
  except OSError:
    return None   # a read-only home: compile as before
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
