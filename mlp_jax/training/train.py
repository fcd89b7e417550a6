"""Training: TrainState, the optax optimizer, the train step, a scanned epoch.

The dataset lives on the device. An epoch is ONE jitted lax.scan over index batches of a
permutation drawn from fold_in(key, epoch): every example is used once, the ragged last
batch is padded with index 0 and masked with weight 0, so every step has one static
shape and nothing recompiles after the first epoch.

A run is a stack of M >= 1 models (seeds, swept hyperparameters): one TrainState whose
leaves carry a leading model axis, trained by one program (init_state,
make_train_epoch, evaluation.evaluate; a single model is the stack of one). Given a mesh
(mlp_jax/training/parallel.py), the models are split over its model axis and each model's
batches over its data axis.
"""

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence

import jax
from jax import Array
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import ArrayLike
import numpy as np
import optax

from mlp_jax.base.options import STACKINGS, steps_per_epoch
from mlp_jax.core import augment, losses, privacy
from mlp_jax.core.gradients import value_and_grads_with_logits
from mlp_jax.core.network import Network
from mlp_jax.training import parallel
from mlp_jax.training.spec import Hyperparams
from mlp_jax.training.train_state import (TrainState, in_use, init_model_state,
                                          make_optimizer)


Metrics = dict[str, Array]   # per-epoch metrics by name, on the device


def smooth_targets(y: Array, num_classes: int, label_smoothing: ArrayLike) -> Array:
  """Int labels (B,) -> (1 − ε) one-hot + ε/K targets (B, K); labels as they are if ε = 0."""
  if not in_use(label_smoothing):
    return y
  return optax.smooth_labels(losses.targets(y, num_classes, jnp.float32), label_smoothing)


class NetworkSettings(Protocol):
  """What names a network among a run's settings (Hyperparams, RunConfig)."""

  @property
  def activation(self) -> str: ...

  @property
  def compute_dtype(self) -> str: ...


def compute_dtype(settings: NetworkSettings) -> Optional[str]:
  """The dtype the hidden layer's products read: None for float32, the params' own."""
  return None if settings.compute_dtype == "float32" else settings.compute_dtype


def network(settings: NetworkSettings) -> Network:
  """The network a run's settings describe: its activation and compute dtype."""
  return Network(settings.activation, compute_dtype(settings))


TrainStep = Callable[[TrainState, Any], tuple[TrainState, tuple[Array, ...]]]


def augmented(hp: Hyperparams, x: Array, state: TrainState) -> Array:
  """The batch x (B, D) augmented as hp.augmentation says (as given where it is None),
  its draws the step's own (augment.augment_key)."""
  if hp.augmentation is None:
    return x
  return augment.augment_batch(x, augment.augment_key(state.key, state.step),
                               hp.augmentation)


