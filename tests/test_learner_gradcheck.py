"""mj.check_grads and `python -m mlp_jax.gradcheck --grads=...`: a learner's own gradient
function, leaf by leaf, with the mistake named (mlp_jax/core/mistakes.py)."""

import csv
import json
import os
import pathlib
import subprocess
import signal
import sys
import time
import types

import numpy as np
import pytest

import mlp_jax as mj
from mlp_jax.core import mistakes
from mlp_jax.gradcheck import check_grads

from conftest import ROOT, float64


def _forward(params, X):
  z1 = X @ params["w1"].T + params["b1"]
  a1 = np.where(z1 < 0, 0.0, z1)
  z2 = a1 @ params["w2"].T + params["b2"]
  p = np.exp(z2 - z2.max(axis=1, keepdims=True))
  return z1, a1, p / p.sum(axis=1, keepdims=True)


def learner(mistake=None):
  """A learner's vectorised NumPy gradient, with `mistake` made the way one makes it."""
  def grads(params, X, y):
    B = X.shape[0]
    z1, a1, p = _forward(params, X)
    Y = np.eye(p.shape[1])[(y + (mistake == "labels_shifted")) % p.shape[1]]
    d2 = (Y - p if mistake == "sign_flipped" else p - Y)
    if mistake == "softmax_jacobian_diagonal":
      d2 = (p - 1) * Y
    if mistake == "softmax_as_sigmoid":
      d2 = d2 * p * (1 - p)
    d2 = {"sum_not_mean": d2, "mean_twice": d2 / B / B}.get(mistake, d2 / B)
    back = d2 @ (params["w1"].T if mistake == "w1_for_w2" else params["w2"])
    sigmoid = 1 / (1 + np.exp(-z1))
    mask = {"relu_mask_missing": 1.0, "relu_tie_convention": z1 > 0,
            "wrong_activation_derivative": sigmoid * (1 - sigmoid)}.get(mistake, z1 >= 0)
    d1 = back * mask
    g = {"w1": d1.T @ X, "b1": d1.sum(axis=0), "w2": d2.T @ a1, "b2": d2.sum(axis=0)}
    if mistake == "pre_activation_for_activation":
      g["w2"] = d2.T @ z1
    if mistake == "l2_term":
      g["w1"], g["w2"] = g["w1"] + 0.01 * params["w1"], g["w2"] + 0.01 * params["w2"]
    if mistake == "scale_factor":
      g = {k: 0.5 * v for k, v in g.items()}
    if mistake == "elementwise_for_outer":
      g["w2"] = (d2 * a1).sum(axis=0)
    if mistake == "transposed":
      g["w1"] = X.T @ d1
    if mistake == "bias_not_summed":
      g["b1"] = d1[-1]
    if mistake == "leaves_swapped":
      g["b1"], g["b2"] = g["b2"], g["b1"]
    return g
  return grads


# The leaves each mistake makes wrong (on the catalogue's problems).
WRONG = {"relu_mask_missing": {"w1", "b1"}, "relu_tie_convention": {"w1", "b1"},
         "w1_for_w2": {"w1", "b1"}, "elementwise_for_outer": {"w2"},
         "sign_flipped": set(mistakes.LEAVES), "softmax_as_sigmoid": set(mistakes.LEAVES),
         "sum_not_mean": set(mistakes.LEAVES), "mean_twice": set(mistakes.LEAVES),
         "transposed": {"w1"}, "bias_not_summed": {"b1"}, "leaves_swapped": {"b1", "b2"},
         "labels_shifted": set(mistakes.LEAVES),
         "softmax_jacobian_diagonal": set(mistakes.LEAVES),
         "wrong_activation_derivative": {"w1", "b1"},
         "pre_activation_for_activation": {"w2"}, "l2_term": {"w1", "w2"},
         "scale_factor": set(mistakes.LEAVES)}


def test_every_mistake_is_tested():
  assert set(WRONG) == set(mistakes.CATALOGUE)


