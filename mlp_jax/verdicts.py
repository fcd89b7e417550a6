"""The verdicts on a learner's gradient function: per parameter right, wrong (with the
mistakes of mlp_jax/core/mistakes.py that give it), or why there is no value, and the
Report of a whole submission with its status (mj.check_grads; from the command line,
check_grads_isolated runs the learner's file in a child process: mlp_jax/learner.py).
Nothing here imports JAX.
"""

from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from mlp_jax import learner
from mlp_jax.base import boundary
from mlp_jax.core import mistakes
from mlp_jax.core.mistakes import CATALOGUE, LEAVES, Problem
from mlp_jax.learner import Value, Why

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
  exited, crashed, timed out or returned nothing); `shapes`: the problems' B, D, H, K;
  `called`: how the function was called (its arguments' shapes on the first)."""
  correct: bool
  leaves: dict[str, Verdict]
  problems: list[str]
  status: int = RIGHT
  message: str = ""
  seed: int = 0
  shapes: tuple[dict[str, int], ...] = ()
  called: str = ""   # how the function was called, with the shapes of the first problem
  warnings: tuple[str, ...] = ()   # what is right but fragile: a softmax that overflows

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
            "seed": self.seed, "problems": list(self.shapes), "called": self.called,
            "warnings": list(self.warnings),
            "leaves": {n: v._asdict() for n, v in self.leaves.items()},
            "mistakes": {m: CATALOGUE[m][0] for m in named}}

  def __str__(self) -> str:
    wrong = [n for n, v in self.leaves.items() if not v.ok]
    named = [m for m in CATALOGUE if any(m in v.mistakes for v in self.leaves.values())]
    verdict = (f"NOT CHECKED: {self.message}" if self.status == NOT_CHECKED else
               f"WRONG: {', '.join(wrong)}" if wrong else "OK: every gradient is right")
    return "\n".join(
        ([f"called as {self.called}"] if self.called else [])
        + [f"problems: {'; '.join(self.problems)}"]
        + [f"{n:3} {v.message}" for n, v in self.leaves.items()]
        + [f"  {m}: {CATALOGUE[m][0]} (docs/derivation.md"
           + (f", {CATALOGUE[m][1]})" if CATALOGUE[m][1] else ")") for m in named]
        + [f"warning: {w}" for w in self.warnings] + [verdict])


def check_grads(fn: Callable[..., Any], seed: int = 0, tolerance: Optional[float] = None,
                layout: str = "rows", activation: str = "relu") -> Report:
  """Checks a learner's fn(params, X, y) -> the gradients of the mean cross-entropy (as
  Params, a dict of w1, b1, w2, b2, or a 4-tuple), NumPy or JAX, called with float64
  NumPy arrays (never jitted) on mistakes.problems(seed) of the network whose hidden
  layer is f = `activation` (a key of mistakes.ACTIVATIONS); each leaf's Verdict, within
  `tolerance` (default: by the dtype it computed in, LEARNER_TOLERANCE). `fn` runs
  in this process: the caller's own code (the command line runs a learner's file in a
  child process: check_grads_isolated)."""
  problem_list = mistakes.problems(seed, activation)
  called = learner.describe_call(fn, learner.shapes(problem_list[0].arrays), layout)
  try:
    answers = learner.Answers([learner.call(fn, p.arrays, layout)
                               for p in [*problem_list, _large_logits(problem_list[0])]],
                              "", called)
  except learner.Exited as e:
    answers = learner.Answers([], str(e), called)
  return _report(answers, problem_list, seed, tolerance)


# The logits of the overflow probe: every one of the first problem's plus this (the
# softmax, and so the gradient, unchanged; exp(1000) overflows float64).
LARGE_LOGIT = 1000.0


def _large_logits(problem: Problem) -> Problem:
  """The first problem with every logit LARGE_LOGIT larger (b2 + LARGE_LOGIT): the same
  gradient, where a softmax that does not subtract its row's max overflows."""
  return problem._replace(b2=problem.b2 + LARGE_LOGIT)


