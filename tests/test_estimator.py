"""mlp_jax.MLPClassifier and MLPClassifierCV: scikit-learn's estimator contract, and the
runner's training behind them (the same scaling, epochs, folds, choice and ε)."""

import json
import pickle

import numpy as np
import pytest
import sklearn.base
from sklearn.model_selection import GridSearchCV
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import mlp_jax as mj
from mlp_jax.base import options
from mlp_jax.data import datasets
from mlp_jax.run import experiment
from conftest import tiny_config

SMALL = {"hidden_dim": 8, "batch_size": 8, "epochs": 3}  # fast fits; one compiled shape
TRAINED = {**SMALL, "epochs": 20, "learning_rate": 1e-2}  # enough to learn blobs


def blobs(n=48, d=5, k=3, seed=0, scales=None):
  """(X (n, d), y (n,)): k separable classes; column j multiplied by scales[j]."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % k
  X = rng.normal(size=(k, d))[y] * 3 + rng.normal(size=(n, d))
  return X * (np.ones(d) if scales is None else np.asarray(scales)), y


# -- the scaling rule ----------------------------------------------------------------


@pytest.mark.parametrize("scales, expected", [
    ((1, 1, 1, 1, 1), "global"),
    ((1e6, 1, 1, 1, 1), "per_feature"),        # one wide column among narrow ones
    ((1e6, 1e6, 1e6, 1e6, 1), "per_feature"),  # one narrow column among wide ones
    ((1e-6, 1, 1, 1, 1), "per_feature"),
])
def test_auto_scaling_standardises_each_column_of_a_table_whose_columns_differ(
    scales, expected):
  X, y = blobs(scales=scales)
  ds = datasets.prepare((X, y, X[:3], y[:3]))  # scaling auto by default
  assert ds.scaling == expected and ds.scaling_reason
  if expected == "per_feature":  # every column of train now has mean 0 and std 1
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1, rtol=1e-4)


def test_auto_scaling_keeps_one_mean_and_std_for_images():
  x_train, y_train, x_test, y_test = datasets.load_digits()
  ds = datasets.prepare((x_train, y_train, x_test, y_test))
  assert ds.scaling == "global" and np.ptp(ds.std) == 0
  images = np.random.default_rng(0).integers(0, 256, size=(50, 28, 28))
  images[:, 0, :] = 0          # a constant border does not count
  images[1:, 1, 0] = 0         # nor does a dim pixel: its range is 1/3 of the others'
  images[0, 1, 0] = 85
  assert datasets.choose_scaling(images.reshape(50, -1).astype(np.float32))[0] == "global"


def test_the_scaling_threshold_is_the_documented_ratio():
  X = np.array([[0.0, 0.0], [1.0, datasets.SHARED_RANGE_RATIO]])
  assert datasets.range_ratio(X) == datasets.SHARED_RANGE_RATIO
  assert datasets.choose_scaling(X)[0] == "global"
  X[1, 1] = datasets.SHARED_RANGE_RATIO * 1.001
  assert datasets.choose_scaling(X)[0] == "per_feature"


def test_the_runner_prints_and_records_its_scaling_choice(tmp_path):
  X, y = blobs(n=40, scales=(1e6, 1, 1, 1, 1))
  path = tmp_path / "table.npz"
  np.savez(path, x_train=X, y_train=y, x_test=X[:6], y_test=y[:6])
  lines = []
  experiment.run(tiny_config(f"npz:{path}", tmp_path / "run", epochs=2), log=lines.append)
  assert any(line.startswith("input scaling: per_feature, by auto: the features' ranges "
                             "differ 1.07e+06-fold, over 100") for line in lines), lines
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["config"]["input_scaling"] == "per_feature"
  assert str(np.load(tmp_path / "run" / "params.npz")["input_scaling"]) == "per_feature"
  # Overridable: --input_scaling=global is used as given, with nothing to print.
  lines.clear()
  experiment.run(tiny_config(f"npz:{path}", tmp_path / "global", epochs=2,
                             input_scaling="global"), log=lines.append)
  assert not any(line.startswith("input scaling") for line in lines)
  assert str(np.load(tmp_path / "global" / "params.npz")["input_scaling"]) == "global"


def test_default_epochs_give_small_data_its_minimum_steps():
  assert options.auto_epochs(120, 16) == -(-options.MIN_STEPS // 8)   # iris: 8 steps
  assert options.auto_epochs(60_000, 16) == options.DEFAULT_EPOCHS    # large: 20
  steps = options.auto_epochs(455, 16) * -(-455 // 16)
  assert options.MIN_STEPS <= steps < options.MIN_STEPS + 29


def test_validation_split_is_stratified():
  y = np.repeat(np.arange(3), [40, 50, 30])
  X = np.arange(len(y), dtype=np.float64)[:, None] * np.ones((1, 2))
  ds = datasets.prepare((X, y, X[:3], y[:3]), validation_fraction=0.1, seed=0)
  np.testing.assert_array_equal(np.bincount(ds.y_val), [4, 5, 3])
  np.testing.assert_array_equal(np.bincount(ds.y_train), [36, 45, 27])


# -- the estimator contract ----------------------------------------------------------


@pytest.mark.slow(reason="about 60 scikit-learn checks, each compiling its own shapes")
def test_check_estimator():
  """scikit-learn's contract, at 50 epochs: its checks fit tiny data (~30 rows), where the
  default would be 750 epochs (options.auto_epochs); scikit-learn checks its own
  MLPClassifier at max_iter=100 likewise. Learning is still checked
  (check_classifiers_train: ≥ 83% of the training rows right)."""
  from sklearn.utils.estimator_checks import check_estimator  # pylint: disable=g-import-not-at-top
  results = check_estimator(mj.MLPClassifier(epochs=50), on_skip=None)  # raises on a failure
  skipped = {r["check_name"] for r in results if r["status"] != "passed"}
  assert skipped == {"check_array_api_input"}  # needs SCIPY_ARRAY_API; not an array-API estimator
  assert len(results) > 50


def test_string_labels_round_trip():
  X, y = blobs()
  names = np.array(["cat", "dog", "emu"])[y]
  clf = mj.MLPClassifier(**SMALL).fit(X, names)
  np.testing.assert_array_equal(clf.classes_, ["cat", "dog", "emu"])
  assert clf.n_features_in_ == X.shape[1]
  predicted = clf.predict(X)
  assert predicted.dtype == names.dtype and set(predicted) <= set(names)
  assert clf.score(X, names) == np.mean(predicted == names)
  assert clf.predict_proba(X).shape == (len(X), 3)


def test_sample_weight_equals_repeating_rows():
  X, y = blobs(n=30)
  counts = np.random.default_rng(1).integers(0, 4, size=len(y))
  weighted = mj.MLPClassifier(**SMALL).fit(X, y, sample_weight=counts)
  order = np.random.default_rng(2).permutation(int(counts.sum()))  # any row order
  repeated = mj.MLPClassifier(**SMALL).fit(np.repeat(X, counts, axis=0)[order],
                                           np.repeat(y, counts)[order])
  np.testing.assert_array_equal(weighted.predict_proba(X), repeated.predict_proba(X))
  # A weight that is not a whole number weighs its row's loss: a different model.
  halves = mj.MLPClassifier(**SMALL).fit(X, y, sample_weight=counts + 0.5)
  assert not np.array_equal(halves.predict_proba(X), weighted.predict_proba(X))


def test_sample_weights_that_repeat_rows_past_the_memory_are_refused_before_a_copy(
    monkeypatch):
  """The trial's np.full(150, 1e6) on iris: 150 M repeated rows, past a budget of 1 GiB
  (the budget of a machine this size). One ValueError naming sample_weight, before the
  rows are copied (peak memory stays small)."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  from mlp_jax.base import budget  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(budget, "memory_budget", lambda: 1 << 30)
  X, y = blobs(n=150)
  tracemalloc.start()
  with pytest.raises(ValueError, match="sample_weight repeats the rows 150,000,000 "
                                       "times in all") as refused:
    mj.MLPClassifier(**SMALL).fit(X, y, sample_weight=np.full(150, 1e6))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert "\n" not in str(refused.value) and peak < 64 << 20, peak


