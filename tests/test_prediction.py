"""One predict (mlp_jax/core/prediction.py): every path that classifies new inputs gives the
same classes and refuses, the same way, a row that is not finite in the params' dtype
once cast (experiments/predict.py's run: test_trained.test_predict_script_end_to_end)."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
import mlp_jax as mj
from mlp_jax.core import prediction
from mlp_jax.run import experiment

# Not finite in float32 once cast: NaN and inf, and float64 values beyond float32's range.
BAD_VALUES = [np.nan, np.inf, -np.inf, 1e300, -1e300, 3.5e38]
REFUSAL = ("input row 2 is not a finite float32 number once scaled (NaN, inf, or beyond "
           "±3.4e+38, such as 1e300); give finite inputs within float32's range.")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """A finished runner workdir's model and an MLPClassifier, both on the same 4 features."""
  rng = np.random.default_rng(0)
  y = np.arange(40) % 3
  X = rng.normal(size=(3, 4))[y] * 3 + rng.normal(size=(40, 4))
  path = tmp_path_factory.mktemp("prediction") / "data.npz"
  np.savez(path, x_train=X.astype(np.float32), y_train=y, x_test=X[:8].astype(np.float32),
           y_test=y[:8])
  workdir = path.parent / "run"
  experiment.run(tiny_config(f"npz:{path}", workdir, epochs=1), log=lambda *_: None)
  clf = mj.MLPClassifier(hidden_dim=8, batch_size=8, epochs=2).fit(X, y)
  return mj.load(str(workdir)), clf, X


def _paths(model, clf):
  return {"load.predict": model.predict, "load.predict_proba": model.predict_proba,
          "MLPClassifier.predict": clf.predict,
          "MLPClassifier.predict_proba": clf.predict_proba}


@pytest.mark.parametrize("value", BAD_VALUES)
def test_every_path_refuses_a_row_not_finite_after_the_cast(fitted, value):
  model, clf, X = fitted
  x = X[:4].astype(np.float64)
  x[2, 1] = value
  for name, predict in _paths(model, clf).items():
    if name.startswith("MLPClassifier") and not np.isfinite(value):
      continue   # scikit-learn's own validate_data refuses NaN and inf first
    with pytest.raises(ValueError) as error:
      predict(x)
    assert str(error.value) == REFUSAL, name   # the same line, whatever the path


def test_the_refusal_names_the_row_and_counts_the_others():
  x = np.ones((5, 3), np.float64)
  x[3, 0] = x[4, 2] = 1e300
  with pytest.raises(ValueError, match=r"^input row a \(and 1 more row\(s\)\) is not a "
                                       r"finite float32 number once scaled \(NaN, inf, or "
                                       r"beyond ±3.4e\+38, such as 1e300\); give finite "
                                       r"inputs within float32's range\.$"):
    prediction.network_inputs(x, np.zeros(3), np.ones(3), names=list("xyzab"))
  # The check is after the cast AND the scaling: finite raw values a tiny σ overflows.
  with pytest.raises(ValueError, match="input row 0 is not a finite"):
    prediction.network_inputs(np.full((1, 3), 1e30), np.zeros(3), np.full(3, 1e-30))
  ok = prediction.network_inputs(np.full((2, 3), 1e30), np.zeros(3), np.ones(3))
  assert ok.dtype == np.float32 and bool(np.all(np.isfinite(ok)))


def test_every_path_refuses_finite_inputs_whose_logits_overflow(fitted):
  """Finite inputs, a network whose W2 overflows z2 to inf: no path returns a class
  (a -1 would index the last class), each names the row; predict.py's call by name."""
  model, clf, X = fitted
  big = lambda params: params._replace(w2=params.w2 * 1e30)
  model = model._replace(params=big(model.params))
  clf.params_, kept = big(clf.params_), clf.params_
  try:
    x = X[:4] * np.array([[1.0], [1.0], [1e10], [1.0]])   # z2 ~ 1e30 a1: only row 2 overflows
    for name, predict in _paths(model, clf).items():
      with pytest.raises(ValueError, match=r"^input row 2: the network's logits z2 are not "
                                           r"finite .* it has no class"):
        predict(x)
    with pytest.raises(ValueError, match=r"^input row c: the network's logits"):
      prediction.probabilities(model.params, model.inputs(x), model.activation,
                               names=list("abcd"))
  finally:
    clf.params_ = kept


@pytest.mark.parametrize("value", BAD_VALUES)
def test_under_jit_the_row_is_flagged_never_a_plausible_class(fitted, value):
  """Values cannot be read under jit: that row's probabilities are NaN, its class -1;
  the other rows are as they are alone."""
  model, _, X = fitted
  x = X[:4].astype(np.float64)
  x[2, 1] = value
  with np.errstate(over="ignore"):   # what jit's own conversion to float32 gives
    x = x.astype(np.float32)
  p = np.asarray(jax.jit(model.predict_proba)(x))
  classes = np.asarray(jax.jit(model.predict)(x))
  assert np.all(np.isnan(p[2])) and classes[2] == -1
  good = np.asarray(model.predict(X[[0, 1, 3]]))
  np.testing.assert_array_equal(classes[[0, 1, 3]], good)
  assert np.all(np.isfinite(p[[0, 1, 3]]))


def test_every_path_gives_the_same_classes_and_probabilities(fitted):
  """Where the inputs are fine: classes = argmax p, and the jitted path equals the eager
  one; the estimator's probabilities sum to 1 in float64."""
  model, clf, X = fitted
  p = np.asarray(model.predict_proba(X))
  np.testing.assert_array_equal(np.asarray(model.predict(X)), p.argmax(axis=1))
  np.testing.assert_array_equal(np.asarray(jax.jit(model.predict)(X)), p.argmax(axis=1))
  q = clf.predict_proba(X)
  assert q.dtype == np.float64 and np.allclose(q.sum(axis=1), 1, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(clf.predict(X), clf.classes_[q.argmax(axis=1)])


def test_the_inputs_are_computed_in_the_params_dtype(fitted, x64):
  """float64 inputs (x64 on) are cast to the float32 params' dtype before anything is
  computed, eager and under jit, and scaled by the run's μ and σ: (x − μ) / σ."""
  model, _, X = fitted
  x = np.asarray(X[:3], np.float64)
  for inputs in (model.inputs(x), jax.jit(model.inputs)(x)):
    assert inputs.dtype == np.float32
    np.testing.assert_allclose(inputs, (x.astype(np.float32) - model.mean) / model.std,
                               rtol=1e-6)
  assert jax.jit(model.predict_proba)(x).dtype == np.float32


def test_classes_flags_nan_rows_only():
  p = np.array([[0.2, 0.8], [np.nan, np.nan], [0.6, 0.4]], np.float32)
  np.testing.assert_array_equal(prediction.classes(p), [1, -1, 0])