def make_train_step(hp: Hyperparams, optimizer: optax.GradientTransformation) -> TrainStep:
  """train_step(state, (x (B, D), y (B,), w (B,))) -> (state, (Σ w·L, Σ w·correct))."""
  def train_step(state: TrainState, batch: tuple[Array, Array, Array]
                 ) -> tuple[TrainState, tuple[Array, ...]]:
    x, y, w = batch
    x = augmented(hp, x, state)
    w = jnp.asarray(w, state.params.w1.dtype)   # so the metrics are in the params' dtype
    num_classes = state.params.b2.shape[0]
    targets = smooth_targets(y, num_classes, hp.label_smoothing)
    (loss, z2), g = value_and_grads_with_logits(state.params, x, targets, w,
                                                method=hp.grads, net=network(hp))
    updates, opt_state = optimizer.update(g, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    hits = jnp.argmax(z2, axis=-1) == y
    metrics = (loss * jnp.sum(w), jnp.sum(w * hits))
    return TrainState(params, opt_state, state.step + 1, state.key), metrics

  return train_step


def make_dp_train_step(hp: Hyperparams, optimizer: optax.GradientTransformation,
                       dp: privacy.DPSGD, mesh: Optional[Mesh] = None) -> TrainStep:
  """DP-SGD train_step(state, (X (N, D), y (N,))) -> (state, (Σ m·L, Σ m·correct, Σ m,
  overflowed)), for a privacy.DPSGD `dp`.

  The batch is Poisson-sampled from the whole resident training set, padded to
  dp.padded_batch_size and masked; the gradient is the closed-form clipped sum plus
  Gaussian noise over the expected batch size q·N. Batch and noise keys come from
  (state.key, state.step), so a resumed run repeats them exactly.
  """
  net = network(hp)
  expected_batch_size = dp.sampling_rate * dp.num_examples

  def train_step(state: TrainState, data: tuple[Array, Array]
                 ) -> tuple[TrainState, tuple[Array, ...]]:
    X, y = data
    sample_key, noise_key = privacy.step_keys(state.key, state.step)
    i, mask, overflowed = privacy.poisson_batch(sample_key, dp.num_examples,
                                                dp.sampling_rate, dp.padded_batch_size)
    dtype = state.params.w1.dtype      # all the work in it, whatever X's dtype (x64)
    x, labels = gather_batch(X.astype(dtype), i, mesh), gather_batch(y, i, mesh)
    # K augmented copies of each example, consecutive rows (dp.augmult; 1: itself).
    x, labels, mask = (jnp.repeat(a, dp.augmult, axis=0) for a in (x, labels, mask))
    x = augmented(hp, x, state)
    num_classes = state.params.b2.shape[0]
    Y = losses.targets(smooth_targets(labels, num_classes, hp.label_smoothing), num_classes,
                       dtype)
    (loss_sum, z2), grad_sum, _ = privacy.clipped_sum_with_logits(
        net, state.params, x, Y, mask, privacy.Clip(dp.clip_norm, dp.clipping, dp.augmult))
    g = privacy.add_noise(grad_sum, noise_key, dp.noise_multiplier, dp.clip_norm,
                          dp.clipping, expected_batch_size)
    updates, opt_state = optimizer.update(g, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    hits = jnp.sum(mask * (jnp.argmax(z2, axis=-1) == labels)) / dp.augmult
    metrics = (loss_sum, hits, jnp.sum(mask) / dp.augmult, overflowed)
    return TrainState(params, opt_state, state.step + 1, state.key), metrics

  return train_step


def dp_train_epoch(train_step: TrainStep, state: TrainState, X: Array, y: Array,
                   epoch: ArrayLike, steps: int) -> tuple[TrainState, Metrics]:
  """`steps` DP-SGD steps in one lax.scan -> (state, {"train_loss", "train_accuracy",
  "overflows"}); `epoch` is unused (batches are keyed by the step count)."""
  del epoch
  state, (loss_sums, hits, counts, overflows) = jax.lax.scan(
      lambda s, _: train_step(s, (X, y)), state, None, length=steps)
  count = jnp.maximum(jnp.sum(counts), 1)
  return state, {"train_loss": jnp.sum(loss_sums) / count,
                 "train_accuracy": jnp.sum(hits) / count,
                 "overflows": jnp.sum(overflows)}


def batch_indices(order: Array, batch_size: int) -> tuple[Array, Array]:
  """order (N,) -> indices (S, B) padded with 0 to S = ceil(N / B) batches, weights (S, B)."""
  n = order.shape[0]
  steps = steps_per_epoch(n, batch_size)
  pad = steps * batch_size - n
  idx = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(steps, batch_size)
  w = (jnp.arange(steps * batch_size) < n).astype(jnp.float32).reshape(steps, batch_size)
  return idx, w


def every_batch_has_rows(orders: Array, train_masks: Array, batch_size: int) -> Array:
  """Whether every batch (batch_indices) of every model's epoch holds a row its train
  mask weighs above 0: orders (M, N), or (N,) shared by the models; train_masks (M, N)."""
  def has_rows(order: Array, train_mask: Array) -> Array:
    idx, w = batch_indices(order, batch_size)
    return jnp.all(jnp.sum(w * train_mask[idx], axis=1) > 0)
  orders_axis = 0 if orders.ndim == 2 else None
  return jnp.all(jax.vmap(has_rows, (orders_axis, 0))(orders, train_masks))


def epoch_order(key: Array, epoch: ArrayLike, n: int) -> Array:
  """The permutation of the N training examples for `epoch`: fold_in(key, epoch)."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def gather_batch(X: Array, i: Array, mesh: Optional[Mesh] = None) -> Array:
  """X[i]: the rows of index batch i (B,); split over the mesh's devices if one is given."""
  batch = X[i]
  if mesh is None:
    return batch
  return jax.lax.with_sharding_constraint(batch, parallel.batch_sharded(mesh))


class Batching(NamedTuple):
  """How an epoch or an evaluation walks the resident data (static under jit):
  batch_size rows a step; the first num_examples rows are the examples (None: all; the
  rest pad a dataset sharded over a mesh: parallel.shard_rows); the mesh whose data
  axis splits each batch (None: one device); how a stack's models are mapped
  (STACKINGS); shared_order: every model of the stack has one seed, so one batch order
  (epoch_order of the first model's key) serves them all and each batch's rows are
  gathered once: the models' first layers are then one matmul (make_train_epoch);
  empty_batches: whether a batch may hold no row a train mask weighs (it then takes no
  step: keep_if_empty); False where every batch is known to hold one (make_train_epoch
  checks it each epoch), so that no step selects between a new and an old state."""

  batch_size: int
  num_examples: Optional[int] = None
  mesh: Optional[Mesh] = None
  stacking: str = "vmap"
  shared_order: bool = False
  empty_batches: bool = True

  def examples(self, X: Array) -> int:
    """N: the number of examples of the resident rows X."""
    return X.shape[0] if self.num_examples is None else self.num_examples


def train_epoch(train_step: TrainStep, state: TrainState, data: tuple[Array, Array],
                order: Array, batching: Batching, train_mask: Optional[Array] = None
                ) -> tuple[TrainState, Metrics]:
  """One epoch, one lax.scan -> (state, {"train_loss", "train_accuracy"}) on the device.

  The epoch visits the first N = batching.num_examples rows of data = (X, y) (default
  all) in `order` (N,), epoch_order(state.key, epoch, N). train_mask (N,), 1 for a row
  the model trains on and 0 for one it holds out (a k-fold model): each batch weighs
  its rows by it, and a batch of held-out rows alone is no step at all (the state is
  kept).
  """
  X, y = data
  mesh = batching.mesh
  n = batching.examples(X)
  idx, w = batch_indices(order, batching.batch_size)

  def body(state: TrainState, batch: tuple[Array, Array]
           ) -> tuple[TrainState, tuple[Array, ...]]:
    i, wb = batch
    x, labels = gather_batch(X, i, mesh), gather_batch(y, i, mesh)
    if train_mask is None:
      return train_step(state, (x, labels, wb))
    wb = wb * gather_batch(train_mask, i, mesh)
    if not batching.empty_batches:
      return train_step(state, (x, labels, wb))
    return keep_if_empty(jnp.sum(wb) > 0, train_step(state, (x, labels, wb)), state)

  state, (loss_sums, hits) = jax.lax.scan(body, state, (idx, w))
  count = n if train_mask is None else jnp.sum(train_mask[:n])
  return state, {"train_loss": jnp.sum(loss_sums) / count,
                 "train_accuracy": jnp.sum(hits) / count}


def keep_if_empty(any_rows: Array, step_result: tuple[TrainState, Any], state: TrainState
                  ) -> tuple[TrainState, Any]:
  """The train step's (state, metrics) if the batch had rows, else (state, zeros): the
  mean over no example is undefined (NaN), and a zero step would still move Adam."""
  stepped, metrics = step_result
  state = jax.tree.map(lambda new, old: jnp.where(any_rows, new, old), stepped, state)
  return state, jax.tree.map(lambda m: jnp.where(any_rows, m, 0), metrics)


# A run is a stack of M >= 1 models: every leaf of its TrainState has a leading model
# axis, and one program trains them all over one shared dataset. Each model has its own
# seed (init, batch order, DP noise) and its own values of the sweepable settings, given
# as arrays {name: (M,)}. A single model is the stack of one.

# The DPSGD field each dp_ setting of a stack sets, per model.
_DP_FIELDS = {"dp_clip_norm": "clip_norm", "dp_noise_multiplier": "noise_multiplier"}


# The per-model value that is no hyperparameter: a k-fold model's rows, (M, N) (train_epoch).
TRAIN_MASK = "train_mask"


def with_values(hp: Hyperparams, dp: Optional[privacy.DPSGD], values: Mapping[str, Any]
                ) -> tuple[Hyperparams, Optional[privacy.DPSGD]]:
  """(hp, dp) of one model of a stack: the swept fields replaced by its `values`
  {name: scalar} (traced inside the program; TRAIN_MASK is not a field)."""
  hp = hp._replace(**{k: v for k, v in values.items()
                      if k not in _DP_FIELDS and k != TRAIN_MASK})
  if dp is not None:
    dp = dp._replace(**{_DP_FIELDS[k]: v for k, v in values.items() if k in _DP_FIELDS})
  return hp, dp


def map_models(fn: Callable[[Any], Any], tree: Any, stacking: str, groups: int) -> Any:
  """fn applied to each model of `tree` (every leaf has a leading model axis M).

  groups > 1: the models are split into `groups` equal blocks, one per slice of the
  mesh's model axis (jax.vmap with spmd_axis_name), each block mapped as below.
  Within a block: one model is fn itself (no batching at all, so a single run computes
  exactly what one model alone computes); several are batched ("vmap": their matmuls
  in one) or run one after another ("map": lax.map, one model's activations at a time).
  """
  m = jax.tree.leaves(tree)[0].shape[0]
  if groups > 1:
    blocks = jax.tree.map(lambda a: a.reshape(groups, m // groups, *a.shape[1:]), tree)
    out = jax.vmap(lambda block: map_models(fn, block, stacking, 1),
                   spmd_axis_name=parallel.MODEL_AXIS)(blocks)
    return jax.tree.map(lambda a: a.reshape(m, *a.shape[2:]), out)
  if m == 1:
    return jax.tree.map(lambda a: a[None], fn(jax.tree.map(lambda a: a[0], tree)))
  if stacking == "vmap":
    return jax.vmap(fn)(tree)
  if stacking == "map":
    return jax.lax.map(fn, tree)
  raise ValueError(f"unknown stacking {stacking!r}; choose one of {', '.join(STACKINGS)}.")


def init_state(seeds: Sequence[int], in_dim: int, hidden_dim: int, num_classes: int,
               hp: Hyperparams, values: Optional[Mapping[str, ArrayLike]] = None
               ) -> TrainState:
  """The stacked TrainState of M = len(seeds) models, on the default device: model m is
  init_model_state(seeds[m], ...) with the optimizer of hp and its `values` {name: (M,)}
  (spec.SWEEPABLE names; None or {} when only the seeds differ). One program for the M
  models (jax.vmap), compiled once per shape; bit for bit the models built one by one
  (tested)."""
  arrays = {k: np.asarray(v) for k, v in (values or {}).items()}
  swept: dict[str, Any] = {k: None for k in arrays if k in hp._fields}  # set inside
  static_hp = hp._replace(**swept)
  return _init_stack(np.asarray(seeds, np.int32), arrays, static_hp, in_dim, hidden_dim,
                     num_classes)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _init_stack(seeds: Array, values: dict[str, Array], hp: Hyperparams, in_dim: int,
                hidden_dim: int, num_classes: int) -> TrainState:
  def init_one(seed: Array, model_values: dict[str, Array]) -> TrainState:
    # Traced values, as inside the training program: a swept 0 keeps its state.
    model_hp, _ = with_values(hp, None, model_values)
    return init_model_state(seed, in_dim, hidden_dim, num_classes,
                            make_optimizer(model_hp))
  return jax.vmap(init_one)(seeds, values)


ModelEpoch = Callable[..., tuple[TrainState, Metrics]]


def _model_epoch(hp: Hyperparams, dp: Optional[privacy.DPSGD], batching: Batching
                 ) -> ModelEpoch:
  """ONE model's epoch (state, X, y, epoch, values, order) -> (state, metrics):
  train_epoch of its train step in `order` (epoch_order of its key, or of the stack's
  shared one), or with a privacy.DPSGD `dp`, ceil(N / batch_size) DP-SGD steps (which
  take no order)."""
  def one(state: TrainState, X: Array, y: Array, epoch: ArrayLike,
          values: Mapping[str, Array], order: Optional[Array]) -> tuple[TrainState, Metrics]:
    model_hp, model_dp = with_values(hp, dp, values)
    optimizer = make_optimizer(model_hp)
    if model_dp is None:
      assert order is not None, "make_train_epoch draws every plain epoch's order"
      return train_epoch(make_train_step(model_hp, optimizer), state, (X, y), order,
                         batching, values.get(TRAIN_MASK))
    return dp_train_epoch(make_dp_train_step(model_hp, optimizer, model_dp, batching.mesh),
                          state, X, y, epoch,
                          steps_per_epoch(model_dp.num_examples, batching.batch_size))
  return one


def _memoized(make: Callable[..., Any]) -> Callable[..., Any]:
  """`make` returning the same object for the same (hashable) arguments: one jitted
  function is traced and lowered once per process for every run that asks for it (a
  k-fold refit, many runs from Python, the tests); unhashable ones build it anew."""
  cached = functools.lru_cache(maxsize=32)(make)

  @functools.wraps(make)
  def memoized(*args: Any, **kwargs: Any) -> Any:
    try:
      hash((args, tuple(kwargs.items())))
    except TypeError:  # e.g. arrays in hp: a stack's values belong in `values`
      return make(*args, **kwargs)
    return cached(*args, **kwargs)
  return memoized


@_memoized
def make_train_epoch(hp: Hyperparams, batching: Batching, dp: Optional[privacy.DPSGD] = None
                     ) -> ModelEpoch:
  """jit(epoch)(states, X (N, D), y (N,), epoch, values {name: (M,)}) -> (states,
  {"train_loss": (M,), "train_accuracy": (M,)[, "overflows": (M,)]}), the states donated
  (call it positionally), each step `batching.batch_size` rows (Batching).

  Model m trains exactly as it would alone: its own batch order from its own key, its
  own hyperparameters `values[m]`, one shared dataset (of which a k-fold model trains
  on the rows of values[TRAIN_MASK][m], (N,); not with DP). With a mesh
  (parallel.run_mesh), X and y are row-sharded over its data axis (parallel.shard_rows),
  the states and values split over its model axis (parallel.shard_models), and each
  model's batches are split over the data axis. With batching.shared_order (models of
  one seed, whose keys are one key), the order is drawn once for all. With a
  privacy.DPSGD `dp`, an epoch is ceil(N / batch_size) DP-SGD steps (dp_train_epoch).
  """
  one = _model_epoch(hp, dp, batching)
  one_without_empty = _model_epoch(hp, dp, batching._replace(empty_batches=False))
  mesh = batching.mesh
  groups = 1 if mesh is None else parallel.model_groups(mesh)
  shared = batching.shared_order and groups == 1 and dp is None

  def epoch_fn(states: TrainState, X: Array, y: Array, epoch: ArrayLike,
               values: Mapping[str, Array]) -> tuple[TrainState, Metrics]:
    n = batching.examples(X)
    orders = None        # DP-SGD draws its batches itself
    if dp is None:       # the stack's one order (N,), or each model's (M, N)
      orders = (epoch_order(states.key[0], epoch, n) if shared else
                jax.vmap(epoch_order, (0, None, None))(states.key, epoch, n))

    def train_models(model_epoch: ModelEpoch) -> tuple[TrainState, Metrics]:
      return map_models(lambda svo: model_epoch(svo[0], X, y, epoch, svo[1],
                                                orders if shared else svo[2]),
                        (states, values, None if shared else orders), batching.stacking,
                        groups)

    if orders is None or TRAIN_MASK not in values:
      return train_models(one)
    # One test per epoch, for all models: where every batch holds a training row (a
    # k-fold model's with B = 16: all but always), no step needs keep_if_empty's select.
    return jax.lax.cond(
        every_batch_has_rows(orders, values[TRAIN_MASK], batching.batch_size),
        lambda: train_models(one_without_empty), lambda: train_models(one))

  if mesh is None:
    return jax.jit(epoch_fn, donate_argnums=(0,))
  parallel.check_batch_size(batching.batch_size, mesh)
  return jax.jit(epoch_fn, donate_argnums=(0,), out_shardings=parallel.model_sharded(mesh))


def default_stacking(platform: str, batch_size: int, in_dim: int, hidden_dim: int) -> str:
  """"vmap" unless on a CPU with a step of ≥ 2^22 multiply-adds per model (B·D·H): there
  one model already keeps the cores busy, batching gains nothing (docs/benchmarks.md,
  "Many models": vmap and map within 5% at 784-1024, B = 256), and "map" holds one
  model's activations at a time instead of all of them."""
  big = batch_size * in_dim * hidden_dim >= 2 ** 22
  return "map" if platform == "cpu" and big else "vmap"
