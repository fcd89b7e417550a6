"""Evaluation: the loss, accuracy and predictions of a stack of models on resident rows,
in batches of EVALUATION's 1024 rows (each model's own rows where a k-fold model is
evaluated on its held-out fold), one jitted program per shape."""

import functools
from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp

from mlp_jax.core import losses, model
from mlp_jax.core.model import Params
from mlp_jax.core.network import Network
from mlp_jax.training import parallel
from mlp_jax.training.train import Batching, Metrics, batch_indices, gather_batch, map_models


def evaluate_model(net: Network, params: Params, X: Array, y: Array, batching: Batching,
                   rows: Optional[tuple[Array, Array]] = None) -> Metrics:
  """ONE model's loss, accuracy and predictions (N,) over the first N rows of X
  (Batching), every example counted once; with a mesh each batch is split over its data
  axis. rows = (indices (R,), weights (R,)): the rows it is evaluated on instead (a
  k-fold model's held-out rows, padded with weight 0), predictions (R,). Not jitted:
  see evaluate."""
  batch_size, mesh = batching.batch_size, batching.mesh
  n = X.shape[0] if batching.num_examples is None else batching.num_examples
  if rows is not None:
    n = rows[0].shape[0]
  batch_size = min(batch_size, n)
  if mesh is not None:
    shards = parallel.data_shards(mesh)
    batch_size = -(-batch_size // shards) * shards
  idx, w = batch_indices(jnp.arange(n), batch_size)
  if rows is not None:
    idx, w = rows[0][idx], w * rows[1][idx]

  def body(_: None, batch: tuple[Array, Array]) -> tuple[None, tuple[Array, Array, Array]]:
    i, wb = batch
    z2 = model.batch_logits(net, params, gather_batch(X, i, mesh))
    Y = losses.targets(gather_batch(y, i, mesh), z2.shape[-1], z2.dtype)
    hits = jnp.argmax(z2, axis=-1) == gather_batch(y, i, mesh)
    return None, (jnp.sum(wb * losses.cross_entropy(z2, Y)), jnp.sum(wb * hits),
                  jnp.argmax(z2, axis=-1))

  _, (loss_sums, hits, predicted) = jax.lax.scan(body, None, (idx, w))
  count = n if rows is None else jnp.sum(rows[1])
  return {"loss": jnp.sum(loss_sums) / count, "accuracy": jnp.sum(hits) / count,
          "predictions": predicted.reshape(-1)[:n]}


EVALUATION = Batching(1024)   # an evaluation's batches: 1024 rows


@functools.partial(jax.jit, static_argnames=("batching", "net"))
def evaluate(params: Params, X: Array, y: Array, batching: Batching = EVALUATION,
             rows: Optional[tuple[Array, Array]] = None, *, net: Network) -> Metrics:
  """evaluate_model of each model of stacked Params (leading axis M), the network `net`:
  loss (M,), accuracy (M,), predictions (M, N); the models mapped as batching.stacking
  says. rows = (indices (M, R), weights (M, R)): each model's own rows (see
  evaluate_model)."""
  mesh = batching.mesh
  groups = 1 if mesh is None else parallel.model_groups(mesh)
  results = map_models(lambda pr: evaluate_model(net, pr[0], X, y, batching, pr[1]),
                       (params, rows), batching.stacking, groups)
  if mesh is None:
    return results
  return jax.lax.with_sharding_constraint(results, parallel.model_sharded(mesh))
