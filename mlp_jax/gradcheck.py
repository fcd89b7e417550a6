"""Gradient checks: ours (manual vs jax.grad vs float64 finite differences), and a
learner's own gradient function, leaf by leaf, with the mistake named.

    python -m mlp_jax.gradcheck [--in_dim=6 --hidden_dim=10 --num_classes=4
                                 --batch_size=8 --seed=0 --dtype=float64]
    python -m mlp_jax.gradcheck --grads=FILE.py:FUNCTION [--json] [--gradescope=FILE]
    python -m mlp_jax.gradcheck --grads=DIR:FUNCTION [--json] [--csv=FILE]   (a class)

The first prints, per parameter, the max relative error of each pair and exits 1 when
any exceeds its tolerance; its helpers are what tests/test_gradients.py uses. The others
run a learner's FUNCTION(params, X, y) in a process of its own (mlp_jax/learner.py) on
the problems of mlp_jax/core/mistakes.py, and say of each gradient: right, wrong shape,
raised, or wrong and which known mistakes give it (mlp_jax/verdicts.py; mj.check_grads
from Python); a class, every submission of DIR (mlp_jax/grading.py). Exit statuses: 0
right, 1 wrong, 2 a usage error, 3 not checked, 4 an error in gradcheck.
"""

import contextlib
import functools
import io
import math
import sys
from typing import Callable

from mlp_jax.base import boundary

if __name__ == "__main__":   # before any third-party import: a signal is one line
  boundary.install_stop_at_once()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
from jax import Array
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike
import numpy as np

from mlp_jax import learner
from mlp_jax.base.options import ACTIVATIONS
from mlp_jax.core import losses
from mlp_jax.core.gradients import autodiff_grads, grads
from mlp_jax.core.model import Params
from mlp_jax.grading import Grading, grade_command, refused
from mlp_jax.verdicts import (  # pylint: disable=unused-import  (gradcheck.X names)
    USAGE, Check, Report, Verdict, check_grads, check_grads_isolated)

# Manual vs autodiff, per dtype; and either vs float64 finite differences.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
FD_TOLERANCE = {"float64": 1e-6, "float32": 1e-5}
FD_STEP = 1e-6


