"""The memory budget: the bytes any one read of the data, a model or a record may
allocate (readers check a file's declared sizes against it before reading): the
runner's --memory_budget, else $MLP_JAX_MEMORY_BUDGET (GiB), else 4 GiB or half of what
the process may still allocate, whichever is smaller.
"""

import os
import resource
from typing import Optional

from mlp_jax.base import files
from mlp_jax.base.errors import UserError, escaped

def host_available() -> Optional[int]:
  """Bytes this process may still allocate: the host's available memory, or less where
  an address-space limit (RLIMIT_AS, `ulimit -v`) leaves less room above what the
  process maps already; None where neither can be read."""
  try:
    available: Optional[int] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    available = None
  limit = resource.getrlimit(resource.RLIMIT_AS)[0]
  if limit != resource.RLIM_INFINITY:
    try:
      with files.open_regular("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
      mapped = 0
    room = max(limit - mapped, 0)
    available = room if available is None else min(available, room)
  return available


def gib_of_environment(name: str, example: str) -> Optional[float]:
  """The GiB the environment variable `name` gives, None where it is unset or empty;
  UserError for a value that is not a number of GiB above 0."""
  text = os.environ.get(name, "")
  if not text.strip():
    return None
  try:
    gib = float(text)
  except ValueError:
    gib = -1.0
  if not 0 < gib < float("inf"):
    raise UserError(f"{name}={escaped(text)!r} is not a number of GiB above 0; set it to "
                    f"e.g. {example}, or unset it.")
  return gib


BUDGET_ENV = "MLP_JAX_MEMORY_BUDGET"   # GiB, as the runner's --memory_budget
DEFAULT_BUDGET = 4 << 30
_budget: dict[str, Optional[float]] = {"gib": None}   # set_memory_budget's


def set_memory_budget(gib: Optional[float]) -> None:
  """The budget of every read from now on, in GiB (the runner's --memory_budget); None:
  $MLP_JAX_MEMORY_BUDGET, else the default."""
  _budget["gib"] = gib


def memory_budget() -> int:
  """Bytes a reader may allocate: set_memory_budget's, else $MLP_JAX_MEMORY_BUDGET (GiB),
  else 4 GiB or half of what the process may still allocate (host_available), whichever
  is smaller. UserError for an environment value that is not a number of GiB above 0."""
  gib = _budget["gib"]
  if gib is None:
    gib = gib_of_environment(BUDGET_ENV, "8")
  if gib is not None:
    return int(gib * (1 << 30))
  available = host_available()
  return DEFAULT_BUDGET if available is None else min(DEFAULT_BUDGET, available // 2)
