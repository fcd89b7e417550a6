"""Time whole commands as a user runs them, each in a fresh process, in one run on one
machine: the fixed costs (imports, compilation, checkpoints, outputs) around the work.

    python experiments/startup.py                         # every row, 3 repeats
    python experiments/startup.py --torch_path=/opt/torchsite --repeats=5

Rows (the median wall seconds of --repeats, the commands taken in turn):
  floor           python -c "import jax; jax.jit(lambda x: x @ x)(...)": JAX's own start
  default, new    python experiments/train.py (digits), on an empty compilation cache
  default, warm   the same on a warm cache: what every rerun, resume and sweep job pays
  --help          python experiments/train.py --help
  predict PNG     experiments/predict.py on one PNG (warm cache)
  predict npz     experiments/predict.py on the digits test split as an .npz
  first fit       python -c "mj.MLPClassifier().fit(iris)", on an empty and a warm
                  cache, beside scikit-learn's MLPClassifier().fit(iris) (200 iterations)
  table           the runner on a 178-row table (scikit-learn's wine, as an npz)
each with this checkout's mlp_jax, its modules compiled once (PYTHONPYCACHEPREFIX in a
scratch directory), without torch (a decoy package that fails to import, first on
PYTHONPATH) and, where torch can be imported (installed, or at --torch_path), with it.
Then --short_epochs: the runner on many short epochs (4,000 × 40 table, H = 1024,
B = 100, 200 epochs, 3 seeds stacked) against a plain jax.grad + optax lax.scan loop of
the same steps, side by side.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from mlp_jax.base import boundary

if __name__ == "__main__":   # before any third-party import: a signal is one line
  boundary.install_stop_at_once()

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
PREDICT = os.path.join(ROOT, "experiments", "predict.py")

flags.DEFINE_integer("repeats", 3, "Runs of each command; the median is reported.",
                     lower_bound=1)
flags.DEFINE_string("torch_path", None, "A directory holding torch, added to PYTHONPATH "
                    "for the rows with torch (default: torch as this Python finds it).")
flags.DEFINE_bool("short_epochs", True, "Add the many-short-epochs comparison.")
flags.DEFINE_integer("short_epochs_repeats", 1, "Runs of each side of it.", lower_bound=1)

FLOOR = ("import jax, jax.numpy as jnp; "
         "jax.jit(lambda x: x @ x)(jnp.ones((256, 256))).block_until_ready()")

# The same steps as the runner's command below, written as a user would: jax.grad of the
# cross-entropy, optax.adamw, each epoch one lax.scan over a shuffled order, the 3 seeds
# vmapped; the data resident on the device. Prints nothing; no evaluation, no files.
PLAIN_LOOP = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
data = np.load(sys.argv[1])
X, y = jnp.asarray(data["x_train"], jnp.float32), jnp.asarray(data["y_train"])
N, D = X.shape
H, K, B, EPOCHS, SEEDS = 1024, int(y.max()) + 1, 100, 200, 3
opt = optax.adamw(1e-3, weight_decay=0.03)

def init(key):
  k1, k2 = jax.random.split(key)
  p = (jax.random.normal(k1, (H, D)) * jnp.sqrt(2 / D), jnp.zeros(H),
       jax.random.normal(k2, (K, H)) * jnp.sqrt(1 / H), jnp.zeros(K))
  return p, opt.init(p)

def loss(p, xb, yb):
  w1, b1, w2, b2 = p
  z = jax.nn.relu(xb @ w1.T + b1) @ w2.T + b2
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), yb[:, None], 1))

def epoch(state, key):
  order = jax.random.permutation(key, N)[: N // B * B].reshape(-1, B)
  def step(state, idx):
    p, s = state
    g = jax.grad(loss)(p, X[idx], y[idx])
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None
  return jax.lax.scan(step, state, order)[0]

run_epoch = jax.jit(jax.vmap(epoch))
state = jax.vmap(init)(jax.random.split(jax.random.key(0), SEEDS))
for e in range(EPOCHS):
  state = run_epoch(state, jax.random.split(jax.random.key(e + 1), SEEDS))
jax.block_until_ready(state)
"""


# The first fit of a new process on iris, the whole command: mlp_jax's estimator and
# scikit-learn's, side by side (imports included: what a user waits for).
FIRST_FIT = ("from sklearn.datasets import load_iris; import mlp_jax as mj; "
             "mj.MLPClassifier().fit(*load_iris(return_X_y=True))")
