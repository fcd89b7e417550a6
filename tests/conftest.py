"""Strict JAX for every test (no silent rank promotion), float32 as users run it, and the
helpers the test files share.

float64 only where a test needs it: the `x64` fixture. Every compiled program is kept in
a persistent compilation cache, one per user kept between runs (`_cache_dir`), so the
runner's programs compile once for all the tests (and subprocesses) that train the
same network, and a rerun of the suite reads back what the last one compiled.
"""

import atexit
import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _xla_cpu_flags() -> str:
  """Tests compile thousands of tiny programs and run each a few times, so compiling
  costs more than running: XLA's backend optimisations off, and on the CPU the
  elemental emitters for fusions instead of the newer fusion emitters (half the compile
  time of a small program, measured on jax 0.10), compiled in one piece, not split for
  parallel compilation (a quarter of a small program's compile time: each worker has one
  core). A flag XLA does not know aborts the process, so these are tried once in a
  subprocess first; the answer is passed on to pytest-xdist's workers in the
  environment."""
  known = os.environ.get("MLP_JAX_TEST_XLA_FLAGS")
  if known is not None:
    return known
  flags = "--xla_backend_optimization_level=0"
  faster = (flags + " --xla_cpu_use_fusion_emitters=false"
            " --xla_cpu_parallel_codegen_split_count=1")
  try:
    accepted = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"],
                              env={**os.environ, "XLA_FLAGS": faster, "JAX_PLATFORMS": "cpu"},
                              capture_output=True, check=False, timeout=120).returncode == 0
  except subprocess.TimeoutExpired:
    accepted = False
  os.environ["MLP_JAX_TEST_XLA_FLAGS"] = faster if accepted else flags
  return os.environ["MLP_JAX_TEST_XLA_FLAGS"]


# Set before JAX starts; subprocesses inherit them, after any XLA_FLAGS a test gives them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _xla_cpu_flags()).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "experiments", "train.py")
TIME_FIELDS = ("seconds", "examples_per_second")


def _cache_dir() -> str:
  """The suite's compilation cache: $MLP_JAX_TEST_CACHE, else $XDG_CACHE_HOME/mlp_jax/tests
  (~/.cache/mlp_jax/tests), kept between runs so that a rerun reads back the programs
  it compiled before (entries are keyed by the program, the versions and XLA_FLAGS), and
  emptied when a run finds more than CACHE_BYTES in it. Where that is not the user's own
  directory (compilation.unsafe), a temporary one, removed when the process ends."""
  from mlp_jax.base import compilation  # pylint: disable=g-import-not-at-top
  path = (os.environ.get("MLP_JAX_TEST_CACHE")
          or os.path.join(compilation.user_cache_dir(), "tests"))
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
    if compilation.unsafe(path) is None:
      with os.scandir(path) as entries:
        files = [e for e in entries if e.is_file(follow_symlinks=False)]
      if sum(e.stat(follow_symlinks=False).st_size for e in files) > CACHE_BYTES:
        for entry in files:
          os.unlink(entry.path)
        shutil.rmtree(os.path.join(path, BYTECODE), ignore_errors=True)
      return path
  except OSError:
    pass
  path = tempfile.mkdtemp(prefix="mlp_jax_test_cache_")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