class Check(NamedTuple):
  """How a submission is checked: the problems' seed, the tolerance (None: by the dtype
  each gradient was computed in), the layout it takes (learner.LAYOUTS), the hidden
  layer's activation, and its process's limits: seconds and bytes of address space."""

  seed: int = 0
  tolerance: Optional[float] = None
  layout: str = "rows"
  activation: str = "relu"
  timeout: float = learner.TIMEOUT_SECONDS
  memory: int = learner.MEMORY_BYTES


def check_grads_isolated(spec: str, how: Check = Check()) -> Report:
  """check_grads of the function "FILE.py:FUNCTION" or "MODULE:FUNCTION", run in a child
  process that returns only arrays, within how.timeout seconds and how.memory bytes
  (mlp_jax/learner.py); the verdicts are computed here. UsageError, one line, where
  the command is at fault (no such file, a malformed spec); a submission that cannot
  be checked is a Report of status NOT_CHECKED."""
  problem_list = mistakes.problems(how.seed, how.activation)
  try:
    probes = [*problem_list, _large_logits(problem_list[0])]
    answers = learner.run_isolated(spec, [p.arrays for p in probes], how.timeout,
                                   how.memory, how.layout)
  except learner.LoadError as e:
    raise boundary.UsageError(str(e)) from None
  return _report(answers, problem_list, how.seed, how.tolerance)


def _report(answers: learner.Answers, problem_list: list[Problem], seed: int,
            tolerance: Optional[float] = None) -> Report:
  """The Report of a submission's answers: NOT_CHECKED where it stopped before
  answering, or answered nothing on any problem."""
  shapes = tuple({**learner.shapes(p.arrays), "ties": p.ties} for p in problem_list)
  described = [p.describe() for p in problem_list]
  probe = answers.values[len(problem_list):]   # the large-logit one, where it ran
  answers = answers._replace(values=answers.values[:len(problem_list)])
  if answers.failure:
    return Report(False, {}, described, NOT_CHECKED, answers.failure, seed, shapes,
                  answers.called)
  leaves = {leaf: _verdict(leaf, [o[leaf] for o in answers.values], problem_list,
                           tolerance) for leaf in LEAVES}
  if not any(isinstance(v, np.ndarray) for values in answers.values
             for v in values.values()):
    why = next(str(v) for values in answers.values for v in values.values())
    return Report(False, leaves, described, NOT_CHECKED,
                  f"it returned no gradient on any problem: {why}", seed, shapes,
                  answers.called)
  correct = all(v.ok for v in leaves.values())
  warnings = _overflow_warnings(probe, answers.values[0]) if correct else ()
  return Report(correct, leaves, described, RIGHT if correct else WRONG, "", seed, shapes,
                answers.called, warnings)


def _overflow_warnings(probe: list[dict[str, Value]], first: dict[str, Value]
                       ) -> tuple[str, ...]:
  """A warning where the gradient on the large-logit probe is not the first problem's
  (the same problem, its logits all LARGE_LOGIT larger): a softmax that overflows."""
  same = lambda a, b: (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                       and a.size == b.size
                       and mistakes.relative_error(a.reshape(-1), b.reshape(-1)) <= 1e-6)
  if not probe or all(same(v, first[leaf]) for leaf, v in probe[0].items()):
    return ()
  return (f"its gradient is wrong once every logit is {LARGE_LOGIT:g} larger (the softmax "
          "overflows: subtract each row's max before exp, the log-sum-exp trick)",)