# The mistakes whose shapes fit only a square problem (D = H = K): made as the seed
# makes them, they raise on the other one, and so every leaf is wrong.
SQUARE_ONLY = {"w1_for_w2", "elementwise_for_outer"}


@pytest.mark.parametrize("mistake", sorted(mistakes.CATALOGUE))
def test_each_mistake_is_named_and_no_other(mistake):
  report = check_grads(learner(mistake))
  for leaf, verdict in report.leaves.items():
    if leaf in WRONG[mistake]:
      assert verdict.mistakes == [mistake], (leaf, verdict)
      assert mistake in verdict.message
    else:
      assert not verdict.mistakes, (leaf, verdict)
      assert verdict.ok is (mistake not in SQUARE_ONLY), (leaf, verdict)
    if mistake in SQUARE_ONLY:
      assert "raised ValueError" in verdict.message, verdict.message
      assert "on the B=5 D=4 H=6 K=3 problem" in verdict.message
  tie = mistake == "relu_tie_convention"   # a convention: right, and named
  assert report.correct is tie
  assert all(v.ok is (tie or (leaf not in WRONG[mistake] and mistake not in SQUARE_ONLY))
             for leaf, v in report.leaves.items())


def test_a_fitted_mistake_reports_its_parameter_and_a_tiny_one_is_still_named():
  report = check_grads(learner("l2_term"))
  assert "l2_term (λ = 0.01)" in report.leaves["w1"].message
  assert "scale_factor (c = 0.5)" in check_grads(learner("scale_factor")).leaves["b2"].message
  assert "labels_shifted (y + 1)" in check_grads(learner("labels_shifted")).leaves["w1"].message

  def tiny_decay(p, X, y):
    g = learner()(p, X, y)
    return {**g, "w2": g["w2"] + 1e-9 * p["w2"]}
  report = check_grads(tiny_decay)
  verdict = report.leaves["w2"]
  assert report.correct and verdict.ok and verdict.mistakes == ["l2_term"], verdict
  assert "a term too small for the tolerance: l2_term (λ = 1e-09)" in verdict.message
  assert not report.leaves["w1"].mistakes    # a right leaf is not given a name


def _loop(params, X, y):
  """The per-example loop a learner writes first, summing δ xᵀ one example at a time."""
  g = {k: np.zeros_like(params[k]) for k in ("w1", "b1", "w2", "b2")}
  for x, label in zip(X, y):
    z1 = params["w1"] @ x + params["b1"]
    a1 = np.maximum(z1, 0)
    z2 = params["w2"] @ a1 + params["b2"]
    p = np.exp(z2 - z2.max()) / np.sum(np.exp(z2 - z2.max()))
    d2 = p.copy()
    d2[label] -= 1
    d1 = (params["w2"].T @ d2) * (z1 >= 0)
    g["w2"] += np.outer(d2, a1)
    g["b2"] += d2
    g["w1"] += np.outer(d1, x)
    g["b1"] += d1
  return tuple(g[k] / len(X) for k in ("w1", "b1", "w2", "b2"))


