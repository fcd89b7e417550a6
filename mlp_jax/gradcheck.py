"""Gradient checks: ours (manual vs jax.grad vs float64 finite differences), and a
learner's own gradient function, leaf by leaf, with the mistake named.

    python -m mlp_jax.gradcheck [--in_dim=6 --hidden_dim=10 --num_classes=4
                                 --batch_size=8 --seed=0 --dtype=float64]
    python -m mlp_jax.gradcheck --grads=FILE.py:FUNCTION [--json]   (or MODULE:FUNCTION)

The first prints, per parameter, the max relative error of each pair and exits 1 when
any exceeds its tolerance; its helpers are what tests/test_gradients.py uses. The second
(mj.check_grads from Python) calls FUNCTION(params, X, y) on the problems of
mlp_jax/core/mistakes.py and says of each gradient: right, wrong shape, raised, or wrong
and which known mistakes give it; exit status 0 when all four are right, 1 otherwise.
"""

import contextlib
import functools
import io
import json
import math
import sys
from typing import Any, Callable, NamedTuple, Optional

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
from mlp_jax.core import losses, mistakes
from mlp_jax.core.gradients import autodiff_grads, grads
from mlp_jax.core.mistakes import CATALOGUE, LEAVES, Problem
from mlp_jax.core.model import Params
from mlp_jax.learner import Value, Why

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


# A learner's gradient is right within this relative error of the leaf, by its dtype.
LEARNER_TOLERANCE = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2}


class Verdict(NamedTuple):
  """One parameter's verdict: ok, its relative error (None where there is none), the
  catalogue's ids of the mistakes it matches, one line saying so, and whether it earns
  its credit (ok, or right on every problem where the function returned)."""
  ok: bool
  rel_error: Optional[float]
  mistakes: list[str]
  message: str
  credit: bool = False


# The command's exit statuses (and a report's `status`).
RIGHT, WRONG, USAGE, NOT_CHECKED, INTERNAL = 0, 1, 2, 3, 4
STATUS_WORDS = {RIGHT: "right", WRONG: "wrong", USAGE: "usage error",
                NOT_CHECKED: "not checked", INTERNAL: "error in gradcheck"}


class Report(NamedTuple):
  """check_grads' answer: correct when every leaf is; str() is the printed report.
  status: RIGHT, WRONG or NOT_CHECKED (`message` says what stopped the submission: it
  exited, crashed, timed out or returned nothing); `shapes`: the problems' B, D, H, K."""
  correct: bool
  leaves: dict[str, Verdict]
  problems: list[str]
  status: int = RIGHT
  message: str = ""
  seed: int = 0
  shapes: tuple[dict[str, int], ...] = ()

  @property
  def score(self) -> int:
    """One point per leaf that earns its credit (Verdict.credit), of len(LEAVES)."""
    return sum(v.credit for v in self.leaves.values())

  def as_dict(self) -> dict[str, Any]:
    """The report as JSON: {"version", "status", "status_words", "correct", "score",
    "max_score", "message", "seed", "problems": [{B, D, H, K, ties}], "leaves": {"w1":
    {"ok", "rel_error", "mistakes", "message", "credit"}}, "mistakes": {id: what it
    is}}."""
    from mlp_jax import __version__  # pylint: disable=g-import-not-at-top
    named = [m for m in CATALOGUE if any(m in v.mistakes for v in self.leaves.values())]
    return {"version": __version__, "status": self.status,
            "status_words": STATUS_WORDS[self.status], "correct": self.correct,
            "score": self.score, "max_score": len(LEAVES), "message": self.message,
            "seed": self.seed, "problems": list(self.shapes),
            "leaves": {n: v._asdict() for n, v in self.leaves.items()},
            "mistakes": {m: CATALOGUE[m][0] for m in named}}

  def __str__(self) -> str:
    wrong = [n for n, v in self.leaves.items() if not v.ok]
    named = [m for m in CATALOGUE if any(m in v.mistakes for v in self.leaves.values())]
    verdict = (f"NOT CHECKED: {self.message}" if self.status == NOT_CHECKED else
               f"WRONG: {', '.join(wrong)}" if wrong else "OK: every gradient is right")
    return "\n".join(
        [f"problems: {'; '.join(self.problems)}"]
        + [f"{n:3} {v.message}" for n, v in self.leaves.items()]
        + [f"  {m}: {CATALOGUE[m][0]} (docs/derivation.md"
           + (f", {CATALOGUE[m][1]})" if CATALOGUE[m][1] else ")") for m in named]
        + [verdict])