SKLEARN_FIT = ("import warnings; from sklearn.datasets import load_iris; "
               "from sklearn.neural_network import MLPClassifier; "
               "warnings.simplefilter('ignore'); MLPClassifier().fit(*load_iris(return_X_y=True))")


def decoy_torch(directory):
  """A `torch` package in `directory` that fails to import, as if torch were absent."""
  os.makedirs(os.path.join(directory, "torch"), exist_ok=True)
  with open(os.path.join(directory, "torch", "__init__.py"), "w") as f:
    f.write("raise ImportError('torch is hidden for this benchmark row')\n")
  return directory


def environments(scratch, torch_path):
  """{"no torch": env, "torch": env (when torch imports)}."""
  base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")
          and k != "PYTHONDONTWRITEBYTECODE"}
  # Compiled modules kept (in the scratch directory), as an installed package has them:
  # with PYTHONDONTWRITEBYTECODE each command would compile mlp_jax again (not JAX: pip
  # compiled it when it installed it), which no user's second run pays.
  base["PYTHONPYCACHEPREFIX"] = os.path.join(scratch, "pycache")
  # This checkout's mlp_jax, whichever one is installed: ROOT is on every PYTHONPATH.
  decoy = decoy_torch(os.path.join(scratch, "decoy"))
  envs = {"no torch": {**base, "PYTHONPATH": os.pathsep.join([decoy, ROOT])}}
  with_torch = {**base, "PYTHONPATH": os.pathsep.join([torch_path, ROOT]) if torch_path
                else ROOT}
  found = subprocess.run([sys.executable, "-c", "import torch"], env=with_torch,
                         capture_output=True).returncode == 0
  if found:
    envs["torch"] = with_torch
  return envs