def _jax_grad_of_own_loss(params, X, y):
  """jax.grad of the learner's own loss (jax.nn.relu: ReLU′(0) = 0), float32 by default."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss(p):
    z = jax.nn.relu(X @ p.w1.T + p.b1[None]) @ p.w2.T + p.b2[None]
    return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])
  return jax.grad(loss)(params)


@pytest.mark.parametrize("style", [
    "vectorised", "loop", "float32",
    pytest.param("jax_grad", marks=pytest.mark.slow)])   # eager: over a hundred compilations
def test_right_gradients_in_every_style_are_right(style):
  fn = {"vectorised": learner(), "loop": _loop, "jax_grad": _jax_grad_of_own_loss,
        "float32": lambda p, X, y: {k: v.astype(np.float32)
                                    for k, v in learner()(p, X, y).items()}}[style]
  report = check_grads(fn)
  assert report.correct, str(report)
  for leaf, verdict in report.leaves.items():
    assert verdict.rel_error <= (1e-4 if style in ("jax_grad", "float32") else 1e-8), leaf
  # jax.nn.relu takes ReLU′(0) = 0: the ties tell, and it is named, not counted wrong.
  tie = [leaf for leaf, v in report.leaves.items() if v.mistakes]
  assert tie == (["w1", "b1"] if style == "jax_grad" else []), str(report)


def test_float32_values_are_held_to_float32s_tolerance_only():
  """The tolerance follows the dtype: an error float32 allows passes in float32 and fails
  in float64."""
  def off(dtype):
    def fn(p, X, y):
      return {k: (v * (1 + 3e-6)).astype(dtype) for k, v in learner()(p, X, y).items()}
    return fn
  assert check_grads(off(np.float32)).correct
  report = check_grads(off(np.float64))     # float32's error in float64: a verdict of its own
  assert report.correct and all("right to float32 precision" in v.message
                                for v in report.leaves.values())
  report = check_grads(off(np.float64), tolerance=1e-8)
  assert not report.correct
  assert all("not a mistake gradcheck knows" in v.message for v in report.leaves.values())


def test_a_gradient_computed_in_float32_and_returned_in_float64_is_right_to_float32():
  """Every value a float32 number: computed in float32, judged at float32's tolerance, a
  verdict of its own; --tolerance overrides either way."""
  def in_float32(p, X, y):
    p32 = type(p)(*(a.astype(np.float32) for a in p))
    return {k: v.astype(np.float64) for k, v in learner()(p32, X.astype(np.float32), y).items()}
  report = check_grads(in_float32)
  assert report.correct and all(v.message.startswith("right to float32 precision")
                                for v in report.leaves.values()), str(report)
  assert report.score == 4
  assert not check_grads(in_float32, tolerance=1e-9).correct
  assert check_grads(learner(), tolerance=1e-12).correct
  assert "to float32" not in str(check_grads(learner()))


def test_an_unknown_mistake_is_wrong_and_located_never_forced_onto_an_id():
  def fn(p, X, y):
    g = learner()(p, X, y)
    g["w2"] = g["w2"].copy()
    g["w2"][1, 2] += 0.5
    return g
  verdict = check_grads(fn).leaves["w2"]
  assert not verdict.ok and verdict.mistakes == []
  assert "not a mistake gradcheck knows" in verdict.message
  assert "row 1, column 2" in verdict.message


@pytest.mark.parametrize("fault,expected", [
    ("raises", "raised ZeroDivisionError: division by zero (test_learner_gradcheck.py:"),
    ("nan", "holds NaN or inf"),
    ("string", "is a str, not an array of numbers"),
    ("none", "the function returned NoneType, not Params"),
    ("three", "the function returned tuple of 3, not Params"),
    ("missing", "is missing from the returned dict (keys: w1, b1, w2)"),
])
def test_a_broken_function_gives_one_line_per_leaf(fault, expected):
  def fn(p, X, y):
    g = learner()(p, X, y)
    if fault == "raises":
      return 1 / 0
    return {"nan": {**g, "b2": g["b2"] * np.nan}, "string": {**g, "b2": "oops"},
            "none": None, "three": (g["w1"], g["b1"], g["w2"]),
            "missing": {k: g[k] for k in ("w1", "b1", "w2")}}[fault]
  report = check_grads(fn)
  assert not report.correct
  verdict = report.leaves["b2"]
  assert not verdict.ok and verdict.rel_error is None
  assert expected in verdict.message and "\n" not in verdict.message


def test_the_params_are_mj_params_and_read_by_name():
  seen = []

  def fn(params, X, y):
    seen.append((isinstance(params, mj.Params), params["w1"] is params.w1, X.dtype, y.dtype))
    return learner()(params, X, y)
  assert check_grads(fn).correct
  assert all(s[:2] == (True, True) and s[2] == np.float64 for s in seen)
  assert all(np.issubdtype(s[3], np.integer) for s in seen)


def test_the_seed_as_written_is_diagnosed_as_the_docs_show():
  """docs/seed_as_written.py: each of its errors named; docs/derivation.md shows this
  output exactly (test_docs runs its block)."""
  sys.path.insert(0, os.path.join(ROOT, "docs"))
  try:
    import seed_as_written  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  report = check_grads(seed_as_written.grads)
  assert not report.correct
  assert report.leaves["w2"].mistakes == ["elementwise_for_outer"]
  assert report.leaves["w1"].mistakes == ["relu_mask_missing", "elementwise_for_outer"]
  assert report.leaves["b1"].mistakes == ["relu_mask_missing", "w1_for_w2"]
  assert report.leaves["b2"].mistakes == []


@pytest.mark.slow  # a process of its own
def test_the_command_prints_json_and_exits_by_the_verdict(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text("import numpy as np\n"
                  "def grads(params, X, y):\n"
                  "  print('debugging', X.shape)\n"     # a learner's print: not in the JSON
                  "  return {k: np.zeros_like(params[k]) for k in ('w1', 'b1', 'w2', 'b2')}\n")
  run = lambda *args: subprocess.run([sys.executable, "-m", "mlp_jax.gradcheck", *args],
                                     capture_output=True, text=True, cwd=tmp_path)
  result = run(f"--grads={path}:grads", "--json")
  assert result.returncode == 1, result.stderr
  report = json.loads(result.stdout)
  assert report["correct"] is False
  assert set(report["leaves"]) == {"w1", "b1", "w2", "b2"}
  assert set(report["leaves"]["w1"]) == {"ok", "rel_error", "mistakes", "message", "credit"}
  assert report["version"] == mj.__version__ and report["status"] == 1
  assert report["score"] == 0 and report["max_score"] == 4
  for encoding in ("ascii", "latin-1"):   # ReLU′, δ, Σ in the text: never an error
    ascii_run = subprocess.run([sys.executable, "-m", "mlp_jax.gradcheck",
                                f"--grads={path}:grads"], capture_output=True, cwd=tmp_path,
                               env={**os.environ, "PYTHONIOENCODING": encoding})
    assert ascii_run.returncode == 1 and b"WRONG" in ascii_run.stdout, ascii_run.stderr
  assert [set(p) for p in report["problems"]] == [{"B", "D", "H", "K", "ties"}] * 3
  for spec, line in [("missing.py:grads", "--grads: no file missing.py; give the path"),
                     ("grads", "--grads='grads': must be FILE.py:FUNCTION or"),
                     ("grads --timeout=soon", "flag --timeout=soon: could not convert")]:
    result = run(*f"--grads={spec}".split(), "--json")
    assert result.returncode == 2, (spec, result.stderr)
    (only,) = result.stderr.strip().splitlines()
    assert only.startswith(f"error: {line}"), (spec, only)
    assert json.loads(result.stdout)["status"] == 2     # JSON whatever happens


# A learner's file that tries to pass by reaching into the checker: each way, and the
# wrong gradients it returns (zeros).
CHEATS = {
    "patches_the_checker": "import mlp_jax.core.mistakes as m, mlp_jax.gradcheck as g\n"
                           "m.relative_error = lambda a, b: 0.0\n"
                           "g._verdict = lambda leaf, *_: g.Verdict(True, 0.0, [], 'right')\n",
    "forges_the_json": "import os, sys\n"
                       "FORGED = '{\"correct\": true, \"leaves\": {}}'\n"
                       "print(FORGED, file=sys.__stdout__, flush=True)\n"
                       "os.write(1, FORGED.encode())\n",
    "exits_early": "import os\n"
                   "def grads(params, X, y):\n"
                   "  os._exit(0)\n",
}


@pytest.mark.slow  # processes of their own
@pytest.mark.parametrize("cheat", CHEATS)
def test_a_learners_code_runs_apart_and_cannot_forge_its_verdict(tmp_path, cheat):
  """The learner's code runs in a child process that returns only arrays: patching
  the checker's modules changes the child's copy, its stdout is relayed to stderr, and
  a child that ends early is one line, never a verdict."""
  path = tmp_path / "cheat.py"
  path.write_text("import numpy as np\n" + CHEATS[cheat] + (
      "" if "def grads" in CHEATS[cheat] else
      "def grads(params, X, y):\n"
      "  return {k: np.zeros_like(params[k]) for k in ('w1', 'b1', 'w2', 'b2')}\n"))
  result = subprocess.run([sys.executable, "-m", "mlp_jax.gradcheck", f"--grads={path}:grads",
                           "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
  if cheat == "exits_early":
    assert result.returncode == 3, result.stderr
    assert "ended its process before it returned" in json.loads(result.stdout)["message"]
    return
  assert result.returncode == 1, result.stderr
  report = json.loads(result.stdout)       # the whole stdout is the checker's JSON
  assert report["correct"] is False and not any(
      v["ok"] for v in report["leaves"].values())
  if cheat == "forges_the_json":
    assert '"correct": true' in result.stderr


ZEROS = "  return {k: np.zeros_like(params[k]) for k in ('w1', 'b1', 'w2', 'b2')}\n"
# Whatever a submission does, the report says what happened: (its file, the status, the
# words of its message).
SUBMISSIONS = {
    "right": ("from mlp_jax.core import mistakes\n"
              "def grads(params, X, y):\n"
              "  return mistakes.right_gradients(mistakes.Problem(*params, X, y))\n", 0, ""),
    "wrong": ("def grads(params, X, y):\n" + ZEROS, 1, ""),
    "sys_exit": ("import sys\ndef grads(params, X, y):\n  sys.exit(0)\n", 3,
                 "the function called sys.exit(0)"),
    "keyboard_interrupt": ("def grads(params, X, y):\n  raise KeyboardInterrupt\n", 3,
                           "the function raised KeyboardInterrupt"),
    "exit_at_import": ("import sys\nsys.exit(1)\n", 3, "called sys.exit(1) while it was "
                                                        "loaded"),
    "os_exit": ("import os\ndef grads(params, X, y):\n  os._exit(0)\n", 3,
                "ended its process before it returned"),
    "a_signal": ("import os, signal\ndef grads(params, X, y):\n"
                 "  os.kill(os.getpid(), signal.SIGSEGV)\n", 3, "the signal SIGSEGV"),
    "never_ends": ("def grads(params, X, y):\n  while True:\n    pass\n", 3,
                   "did not finish within 3 s (--timeout)"),
    "prints_megabytes": ("import sys\ndef grads(params, X, y):\n"
                         "  sys.stdout.write('x' * (80 << 20))\n" + ZEROS, 3,
                         "File too large"),   # past 64 MiB printed (RLIMIT_FSIZE)
    "prints_bytes_not_text": ("import sys\ndef grads(params, X, y):\n"
                              "  sys.stdout.buffer.write(bytes(range(256)))\n" + ZEROS, 1, ""),
    "returns_nothing": ("def grads(params, X, y):\n  return None\n", 3,
                        "it returned no gradient on any problem"),
    "raises_everywhere": ("def grads(params, X, y):\n  raise ValueError('no')\n", 3,
                          "returned no gradient on any problem: raised ValueError: no"),
    "no_function": ("x = 1\n", 3, "defines no function 'grads'"),
    "syntax_error": ("def grads(:\n", 3, "cannot be loaded: SyntaxError"),
}


@pytest.mark.slow   # a child process each
@pytest.mark.parametrize("name", SUBMISSIONS)
def test_whatever_a_submission_does_the_report_says_what_happened(name, tmp_path, capsys):
  """Each submission in its own process, the whole of it under --timeout: the report (as
  JSON here) is produced, with the status of the command's table."""
  source, status, words = SUBMISSIONS[name]
  path = tmp_path / f"{name}.py"
  path.write_text("import numpy as np\n" + source)
  from mlp_jax import gradcheck  # pylint: disable=g-import-not-at-top
  code = gradcheck.grade_command(f"{path}:grads", gradcheck.Grading(
      gradcheck.Check(timeout=3.0), as_json=True))
  report = json.loads(capsys.readouterr().out)
  assert code == status == report["status"], report
  assert words in report["message"], report["message"]
  assert (report["score"] == 4) == (status == 0)


