"""What a command checks and sets in its environment before JAX starts: the settings
JAX would abort on in C++ (a crash, not an exception), and the host devices a CPU run
asks for (--num_devices). Nothing heavy is imported here (no JAX)."""

import os
import resource
import sys
from typing import Optional

from mlp_jax.base.errors import UserError, escaped

_state: dict[str, int] = {}   # "host_devices": the count make_host_devices gave XLA


# Address space JAX's CPU backend needs to start and compile (about 1.5 GiB measured on
# a 2-core Intel Xeon, jax 0.10.2; below it the process segfaults or aborts).
MIN_ADDRESS_SPACE = 2 << 30

# More host devices than this is a mistake (each costs memory and a thread: 999,999 took
# 18 GB); XLA_FLAGS' --xla_force_host_platform_device_count is held to it.
MAX_HOST_DEVICES = 1024
XLA_ACCEPTED_DIR = "xla_flags_accepted"   # under compilation.user_cache_dir()


def _xla_flags_problem(flags: str) -> Optional[str]:
  """XLA's own line refusing XLA_FLAGS=`flags`, or None: a child process starts XLA's
  CPU backend with them (XLA parses them there, and would abort this process in C++).
  Flags it accepted are remembered in the user's cache, keyed by the flags and jaxlib's
  version, so only the first run with new flags pays the child (about 2 s)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  from mlp_jax.base import compilation, files  # pylint: disable=g-import-not-at-top
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    version = "?"
  key = hashlib.sha256(f"{version}\0{flags}".encode()).hexdigest()[:32]
  accepted = os.path.join(compilation.user_cache_dir(), XLA_ACCEPTED_DIR)
  if os.path.isfile(os.path.join(accepted, key)):
    return None
  try:
    child = subprocess.run([sys.executable, "-I", "-c", "import jax; jax.devices('cpu')"],
                           env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=300, check=False)
  except subprocess.TimeoutExpired:
    return None   # no verdict: the run goes on, and meets the flags itself
  if child.returncode == 0:
    try:
      files.make_dirs(accepted, 0o700)
      with files.atomic_file(os.path.join(accepted, key), "w") as f:
        f.write(flags)
    except OSError:
      pass   # a read-only home: asked again next time
    return None
  said = [line.split("] ", 1)[1] for line in child.stderr.decode(errors="replace").splitlines()
          if "] " in line and ("flags" in line.split("] ", 1)[0])]
  return said[0] if said else None   # failed for another reason: the run will say why


def make_host_devices(count: Optional[int]) -> None:
  """Before JAX starts (a script's --num_devices=N): XLA_FLAGS gets
  --xla_force_host_platform_device_count=N, so that a CPU host has N devices (a GPU or
  TPU is used as it is); nothing where JAX has started, XLA_FLAGS gives a count already,
  or N is 1 or past MAX_HOST_DEVICES (refused later, with the devices there are)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if (not count or not 1 < count <= MAX_HOST_DEVICES or "jax" in sys.modules
      or "xla_force_host_platform_device_count" in flags):
    return
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  _state["host_devices"] = count


def made_host_devices() -> Optional[int]:
  """The count make_host_devices gave XLA, or None."""
  return _state.get("host_devices")


def check_environment() -> None:
  """UserError for the environment settings that JAX would abort on in C++ (a crash, not
  an exception): XLA_FLAGS that XLA's own parser refuses (_xla_flags_problem), a host
  device count past MAX_HOST_DEVICES, an address-space limit. Called before JAX is
  imported. (JAX_* variables are parsed by JAX at its import: errors.classify names a
  refused one as the environment's fault.)"""
  flags = os.environ.get("XLA_FLAGS", "").strip()
  for flag in flags.split():
    name, _, value = flag.partition("=")
    if name == "--xla_force_host_platform_device_count" and not (
        value.isdigit() and 1 <= int(value) <= MAX_HOST_DEVICES):
      raise UserError(f"XLA_FLAGS has {escaped(flag)}: the device count must be a whole "
                      f"number from 1 to {MAX_HOST_DEVICES}; fix or unset XLA_FLAGS.")
  why = flags and _xla_flags_problem(flags)
  if why:
    raise UserError(f"XLA_FLAGS={escaped(flags)!r} is refused by XLA ({escaped(why)}; it "
                    "would abort in C++): fix the flag or remove it from XLA_FLAGS.")
  limit = resource.getrlimit(resource.RLIMIT_AS)[0]
  if limit != resource.RLIM_INFINITY and limit < MIN_ADDRESS_SPACE:
    raise UserError(f"the address-space limit (ulimit -v) is {limit / 2**30:.2f} GiB, "
                    f"less than the {MIN_ADDRESS_SPACE / 2**30:g} GiB JAX needs to start "
                    "(it would abort in C++): raise it, e.g. ulimit -v unlimited.")
