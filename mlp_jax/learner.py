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
import inspect
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Callable, NamedTuple, Sequence, Union

import numpy as np

from mlp_jax.core.params import Params

LEAVES = ("w1", "b1", "w2", "b2")
TIMEOUT_SECONDS = 30.0     # for a whole submission (--timeout): a loop is stopped
MEMORY_BYTES = 4 << 30     # its address space (--memory_limit; JAX needs 2 GiB to start)
OUTPUT_BYTES = 64 << 20    # it may print; past them the system stops it (SIGXFSZ)
OUTPUT_CHARACTERS = 20000  # of what the learner's code prints, relayed to stderr


class LoadError(Exception):
  """The learner's function cannot be loaded; the message is one line. `usage`: the
  fault is the command's (no such file, a malformed FILE:FUNCTION), not the
  submission's."""

  def __init__(self, message: str, usage: bool = False):
    super().__init__(message)
    self.usage = usage


class Exited(BaseException):
  """The learner's code called sys.exit, raised SystemExit or KeyboardInterrupt: the
  submission ends there, unchecked."""


class Answers(NamedTuple):
  """What a submission gave: per problem, {leaf: array or why not}; `failure`: what
  stopped it before it answered them all ("" where it did)."""

  values: list[dict[str, "Value"]]
  failure: str = ""
  called: str = ""   # describe_call's: how the function was called, with the shapes


class LearnerParams(Params):
  """mj.Params (w1 (H, D), b1 (H,), w2 (K, H), b2 (K,)) that also reads params["w1"],
  and its names in any case (params["W1"], params.W1)."""
  __slots__ = ()

  def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
    if isinstance(key, str):
      return getattr(self, key.lower())
    return tuple.__getitem__(self, key)

  def __getattr__(self, name: str) -> Any:   # only for a name not found: W1, B2
    if name.lower() in LEAVES:
      return getattr(self, name.lower())
    raise AttributeError(name)


# How a learner's function takes its arrays: "rows" (X (B, D), biases (H,), the mlp_jax
# convention) or "columns" (the handout's: X (D, B), biases (H, 1) columns).
LAYOUTS = ("rows", "columns")


def describe_call(fn: Callable[..., Any], shapes: dict[str, int], layout: str) -> str:
  """How `fn` is called, with the shapes passed: "grads(params: w1 (6, 4), b1 (6,), w2
  (3, 6), b2 (3,); X (5, 4); y (5,))"."""
  B, D, H, K = (shapes[k] for k in "BDHK")
  bias = "(H, 1)" if layout == "columns" else "(H,)"
  arrays = [f"w1 ({H}, {D})", f"b1 {bias.replace('H', str(H))}", f"w2 ({K}, {H})",
            f"b2 {bias.replace('H', str(K))}",
            f"X ({D}, {B})" if layout == "columns" else f"X ({B}, {D})", f"y ({B},)"]
  name = getattr(fn, "__name__", "function")
  if _takes_six(fn):
    return f"{name}({', '.join(arrays)})"
  return f"{name}(params: {', '.join(arrays[:4])}; {arrays[4]}; {arrays[5]})"


def _takes_six(fn: Callable[..., Any]) -> bool:
  """Whether fn takes the arrays one by one: fn(W1, b1, W2, b2, X, y)."""
  try:
    parameters = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
  return len(positional) == 6


class Why(str):
  """Why a leaf has no value (it raised, is missing, or is not an array of numbers)."""


Value = Union[np.ndarray, Why]   # a leaf's array, or why there is none
Problem = Sequence[np.ndarray]   # w1, b1, w2, b2, X, y


def load_function(spec: str) -> Callable[..., Any]:
  """The function named by "FILE.py:FUNCTION" or "MODULE:FUNCTION"; LoadError if not."""
  source, _, name = spec.rpartition(":")
  if not source or not name:
    raise LoadError(f"--grads={spec!r}: must be FILE.py:FUNCTION or MODULE:FUNCTION, "
                    "e.g. --grads=my_grads.py:grads.", usage=True)
  try:
    if source.endswith(".py") or os.sep in source:
      if not os.path.isfile(source):
        raise LoadError(f"--grads: no file {source}; give the path of the .py file that "
                        "defines the function.", usage=True)
      sys.path.insert(0, os.path.dirname(os.path.abspath(source)))
      module_spec = importlib.util.spec_from_file_location("learner_grads", source)
      assert module_spec is not None and module_spec.loader is not None
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
    else:
      module = importlib.import_module(source)
  except LoadError:
    raise
  except (SystemExit, KeyboardInterrupt) as e:
    raise LoadError(f"--grads: {source} {_exit_words(e)} while it was loaded") from None
  except Exception as e:  # pylint: disable=broad-except  (the learner's file, reported)
    raise LoadError(f"--grads: {source} cannot be loaded: {exception_line(e)}") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise LoadError(f"--grads: {source} defines no function {name!r}.")
  return fn