def _verdict(leaf: str, values: list[Value], problem_list: list[Problem],
             tolerance: Optional[float] = None) -> Verdict:
  """The Verdict of one leaf from its value on each problem, within `tolerance` (None:
  by its dtype; float64 values within float32's tolerance, that no catalogued mistake
  gives exactly, are "right to float32 precision": computed in float32)."""
  rights = [mistakes.right_gradients(p)[leaf] for p in problem_list]
  arrays = [v if isinstance(v, np.ndarray) else None for v in values]
  failed = next((f"{v} on the {p.describe()} problem" for v, p in zip(values, problem_list)
                 if isinstance(v, Why)), "")
  if all(a is None for a in arrays):
    return Verdict(False, None, [], failed.rpartition(" on the ")[0])
  dtype = next(a.dtype.name for a in arrays if a is not None)
  tol = tolerance or LEARNER_TOLERANCE.get(dtype, LEARNER_TOLERANCE["float64"])
  ran = [(a, r, p) for a, r, p in zip(arrays, rights, problem_list) if a is not None]
  bad = next((f"wrong shape {a.shape}, should be {r.shape}" for a, r, _ in ran
              if a.shape != r.shape), "")
  rel = None if bad else max(mistakes.relative_error(a, r) for a, r, _ in ran)
  if rel is not None and rel <= tol and not failed:
    tiny = _tiny_term(arrays, problem_list, leaf, rel) if rel > TINY_TERM else {}
    return Verdict(True, rel, list(tiny), f"right (rel_error {rel:.1e} <= {tol:g})" + "".join(
        f", but it holds a term too small for the tolerance: {m} ({_parameter(m, v)})"
        for m, v in tiny.items()), True)
  found = mistakes.matching(arrays, problem_list, leaf, mistakes.Close(tol))
  single = LEARNER_TOLERANCE["float32"]
  if (tolerance is None and dtype == "float64" and rel is not None and rel <= single
      and not failed and not found):   # float32's error, and no mistake gives it exactly
    return Verdict(True, rel, [], f"right to float32 precision (rel_error {rel:.1e} <= "
                   f"{single:g}): float64 values with the error of a gradient computed "
                   "in float32", True)
  ids = sorted({m for s in found for m in s}, key=list(CATALOGUE).index)
  if found == [frozenset(["relu_tie_convention"])] and not failed:
    return _tie_verdict(leaf, ran, tol)
  status = bad or (f"wrong (rel_error {rel:.1e} > {tol:g})" if rel and rel > tol else
                   f"right where it ran (rel_error {rel:.1e} <= {tol:g})")
  if found:
    fitted: dict[str, float] = mistakes.fit_parameters(arrays, problem_list, leaf,
                                                       mistakes.Close(tol))
    shift = mistakes.label_shift(arrays, problem_list, leaf, mistakes.Close(tol))
    if shift is not None:
      fitted["labels_shifted"] = shift
    status += ": the gradient with " + ", or with ".join(
        " + ".join(f"{m} ({_parameter(m, fitted[m])})" if m in fitted else m
                   for m in sorted(s, key=list(CATALOGUE).index)) for s in found)
  elif not failed and not bad:
    status += ": not a mistake gradcheck knows; " + _largest_difference(ran)
  credit = rel is not None and rel <= tol   # right wherever it returned
  return Verdict(False, rel, ids, status + (f"; {failed}" if failed else ""), credit)


# A right leaf whose relative error passes this (far above float64's round-off in a
# right computation) is looked at for a fitted mistake that explains it exactly.
TINY_TERM = 1e-12


def _tiny_term(arrays: list[Optional[np.ndarray]], problem_list: list[Problem], leaf: str,
               rel: float) -> dict[str, float]:
  """{id: parameter} of a FITTED mistake that gives the values to within a thousandth of
  their (small) difference from right: a weight decay of λ = 1e-9, say."""
  return mistakes.fit_parameters(arrays, problem_list, leaf, mistakes.Close(rel * 1e-3))


def _parameter(mistake: str, value: float) -> str:
  """"λ = 0.01", "c = 0.5" or "y + 1": a mistake's parameter."""
  if mistake == "labels_shifted":
    return f"y {'+' if value > 0 else '−'} 1"
  return f"{'λ' if mistake == 'l2_term' else 'c'} = {value:.4g}"


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
