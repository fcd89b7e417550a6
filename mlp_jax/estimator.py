"""scikit-learn estimators over the runner's training code: MLPClassifier and
MLPClassifierCV.

    clf = mj.MLPClassifier().fit(X, y)       # X (N, D), y (N,) of any labels
    clf.predict(X_new), clf.predict_proba(X_new), clf.score(X_test, y_test)

Every parameter is a training setting of config.RunConfig, with its name and default
(config.TRAINING; random_state is its seed), and fit trains through the runner's one
fit (mlp_jax/training/fit.py): the manual gradient, optax, the same input scaling (auto:
datasets.choose_scaling), the same number of epochs by default (options.auto_epochs), and
DP-SGD with dp_noise_multiplier or dp_target_epsilon.

MLPClassifierCV(param_grid=..., cv=K) trains every configuration on every fold in ONE
program, as `--sweep ... --cv_folds=K` does, chooses by mean validation accuracy and
refits on all rows.
"""

import inspect
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.base import ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight
from sklearn.utils.validation import check_is_fitted
from sklearn.utils.validation import validate_data

from mlp_jax.base import options
from mlp_jax.data import datasets
from mlp_jax.training import config as config_lib, stack as stack_lib

if TYPE_CHECKING:  # imported where a fit starts: JAX only then
  from mlp_jax.training import dp_plan, fit

# The parameters: the training settings of the spec, scikit-learn's random_state for
# the seed, each with the spec's default.
_SEED = "random_state"
PARAMETERS = {(_SEED if name == "seed" else name): config_lib.BY_NAME[name]
              for name in config_lib.TRAINING}


class _Fitted(NamedTuple):
  """What `_fit` returns: stacked params (numpy, leading model axis M) and the
  per-epoch train losses (epochs, M)."""

  params: Any
  train_loss: np.ndarray


def _training(config: config_lib.Config, stack: stack_lib.Stack, num_rows: int,
              dp: Optional["dp_plan.DPPlan"] = None) -> "fit.Training":
  """The fit.Training of `config` and `stack` on `num_rows` training rows."""
  from mlp_jax.training import fit  # pylint: disable=g-import-not-at-top  (JAX only once a fit starts)
  steps_per_epoch = options.steps_per_epoch(num_rows, config.batch_size)
  hp = config_lib.hyperparams(config, steps_per_epoch, [config.num_epochs])
  return fit.Training(config, stack, hp, steps_per_epoch, dp)


def _fit(training: "fit.Training", X: np.ndarray, y: np.ndarray, num_classes: int,
         train_mask: Optional[np.ndarray] = None) -> _Fitted:
  """Trains the models of training.stack on the standardised rows X (N, D) float32,
  labels y (N,) int32, through the runner's one fit (fit.fit); train_mask (M, N): each
  model's row weights (folds, sample weights). What the fit refuses (a network too
  large for the memory, divergence, an overflowed Poisson batch) is one ValueError."""
  import jax  # pylint: disable=g-import-not-at-top
  from mlp_jax.base import compilation  # pylint: disable=g-import-not-at-top
  from mlp_jax.training import fit  # pylint: disable=g-import-not-at-top
  from mlp_jax.training import train_state  # pylint: disable=g-import-not-at-top
  compilation.enable(None)
  try:
    fit.check_memory(training, (len(y), X.shape[1], num_classes))
    state = fit.init_state(training, (len(y), X.shape[1], num_classes))
    data = fit.Data((jax.device_put(X), jax.device_put(y), len(y)), {}, train_mask)
    state, rows = fit.fit(training, state, data)
  except config_lib.RunError as e:
    raise ValueError(e.worded("")) from None
  losses = np.array([stack_lib.model_values(row, "train_loss") for row in rows])
  return _Fitted(jax.tree.map(np.asarray, train_state.averaged_params(state)), losses)


def _canonical_order(X: np.ndarray, y: np.ndarray) -> np.ndarray:
  """An order of the rows that depends on their values only: sorted by a 64-bit hash
  of each row and its label, so that a fit does not depend on the order the rows come
  in (rows of equal hash are, but for a 2^-64 chance, equal rows)."""
  words = np.concatenate([X.astype(np.float64), y[:, None].astype(np.float64)], axis=1)
  words = words.view(np.uint64)
  digest = np.zeros(len(words), np.uint64)
  for column in words.T:  # FNV-1a over the 64-bit words, modulo 2^64
    digest = (digest ^ column) * np.uint64(0x100000001B3)
  return np.argsort(digest, kind="stable")