def prepare(scratch):
  """The inputs: a finished digits run, one PNG and an npz of its test split, and the
  wine table as an npz. Returns their paths."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top
  from mlp_jax.data import datasets  # pylint: disable=g-import-not-at-top
  run = os.path.join(scratch, "digits_run")
  subprocess.run([sys.executable, TRAIN, "--noprogress", f"--workdir={run}"],
                 check=True, capture_output=True)
  _, _, x_test, y_test = datasets.load_digits()
  png = os.path.join(scratch, "digit.png")
  Image.fromarray((x_test[0].reshape(8, 8) * 255 / 16).astype(np.uint8)).save(png)
  test_npz = os.path.join(scratch, "digits_test.npz")
  np.savez(test_npz, x=x_test, y=y_test)
  wine = sklearn_datasets.load_wine()
  train_rows, test_rows = datasets.stratified_split(wine.target, 0.2, 0)
  wine_npz = os.path.join(scratch, "wine.npz")
  np.savez(wine_npz, x_train=wine.data[train_rows], y_train=wine.target[train_rows],
           x_test=wine.data[test_rows], y_test=wine.target[test_rows])
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 40))
  labels = rng.integers(0, 4, 5000)
  table = centers[labels] + rng.normal(size=(5000, 40))
  short_npz = os.path.join(scratch, "short.npz")
  np.savez(short_npz, x_train=table[:4000], y_train=labels[:4000], x_test=table[4000:],
           y_test=labels[4000:])
  return run, png, test_npz, wine_npz, short_npz


def wall(command, env):
  """Seconds of one run of `command` (it must succeed: exit status 0, --help too)."""
  start = time.perf_counter()
  result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  return seconds


def commands(scratch, paths):
  """{row: (command, fresh cache each run?)}."""
  run, png, test_npz, wine_npz, _ = paths
  work = lambda: os.path.join(tempfile.mkdtemp(dir=scratch), "w")  # pylint: disable=unnecessary-lambda-assignment
  return {
      "floor": (lambda: [sys.executable, "-c", FLOOR], False),
      "default, new cache": (lambda: [sys.executable, TRAIN, f"--workdir={work()}"], True),
      "default, warm cache": (lambda: [sys.executable, TRAIN, f"--workdir={work()}"], False),
      "--help": (lambda: [sys.executable, TRAIN, "--help"], False),
      "predict.py, one PNG": (lambda: [sys.executable, PREDICT, f"--workdir={run}",
                                       f"--input={png}"], False),
      "predict.py, an npz": (lambda: [sys.executable, PREDICT, f"--workdir={run}",
                                      f"--input={test_npz}"], False),
      "first MLPClassifier fit, iris, new cache": (
          lambda: [sys.executable, "-c", FIRST_FIT], True),
      "first MLPClassifier fit, iris, warm cache": (
          lambda: [sys.executable, "-c", FIRST_FIT], False),
      "scikit-learn's MLPClassifier fit, iris": (
          lambda: [sys.executable, "-c", SKLEARN_FIT], False),
      "178-row table (wine npz)": (lambda: [sys.executable, TRAIN, "--noprogress",
                                            f"--dataset=npz:{wine_npz}",
                                            "--input_scaling=per_feature",
                                            f"--workdir={work()}"], False),
  }


def time_commands(scratch, paths, envs, repeats):
  """{(row, env name): [seconds]}, the commands taken in turn, `repeats` rounds."""
  warm = os.path.join(scratch, "cache")
  seconds = {}
  for env in envs.values():   # warm the cache of every command first
    for command, _ in commands(scratch, paths).values():
      wall(command(), {**env, "MLP_JAX_COMPILATION_CACHE": warm})
  for _ in range(repeats):
    for env_name, env in envs.items():
      for row, (command, fresh) in commands(scratch, paths).items():
        cache = tempfile.mkdtemp(dir=scratch) if fresh else warm
        seconds.setdefault((row, env_name), []).append(
            wall(command(), {**env, "MLP_JAX_COMPILATION_CACHE": cache}))
  return seconds


def time_short_epochs(scratch, short_npz, env, repeats):
  """{side: [seconds]}: the runner (warm cache, and none) and the plain loop, in turn."""
  warm = os.path.join(scratch, "cache")
  runner = lambda: [sys.executable, TRAIN, "--noprogress", f"--dataset=npz:{short_npz}",  # pylint: disable=unnecessary-lambda-assignment
                    "--hidden_dim=1024", "--batch_size=100", "--epochs=200",
                    "--num_seeds=3", f"--workdir={tempfile.mkdtemp(dir=scratch)}/w"]
  sides = {"runner, warm cache": (runner, warm), "runner, no cache": (runner, ""),
           "plain jax.grad + optax loop": (
               lambda: [sys.executable, "-c", PLAIN_LOOP, short_npz], "")}
  wall(runner(), {**env, "MLP_JAX_COMPILATION_CACHE": warm})   # warm it
  seconds = {}
  for _ in range(repeats):
    for side, (command, cache) in sides.items():
      seconds.setdefault(side, []).append(
          wall(command(), {**env, "MLP_JAX_COMPILATION_CACHE": cache}))
  return seconds


def main(argv):
  del argv   # none: boundary.parse_flags refuses a stray argument
  cfg = flags.FLAGS
  scratch = tempfile.mkdtemp(prefix="mlp_jax_startup_")
  try:
    envs = environments(scratch, cfg.torch_path)
    paths = prepare(scratch)
    seconds = time_commands(scratch, paths, envs, cfg.repeats)
    print(f"median wall seconds of {cfg.repeats} runs (each a fresh process)")
    print(f"{'command':<42}" + "".join(f"{name:>12}" for name in envs))
    rows = dict.fromkeys(row for row, _ in seconds)
    for row in rows:
      print(f"{row:<42}" + "".join(f"{statistics.median(seconds[(row, name)]):>12.2f}"
                                   for name in envs))
    if "torch" not in envs:
      print("(torch cannot be imported here: give --torch_path for its column)")
    if cfg.short_epochs:
      env = envs.get("torch", envs["no torch"])
      short = time_short_epochs(scratch, paths[4], env, cfg.short_epochs_repeats)
      plain = statistics.median(short["plain jax.grad + optax loop"])
      print(f"many short epochs (4,000 x 40, H=1024, B=100, 200 epochs, 3 seeds), "
            f"median of {cfg.short_epochs_repeats}, {'with' if 'torch' in envs else 'no'} torch:")
      for side, values in short.items():
        print(f"  {side:<30}{statistics.median(values):>8.2f} s"
              f"{statistics.median(values) / plain:>8.2f}x")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  boundary.script(lambda: app.run(main, flags_parser=boundary.parse_flags))