def call(fn: Callable[..., Any], problem: Problem, layout: str = "rows"
         ) -> dict[str, Value]:
  """{leaf: array or the one line why not} of fn on a copy of `problem`: fn(params, X,
  y), or fn(W1, b1, W2, b2, X, y) where its signature takes six arrays; in `layout`
  (LAYOUTS; "columns": X (D, B), biases (H, 1), and a bias returned as (H, 1) read as
  (H,))."""
  w1, b1, w2, b2, X, y = (np.array(a) for a in problem)
  if layout == "columns":
    X, b1, b2 = X.T.copy(), b1[:, None], b2[:, None]
  try:
    if _takes_six(fn):
      result = fn(w1, b1, w2, b2, X, y)
    else:
      result = fn(LearnerParams(w1, b1, w2, b2), X, y)  # type: ignore[arg-type]
  except (SystemExit, KeyboardInterrupt) as e:
    raise Exited(f"the function {_exit_words(e)}") from None
  except Exception as e:  # pylint: disable=broad-except  (the learner's code, reported)
    return dict.fromkeys(LEAVES, Why(f"raised {exception_line(e)}"))
  values = _leaves_of(result)
  if layout == "columns":   # a bias as the column it was given: (H, 1) -> (H,)
    values = [v[:, 0] if leaf[0] == "b" and np.ndim(v) == 2 and np.shape(v)[1] == 1
              and not isinstance(v, Why) else v for leaf, v in zip(LEAVES, values)]
  return {leaf: v if isinstance(v, Why) else as_array(v) for leaf, v in zip(LEAVES, values)}


def _leaves_of(result: Any) -> list[Any]:
  """The four leaves a function returned (Params, a dict or an object of w1 .. b2 in
  any case, or a 4-tuple), or why each is missing."""
  if isinstance(result, dict):
    by_name = {str(k).lower(): v for k, v in result.items()}
    return [by_name.get(leaf, Why(f"is missing from the returned dict (keys: "
                                  f"{', '.join(map(str, result)) or 'none'})"))
            for leaf in LEAVES]
  named = [getattr(result, leaf, getattr(result, leaf.upper(), None)) for leaf in LEAVES]
  if all(v is not None for v in named):   # Params, a namedtuple, any object of them
    return named
  if isinstance(result, (tuple, list)) and len(result) == 4:
    return list(result)
  sized = isinstance(result, (tuple, list))
  what = type(result).__name__ + (f" of {len(result)}" if sized else "")
  return [Why(f"is missing: the function returned {what}, not Params, a dict of w1, b1, "
              "w2, b2 or a 4-tuple")] * 4


def _exit_words(e: BaseException) -> str:
  """"called sys.exit(0)" or "raised KeyboardInterrupt"."""
  if isinstance(e, SystemExit):
    return f"called sys.exit({e.code!r})"
  return f"raised {type(e).__name__}"


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


def shapes(problem: Problem) -> dict[str, int]:
  """B, D, H, K of a problem's arrays (w1, b1, w2, b2, X, y)."""
  w1, _, w2, _, X, _ = problem
  return {"B": X.shape[0], "D": X.shape[1], "H": w1.shape[0], "K": w2.shape[0]}


def _child(spec: str, inputs: str, outputs: str, layout: str) -> None:
  """Loads the function, calls it on each problem of `inputs`, writes `outputs`: per
  problem i and leaf, "i.leaf" (an array) or "i.leaf.why" (a line); or "load_error"
  (and "usage" where the command is at fault), or "failure" where it exited."""
  from mlp_jax.base import budget, files  # pylint: disable=g-import-not-at-top
  answers: dict[str, Any] = {}
  with files.NpzArchive(inputs, budget.memory_budget(), LoadError) as data:
    problems = [[data.read(f"{i}.{name}") for name in (*LEAVES, "X", "y")]
                for i in range(int(data.read("count")))]
  try:
    fn = load_function(spec)
    answers["called"] = np.array(describe_call(fn, shapes(problems[0]), layout))
    for i, problem in enumerate(problems):
      for leaf, value in call(fn, problem, layout).items():
        key = f"{i}.{leaf}" + (".why" if isinstance(value, Why) else "")
        answers[key] = np.array(str(value)) if isinstance(value, Why) else value
  except LoadError as e:
    answers = {"load_error": np.array(str(e)), "usage": np.array(e.usage)}
  except Exited as e:
    answers["failure"] = np.array(str(e))
  np.savez(outputs, **answers)


