"""The persistent compilation cache is used only where it is the user's own
(mlp_jax/base/compilation.py): JAX runs the programs it finds there."""

import os
import subprocess
import sys

import pytest

from mlp_jax.base import compilation
from mlp_jax.training import config as config_lib

from conftest import ROOT, assert_same_params, runner_command

OTHER_UID = 65534   # "nobody": another user, for the faults only root can make


def _make(tmp_path, fault):
  """A cache directory with `fault`, and the words `unsafe` must say (None: usable)."""
  cache = tmp_path / "cache"
  cache.mkdir(mode=0o700)
  (cache / "jit_step-cache").write_bytes(b"entry")
  os.chmod(cache / "jit_step-cache", 0o600)
  if fault == "world_writable":
    os.chmod(cache, 0o777)
  elif fault == "group_writable":
    os.chmod(cache, 0o770)
  elif fault == "other_owner":
    os.chown(cache, OTHER_UID, OTHER_UID)
  elif fault == "entry_other_owner":
    os.chown(cache / "jit_step-cache", OTHER_UID, OTHER_UID)
  elif fault == "entry_writable":
    os.chmod(cache / "jit_step-cache", 0o666)
  elif fault == "symlink":
    os.symlink(cache, tmp_path / "link")
    return tmp_path / "link", "cannot be opened as a directory"
  elif fault == "file":
    return cache / "jit_step-cache", "cannot be opened as a directory"
  elif fault == "fifo":
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo", "cannot be opened as a directory"
  return cache, {None: None, "world_writable": "other users can write it (mode 777)",
                 "group_writable": "other users can write it (mode 770)",
                 "other_owner": f"it belongs to another user (uid {OTHER_UID})",
                 "entry_other_owner": "its entry jit_step-cache belongs to another user",
                 "entry_writable": "other users can write its entry jit_step-cache"}[fault]


FAULTS = [None, "world_writable", "group_writable", "other_owner", "entry_other_owner",
          "entry_writable", "symlink", "file", "fifo"]


@pytest.mark.parametrize("fault", FAULTS)
def test_only_a_directory_of_ones_own_is_a_cache(tmp_path, fault):
  if "owner" in str(fault) and os.geteuid() != 0:
    pytest.skip("only root can give a file to another user")
  path, words = _make(tmp_path, fault)
  why = compilation.unsafe(str(path))
  assert (why is None) if words is None else (words in why), why


@pytest.mark.parametrize("fault", FAULTS[1:])
def test_an_explicit_cache_that_is_not_ones_own_is_refused_in_one_line(tmp_path, fault):
  if "owner" in str(fault) and os.geteuid() != 0:
    pytest.skip("only root can give a file to another user")
  path, _ = _make(tmp_path, fault)
  with pytest.raises(config_lib.SettingError) as refused:
    config_lib.resolve(config_lib.RunConfig(compilation_cache=str(path)))
  line = str(refused.value)
  assert line.startswith("--compilation_cache") and "\n" not in line
  if fault not in ("file", "fifo"):   # those are refused as not a directory to write
    assert line.startswith(f"--compilation_cache {path}: ")
    assert "--compilation_cache= to compile without a cache" in line


@pytest.mark.slow   # two runs of the runner, each a process of its own
@pytest.mark.parametrize("fault", ["world_writable", "other_owner"])
def test_a_cache_of_others_is_never_read_and_the_run_is_as_without_one(tiny_npz, tmp_path,
                                                                       reference_run, fault):
  """The default cache (here $MLP_JAX_COMPILATION_CACHE) holds another user's entries
  under this run's own keys: the run says so in one line, reads none of them, writes
  none, and trains the same params as the suite's in-process run of its settings."""
  if fault == "other_owner" and os.geteuid() != 0:
    pytest.skip("only root can give a file to another user")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # not the suite's
  cache = tmp_path / "cache"

  def run(workdir, cache_dir):
    env["MLP_JAX_COMPILATION_CACHE"] = str(cache_dir)
    result = subprocess.run(runner_command(tiny_npz, tmp_path / workdir, "--epochs=2"),
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stderr

  run("fill", cache)                             # this run's keys, then planted entries
  for entry in cache.iterdir():
    entry.write_bytes(b"another user's program")
  if fault == "world_writable":
    os.chmod(cache, 0o777)
  else:
    for p in (cache, *cache.iterdir()):
      os.chown(p, OTHER_UID, OTHER_UID)
  before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.iterdir()}
  stderr = run("planted", cache)
  assert f"mlp_jax: not using the compilation cache '{cache}'" in stderr
  assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.iterdir()} == before
  assert_same_params(tmp_path / "planted", reference_run(tiny_npz, epochs=2))


_FILL_CACHE = """
import sys
import jax, jax.numpy as jnp
from mlp_jax.base import compilation
path = compilation.enable()
for n in range(8, 8 + int(sys.argv[1])):             # distinct programs, cached
  jax.jit(lambda x: jnp.tanh(x) @ x.T + n).lower(jax.ShapeDtypeStruct((n, n), "f4")).compile()
with compilation.not_cached():                       # a peer's: never written
  jax.jit(lambda x: jnp.sin(x) * 3).lower(jax.ShapeDtypeStruct((5, 7), "f4")).compile()
print(path, jax.config.jax_compilation_cache_max_size)
"""


def _fill_cache(tmp_path, programs, gib=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["MLP_JAX_COMPILATION_CACHE"] = str(tmp_path / "cache")
  env.pop(compilation.SIZE_ENV, None)
  if gib is not None:
    env[compilation.SIZE_ENV] = gib
  return subprocess.run([sys.executable, "-c", _FILL_CACHE, str(programs)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def _entries(cache):
  return {p.name: p.stat().st_size for p in cache.iterdir() if p.name.endswith("-cache")}


@pytest.mark.slow   # fresh processes: JAX sets its cache up once per process
def test_the_cache_is_bounded_and_a_peers_programs_are_not_in_it(tmp_path):
  result = _fill_cache(tmp_path, 3)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [str(tmp_path / "cache"), str(1 << 30)]   # 1 GiB default
  entries = _entries(tmp_path / "cache")
  assert len(entries) == 3, entries                    # the peer's program is not there
  bound = 2.5 * max(entries.values()) / (1 << 30)      # room for two of those programs
  result = _fill_cache(tmp_path / "small", 6, gib=f"{bound:.12f}")
  assert result.returncode == 0, result.stderr
  assert int(result.stdout.split()[1]) == int(bound * (1 << 30))
  entries = _entries(tmp_path / "small" / "cache")
  assert 1 <= len(entries) <= 3 and sum(entries.values()) <= bound * (1 << 30), entries
  result = _fill_cache(tmp_path, 1, gib="lots")
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].endswith(
      "MLP_JAX_COMPILATION_CACHE_GIB='lots' is not a number of GiB above 0; set it to e.g. "
      "2, or unset it."), result.stderr