def relative_error(a: ArrayLike, b: ArrayLike) -> float:
  """max|a − b| / max(max|a|, max|b|): one number per array, 0 when both are 0."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(a)), np.max(np.abs(b)))
  return float(np.max(np.abs(a - b)) / scale) if scale > 0 else 0.0


def random_problem(seed: int, batch_size: int, in_dim: int, hidden_dim: int,
                   num_classes: int, dtype: DTypeLike = np.float64
                   ) -> tuple[Params, Array, Array]:
  """Random non-zero params (biases too), X (B, D) and int labels y (B,), from numpy.

  Redraws until every |z1| is 10× farther from the ReLU kink at 0 than a finite
  difference step can move it (h·max(1, max|X|)), so no difference straddles the kink;
  ValueError (one line) if 100 draws cannot.
  """
  rng = np.random.default_rng(seed)
  for _ in range(100):
    w1 = rng.standard_normal((hidden_dim, in_dim)) / math.sqrt(in_dim)
    b1 = rng.standard_normal(hidden_dim)
    w2 = rng.standard_normal((num_classes, hidden_dim)) / math.sqrt(hidden_dim)
    b2 = rng.standard_normal(num_classes)
    X = rng.standard_normal((batch_size, in_dim))
    y = rng.integers(0, num_classes, batch_size)
    margin = 10 * FD_STEP * max(1.0, float(np.max(np.abs(X))))
    if np.min(np.abs(X @ w1.T + b1)) > margin:
      return (Params(*(jnp.asarray(a, dtype) for a in (w1, b1, w2, b2))),
              jnp.asarray(X, dtype), jnp.asarray(y, jnp.int32))
  raise ValueError(f"no random problem of B·H = {batch_size * hidden_dim} hidden values "
                   f"keeps every z1 {margin:.0e} away from the ReLU kink in 100 draws; use "
                   "a smaller --batch_size or --hidden_dim.")


def finite_difference_grads(loss_fn: Callable[[Params], Array], params: Params,
                            step: float = FD_STEP) -> Params:
  """Central differences (f(θ + h e_j) − f(θ − h e_j)) / 2h of loss_fn, in float64."""
  @jax.jit
  def differences(params: Params) -> Params:
    flat, unravel = ravel_pytree(jax.tree.map(lambda a: a.astype(jnp.float64), params))

    # One coordinate; 256 at a time, never a (P, P) matrix of shifts.
    def difference(j: Array) -> Array:
      e = jnp.zeros_like(flat).at[j].set(step)
      return (loss_fn(unravel(flat + e)) - loss_fn(unravel(flat - e))) / (2 * step)

    return unravel(jax.lax.map(difference, jnp.arange(flat.size), batch_size=256))

  return differences(params)


def check(params: Params, X: Array, y: Array, dtype: DTypeLike,
          manual_grads: Callable[..., Params] = grads, activation: str = "relu"
          ) -> list[tuple[str, float, float, float]]:
  """Rows (name, manual~autodiff, manual~fd, autodiff~fd) of relative errors.

  params, X are float64; the manual and autodiff gradients are taken in `dtype`,
  the finite differences always in float64, all of the network with `activation`.
  `manual_grads` is the function checked (called with activation=). Needs float64:
  jax.config.update("jax_enable_x64", True) first (the script does).
  """
  if not jax.config.read("jax_enable_x64"):
    raise ValueError("gradcheck.check needs float64 for its finite differences: call "
                     'jax.config.update("jax_enable_x64", True) first.')
  cast = lambda a: a.astype(dtype)
  p, x = jax.tree.map(cast, params), cast(X)
  manual = jax.jit(functools.partial(manual_grads, activation=activation))(p, x, y)
  autodiff = jax.jit(functools.partial(autodiff_grads, activation=activation))(p, x, y)
  fd = finite_difference_grads(lambda q: losses.loss(q, X, y, activation=activation), params)
  return [(name, relative_error(m, a), relative_error(m, f), relative_error(a, f))
          for name, m, a, f in zip(Params._fields, manual, autodiff, fd)]


def define_flags() -> None:
  """The command line's flags; defined when run as a script, never at import."""
  flags.DEFINE_integer("in_dim", 6, "D, the input size.", lower_bound=1)
  flags.DEFINE_integer("hidden_dim", 10, "H, the hidden size.", lower_bound=1)
  flags.DEFINE_integer("num_classes", 4, "K, the number of classes.", lower_bound=2)
  flags.DEFINE_integer("batch_size", 8, "B, the rows of X.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the random problem.")
  flags.DEFINE_enum("dtype", "float64", ["float32", "float64"],
                    "dtype of params and X for the manual and autodiff gradients.")
  flags.DEFINE_string("grads", None, "FILE.py:FUNCTION or MODULE:FUNCTION: check that "
                      "function(params, X, y) instead of ours, and name its mistakes.")
  flags.DEFINE_bool("json", False, "With --grads: print the report as one JSON object, "
                    "whatever happens (a usage error, a timeout, a crash included).")
  flags.DEFINE_string("csv", None, "With --grads=DIR:FUNCTION: write one row per "
                      "submission here (name, status, score, each leaf's verdict and "
                      "mistakes).")
  flags.DEFINE_string("gradescope", None, "With --grads=FILE.py:FUNCTION: write "
                      "Gradescope's results.json here (a test per parameter).")
  flags.DEFINE_float("tolerance", None, "With --grads: the relative error a right "
                     "gradient may have. Default: by the dtype it was computed in (1e-8 "
                     "float64, 1e-4 float32, 1e-2 float16).", lower_bound=0)
  flags.DEFINE_enum("layout", "rows", list(learner.LAYOUTS), "With --grads: how the "
                    "function takes its arrays: rows (X (B, D), biases (H,)) or columns "
                    "(the handout's: X (D, B), biases (H, 1)).")
  flags.DEFINE_float("timeout", learner.TIMEOUT_SECONDS, "With --grads: seconds the whole "
                     "submission may run; past them it is stopped, not checked.",
                     lower_bound=0.1)
  flags.DEFINE_float("memory_limit", learner.MEMORY_BYTES / 2**30, "With --grads: GiB of "
                     "address space the submission's process may use (JAX needs 2 to "
                     "start).", lower_bound=0.5)
  flags.DEFINE_enum("activation", "relu", list(ACTIVATIONS),
                    "f of the hidden layer, a1 = f(z1), of the network checked (with "
                    "--grads: the learner's network, its mistakes named for that f).")


