"""The one fit: a stack of M >= 1 models trained epoch by epoch, plain or private.

experiment.py (the runner) and the estimators (estimator.py) both train through it:

    fit.check_memory(training, (N, D, K))          # once, before anything is allocated
    state = fit.init_state(training, (N, D, K))
    state, rows = fit.fit(training, state, data, hooks)

Each epoch is the scanned epoch program (train.make_train_epoch), the evaluation of the
data's splits, ONE transfer to the host, the DP accountant (and its overflow rule), the
metrics row (stack.metrics_row) with the epoch's learning rate, and the divergence rule.
Whatever else a caller does with an epoch (metrics lines, checkpoints, signals, progress,
profile, TensorBoard) it does in its Hooks, called around each epoch.
"""

import functools
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
from jax import Array
from jax.sharding import Mesh
import numpy as np

from mlp_jax.training import (dp_plan, evaluation, memory, parallel, spec, stack as stack_lib,
                              train, train_state)
from mlp_jax.training.config import Named, RunConfig, RunError
from mlp_jax.training.stack import Row, Stack

# (X, y, N) of a split on the devices; evaluated splits add their rows (indices (M, R),
# weights (M, R)) of each model, or None: all N.
Split = tuple[Array, Array, int]
Evaluated = tuple[Array, Array, int, Optional[tuple[Array, Array]]]


class Training(NamedTuple):
  """What a fit trains: a resolved RunConfig (its epochs chosen), the stack of models,
  their Hyperparams (the schedule's cycles included), the steps of an epoch, a private
  run's dp_plan.DPPlan, and the mesh (None: JAX's default device, unsharded)."""

  config: RunConfig
  stack: Stack
  hp: spec.Hyperparams
  steps_per_epoch: int
  dp: Optional[dp_plan.DPPlan] = None
  mesh: Optional[Mesh] = None


class Data(NamedTuple):
  """The training rows on the devices; the splits evaluated after every epoch
  ({"validation": ..., "test": ...}: their losses and accuracies go in the row); each
  model's weight of each training row (M, N) (k-fold masks, sample weights), or None."""

  train: Split
  splits: dict[str, Evaluated]
  train_mask: Optional[np.ndarray] = None


class Diverged(RunError):
  """Every model's loss stopped being finite (the divergence rule)."""


class Hooks:
  """A caller's concerns around each epoch; these do nothing (an estimator's fit).

  epsilon_every_epoch: whether a private fit's rows carry ε after every epoch (the
  runner's metrics lines) or after the last one only (an estimator, which shows none:
  each epoch's is seconds of dp-accounting). The padding overflow is checked every epoch.
  """

  epsilon_every_epoch = False

  def before_epoch(self, epoch: int) -> None:
    """Called before epoch `epoch` (0-based) is trained."""

  def after_epoch(self, epoch: int, state: train.TrainState, row: Row) -> bool:
    """Called with the epoch's state and metrics row; True stops the fit there."""
    del epoch, state, row
    return False


def _local_devices(mesh: Optional[Mesh]) -> list[jax.Device]:
  if mesh is None:
    return jax.devices()[:1]
  return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def check_memory(training: Training, data_shape: tuple[int, int, int]) -> None:
  """memory.check_memory of this training's models on data of (N, D, K) on its devices."""
  groups = 1 if training.mesh is None else parallel.model_groups(training.mesh)
  memory.check_memory(training.config, data_shape, _local_devices(training.mesh),
                      training.stack.num_models, groups)


def init_state(training: Training, data_shape: tuple[int, int, int]) -> train.TrainState:
  """The stack's fresh TrainState (leading model axis M) on the mesh. Call check_memory
  first (the runner does before its workdir exists): where the memory cannot hold the
  models, XLA would abort the process."""
  stack = training.stack
  _, in_dim, num_classes = data_shape
  state = train.init_state(stack.model_seeds, in_dim, training.config.hidden_dim,
                           num_classes, training.hp, stack.values)
  return state if training.mesh is None else parallel.shard_models(state, training.mesh)


def _model_values(training: Training, data: Data) -> dict[str, Array]:
  """Each model's swept values and train mask (M, ...), on the devices."""
  values = dict(training.stack.values)
  if data.train_mask is not None:
    values[train.TRAIN_MASK] = data.train_mask
  if training.mesh is None:
    return jax.device_put(values)
  return parallel.shard_models(values, training.mesh)


def _epoch_end_rates(training: Training) -> np.ndarray:
  """The configured peak's learning rate at each epoch's last step (epochs,), in one
  program (swept peaks scale them)."""
  last = np.arange(1, training.config.num_epochs + 1) * training.steps_per_epoch - 1
  return np.asarray(_schedule_program(training.hp)(last))