def _check_repeats(total: int, X: np.ndarray) -> None:
  """ValueError, before anything is copied, if `total` repeated rows of X would not fit
  the memory budget of a read (budget.memory_budget): the fit holds about three copies
  of them in X's dtype (repeated, ordered, scaled) and three in float32."""
  from mlp_jax.base import budget  # pylint: disable=g-import-not-at-top
  need = total * (X.shape[1] * (3 * X.itemsize + 12) + 24)
  limit = budget.memory_budget()
  if need > limit:
    raise ValueError(f"sample_weight repeats the rows {total:,} times in all (whole-number "
                     f"weights train as repeated rows): about {need / 2**30:,.1f} GiB, more "
                     f"than the {limit / 2**30:,.1f} GiB this fit may use; divide the "
                     "weights by a common factor, or give weights that are not whole "
                     "numbers (each row's loss scaled, no copies).")


def _one_hidden_layer(sizes: Any) -> int:
  """hidden_layer_sizes (scikit-learn's) as hidden_dim: one layer's size, an int."""
  layers = (sizes,) if isinstance(sizes, (int, np.integer)) else tuple(sizes)
  if len(layers) != 1:
    raise TypeError(f"hidden_layer_sizes={sizes!r} has {len(layers)} hidden layers; mlp_jax "
                    "has one: give hidden_dim=H (or hidden_layer_sizes=(H,)).")
  return layers[0]


# scikit-learn's MLPClassifier names that mean what an mlp_jax parameter means: accepted,
# and stored under mlp_jax's name (so get_params and clone see that one).
SKLEARN_ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "hidden_layer_sizes": ("hidden_dim", _one_hidden_layer),
    "max_iter": ("epochs", lambda v: v),
    "learning_rate_init": ("learning_rate", lambda v: v),
}
# Its names for something mlp_jax does otherwise or not at all: a TypeError says so.
SKLEARN_NAMES = {
    "alpha": "weight_decay, AdamW's decay of W1 and W2 (decoupled, scaled by the learning "
             "rate), not scikit-learn's L2 penalty alpha·‖W‖²/(2n) in the loss",
    "solver": "optimizer (sgd, momentum, adam, adamw; no lbfgs)",
    "n_iter_no_change": "nothing: mlp_jax trains for its epochs (no early stopping)",
    "early_stopping": "nothing: mlp_jax trains for its epochs (no early stopping)",
}


def _as_ours(name: str, value: Any) -> tuple[str, Any]:
  """(mlp_jax's name, its value) of a parameter given by scikit-learn's alias, else
  (name, value) as given."""
  if name in SKLEARN_ALIASES:
    ours, convert = SKLEARN_ALIASES[name]
    return ours, convert(value)
  return name, value


def _ours(params: dict[str, Any], estimator: str) -> dict[str, Any]:
  """`params` with scikit-learn's aliases as mlp_jax's names; TypeError for a name that
  is neither (naming what mlp_jax calls it, where it has one) or one given twice."""
  ours = {}
  for given, value in params.items():
    name, value = _as_ours(given, value)
    if name != given and name in params:
      raise TypeError(f"{estimator}() got {given} and {name}, the same parameter twice: "
                      f"give {name} alone.")
    if name not in PARAMETERS:
      hint = SKLEARN_NAMES.get(name)
      raise TypeError(f"{estimator}() got an unexpected keyword argument {name!r}"
                      + (f": mlp_jax calls it {hint}" if hint else ""))
    ours[name] = value
  return ours