def parse_flags(argv: list[str]) -> list[str]:
  """boundary.parse_flags; with --json, a flag it refuses is also the JSON object of a
  usage error on stdout (an autograder reads stdout)."""
  if not any(a in ("--json", "--json=true", "--json=1") for a in argv[1:]):
    return boundary.parse_flags(argv)
  said = io.StringIO()
  try:
    with contextlib.redirect_stderr(said):
      return boundary.parse_flags(argv)
  except SystemExit as e:
    sys.stderr.write(said.getvalue())
    if e.code == USAGE:
      refused(USAGE, said.getvalue().strip().removeprefix("error: "), True, said=True)
    raise


def main(argv: list[str]) -> None:
  """The command: one random problem, its table of errors; exit 1 past a tolerance."""
  del argv   # none: boundary.parse_flags refuses a stray argument
  FLAGS = flags.FLAGS
  if FLAGS.grads is not None:
    how = Check(FLAGS.seed, FLAGS.tolerance, FLAGS.layout, FLAGS.activation,
                FLAGS.timeout, int(FLAGS.memory_limit * 2**30))
    sys.exit(grade_command(FLAGS.grads, Grading(how, FLAGS.json, FLAGS.csv or "",
                                                FLAGS.gradescope or "")))
  jax.config.update("jax_enable_x64", True)
  try:
    params, X, y = random_problem(FLAGS.seed, FLAGS.batch_size,
                                  FLAGS.in_dim, FLAGS.hidden_dim, FLAGS.num_classes)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  tol, fd_tol = TOLERANCE[FLAGS.dtype], FD_TOLERANCE[FLAGS.dtype]
  print(f"gradcheck D={FLAGS.in_dim} H={FLAGS.hidden_dim} K={FLAGS.num_classes} "
        f"B={FLAGS.batch_size} seed={FLAGS.seed} dtype={FLAGS.dtype}"
        + (f" activation={FLAGS.activation}" if FLAGS.activation != "relu" else ""))
  print(f"max relative error; tolerance manual~autodiff {tol:g}, vs float64 finite "
        f"differences (h={FD_STEP:g}) {fd_tol:g}")
  print(f"{'param':6} {'manual~autodiff':>16} {'manual~fd':>12} {'autodiff~fd':>12}",
        flush=True)  # the finite differences take a while for large D·H
  failed = []
  for name, m_a, m_f, a_f in check(params, X, y, jnp.dtype(FLAGS.dtype),
                                   activation=FLAGS.activation):
    print(f"{name:6} {m_a:16.3e} {m_f:12.3e} {a_f:12.3e}")
    if m_a > tol or m_f > fd_tol or a_f > fd_tol:
      failed.append(name)
  if failed:
    print(f"FAILED: {', '.join(failed)} exceed the tolerance")
    sys.exit(1)
  print("OK: manual == autodiff == finite differences")


def script() -> None:
  """The command (`mlp-jax gradcheck`, `python -m mlp_jax.gradcheck`): flags from
  sys.argv, then main, in the error boundary (exits)."""
  boundary.script(lambda: app.run(main, flags_parser=parse_flags), __name__,
                  define_flags)


if __name__ == "__main__":
  script()