@pytest.mark.parametrize("weight", [2.0**62, 2.0**63, 2.0**64, 1e300])
def test_sample_weights_whose_sum_passes_int64_are_refused_not_wrapped(weight):
  """2**62 on each of 150 rows wraps an int64 sum to a small number (np.repeat would then
  crash); the sum is taken in float64, and the weights are whole numbers: refused in one
  line, as any repeat past the memory."""
  X, y = blobs(n=150)
  with pytest.raises(ValueError, match=r"^sample_weight repeats the rows [\d,]+ times in "
                                       r"all.*GiB"):
    mj.MLPClassifier(**SMALL).fit(X, y, sample_weight=np.full(150, weight))


def test_random_state_is_the_seed():
  X, y = blobs()
  p0 = mj.MLPClassifier(**SMALL).fit(X, y).predict_proba(X)
  np.testing.assert_array_equal(
      mj.MLPClassifier(**SMALL, random_state=0).fit(X, y).predict_proba(X), p0)
  assert not np.array_equal(
      mj.MLPClassifier(**SMALL, random_state=1).fit(X, y).predict_proba(X), p0)


def test_pickled_classifier_predicts_the_same():
  X, y = blobs()
  clf = mj.MLPClassifier(**SMALL).fit(X, y)
  again = pickle.loads(pickle.dumps(clf))
  np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
  assert again.get_params() == clf.get_params()


