"""What a command pays for before and beside its work: no JAX for --help and argument
errors, nothing heavy at `import mlp_jax.run.experiment`, no torch ever, the persistent
compilation cache read back by a second run, and no JAX backend started by collecting
the tests mutmut runs.

Each test starts fresh processes: the modules a process imports can only be seen there.
A module is caught importing when a decoy of it, first on PYTHONPATH, leaves a mark.
"""

import json
import os
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT
from conftest import RUNNER

pytestmark = pytest.mark.slow
PREDICT = os.path.join(ROOT, "experiments", "predict.py")


@pytest.fixture
def decoys(tmp_path):
  """(environment, imported): PYTHONPATH with decoy packages `jax` or `torch` that record
  their import in a file and then load the real one (jax) or fail as if absent (torch)."""
  site = tmp_path / "decoys"
  marks = tmp_path / "imported"
  for name, then in (("jax", "real"), ("torch", "absent")):
    (site / name).mkdir(parents=True)
    load = ("import importlib.machinery, importlib.util, sys\n"
            f"sys.path.remove({str(site)!r})\n"
            f"spec = importlib.machinery.PathFinder.find_spec({name!r})\n"
            "module = importlib.util.module_from_spec(spec)\n"
            f"sys.modules[{name!r}] = module\n"
            "spec.loader.exec_module(module)\n") if then == "real" else (
            "raise ImportError('a decoy torch: the package is not installed')\n")
    (site / name / "__init__.py").write_text(
        f"with open({str(marks)!r}, 'a') as f:\n  f.write({name!r} + '\\n')\n" + load)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT])}

  def imported():
    return set(marks.read_text().split()) if marks.exists() else set()
  return env, imported


@pytest.mark.parametrize("argv, status, says", [
    ((RUNNER, "--help"), 0, "--hidden_dim"),
    ((RUNNER, "--hidden_dim=many"), 2, "error: flag --hidden_dim=many"),
    ((RUNNER, "--no_such_flag=1"), 2, "error: Unknown command line flag 'no_such_flag'"),
    ((PREDICT, "--help"), 0, "--workdir"),
    ((PREDICT,), 2, "error: flag --workdir=None: Flag --workdir must have a value"),
    ((PREDICT, "--workdir=/no/such/run", "--input=x.npz"), 1,
     "error: no params.npz at /no/such/run"),
    ((PREDICT, f"--workdir={ROOT}", "--input=/no/a.png,/no/b.png"), 1,
     "error: no such file: '/no/a.png', '/no/b.png'."),
    ((PREDICT, f"--workdir={ROOT}", f"--input={RUNNER}", "--output=/"), 1, "is a directory"),
    ((PREDICT, f"--workdir={ROOT}", f"--input={RUNNER}", "--output=/no/such/dir/p.csv"), 1,
     "does not exist"),
])
def test_help_and_argument_errors_answer_before_jax_is_imported(argv, status, says,
                                                                 decoys):
  env, imported = decoys
  result = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
  assert result.returncode == status, result.stderr
  assert says in result.stdout + result.stderr
  assert imported() == set()


def test_the_experiment_module_loads_nothing_heavy_and_a_run_never_imports_torch(
    decoys, tiny_npz, tmp_path):
  env, imported = decoys
  code = f"""
import json, sys
import mlp_jax.run.experiment as experiment
heavy = ("matplotlib", "tensorboardX", "torch", "orbax", "sklearn", "dp_accounting", "tqdm")
at_import = [m for m in heavy if m in sys.modules]
experiment.run(experiment.RunConfig(dataset={tiny_npz!r}, workdir={str(tmp_path / 'w')!r},
    hidden_dim=8, epochs=2, num_seeds=2, progress=False), log=lambda *_: None)
print(json.dumps({{"at_import": at_import,
                   "after_run": [m for m in heavy if m in sys.modules]}}))
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  loaded = json.loads(result.stdout.splitlines()[-1])
  assert loaded["at_import"] == []
  # The run wrote its plots (matplotlib), checkpoint (orbax) and events: never torch.
  assert "orbax" in loaded["after_run"] and "matplotlib" in loaded["after_run"]
  assert "torch" not in loaded["after_run"] and "tensorboardX" not in loaded["after_run"]
  assert imported() == {"jax"}                         # the decoy torch was never asked for
  assert list((tmp_path / "w" / "tensorboard" / "model_1_seed=1").glob("events.out.tfevents.*"))


def test_a_second_run_reads_its_programs_from_the_compilation_cache(tiny_npz, tmp_path):
  """MLP_JAX_COMPILATION_CACHE names the cache; the second run (another workdir, the
  same network) compiles nothing new: no file is added to the cache. Turned off, a run
  of another network adds none either."""
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # not the suite's
  env["MLP_JAX_COMPILATION_CACHE"] = str(cache)

  def run(workdir, *extra):
    result = subprocess.run([sys.executable, RUNNER, "--noprogress", "--hidden_dim=8",
                             f"--dataset={tiny_npz}", f"--workdir={tmp_path / workdir}",
                             "--epochs=2", *extra], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []

  first = run("a")
  assert len(first) >= 3                  # the init, the epoch and the evaluation
  assert run("b") == first                # every program read back, none compiled
  # Off: another network's programs (new ones) are not written.
  assert run("c", "--hidden_dim=9", "--compilation_cache=") == first


def test_help_into_a_closed_pipe_is_a_silent_141(decoys):
  """`train.py --help | head`: stdout's reader is gone; no error line, status 141 (as a
  shell reports a SIGPIPE), and still no JAX."""
  env, imported = decoys
  read_end, write_end = os.pipe()
  os.close(read_end)                       # every write to stdout fails: EPIPE
  result = subprocess.run([sys.executable, RUNNER, "--help"], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=60)
  os.close(write_end)
  assert (result.returncode, result.stderr) == (141, "")
  assert imported() == set()


def test_collecting_the_tests_starts_no_jax_backend():
  """mutmut forks its test processes from one that has collected its tests (pyproject's
  [tool.mutmut]); a JAX backend started at their import (a module-level jax.devices() or
  default_backend()) would make those forks deadlock."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    selection = tomllib.load(f)["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
  script = ("import pytest, sys\n"
            f"code = pytest.main(['--collect-only', '-q', '-n0', *{selection!r}])\n"
            "from jax._src import xla_bridge\n"
            "sys.exit(code or 3 * bool(xla_bridge._backends))\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:]