RIGHT_HELPER = ("from mlp_jax.core import mistakes\n"
                "def gradients(params, X, y):\n"
                "  return mistakes.right_gradients(mistakes.Problem(*params, X, y))\n")
WRONG_HELPER = ("import numpy as np\n"
                "def gradients(params, X, y):\n"
                "  return {k: np.zeros_like(params[k]) for k in ('w1', 'b1', 'w2', 'b2')}\n")
USES_HELPER = "from helper import gradients\ndef grads(params, X, y):\n  return gradients(params, X, y)\n"


def _class(folder):
  """A class: two subfolders whose grads.py import a helper.py of the same name (one
  right, one wrong), a flat wrong file, a subfolder without the function, and a file
  that exits."""
  for name, helper in (("alice", RIGHT_HELPER), ("bob", WRONG_HELPER)):
    (folder / name).mkdir(parents=True)
    (folder / name / "helper.py").write_text(helper)
    (folder / name / "grads.py").write_text(USES_HELPER)
  (folder / "carol.py").write_text(WRONG_HELPER + "grads = gradients\n")
  (folder / "dave").mkdir()
  (folder / "dave" / "a.py").write_text("x = 1\n")
  (folder / "dave" / "b.py").write_text("y = 2\n")
  (folder / "eve.py").write_text("import sys\ndef grads(params, X, y):\n  sys.exit(0)\n")
  return {"alice": 0, "bob": 1, "carol": 1, "dave": 3, "eve": 3}