def test_works_in_pipeline_gridsearch_and_cross_val_score():
  X, y = blobs(n=60)
  pipe = make_pipeline(StandardScaler(), mj.MLPClassifier(**TRAINED))
  assert pipe.fit(X, y).score(X, y) > 0.9
  scores = cross_val_score(mj.MLPClassifier(**TRAINED), X, y, cv=3)
  assert scores.shape == (3,) and np.all(scores > 0.8)
  search = GridSearchCV(mj.MLPClassifier(**TRAINED), {"learning_rate": [1e-3, 1e-2]}, cv=3)
  search.fit(X, y)
  assert search.best_params_["learning_rate"] in (1e-3, 1e-2)


def test_gridsearch_over_numpy_grids_fits():
  """np.arange gives NumPy scalars: each is taken as the number it holds."""
  X, y = blobs(n=30)
  search = GridSearchCV(mj.MLPClassifier(**SMALL), {"hidden_dim": np.arange(4, 12, 4),
                                                    "batch_size": np.array([8])}, cv=2)
  search.fit(X, y)
  assert search.best_params_["hidden_dim"] in (4, 8)
  assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_a_network_too_large_for_memory_is_one_value_error():
  """Refused before anything is allocated, naming hidden_dim: the process lives on."""
  X, y = blobs(n=30)
  with pytest.raises(ValueError, match=r"^hidden_dim 1000000000 needs about [0-9,.]+ GiB "
                                       r".*use a smaller hidden_dim\.$"):
    mj.MLPClassifier(hidden_dim=10**9, epochs=1).fit(X, y)
  with pytest.raises(ValueError, match=r"^hidden_dim 1000000000 needs about"):
    mj.MLPClassifierCV({"learning_rate": [1e-3]}, cv=2, hidden_dim=10**9, epochs=1).fit(X, y)


@pytest.mark.parametrize("params, message", [
    ({"hidden_dim": 0}, "hidden_dim=0: must be >= 1"),
    ({"optimizer": "lbfgs"}, "optimizer='lbfgs': must be one of sgd, momentum, adam"),
    ({"input_scaling": "minmax"}, "input_scaling='minmax': must be one of auto"),
    ({"activation": "softplus"}, "activation='softplus': must be one of relu, tanh, "
                                 "logistic, identity, gelu"),
    ({"epochs": 2, "warmup_epochs": 3}, "warmup_epochs 3 is longer than epochs 2"),
    ({"dp_noise_multiplier": 1.0, "input_scaling": "per_feature"},
     "^MLPClassifier: input_scaling=per_feature: a private run cannot scale by statistics"),
    ({"grads": "autodiff", "dp_noise_multiplier": 1.0},
     "a DP run always uses the closed-form clipped gradient; drop grads=autodiff"),
    ({"unknown_setting": 1}, "got an unexpected keyword argument 'unknown_setting'"),
])
def test_a_bad_parameter_is_one_line_naming_it(params, message):
  X, y = blobs()
  with pytest.raises((ValueError, TypeError), match=message) as raised:
    mj.MLPClassifier(**{**SMALL, **params}).fit(X, y)
  assert "--" not in str(raised.value) and "\n" not in str(raised.value)