def check_grads(fn: Callable[..., Any], seed: int = 0) -> Report:
  """Checks a learner's fn(params, X, y) -> the gradients of the mean cross-entropy (as
  Params, a dict of w1, b1, w2, b2, or a 4-tuple), NumPy or JAX, called with float64
  NumPy arrays (never jitted) on mistakes.problems(seed); each leaf's Verdict. `fn` runs
  in this process: the caller's own code (the command line runs a learner's file in a
  child process: check_grads_isolated)."""
  problem_list = mistakes.problems(seed)
  try:
    answers = learner.Answers([learner.call(fn, p) for p in problem_list])
  except learner.Exited as e:
    answers = learner.Answers([], str(e))
  return _report(answers, problem_list, seed)


def check_grads_isolated(spec: str, seed: int = 0,
                         timeout: float = learner.TIMEOUT_SECONDS,
                         memory: int = learner.MEMORY_BYTES) -> Report:
  """check_grads of the function "FILE.py:FUNCTION" or "MODULE:FUNCTION", run in a child
  process that returns only arrays, within `timeout` seconds and `memory` bytes
  (mlp_jax/learner.py); the verdicts are computed here. UsageError, one line, where
  the command is at fault (no such file, a malformed spec); a submission that cannot
  be checked is a Report of status NOT_CHECKED."""
  problem_list = mistakes.problems(seed)
  try:
    answers = learner.run_isolated(spec, [tuple(p) for p in problem_list], timeout, memory)
  except learner.LoadError as e:
    raise boundary.UsageError(str(e)) from None
  return _report(answers, problem_list, seed)


def _report(answers: learner.Answers, problem_list: list[Problem], seed: int) -> Report:
  """The Report of a submission's answers: NOT_CHECKED where it stopped before
  answering, or answered nothing on any problem."""
  shapes = tuple({"B": len(p.X), "D": p.X.shape[1], "H": len(p.b1), "K": len(p.b2),
                  "ties": int(np.sum(p.X @ p.w1.T + p.b1 == 0))} for p in problem_list)
  described = [p.describe() for p in problem_list]
  if answers.failure:
    return Report(False, {}, described, NOT_CHECKED, answers.failure, seed, shapes)
  leaves = {leaf: _verdict(leaf, [o[leaf] for o in answers.values], problem_list)
            for leaf in LEAVES}
  if not any(isinstance(v, np.ndarray) for values in answers.values
             for v in values.values()):
    why = next(str(v) for values in answers.values for v in values.values())
    return Report(False, leaves, described, NOT_CHECKED,
                  f"it returned no gradient on any problem: {why}", seed, shapes)
  correct = all(v.ok for v in leaves.values())
  return Report(correct, leaves, described, RIGHT if correct else WRONG, "", seed, shapes)


def _verdict(leaf: str, values: list[Value], problem_list: list[Problem]) -> Verdict:
  """The Verdict of one leaf from its value on each problem."""
  rights = [mistakes.right_gradients(p)[leaf] for p in problem_list]
  arrays = [v if isinstance(v, np.ndarray) else None for v in values]
  failed = next((f"{v} on the {p.describe()} problem" for v, p in zip(values, problem_list)
                 if isinstance(v, Why)), "")
  if all(a is None for a in arrays):
    return Verdict(False, None, [], failed.rpartition(" on the ")[0])
  dtype = next(a.dtype.name for a in arrays if a is not None)
  tol = LEARNER_TOLERANCE.get(dtype, LEARNER_TOLERANCE["float64"])
  ran = [(a, r, p) for a, r, p in zip(arrays, rights, problem_list) if a is not None]
  bad = next((f"wrong shape {a.shape}, should be {r.shape}" for a, r, _ in ran
              if a.shape != r.shape), "")
  rel = None if bad else max(mistakes.relative_error(a, r) for a, r, _ in ran)
  if rel is not None and rel <= tol and not failed:
    return Verdict(True, rel, [], f"right (rel_error {rel:.1e} <= {tol:g})", True)
  found = mistakes.matching(arrays, problem_list, leaf, mistakes.Close(tol))
  ids = sorted({m for s in found for m in s}, key=list(CATALOGUE).index)
  if found == [frozenset(["relu_tie_convention"])] and not failed:
    return _tie_verdict(leaf, ran, tol)
  status = bad or (f"wrong (rel_error {rel:.1e} > {tol:g})" if rel and rel > tol else
                   f"right where it ran (rel_error {rel:.1e} <= {tol:g})")
  if found:
    status += ": the gradient with " + ", or with ".join(
        " + ".join(sorted(s, key=list(CATALOGUE).index)) for s in found)
  elif not failed and not bad:
    status += ": not a mistake gradcheck knows; " + _largest_difference(ran)
  credit = rel is not None and rel <= tol   # right wherever it returned
  return Verdict(False, rel, ids, status + (f"; {failed}" if failed else ""), credit)