class MLPClassifier(ClassifierMixin, BaseEstimator):
  """The two-layer MLP as a scikit-learn classifier, trained by the runner's code.

  Parameters are the runner's settings of the same names (python experiments/train.py
  --help), with their defaults; random_state is --seed (an int; a RandomState draws
  one; None a fresh one). batch_size is capped at the number of rows.

  sample_weight: whole numbers train exactly as the rows repeated that many times (0
  drops a row); other weights scale each row's loss (Σ w·L / Σ w over each batch). A
  private classifier (dp_noise_multiplier or dp_target_epsilon) takes none, and scales
  X by nothing fitted to it (input_scaling auto means none: scale X with constants
  fixed in advance); its ε at dp_delta is `epsilon_`.

  Attributes after fit: classes_, n_features_in_, params_ (W1 (H, D), b1, W2 (K, H),
  b2), activation_ (f of its hidden layer), input_mean_, input_std_ (D,), input_scaling_
  (the scaling used), n_iter_ (epochs), loss_curve_ (train loss per epoch), epsilon_ and
  noise_multiplier_ (private).
  """

  # For a type checker: the parameters read here (every one is set by __init__).
  input_scaling: str
  random_state: Any
  dp_noise_multiplier: Optional[float]
  dp_target_epsilon: Optional[float]

  def __init__(self, **params: Any):
    """Stores each parameter (PARAMETERS) as given, unchecked, or its default; fit
    checks them. The signature scikit-learn and help() read is generated below."""
    params = _ours(params, type(self).__name__)
    for name, setting in PARAMETERS.items():
      setattr(self, name, params.get(name, setting.default))

  def set_params(self, **params: Any) -> "MLPClassifier":
    """scikit-learn's set_params, taking its aliases too (max_iter, ...: SKLEARN_ALIASES),
    so that GridSearchCV(MLPClassifier(), {"max_iter": ...}) works."""
    return super().set_params(**dict(_as_ours(k, v) for k, v in params.items()))

  # -- fitting -------------------------------------------------------------------------

  def _seed(self) -> int:
    if isinstance(self.random_state, (int, np.integer)) and not isinstance(
        self.random_state, bool):
      return int(self.random_state)
    return int(check_random_state(self.random_state).randint(2**31 - 1))

  def _config(self, num_rows: int, **overrides: Any) -> config_lib.Config:
    """The RunConfig of these parameters for `num_rows` training rows, its training part
    checked (ValueError naming the parameter), with its epochs made explicit."""
    settings = {name: getattr(self, name) for name in PARAMETERS if name != _SEED}
    settings.update(overrides)
    config = config_lib.RunConfig(**settings, seed=self._seed(), progress=False)
    try:
      config = config_lib.check_training(config)
      config = config._replace(batch_size=min(config.batch_size, num_rows))
      if config.epochs is None:
        config = config._replace(epochs=options.auto_epochs(num_rows, config.batch_size))
      config_lib.check_warmup(config)
    except config_lib.RunError as e:
      raise ValueError(f"{type(self).__name__}: {e.worded('')}") from None
    return config

  def _inputs(self, X: Any, y: Any, sample_weight: Any = None
              ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(X float32 (N, D), class indices (N,) int32, row weights or None), with classes_
    set; whole-number weights become repeated rows."""
    X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
    check_classification_targets(y)
    self.classes_, y = np.unique(y, return_inverse=True)
    if len(self.classes_) < 2:
      raise ValueError(f"{type(self).__name__} needs at least 2 classes in y; got one "
                       f"class ({self.classes_[0]!r}).")
    weights = None
    if sample_weight is not None:
      weights = _check_sample_weight(sample_weight, X, ensure_non_negative=True)
      if self._private() and not np.all(weights == 1):
        raise ValueError("a private MLPClassifier takes no sample_weight: ε bounds the "
                         "influence of one row, and a weight would change it.")
      if np.all(weights == np.round(weights)):
        _check_repeats(int(weights.sum()), X)   # in float64: a sum of int64 could wrap
        counts = weights.astype(np.int64)
        X, y, weights = np.repeat(X, counts, axis=0), np.repeat(y, counts), None
      else:
        keep = weights > 0
        X, y, weights = X[keep], y[keep], weights[keep]
      if len(np.unique(y)) < 2:
        raise ValueError(f"{type(self).__name__} needs rows of at least 2 classes with a "
                         "weight above 0; sample_weight leaves one class.")
    order = _canonical_order(X, y)
    X, y = X[order].astype(np.float32), y[order].astype(np.int32)
    return X, y, None if weights is None else weights[order].astype(np.float32)

  def _private(self) -> bool:
    return self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None

  def _scale(self, X: np.ndarray) -> np.ndarray:
    """X standardised by input_scaling from these rows (a private fit: by nothing; with
    per_feature it is refused by the spec's checks)."""
    scaling = "none" if self._private() else self.input_scaling  # per_feature: refused
    mean, std, self.input_scaling_, _ = datasets.scaling_of(X, scaling)
    self.input_mean_, self.input_std_ = mean, std
    return datasets.standardize(X, mean, std)

  def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPClassifier":
    """Trains on rows X (N, D) with labels y (N,); returns self."""
    X, y, weights = self._inputs(X, y, sample_weight)
    config = self._config(len(y))
    X = self._scale(X)
    stack = stack_lib.make_stack(config)
    dp = None
    if config_lib.is_private(config):
      from mlp_jax.training import dp_plan  # pylint: disable=g-import-not-at-top
      steps_per_epoch = options.steps_per_epoch(len(y), config.batch_size)
      try:
        dp, stack = dp_plan.make_plan(config, stack, len(y), steps_per_epoch, 1,
                                      lambda line: None)
      except config_lib.RunError as e:
        raise ValueError(f"{type(self).__name__}: {e.worded('')}") from None
    fitted = _fit(_training(config, stack, len(y), dp), X, y, len(self.classes_),
                  None if weights is None else weights[None])
    self._set_fitted(fitted, config, dp)
    return self

  def _set_fitted(self, fitted: _Fitted, config: config_lib.Config, dp: Any) -> None:
    from mlp_jax.core.model import Params  # pylint: disable=g-import-not-at-top
    self.params_ = Params._make(np.asarray(p[0]) for p in fitted.params)  # numpy
    self.n_iter_ = config.epochs
    self.activation_ = config.activation
    self.loss_curve_ = [float(v) for v in fitted.train_loss[:, 0]]
    if dp is not None:
      self.noise_multiplier_ = float(dp.noise_multipliers[0])
      self.epsilon_ = float(dp.record["planned_epsilon"])
      self.delta_ = float(dp.delta)

  # -- predicting ----------------------------------------------------------------------

  def predict_proba(self, X: Any) -> np.ndarray:
    """p = softmax(z2) (N, K), columns: classes_ (mlp_jax.core.prediction, in the params'
    float32; a row not finite there once scaled, such as 1e300, is refused)."""
    check_is_fitted(self)
    X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
    from mlp_jax.core import prediction  # pylint: disable=g-import-not-at-top  (JAX)
    x = prediction.network_inputs(X, self.input_mean_, self.input_std_)
    p = np.asarray(prediction.probabilities(self.params_, x, self.activation_), np.float64)
    return p / p.sum(axis=1, keepdims=True)   # rows sum to 1 in float64

  def predict(self, X: Any) -> np.ndarray:
    """The most probable class of each row (N,), one of classes_."""
    p = self.predict_proba(X)
    from mlp_jax.core import prediction  # pylint: disable=g-import-not-at-top  (JAX)
    return self.classes_[np.asarray(prediction.classes(p))]


class MLPClassifierCV(MLPClassifier):
  """MLPClassifier with its configuration chosen by K-fold cross-validation: every
  configuration of param_grid × K folds trained in ONE program (the runner's
  `--sweep ... --cv_folds=K`: the same stratified folds, of random_state), ranked by
  mean validation accuracy at the last epoch (ties: lower validation loss), then refit
  on all rows. param_grid: {name: [values]} of the settings that can differ between
  the models of one program (config.SWEEPABLE). The other parameters are
  MLPClassifier's. Not private (as --cv_folds).

  Attributes: best_params_, best_score_, best_index_, cv_results_ (params,
  mean_test_score, std_test_score, rank_test_score, split{k}_test_score),
  best_estimator_ (the refit MLPClassifier, which predict and score use), and the refit
  one's fitted attributes.
  """

  def __init__(self, param_grid: Optional[dict[str, Any]] = None, cv: int = 5,
               **params: Any):
    self.param_grid = param_grid
    self.cv = cv
    super().__init__(**params)

  def fit(self, X: Any, y: Any) -> "MLPClassifierCV":  # type: ignore[override]
    """Chooses on K folds of (X, y), refits on all of them; returns self."""
    X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
    check_classification_targets(y)
    self.classes_, labels = np.unique(y, return_inverse=True)
    grid = self.param_grid or {}
    sweep = []
    for name, values in grid.items():
      if name not in config_lib.SWEEPABLE:
        raise ValueError(f"param_grid {name!r} cannot be trained in one program with the "
                         f"others (sweepable: {', '.join(config_lib.SWEEPABLE)}); use "
                         "GridSearchCV(MLPClassifier(), ...) for it.")
      sweep.append((name, values))
    if self._private():
      raise ValueError("MLPClassifierCV is not private (each row would train K − 1 "
                       "models); choose a private MLPClassifier's settings yourself.")
    if not isinstance(self.cv, (int, np.integer)) or self.cv < 2:
      raise ValueError(f"MLPClassifierCV: cv={self.cv!r} must be a number of folds >= 2.")
    X32, labels = X.astype(np.float32), labels.astype(np.int32)
    config = self._config(len(labels), sweep=tuple(sweep), cv_folds=int(self.cv))
    try:
      stack = stack_lib.with_folds(stack_lib.make_stack(config), config, labels)
    except config_lib.RunError as e:
      raise ValueError(f"MLPClassifierCV: {e.worded('')}") from None
    mean, std, _, _ = datasets.scaling_of(X32, config.input_scaling)
    X32 = datasets.standardize(X32, mean, std)
    fitted = _fit(_training(config, stack, len(labels)), X32, labels, len(self.classes_),
                  stack.train_masks())
    from mlp_jax.training import evaluation, train  # pylint: disable=g-import-not-at-top  (JAX)
    evaluated = evaluation.evaluate(fitted.params, X32, labels,
                                    rows=stack.validation_rows(), net=train.network(config))
    row = stack_lib.metrics_row(config.num_epochs, {
        "validation_accuracy": evaluated["accuracy"], "validation_loss": evaluated["loss"]},
        stack.num_models)
    self.best_index_, ranking = stack_lib.choose([row], stack)
    self.cv_results_ = _cv_results(stack, evaluated["accuracy"], ranking)
    self.best_params_ = dict(stack.configurations[self.best_index_])
    self.best_score_ = float(self.cv_results_["mean_test_score"][self.best_index_])
    base = {k: v for k, v in self.get_params().items() if k not in ("param_grid", "cv")}
    self.best_estimator_ = MLPClassifier(**{**base, **self.best_params_}).fit(X, y)
    for name in ("params_", "activation_", "input_mean_", "input_std_", "input_scaling_",
                 "n_iter_", "loss_curve_"):
      setattr(self, name, getattr(self.best_estimator_, name))
    return self


def _cv_results(stack: stack_lib.Stack, accuracy: np.ndarray,
                ranking: list[dict[str, Any]]) -> dict[str, Any]:
  """GridSearchCV's cv_results_ keys from each model's validation accuracy (M,)."""
  per_configuration = np.asarray(accuracy, np.float64).reshape(
      len(stack.configurations), len(stack.folds), len(stack.seeds)).mean(axis=2)
  rank = np.empty(len(stack.configurations), np.int32)
  for place, entry in enumerate(ranking):
    rank[stack.configurations.index(entry["configuration"])] = place + 1
  results: dict[str, Any] = {
      "params": [dict(c) for c in stack.configurations],
      "mean_test_score": per_configuration.mean(axis=1),
      "std_test_score": per_configuration.std(axis=1), "rank_test_score": rank}
  for fold in range(per_configuration.shape[1]):
    results[f"split{fold}_test_score"] = per_configuration[:, fold]
  return results


# scikit-learn reads an estimator's parameters from its __init__ signature: MLPClassifier's
# are the spec's training settings (PARAMETERS), the CV's its own two and those.
MLPClassifier.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=s.default,
                         annotation=Optional[s.kind] if s.default is None else s.kind)
       for name, s in PARAMETERS.items())])
MLPClassifierCV.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [*list(inspect.signature(MLPClassifierCV.__init__).parameters.values())[:3],
     *list(inspect.signature(MLPClassifier.__init__).parameters.values())[1:]])