@pytest.mark.slow   # a process per submission
def test_a_class_is_graded_each_submission_apart_with_its_csv(tmp_path, capsys):
  from mlp_jax import gradcheck  # pylint: disable=g-import-not-at-top
  expected = _class(tmp_path / "class")
  grades = tmp_path / "grades.csv"
  code = gradcheck.grade_command(f"{tmp_path / 'class'}:grads", gradcheck.Grading(
      gradcheck.Check(timeout=20.0), as_json=True, csv=str(grades)))
  reports = json.loads(capsys.readouterr().out)["submissions"]
  assert {name: r["status"] for name, r in reports.items()} == expected
  assert code == 3                      # some could not be checked
  assert reports["alice"]["score"] == 4 and reports["bob"]["score"] == 0
  assert "none of its 2 .py files defines grads" in reports["dave"]["message"]
  with grades.open(encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == list(expected)
  assert rows[0]["w1_verdict"] == "right" and rows[1]["w1_verdict"] == "wrong"
  assert rows[4]["status_words"] == "not checked" and "sys.exit(0)" in rows[4]["message"]


@pytest.mark.slow   # a process each
def test_one_submission_writes_gradescopes_results_json(tmp_path, capsys):
  from mlp_jax import gradcheck  # pylint: disable=g-import-not-at-top
  _class(tmp_path / "class")
  for name, score in (("alice/grads.py", 4), ("carol.py", 0), ("eve.py", 0)):
    results = tmp_path / "results.json"
    gradcheck.grade_command(f"{tmp_path / 'class' / name}:grads", gradcheck.Grading(
        gradcheck.Check(timeout=20.0), gradescope=str(results)))
    capsys.readouterr()
    written = json.loads(results.read_text())
    assert written["score"] == score == sum(t["score"] for t in written["tests"])
    assert [t["max_score"] for t in written["tests"]] == [1, 1, 1, 1]
    assert {t["status"] for t in written["tests"]} == ({"passed"} if score else {"failed"})
  assert "sys.exit(0)" in written["tests"][0]["output"]     # eve: why, in each test


def _right(w1, b1, w2, b2, X, y):
  """The right gradients in rows: X (B, D), biases (H,)."""
  return mistakes.right_gradients(mistakes.Problem(w1, b1, w2, b2, X, y))


def _columns(W1, b1, W2, b2, X, y):
  """The handout's layout: X (D, B), biases (H, 1) columns, returned the same way."""
  g = _right(W1, b1[:, 0], W2, b2[:, 0], X.T, y)
  return {"W1": g["w1"], "b1": g["b1"][:, None], "W2": g["w2"], "b2": g["b2"][:, None]}


# The layouts students write, each right: (the function, the layout, how it is called).
STYLES = {
    "upper_case_names": (lambda params, X, y: {k.upper(): v for k, v in _right(
        params["W1"], params.B1, params.W2, params["b2"], X, y).items()}, "rows",
        "(params: w1 (6, 4), b1 (6,), w2 (3, 6), b2 (3,); X (5, 4); y (5,))"),
    "an_object_of_attributes": (lambda params, X, y: types.SimpleNamespace(
        **{k.upper(): v for k, v in _right(*params, X, y).items()}), "rows", "params:"),
    "six_arguments": (lambda W1, b1, W2, b2, X, y: _right(W1, b1, W2, b2, X, y), "rows",
                      "(w1 (6, 4), b1 (6,), w2 (3, 6), b2 (3,), X (5, 4), y (5,))"),
    "columns": (_columns, "columns",
                "(w1 (6, 4), b1 (6, 1), w2 (3, 6), b2 (3, 1), X (4, 5), y (5,))"),
}


@pytest.mark.parametrize("style", STYLES)
def test_the_layouts_students_write_are_understood(style):
  fn, layout, called = STYLES[style]
  report = check_grads(fn, layout=layout)
  assert report.correct, str(report)
  assert called in report.called and str(report).startswith("called as "), report.called


def test_the_columns_layout_still_names_a_mistake():
  def transposed_columns(W1, b1, W2, b2, X, y):
    g = _columns(W1, b1, W2, b2, X, y)
    return {**g, "W1": g["W1"].T}
  report = check_grads(transposed_columns, layout="columns")
  assert report.leaves["w1"].mistakes == ["transposed"] and report.leaves["b1"].ok


@pytest.mark.slow   # a child process
def test_the_command_passes_the_layout_to_the_submissions_process(tmp_path, capsys):
  from mlp_jax import gradcheck  # pylint: disable=g-import-not-at-top
  path = tmp_path / "handout.py"
  path.write_text("from mlp_jax.core import mistakes\n"
                  "def grads(W1, b1, W2, b2, X, y):\n"
                  "  g = mistakes.right_gradients(mistakes.Problem(W1, b1[:, 0], W2, "
                  "b2[:, 0], X.T, y))\n"
                  "  return g['w1'], g['b1'][:, None], g['w2'], g['b2'][:, None]\n")
  code = gradcheck.grade_command(f"{path}:grads", gradcheck.Grading(
      gradcheck.Check(layout="columns", timeout=20.0)))
  out = capsys.readouterr().out
  assert code == 0, out
  assert "called as grads(w1 (6, 4), b1 (6, 1), w2 (3, 6), b2 (3, 1), X (4, 5)" in out


@pytest.mark.slow   # a process per submission
def test_the_grading_page_shows_what_the_command_prints_for_its_example(capsys, tmp_path,
                                                                      monkeypatch):
  """docs/grading.md's worked example, run: its table, its CSV and carol's report are
  the page's, line for line."""
  from mlp_jax import gradcheck  # pylint: disable=g-import-not-at-top
  page = (pathlib.Path(ROOT) / "docs" / "grading.md").read_text()
  monkeypatch.chdir(pathlib.Path(ROOT) / "docs")
  grades = tmp_path / "grades.csv"
  code = gradcheck.grade_command("grading_example:grads", gradcheck.Grading(
      csv=str(grades)))
  printed = capsys.readouterr().out.splitlines()
  assert code == 3 and len(printed) == 4
  for line in printed + grades.read_text().splitlines():
    assert f"\n{line}\n" in page, line
  gradcheck.grade_command("grading_example/carol.py:grads", gradcheck.Grading())
  for line in capsys.readouterr().out.splitlines():
    assert f"\n{line}\n" in page, line


def _autodiff(activation, mistake=None):
  """A learner's gradient of the network with `activation`: jax.grad of mj.loss in
  float64, or with δ1 made without f′ (relu_mask_missing) or with sigmoid′(z1) in its
  place (wrong_activation_derivative), by hand from jax.grad's δ2."""
  import jax  # pylint: disable=g-import-not-at-top

  def grads(params, X, y):
    with float64():
      p = mj.Params(*(jax.numpy.asarray(a) for a in params))
      g = {k: np.asarray(v) for k, v in mj.autodiff_grads(p, X, y, activation=activation)
           ._asdict().items()}
    if mistake is None:
      return g
    z1 = X @ params.w1.T + params.b1
    a1 = np.asarray(mistakes.ACTIVATIONS[activation][0](z1))
    z2 = a1 @ params.w2.T + params.b2
    p = np.exp(z2 - z2.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d2 = (p - np.eye(p.shape[1])[y]) / len(X)
    sigmoid = 1 / (1 + np.exp(-z1))
    d1 = (d2 @ params.w2) * (1.0 if mistake == "relu_mask_missing" else sigmoid * (1 - sigmoid))
    return {**g, "w1": d1.T @ X, "b1": d1.sum(0)}
  return grads


@pytest.mark.parametrize("activation", ["tanh", "gelu", "identity", "logistic"])
def test_any_activation_of_the_table_is_checked_and_its_mistakes_follow_it(activation):
  """Right for that network (jax.grad's), and the derivative mistakes are named against
  its f′: none at all (relu_mask_missing, where f′ is not 1), sigmoid′ in tanh's place."""
  assert check_grads(_autodiff(activation), activation=activation).correct
  assert not check_grads(_autodiff(activation)).correct       # checked against ReLU: wrong
  if activation != "identity":     # f′ = 1: leaving it out is no mistake
    report = check_grads(_autodiff(activation, "relu_mask_missing"), activation=activation)
    assert report.leaves["w1"].mistakes == ["relu_mask_missing"], str(report)
  if activation != "logistic":     # sigmoid′ is logistic's own
    report = check_grads(_autodiff(activation, "wrong"), activation=activation)
    assert report.leaves["b1"].mistakes == ["wrong_activation_derivative"], str(report)
    assert report.leaves["w2"].ok


def test_a_right_gradient_whose_softmax_overflows_is_right_with_a_warning():
  def naive(p, X, y):
    z1 = X @ p.w1.T + p.b1
    a1 = np.maximum(z1, 0)
    with np.errstate(over="ignore", invalid="ignore"):
      e = np.exp(a1 @ p.w2.T + p.b2)                 # no max subtracted
      prob = e / e.sum(1, keepdims=True)
    d2 = (prob - np.eye(prob.shape[1])[y]) / len(X)
    d1 = (d2 @ p.w2) * (z1 >= 0)
    return {"w1": d1.T @ X, "b1": d1.sum(0), "w2": d2.T @ a1, "b2": d2.sum(0)}
  report = check_grads(naive)
  assert report.correct and report.status == 0 and report.score == 4
  assert len(report.warnings) == 1 and "log-sum-exp" in report.warnings[0]
  assert "warning: its gradient is wrong once every logit is 1000 larger" in str(report)
  assert check_grads(learner()).warnings == ()


@pytest.mark.slow   # processes of their own
def test_a_killed_check_leaves_no_submission_running(tmp_path):
  """gradcheck stopped by SIGTERM (or killed) while a submission loops: the system ends
  the submission's process too (PR_SET_PDEATHSIG), no orphan keeps the CPU."""
  path = tmp_path / "loops.py"
  path.write_text("import time\ndef grads(params, X, y):\n  while True:\n    time.sleep(0.01)\n")
  parent = subprocess.Popen([sys.executable, "-m", "mlp_jax.gradcheck", f"--grads={path}:grads",
                             "--timeout=120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  def children():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
      try:
        if str(path).encode() in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
          found.append(int(pid))
      except OSError:
        pass
    return found
  deadline = time.monotonic() + 60
  while not [c for c in children() if c != parent.pid] and time.monotonic() < deadline:
    time.sleep(0.05)      # polling for the child to exist: no event to wait on
  assert [c for c in children() if c != parent.pid], "the submission never started"
  parent.send_signal(signal.SIGTERM)
  parent.communicate(timeout=60)
  deadline = time.monotonic() + 30
  while children() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not children()
