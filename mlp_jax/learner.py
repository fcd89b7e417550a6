"""A learner's gradient function, called on gradcheck's problems: its gradients as arrays,
or the one line why there are none. From the command line (`--grads=FILE.py:FUNCTION`)
the learner's code runs in a child process that returns only arrays:

    parent (gradcheck)                      child (python -I -m mlp_jax.learner)
    the problems -> a private .npz    --->  loads FILE.py, calls FUNCTION on each problem
    reads the answers (bounded), and  <---  the answers: arrays, or why not (.npz)
    computes every verdict itself           its stdout and stderr: relayed to stderr

so the learner's code can neither change the checker's modules (patching
mlp_jax.core.mistakes changes only the child's copy) nor write the parent's stdout (the
report, or its JSON).
"""

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Callable, Sequence, Union

import numpy as np

from mlp_jax.core.model import Params

LEAVES = ("w1", "b1", "w2", "b2")
TIMEOUT_SECONDS = 300      # a learner's function that loops forever is stopped
OUTPUT_CHARACTERS = 20000  # of what the learner's code prints, relayed to stderr


class LoadError(Exception):
  """The learner's function cannot be loaded; the message is one line."""


class LearnerParams(Params):
  """mj.Params (w1 (H, D), b1 (H,), w2 (K, H), b2 (K,)) that also reads params["w1"]."""
  __slots__ = ()

  def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
    return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


class Why(str):
  """Why a leaf has no value (it raised, is missing, or is not an array of numbers)."""


Value = Union[np.ndarray, Why]   # a leaf's array, or why there is none
Problem = Sequence[np.ndarray]   # w1, b1, w2, b2, X, y


def load_function(spec: str) -> Callable[..., Any]:
  """The function named by "FILE.py:FUNCTION" or "MODULE:FUNCTION"; LoadError if not."""
  source, _, name = spec.rpartition(":")
  if not source or not name:
    raise LoadError(f"--grads={spec!r}: must be FILE.py:FUNCTION or MODULE:FUNCTION, "
                    "e.g. --grads=my_grads.py:grads.")
  try:
    if source.endswith(".py") or os.sep in source:
      if not os.path.isfile(source):
        raise LoadError(f"--grads: no file {source}; give the path of the .py file that "
                        "defines the function.")
      sys.path.insert(0, os.path.dirname(os.path.abspath(source)))
      module_spec = importlib.util.spec_from_file_location("learner_grads", source)
      assert module_spec is not None and module_spec.loader is not None
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
    else:
      module = importlib.import_module(source)
  except LoadError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the learner's file, reported)
    raise LoadError(f"--grads: {source} cannot be loaded: {exception_line(e)}") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise LoadError(f"--grads: {source} defines no function {name!r}.")
  return fn


def call(fn: Callable[..., Any], problem: Problem) -> dict[str, Value]:
  """{leaf: array or the one line why not} of fn(params, X, y) on a copy of `problem`."""
  w1, b1, w2, b2, X, y = (np.array(a) for a in problem)
  try:
    result = fn(LearnerParams(w1, b1, w2, b2), X, y)  # type: ignore[arg-type]
  except Exception as e:  # pylint: disable=broad-except  (the learner's code, reported)
    return dict.fromkeys(LEAVES, Why(f"raised {exception_line(e)}"))
  if isinstance(result, dict):
    values = [result.get(leaf, Why(f"is missing from the returned dict (keys: "
                             f"{', '.join(map(str, result)) or 'none'})")) for leaf in LEAVES]
  elif isinstance(result, (tuple, list)) and len(result) == 4:
    values = ([getattr(result, leaf) for leaf in LEAVES] if hasattr(result, "w1")
              else list(result))
  else:
    sized = isinstance(result, (tuple, list))
    what = type(result).__name__ + (f" of {len(result)}" if sized else "")
    values = [Why(f"is missing: the function returned {what}, not Params, a dict of w1, "
                  "b1, w2, b2 or a 4-tuple")] * 4
  return {leaf: v if isinstance(v, Why) else as_array(v) for leaf, v in zip(LEAVES, values)}