def _tie_verdict(leaf: str, ran: list[tuple[np.ndarray, np.ndarray, Problem]], tol: float
                 ) -> Verdict:
  """Right but for ReLU′(0) at the ties: a convention, named, not an error."""
  convention = frozenset(["relu_tie_convention"])
  rel = max(min(mistakes.relative_error(a, c) for c in mistakes.gradients_with(
      p, convention)[leaf]) for a, _, p in ran)
  return Verdict(True, rel, ["relu_tie_convention"], credit=True, message=
                 f"right (rel_error {rel:.1e} <= {tol:g}) with ReLU′(0) taken as 0 (or ½) "
                 "at the ties z1 = 0, where the seed and mlp_jax take 1: a convention, not "
                 "an error (relu_tie_convention)")


def _largest_difference(ran: list[tuple[np.ndarray, np.ndarray, Problem]]) -> str:
  """Where the leaf is farthest from right: its index, on which problem."""
  a, r, p = max(ran, key=lambda arp: float(np.max(np.abs(arp[0] - arp[1]))))
  index = np.unravel_index(np.argmax(np.abs(a - r)), a.shape)
  where = f"row {index[0]}, column {index[1]}" if len(index) == 2 else f"entry {index[0]}"
  return (f"the largest difference is at {where} ({a[index]:.4g} for {r[index]:.4g}) on "
          f"the {p.describe()} problem")


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
  flags.DEFINE_float("timeout", learner.TIMEOUT_SECONDS, "With --grads: seconds the whole "
                     "submission may run; past them it is stopped, not checked.",
                     lower_bound=0.1)
  flags.DEFINE_float("memory_limit", learner.MEMORY_BYTES / 2**30, "With --grads: GiB of "
                     "address space the submission's process may use (JAX needs 2 to "
                     "start).", lower_bound=0.5)
  flags.DEFINE_enum("activation", "relu", list(ACTIVATIONS),
                    "f of the hidden layer, a1 = f(z1), of the network checked (--grads: "
                    "relu, the network whose mistakes the catalogue names).")


def grade_command(spec: str, seed: int, timeout: float, memory_gib: float,
                  as_json: bool) -> int:
  """The command with --grads: the report printed (as JSON: one object whatever
  happens), and its exit status (RIGHT, WRONG, USAGE, NOT_CHECKED, INTERNAL)."""
  try:
    report = check_grads_isolated(spec, seed, timeout, int(memory_gib * 2**30))
  except boundary.UsageError as e:
    return _refused(USAGE, str(e), as_json)
  except Exception as e:  # pylint: disable=broad-except  (status 4, with JSON too)
    return _refused(INTERNAL, f"internal error ({type(e).__name__}: "
                    f"{boundary.first_line(e)}): a bug in mlp_jax's gradcheck; please "
                    "report it", as_json)
  with contextlib.suppress(AttributeError, ValueError):   # an ASCII or Latin-1 stdout
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
  print(json.dumps(report.as_dict(), indent=2) if as_json   # JSON: ASCII escapes
        else f"gradcheck of {spec}\n{report}")
  return report.status


def _refused(status: int, message: str, as_json: bool, said: bool = False) -> int:
  """A usage error or gradcheck's own: its line on stderr (unless `said`), and with
  --json the object."""
  if not said:
    print(f"error: {boundary.escaped(message)}", file=sys.stderr)
  if as_json:
    from mlp_jax import __version__  # pylint: disable=g-import-not-at-top
    print(json.dumps({"version": __version__, "status": status,
                      "status_words": STATUS_WORDS[status], "correct": False, "score": 0,
                      "max_score": len(LEAVES), "message": message}, indent=2))
  return status


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
      _refused(USAGE, said.getvalue().strip().removeprefix("error: "), True, said=True)
    raise


def main(argv: list[str]) -> None:
  """The command: one random problem, its table of errors; exit 1 past a tolerance."""
  del argv   # none: boundary.parse_flags refuses a stray argument
  FLAGS = flags.FLAGS
  if FLAGS.grads is not None and FLAGS.activation != "relu":
    print(f"error: --activation={FLAGS.activation} with --grads: a learner's gradient is "
          "checked for the seed's ReLU network, whose mistakes the catalogue names; drop "
          "--activation, or check our gradient of that network without --grads.",
          file=sys.stderr)
    sys.exit(2)
  if FLAGS.grads is not None:
    sys.exit(grade_command(FLAGS.grads, FLAGS.seed, FLAGS.timeout, FLAGS.memory_limit,
                           FLAGS.json))
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


if __name__ == "__main__":
  define_flags()
  boundary.script(lambda: app.run(main, flags_parser=parse_flags))