@functools.lru_cache(maxsize=16)
def _schedule_program(hp: spec.Hyperparams) -> Callable[[np.ndarray], Array]:
  """jit(vmap(the schedule of hp)): one per Hyperparams (compiled once per shape), not
  traced again by every fit of the same settings."""
  return jax.jit(jax.vmap(train_state.make_schedule(hp)))


def _add_learning_rate(training: Training, row: Row, rate: float) -> None:
  """The rate of the epoch's last step, to float32's 7 digits, in the row (and per model
  where the peak rate is swept: the rates scale with it)."""
  row["learning_rate"] = float(f"{rate:.7g}")
  values = training.stack.values
  if "learning_rate" in values:
    row["per_model"]["learning_rate"] = (
        row["learning_rate"] * values["learning_rate"] / training.config.learning_rate
    ).tolist()


def check_divergence(training: Training, row: Row) -> None:
  """The one divergence rule: Diverged when every model's loss is not finite; a sweep's
  diverged models rank last instead (stack.choose)."""
  if not np.all(stack_lib.diverged_models(row)):
    return
  losses = ", ".join(f"{k.removesuffix('_mean')} {v}" for k, v in row.items()
                     if k.endswith("_loss") or k.endswith("_loss_mean"))
  raise Diverged(f"training diverged in epoch {row['epoch']}: {losses}; the learning rate "
                 f"{training.config.learning_rate:g} is likely too high (try 10x lower, or ",
                 Named("clip_norm"), "=1).")


def _epoch_row(training: Training, train_epoch: Callable[..., Any],
               state: train.TrainState, data: Data, epoch: int, with_epsilon: bool
               ) -> tuple[train.TrainState, Row]:
  """(state, metrics row) of one epoch: train (train_epoch(state, epoch)), evaluate,
  ONE transfer to the host, the DP accountant (ε in the row if `with_epsilon`)."""
  start = time.time()
  state, device_metrics = train_epoch(state, epoch)
  params = train_state.averaged_params(state)          # the EMA with --ema_decay
  for name, (X_eval, y_eval, n_eval, rows) in data.splits.items():
    batching = evaluation.EVALUATION._replace(num_examples=n_eval, mesh=training.mesh,
                                              stacking=training.stack.stacking)
    ev = evaluation.evaluate(params, X_eval, y_eval, batching, rows,
                             net=train.network(training.hp))
    device_metrics[f"{name}_loss"], device_metrics[f"{name}_accuracy"] = (
        ev["loss"], ev["accuracy"])
  per_model = parallel.to_host(device_metrics)
  steps = (epoch + 1) * training.steps_per_epoch
  epsilon_all = None
  if training.dp is not None:   # RunError if a Poisson batch overflowed its padding
    epsilon_all = dp_plan.account(training.dp, per_model, steps, with_epsilon)
  row = stack_lib.metrics_row(epoch + 1, per_model, training.stack.num_models)
  if training.dp is not None:
    row["steps"] = steps
    if epsilon_all is not None:
      row["epsilon_all_models"] = epsilon_all
  row["seconds"] = time.time() - start
  row["examples_per_second"] = data.train[2] * training.stack.num_models / row["seconds"]
  return state, row


def fit(training: Training, state: train.TrainState, data: Data,
        hooks: Optional[Hooks] = None, first_epoch: int = 0
        ) -> tuple[train.TrainState, list[Row]]:
  """Trains `state` from epoch `first_epoch` to the config's epochs (or until a hook
  stops it); returns the state and the metrics row of each epoch trained. Raises
  Diverged, or dp_plan's RunError for an overflowed Poisson batch, at the epoch it
  happens (before its hooks)."""
  hooks = hooks or Hooks()
  X, y, n = data.train
  stack = training.stack
  batching = train.Batching(training.config.batch_size, n, training.mesh, stack.stacking,
                            shared_order=len(stack.seeds) == 1)
  program = train.make_train_epoch(training.hp, batching, training.dp and training.dp.dpsgd)
  values = _model_values(training, data)

  def train_epoch(state: train.TrainState, epoch: int) -> tuple[train.TrainState, Any]:
    return program(state, X, y, epoch, values)

  rates = _epoch_end_rates(training)
  rows = []
  for epoch in range(first_epoch, training.config.num_epochs):
    hooks.before_epoch(epoch)
    last = epoch + 1 == training.config.num_epochs
    state, row = _epoch_row(training, train_epoch, state, data, epoch,
                            hooks.epsilon_every_epoch or last)
    check_divergence(training, row)
    _add_learning_rate(training, row, float(rates[epoch]))
    rows.append(row)
    if hooks.after_epoch(epoch, state, row):
      break
  return state, rows