_CHILD = """
import ctypes, os, resource, signal, sys
try:   # Linux: the system kills this process when gradcheck ends, however it ends
  ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
except (AttributeError, OSError):
  pass
if os.getppid() != int(sys.argv[7]):
  sys.exit(1)   # gradcheck ended before the line above: nothing to answer
memory, output = int(sys.argv[4]), int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
sys.path.insert(0, os.getcwd())
from mlp_jax import learner
learner._child(*sys.argv[1:4], sys.argv[6])
"""


def run_isolated(spec: str, problems: list[Problem], timeout: float = TIMEOUT_SECONDS,
                 memory: int = MEMORY_BYTES, layout: str = "rows") -> Answers:
  """call(load_function(spec), p) for each of `problems`, in a child process (`python
  -I`: no PYTHON* variables, no user site, no module shared with this process or
  another submission; the submission's folder first on sys.path), within `timeout`
  seconds in all, `memory` bytes of address space and OUTPUT_BYTES printed; its stdout
  and stderr relayed to this process's stderr (the last OUTPUT_CHARACTERS of each),
  never its stdout. LoadError(usage=True) for the command's fault; whatever else stops
  the submission is Answers.failure: it exited, crashed, was killed by a signal, ran
  out of time, or could not be loaded. The answers are read bounded (NpzArchive), each
  leaf checked again here (as_array)."""
  from mlp_jax.base import budget, files  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="mlp_jax_gradcheck_") as private:
    inputs, outputs = os.path.join(private, "in.npz"), os.path.join(private, "out.npz")
    arrays: dict[str, Any] = {f"{i}.{name}": a for i, p in enumerate(problems)
                              for name, a in zip((*LEAVES, "X", "y"), p)}
    np.savez(inputs, count=len(problems), **arrays)
    printed = [os.path.join(private, name) for name in ("stdout", "stderr")]
    failure = _run_child([sys.executable, "-I", "-c", _CHILD, spec, inputs, outputs,
                          str(int(memory)), str(OUTPUT_BYTES), layout, str(os.getpid())],
                         printed, timeout)
    for path in printed:   # what the learner printed
      with contextlib.suppress(OSError, ValueError), files.open_regular(path) as f:
        f.seek(max(os.fstat(f.fileno()).st_size - OUTPUT_CHARACTERS, 0))
        sys.stderr.write(f.read().decode(errors="replace"))
    if failure or not os.path.exists(outputs):
      return Answers([], failure or "it ended its process before it returned (os._exit, "
                     "or a crash)")
    with files.NpzArchive(outputs, budget.memory_budget(), LoadError) as answers:
      names = set(answers.names)
      if "load_error" in names:
        error = LoadError(str(answers.read("load_error")), bool(answers.read("usage")))
        if error.usage:
          raise error
        return Answers([], str(error))
      values = [{leaf: Why(str(answers.read(f"{i}.{leaf}.why"))) if f"{i}.{leaf}.why" in names
                 else as_array(answers.read(f"{i}.{leaf}")) if f"{i}.{leaf}" in names
                 else Why("was not answered") for leaf in LEAVES}
                for i in range(len(problems))]
      return Answers(values, str(answers.read("failure")) if "failure" in names else "",
                     str(answers.read("called")) if "called" in names else "")


def _run_child(command: list[str], printed: list[str], timeout: float) -> str:
  """Runs the child, its stdout and stderr into the files `printed`; what stopped it
  ("" where it ended by itself with status 0)."""
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top
  out, err = (files.open_for_update(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL) for p in printed)
  try:
    child = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                           timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return (f"it did not finish within {timeout:g} s (--timeout): a loop that never "
            "ends, or far too slow")
  finally:
    os.close(out)
    os.close(err)
  if child.returncode < 0:
    signum = -child.returncode
    name = signal.Signals(signum).name if signum in signal.valid_signals() else signum
    why = (f": it printed more than {OUTPUT_BYTES >> 20} MiB" if signum == signal.SIGXFSZ
           else "")
    return f"its process was ended by the signal {name}{why}"
  if child.returncode != 0:
    return (f"its process ended with exit status {child.returncode} before it returned "
            "(a crash, or out of memory under --memory_limit)")
  return ""