def exception_line(e: BaseException) -> str:
  """"ValueError: ... (FILE:LINE)", the line of the learner's code that raised."""
  here = os.path.dirname(os.path.abspath(__file__))
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if not f.filename.startswith(here) and "site-packages" not in f.filename]
  where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}{where}"


def as_array(value: Any) -> Value:
  """The leaf as a float array, or why it is not one."""
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except  (anything a learner returns)
    array = np.asarray(None)
  if array.dtype.kind not in "fiu":
    return Why(f"is a {type(value).__name__}, not an array of numbers")
  if not np.all(np.isfinite(array)):
    return Why("holds NaN or inf")
  return array if array.dtype.kind == "f" else array.astype(np.float64)


# ----------------------------------------------------------------------- the child


def _child(spec: str, inputs: str, outputs: str) -> None:
  """Loads the function, calls it on each problem of `inputs`, writes `outputs`: per
  problem i and leaf, "i.leaf" (an array) or "i.leaf.why" (a line); or "load_error"."""
  from mlp_jax.base import budget, files  # pylint: disable=g-import-not-at-top
  answers: dict[str, Any] = {}
  with files.NpzArchive(inputs, budget.memory_budget(), LoadError) as data:
    problems = [[data.read(f"{i}.{name}") for name in (*LEAVES, "X", "y")]
                for i in range(int(data.read("count")))]
  try:
    fn = load_function(spec)
  except LoadError as e:
    answers["load_error"] = np.array(str(e))
  else:
    for i, problem in enumerate(problems):
      for leaf, value in call(fn, problem).items():
        key = f"{i}.{leaf}" + (".why" if isinstance(value, Why) else "")
        answers[key] = np.array(str(value)) if isinstance(value, Why) else value
  np.savez(outputs, **answers)


def run_isolated(spec: str, problems: list[Problem]) -> list[dict[str, Value]]:
  """call(load_function(spec), p) for each of `problems`, in a child process (`python
  -I`: no PYTHON* variables, no user site; its stdout and stderr relayed to this
  process's stderr, never its stdout). LoadError for a function that cannot be loaded,
  or a child that crashes or runs past TIMEOUT_SECONDS; the answers are read bounded
  (files.NpzArchive), each leaf checked again here (as_array)."""
  from mlp_jax.base import budget, files  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="mlp_jax_gradcheck_") as private:
    inputs, outputs = os.path.join(private, "in.npz"), os.path.join(private, "out.npz")
    arrays: dict[str, Any] = {f"{i}.{name}": a for i, p in enumerate(problems)
                              for name, a in zip((*LEAVES, "X", "y"), p)}
    np.savez(inputs, count=len(problems), **arrays)
    command = [sys.executable, "-I", "-c", "import sys, os; sys.path.insert(0, os.getcwd())"
               "; from mlp_jax import learner; learner._child(*sys.argv[1:])", spec, inputs,
               outputs]
    try:
      child = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
      raise LoadError(f"--grads: {spec} did not return within {TIMEOUT_SECONDS} s on "
                      "gradcheck's small problems (a loop that never ends?).") from None
    for stream in (child.stdout, child.stderr):   # what the learner printed
      with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(stream.decode(errors="replace")[-OUTPUT_CHARACTERS:])
    if child.returncode != 0 or not os.path.exists(outputs):
      raise LoadError(f"--grads: running {spec} ended its process (exit status "
                      f"{child.returncode}) before it returned; see its output above.")
    with files.NpzArchive(outputs, budget.memory_budget(), LoadError) as answers:
      names = set(answers.names)
      if "load_error" in names:
        raise LoadError(str(answers.read("load_error")))
      return [{leaf: Why(str(answers.read(f"{i}.{leaf}.why"))) if f"{i}.{leaf}.why" in names
               else as_array(answers.read(f"{i}.{leaf}")) if f"{i}.{leaf}" in names
               else Why("is missing from the child's answers")
               for leaf in LEAVES} for i in range(len(problems))]