def test_a_refusal_names_each_setting_in_the_words_of_its_front_end():
  """A RunError names settings, not flags: the runner writes --name, the estimators
  name, and text that is not a setting (a command to run) is never edited."""
  from mlp_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.SettingError) as raised:
    config_lib.parse_sweep(("hidden_dim=8,16",))
  command = "python experiments/train.py --hidden_dim=$v --workdir=runs/$v; done)."
  assert str(raised.value).startswith("--sweep hidden_dim cannot be vmapped")
  assert raised.value.worded("").startswith("sweep hidden_dim cannot be vmapped")
  assert str(raised.value).endswith(command) and raised.value.worded("").endswith(command)
  with pytest.raises(config_lib.SettingError) as raised:
    config_lib.parse_sweep(("learning_rate=0",))
  assert str(raised.value) == "--sweep learning_rate: --learning_rate=0.0: must be > 0."
  assert raised.value.worded("") == "sweep learning_rate: learning_rate=0.0: must be > 0."


def test_an_activation_trains_and_predicts_with_it():
  """scikit-learn's activation names (and gelu): the fitted network's own f predicts."""
  X, y = blobs()
  from mlp_jax.core import prediction  # pylint: disable=g-import-not-at-top
  for activation in options.ACTIVATIONS:
    clf = mj.MLPClassifier(**{**SMALL, "activation": activation}).fit(X, y)
    assert clf.activation_ == activation
    x = prediction.network_inputs(X, clf.input_mean_, clf.input_std_)
    z = np.asarray(mj.logits(clf.params_, np.asarray(x), activation=activation), np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(clf.predict_proba(X), p / p.sum(1, keepdims=True), rtol=1e-5)


def test_divergence_is_the_runners_rule_in_one_value_error():
  """The one fit's rule: every model's loss not finite stops the fit at that epoch."""
  X, y = blobs()
  with pytest.raises(ValueError, match=r"^training diverged in epoch [0-9]+: train_loss "
                                       r"nan; the learning rate 1e\+12 is likely too high "
                                       r"\(try 10x lower, or clip_norm=1\)\.$"):
    mj.MLPClassifier(**{**SMALL, "learning_rate": 1e12, "optimizer": "sgd",
                        "schedule": "constant"}).fit(X * 1e3, y)


def test_one_class_is_refused():
  X, y = blobs()
  with pytest.raises(ValueError, match="needs at least 2 classes"):
    mj.MLPClassifier(**SMALL).fit(X, np.zeros(len(y)))


# -- the runner's code behind it -----------------------------------------------------


@pytest.mark.slow(reason="a DP calibration and a runner run beside the estimator's")
def test_a_private_classifier_has_the_runners_epsilon(tmp_path, monkeypatch):
  """The same ε; the estimator asks the accountant once, after its last epoch (it shows
  no epoch's ε), the runner after every epoch (each metrics line has it)."""
  from mlp_jax.training import dp_plan  # pylint: disable=g-import-not-at-top
  X, y = blobs(n=200)
  path = tmp_path / "table.npz"
  np.savez(path, x_train=X, y_train=y, x_test=X[:10], y_test=y[:10])
  dp = {"dp_target_epsilon": 3.0, "dp_delta": 1e-4, "batch_size": 20, "epochs": 4,
        "hidden_dim": 8}
  asked, account = [], dp_plan.account

  def recorded(plan, per_model, steps, with_epsilon):
    asked.append(with_epsilon)
    return account(plan, per_model, steps, with_epsilon)
  monkeypatch.setattr(dp_plan, "account", recorded)
  clf = mj.MLPClassifier(**dp).fit(X, y)
  assert asked == [False, False, False, True]
  asked.clear()
  result = experiment.run(tiny_config(f"npz:{path}", tmp_path / "run", **dp),
                          log=lambda *_: None)
  assert asked == [True] * 4
  assert clf.epsilon_ == pytest.approx(result["epsilon"], rel=1e-9)
  assert clf.input_scaling_ == "none"  # nothing fitted to the private rows
  with open(tmp_path / "run" / "config.json") as f:
    assert clf.noise_multiplier_ == json.load(f)["dp"]["noise_multiplier"]
  with pytest.raises(ValueError, match="takes no sample_weight"):
    mj.MLPClassifier(**dp).fit(X, y, sample_weight=np.arange(len(y)) % 3)


@pytest.mark.slow(reason="a k-fold selection twice: the runner's and the estimator's")
def test_cv_chooses_as_the_runners_cv_folds(tmp_path):
  X, y = blobs(n=90, scales=(100, 1, 1, 1, 1e-2), seed=3)
  X += np.random.default_rng(4).normal(size=X.shape) * X.std(axis=0) * 1.5  # overlap
  path = tmp_path / "table.npz"
  np.savez(path, x_train=X, y_train=y, x_test=X[:9], y_test=y[:9])
  grid = {"learning_rate": [1e-4, 1e-3, 1e-2], "weight_decay": [0.0, 1.0]}
  settings = {"hidden_dim": 8, "batch_size": 8, "epochs": 6}
  cv = mj.MLPClassifierCV(param_grid=grid, cv=3, **settings).fit(X, y)
  result = experiment.run(tiny_config(
      f"npz:{path}", tmp_path / "run", cv_folds=3,
      sweep=("learning_rate=1e-4,1e-3,1e-2", "weight_decay=0,1"), **settings),
      log=lambda *_: None)
  assert cv.best_params_ == result["chosen"]["configuration"]
  with open(tmp_path / "run" / "sweep.json") as f:
    ranking = json.load(f)["ranking"]
  means = {tuple(e["configuration"].values()): e["validation_accuracy_mean"] for e in ranking}
  for params, mean in zip(cv.cv_results_["params"], cv.cv_results_["mean_test_score"]):
    assert mean == pytest.approx(means[tuple(params.values())], abs=1e-6)
  assert len(set(np.round(cv.cv_results_["mean_test_score"], 6))) > 1  # a real choice
  assert cv.cv_results_["rank_test_score"][cv.best_index_] == 1
  assert cv.best_score_ == max(cv.cv_results_["mean_test_score"])
  np.testing.assert_array_equal(cv.predict(X), cv.best_estimator_.predict(X))


def test_cv_refuses_a_grid_it_cannot_train_in_one_program():
  X, y = blobs()
  with pytest.raises(ValueError, match="param_grid 'hidden_dim' cannot be trained in one"):
    mj.MLPClassifierCV(param_grid={"hidden_dim": [8, 16]}, **SMALL).fit(X, y)
  assert "param_grid" in mj.MLPClassifierCV().get_params()
  assert mj.MLPClassifierCV().get_params()["hidden_dim"] == mj.MLPClassifier().hidden_dim


@pytest.mark.parametrize("name, value, ours", [
    ("alpha", 1e-4, "weight_decay, AdamW's decay"), ("solver", "adam", "optimizer"),
    ("early_stopping", True, "nothing: mlp_jax trains for its epochs")])
def test_scikit_learns_words_are_answered_with_ours(name, value, ours):
  with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}': mlp_jax "
                                      f"calls it {ours}"):
    mj.MLPClassifier(**{name: value})
  with pytest.raises(TypeError, match=f"'{name}': mlp_jax calls it {ours}"):
    mj.MLPClassifierCV(**{name: value})


@pytest.mark.parametrize("name, value, ours, stored", [
    ("hidden_layer_sizes", (64,), "hidden_dim", 64), ("hidden_layer_sizes", 32, "hidden_dim", 32),
    ("max_iter", 200, "epochs", 200), ("learning_rate_init", 3e-3, "learning_rate", 3e-3)])
def test_scikit_learns_names_of_the_same_thing_are_aliases(name, value, ours, stored):
  """Stored under mlp_jax's name (get_params, clone and set_params see one parameter)."""
  for estimator in (mj.MLPClassifier, mj.MLPClassifierCV):
    model = estimator(**{name: value})
    assert model.get_params()[ours] == stored and name not in model.get_params()
    assert sklearn.base.clone(model).get_params()[ours] == stored
    assert estimator().set_params(**{name: value}).get_params()[ours] == stored
    with pytest.raises(TypeError, match=f"got {name} and {ours}, the same parameter twice"):
      estimator(**{name: value, ours: stored})
  with pytest.raises(TypeError, match=r"hidden_layer_sizes=\(64, 32\) has 2 hidden layers; "
                                      "mlp_jax has one: give hidden_dim=H"):
    mj.MLPClassifier(hidden_layer_sizes=(64, 32))