CACHE_BYTES = 1 << 30
BYTECODE = "pycache"   # the compiled modules' directory in it (_keep_bytecode)
# Set once by the first process (pytest-xdist's workers and the tests' subprocesses
# inherit it: one cache).
_CACHE = {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
          or _cache_dir(),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
os.environ.update(_CACHE)
jax.config.update("jax_compilation_cache_dir", _CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_numpy_rank_promotion", "raise")


def _keep_bytecode(cache: str) -> None:
  """Python's compiled modules kept in the suite's cache (cache/pycache, Python's
  PYTHONPYCACHEPREFIX) where PYTHONDONTWRITEBYTECODE would have every fresh process of
  the suite (a few hundred) compile mlp_jax again, and pytest rewrite every test file:
  about 0.1 s a process. Only in a cache that is this user's own (compilation.unsafe):
  a module read from it runs. The checkout gets no __pycache__."""
  from mlp_jax.base import compilation  # pylint: disable=g-import-not-at-top
  if not os.environ.get("PYTHONDONTWRITEBYTECODE") or compilation.unsafe(cache):
    return
  prefix = os.path.join(cache, BYTECODE)
  os.makedirs(prefix, mode=0o700, exist_ok=True)
  del os.environ["PYTHONDONTWRITEBYTECODE"]
  os.environ["PYTHONPYCACHEPREFIX"] = prefix
  sys.dont_write_bytecode = False
  sys.pycache_prefix = prefix


_keep_bytecode(_CACHE["JAX_COMPILATION_CACHE_DIR"])


def equations(closed_jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (jit, scan, cond, ...) included."""
  from jax.extend.core import subjaxprs  # pylint: disable=g-import-not-at-top

  def walk(jaxpr):
    yield from jaxpr.eqns
    for sub in subjaxprs(jaxpr):
      yield from walk(sub)
  return list(walk(closed_jaxpr.jaxpr))


def largest_value(closed_jaxpr) -> int:
  """The most elements any equation of a jaxpr computes (what a program materialises)."""
  return max(int(np.prod(v.aval.shape)) for eqn in equations(closed_jaxpr)
             for v in eqn.outvars)


@contextlib.contextmanager
def float64():
  """float64 inside the block (jax_enable_x64), float32 again after it."""
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.fixture
def x64():
  """float64 for this test (the 1e-12 checks); float32 again after it."""
  with float64():
    yield


@pytest.fixture(scope="module")
def x64_module():
  """float64 for a whole test module: `pytestmark = pytest.mark.usefixtures("x64_module")`."""
  with float64():
    yield


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
  """`--dataset=npz:PATH` of 60 + 15 examples, 6 features, 3 separable classes."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 6)) * 2
  y_train, y_test = np.arange(60) % 3, np.arange(15) % 3
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, x_train=centers[y_train] + rng.normal(size=(60, 6)), y_train=y_train,
           x_test=centers[y_test] + rng.normal(size=(15, 6)), y_test=y_test)
  return f"npz:{path}"


# The runner, three ways: its command line in a fresh process (true end to end), its
# command line in this process, and experiment.run.

# 20 epochs: what the runner's default gives most data (a tiny set would get 1500 steps).
TINY_FLAGS = ("--noprogress", "--noplots", "--hidden_dim=16", "--batch_size=8",
              "--epochs=20")  # "--plots" after them where a test looks at the pictures


def runner_command(dataset, workdir, *extra):
  """The command line of a small run of experiments/train.py."""
  return [sys.executable, RUNNER, *TINY_FLAGS, f"--dataset={dataset}",
          f"--workdir={workdir}", *extra]


def run_runner(dataset, workdir, *extra, timeout=300):
  """A small run of experiments/train.py in a fresh process (CompletedProcess)."""
  return subprocess.run(runner_command(dataset, workdir, *extra), capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT)


def _runner_module():
  """mlp_jax.commands.train, the runner's main (its flags defined once per process)."""
  from mlp_jax.commands import train  # pylint: disable=g-import-not-at-top
  return train


def run_cli(*argv):
  """experiments/train.py's flag parsing and main() in this process: (exit code, stderr).

  The flags are parsed afresh each call, exactly as the command line would parse them.
  """
  code, _, stderr = run_cli_output(*argv)
  return code, stderr


def run_cli_output(*argv):
  """run_cli's (exit code, stdout, stderr)."""
  runner = _runner_module()
  runner.flags.FLAGS.unparse_flags()
  stdout, stderr = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
    try:
      runner.main(runner.parse_flags(["train.py", *argv]))
    except SystemExit as e:
      code = e.code
  return code, stdout.getvalue(), stderr.getvalue()


@contextlib.contextmanager
def small_disk(path, size="600k"):
  """A real small filesystem at `path` (a tmpfs; root only, else the test is skipped)."""
  path.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                    capture_output=True).returncode:
    pytest.skip("needs root to mount a small tmpfs")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def tiny_config(dataset, workdir, **overrides):
  """experiment.RunConfig of a small run (the in-process twin of runner_command), with a
  checkpoint after every epoch: the recovery tests fall back through several. No
  pictures (plots=True where a test looks at them: drawing is half a second a run)."""
  from mlp_jax.run import experiment  # pylint: disable=g-import-not-at-top
  return experiment.RunConfig(**{"dataset": dataset, "workdir": str(workdir),
                                 "hidden_dim": 16, "batch_size": 8, "epochs": 20,
                                 "progress": False, "checkpoint_seconds": 0.0,
                                 "plots": False, **overrides})


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """A memoised experiment.run: `reference_run(dataset, **overrides)` is the workdir of
  a finished tiny_config run of those settings, run once per session (per xdist
  worker) for every test that compares against it. Read it; never write to it."""
  done = {}

  def run(dataset, **overrides):
    from mlp_jax.run import experiment  # pylint: disable=g-import-not-at-top
    key = (dataset, tuple(sorted(overrides.items())))
    if key not in done:
      done[key] = tmp_path_factory.mktemp("reference")
      experiment.run(tiny_config(dataset, done[key], **overrides), log=lambda *_: None)
    return done[key]
  return run


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def without_times(rows):
  return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


def assert_same_params(dir_a, dir_b):
  with np.load(os.path.join(dir_b, "params.npz")) as b:
    assert_same_params_as(dir_a, b)


def assert_same_params_as(workdir, params):
  with np.load(os.path.join(workdir, "params.npz")) as a:
    for k in ("w1", "b1", "w2", "b2"):
      np.testing.assert_array_equal(a[k], params[k])


def wait_for_epochs(workdir, process, count, timeout=120):
  """Returns once the run of `process` has written `count` epochs to metrics.jsonl; fails
  naming why it did not: the process ended first (its status and stderr), or the time."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= count:
          return
    if process.poll() is not None:
      stderr = process.stderr.read() if process.stderr else ""
      raise AssertionError(f"the run ended with status {process.returncode} before epoch "
                           f"{count}: {stderr[-3000:]}")
    time.sleep(0.02)
  raise AssertionError(f"the run did not reach epoch {count} in {timeout} s")


def pld_epsilon(sigmas, q, steps, delta):
  """ε at δ of releasing DP-SGD runs of noise σ ∈ sigmas (q, steps each), composed by
  dp-accounting's PLD accountant directly: the expectation, apart from mlp_jax.core.privacy."""
  import dp_accounting as dpa  # pylint: disable=g-import-not-at-top  (dp extra)
  accountant = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
  for sigma in sigmas:
    accountant.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
  return accountant.get_epsilon(delta)


def manual_grads(layout, activation="relu"):
  """mj.grads with the manual pass in `layout` ("batch_major": gradients.backprop, or
  "feature_major": its kernel), whichever network.choose_layout would pick."""
  from mlp_jax.core import gradients  # pylint: disable=g-import-not-at-top  (JAX)
  from mlp_jax.core.network import Network  # pylint: disable=g-import-not-at-top

  def grads(params, X, y, weights=None, compute_dtype=None):
    net = Network(activation, compute_dtype, layout)
    return gradients.value_and_grads_with_logits(params, X, y, weights, net=net)[1]
  return grads
