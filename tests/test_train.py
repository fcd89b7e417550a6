"""The train step, the scanned epoch, evaluation and the optimizer of mlp_jax/training/train.py."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
import mlp_jax as mj
from mlp_jax.base import options
from mlp_jax.core import network
from mlp_jax.core.network import Network
from mlp_jax.core import privacy
from mlp_jax.training import evaluation
from mlp_jax.training import train
from mlp_jax.training import train_state


def tiny_data(n=10, d=5, k=3, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n, d)), jnp.float32),
          jnp.asarray(rng.integers(0, k, n), jnp.int32))


def first(tree):
  """Model 0 of a stack."""
  return jax.tree.map(lambda a: a[0], tree)


def test_batch_indices_use_every_example_once_and_mask_the_padding():
  order = jax.random.permutation(jax.random.key(0), 10)
  idx, w = train.batch_indices(order, 4)
  assert idx.shape == w.shape == (3, 4)
  np.testing.assert_array_equal(np.sort(idx[w > 0]), np.arange(10))
  np.testing.assert_array_equal(w.reshape(-1), [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(idx.reshape(-1), [*order, 0, 0])   # in order, padded with 0
  idx, w = train.batch_indices(order[:8], 4)                       # no padding
  np.testing.assert_array_equal(idx, order[:8].reshape(2, 4))
  np.testing.assert_array_equal(w, np.ones((2, 4)))


@jax.jit
def sgd_step_by_hand(params, X, y, learning_rate):
  """(params − η ∇L, L·B, correct) on the batch (X, y): the epoch tests' reference."""
  loss, g = mj.value_and_grads(params, X, y)
  hits = jnp.sum(jnp.argmax(mj.logits(params, X), -1) == y)
  return jax.tree.map(lambda p, gi: p - learning_rate * gi, params, g), loss * len(y), hits


def test_epoch_equals_a_python_loop_of_sgd_steps_on_the_real_batches():
  X, y = tiny_data(n=10)
  hp = train.Hyperparams(optimizer="sgd", learning_rate=0.1, schedule="constant",
                         weight_decay=0.0, label_smoothing=0.0)
  state = train.init_state([0], 5, 7, 3, hp)            # a stack of one model
  expected = first(state.params)
  order = np.asarray(train.epoch_order(state.key[0], 0, 10))
  loss_sum = hits = 0.0   # the epoch's metrics: each batch's, at the params it stepped from
  for batch in (order[0:4], order[4:8], order[8:10]):   # the ragged last batch has 2
    expected, batch_loss, batch_hits = sgd_step_by_hand(expected, X[batch], y[batch], 0.1)
    loss_sum, hits = loss_sum + float(batch_loss), hits + float(batch_hits)
  epoch = train.make_train_epoch(hp, train.Batching(4))
  state, metrics = epoch(state, X, y, 0, {})
  for got, want in zip(first(state.params), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert state.step.tolist() == [3]
  np.testing.assert_allclose(metrics["train_loss"][0], loss_sum / 10, rtol=1e-5)
  np.testing.assert_allclose(metrics["train_accuracy"][0], hits / 10, rtol=1e-6)


def test_a_masked_epoch_steps_on_the_kept_rows_and_skips_batches_without_any():
  X, y = tiny_data(n=10)
  hp = train.Hyperparams(optimizer="adam", learning_rate=0.1, schedule="constant",
                         label_smoothing=0.0)
  state = train.init_state([0], 5, 7, 3, hp)
  mask = np.zeros(10, np.float32)
  mask[[2, 7]] = 1                                      # a fold model keeping 2 rows
  order = np.asarray(train.epoch_order(state.key[0], 0, 10))
  # The adam steps of the batches (B = 4) holding a kept row, on those rows alone.
  optimizer = train.make_optimizer(hp)
  params, opt_state, steps = first(state.params), first(state.opt_state), 0

  @jax.jit
  def adam_step(params, opt_state, X, y):
    loss, g = mj.value_and_grads(params, X, y)
    updates, opt_state = optimizer.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss * len(y)

  loss_sum = 0.0
  for batch in (order[0:4], order[4:8], order[8:10]):
    kept = np.array([i for i in batch if mask[i]], np.int32)
    if kept.size:
      params, opt_state, batch_loss = adam_step(params, opt_state, X[kept], y[kept])
      steps, loss_sum = steps + 1, loss_sum + float(batch_loss)
  epoch = train.make_train_epoch(hp, train.Batching(4))
  state, metrics = epoch(state, X, y, 0, {train.TRAIN_MASK: mask[None]})
  for got, want in zip(first(state.params), params):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert state.step.tolist() == [steps] and steps < 3   # a batch without kept rows: no step
  np.testing.assert_allclose(metrics["train_loss"][0], loss_sum / 2, rtol=1e-5)  # 2 kept
  # Evaluated on its own rows: the held-out rows, weight 0 on the padding.
  rows = (np.array([[2, 7, 0]], np.int32), np.array([[1, 1, 0]], np.float32))
  ev = first(evaluation.evaluate(state.params, X, y, rows=rows, net=Network()))
  np.testing.assert_allclose(ev["loss"], mj.loss(params, X[np.array([2, 7])], y[np.array([2, 7])]), rtol=1e-5)
  np.testing.assert_allclose(ev["accuracy"], mj.accuracy(params, X[np.array([2, 7])], y[np.array([2, 7])]))


@pytest.mark.parametrize("shared_order", [False, True])
def test_a_masked_stack_takes_a_step_exactly_where_a_batch_has_rows(shared_order):
  """The epoch tests once, for all models, whether every batch of every model holds a row
  its mask weighs (every_batch_has_rows); only then do its steps go without
  keep_if_empty's select. Either way each model equals its own epoch with the select on
  every step: a stack whose batches all hold rows, and one where a model's batch holds
  held-out rows alone (that model keeps its state there, the other steps)."""
  X, y = tiny_data(n=10)
  hp = train.Hyperparams(optimizer="adam")
  states = train.init_state([0, 0], 5, 7, 3, hp)
  orders = jax.vmap(train.epoch_order, (0, None, None))(states.key, 0, 10)
  full = np.ones((2, 10), np.float32)
  full[0, np.asarray(orders[0, :3])] = 0       # model 0's first batch keeps one row
  emptied = full.copy()
  emptied[1, np.asarray(orders[1, 4:8])] = 0   # model 1's second batch keeps none
  assert bool(train.every_batch_has_rows(orders, full, 4))
  assert not bool(train.every_batch_has_rows(orders, emptied, 4))
  assert not bool(train.every_batch_has_rows(orders[0], emptied, 4))   # a shared order
  batching = train.Batching(4, shared_order=shared_order)
  epoch = train.make_train_epoch(hp, batching)
  step = train.make_train_step(hp, train.make_optimizer(hp))
  for masks, steps in ((full, [3, 3]), (emptied, [3, 2])):
    stack, _ = epoch(train.init_state([0, 0], 5, 7, 3, hp), X, y, 0,
                     {train.TRAIN_MASK: masks})
    assert stack.step.tolist() == steps
    for m in range(2):
      alone, _ = train.train_epoch(step, first(states), (X, y), orders[m], batching,
                                   jnp.asarray(masks[m]))
      chex.assert_trees_all_close(jax.tree.map(lambda a: a[m], stack.params),
                                  alone.params, rtol=1e-6, atol=1e-7)


def test_nothing_recompiles_after_the_first_epoch(monkeypatch):
  X, y = tiny_data(n=10)
  hp = train.Hyperparams(optimizer="adam", schedule="cosine", total_steps=12)
  optimizer = train.make_optimizer(hp)
  step = chex.assert_max_traces(train.make_train_step(hp, optimizer), n=1)
  epoch = jax.jit(lambda state, X, y, e: train.train_epoch(
      step, state, (X, y), train.epoch_order(state.key, e, 10), train.Batching(4)),
                  donate_argnums=(0,))
  # A fresh jit of evaluate: its trace count is this test's alone.
  evaluate = jax.jit(chex.assert_max_traces(evaluation.evaluate.__wrapped__, n=1),
                     static_argnames=("batching", "net"))
  state = first(train.init_state([0], 5, 7, 3, hp))
  for e in range(4):
    state, _ = epoch(state, X, y, e)
    evaluate(jax.tree.map(lambda a: a[None], state.params), X, y, train.Batching(4),
             net=Network())
  # The runner's jitted epoch: its body is traced once for three epochs.
  monkeypatch.setattr(train, "train_epoch", chex.assert_max_traces(train.train_epoch, n=1))
  runner_epoch = train.make_train_epoch(hp, train.Batching(4))
  states = train.init_state([0], 5, 7, 3, hp)
  for e in range(3):
    states, _ = runner_epoch(states, X, y, e, {})


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_train_step_is_one_sgd_step_on_the_weighted_smoothed_batch(compute_dtype):
  """params − η ∇L(params; x, (1 − ε) onehot + ε/K, w) in the step's compute dtype, and
  the metrics (L·Σw, Σ w·correct) at the params it stepped from."""
  X, y = tiny_data(n=6)
  w = jnp.array([1.0, 0.0, 1.0, 0.5, 1.0, 0.0])        # padding rows and a half weight
  hp = train.Hyperparams(optimizer="sgd", learning_rate=0.5, schedule="constant",
                         weight_decay=0.0, label_smoothing=0.2, compute_dtype=compute_dtype)
  optimizer = train.make_optimizer(hp)
  state = train.init_model_state(0, 5, 7, 3, optimizer)
  new, (loss_sum, hits) = jax.jit(train.make_train_step(hp, optimizer))(state, (X, y, w))
  targets = 0.8 * jax.nn.one_hot(y, 3) + 0.2 / 3
  dtype = None if compute_dtype == "float32" else jnp.bfloat16
  loss, g = mj.value_and_grads(state.params, X, targets, w, compute_dtype=dtype)
  want = jax.tree.map(lambda p, gi: p - 0.5 * gi, state.params, g)
  chex.assert_trees_all_close(new.params, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss_sum, loss * 3.5, rtol=1e-6)
  correct = jnp.argmax(mj.logits(state.params, X, compute_dtype=dtype), -1) == y
  np.testing.assert_allclose(hits, jnp.sum(w * correct), rtol=1e-6)
  assert int(new.step) == 1


def test_an_epoch_visits_the_first_num_examples_rows_only():
  """Rows past num_examples (a mesh's padding, parallel.shard_rows) are never trained on:
  the epoch equals the one over the rows alone, whatever the padding holds."""
  X, y = tiny_data(n=10)
  hp = train.Hyperparams(optimizer="sgd", schedule="constant")
  state = train.init_state([0], 5, 7, 3, hp)
  padded = (jnp.concatenate([X, jnp.full((2, 5), 1e3)]), jnp.concatenate([y, jnp.array([0, 1])]))
  alone = train.make_train_epoch(hp, train.Batching(4))(state, X, y, 0, {})
  state = train.init_state([0], 5, 7, 3, hp)    # the epoch donated the first
  chex.assert_trees_all_close(
      train.make_train_epoch(hp, train.Batching(4, 10))(state, *padded, 0, {}), alone, rtol=1e-6)


def test_epochs_shuffle_differently_and_reproducibly():
  key = jax.random.PRNGKey(3)
  assert not np.array_equal(train.epoch_order(key, 0, 50), train.epoch_order(key, 1, 50))
  order = np.asarray(train.epoch_order(key, 2, 50))
  np.testing.assert_array_equal(np.sort(order), np.arange(50))  # each row once
  # Pinned: a resume (and every process of a run) redraws exactly this order, so a
  # change of it would break the bit-identical resume of an older checkpoint.
  assert order[:12].tolist() == [17, 26, 33, 11, 46, 45, 15, 9, 12, 43, 5, 35]


def test_manual_autodiff_and_manual_vjp_train_the_same():
  X, y = tiny_data(n=30, d=6, k=4)
  finals = []
  for grads in ("manual", "autodiff", "manual_vjp"):
    hp = train.Hyperparams(optimizer="adamw", learning_rate=1e-2, schedule="warmup_cosine",
                           warmup_steps=2, total_steps=12, weight_decay=0.1,
                           label_smoothing=0.1, clip_norm=1.0, grads=grads)
    state = train.init_state([0], 6, 8, 4, hp)
    epoch = train.make_train_epoch(hp, train.Batching(8))
    for e in range(3):
      state, metrics = epoch(state, X, y, e, {})
    finals.append((state.params, float(metrics["train_loss"][0])))
  for params, loss in finals[1:]:
    np.testing.assert_allclose(loss, finals[0][1], rtol=1e-5)
    for a, b in zip(params, finals[0][0]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_evaluate_counts_every_example_once():
  X, y = tiny_data(n=11)
  params = mj.init_params(jax.random.key(1), 5, 7, 3)
  ev = first(evaluation.evaluate(jax.tree.map(lambda a: a[None], params), X, y, train.Batching(4),
                            net=Network()))
  np.testing.assert_allclose(ev["accuracy"], mj.accuracy(params, X, y), rtol=1e-6)
  np.testing.assert_allclose(ev["loss"], mj.loss(params, X, y), rtol=1e-5)
  np.testing.assert_array_equal(ev["predictions"], jnp.argmax(mj.logits(params, X), -1))


def test_evaluate_counts_the_first_rows_or_the_given_rows_and_their_weights(x64):
  """num_examples: the rows past it are padding; rows = (indices, weights): a k-fold
  model's held-out rows, weighted, padded with weight 0. float32 params evaluate in
  float32 whatever x64 says."""
  X, y = tiny_data(n=11)
  params = mj.init_params(jax.random.key(1), 5, 7, 3)
  stack = jax.tree.map(lambda a: a[None], params)
  ev = first(evaluation.evaluate(stack, X, y, train.Batching(4, 7), net=Network()))
  np.testing.assert_allclose(ev["loss"], mj.loss(params, X[:7], y[:7]), rtol=1e-6)
  np.testing.assert_allclose(ev["accuracy"], mj.accuracy(params, X[:7], y[:7]), rtol=1e-6)
  assert ev["loss"].dtype == jnp.float32 and ev["predictions"].shape == (7,)
  kept, weights = np.array([2, 7, 0]), np.array([1.0, 0.5, 0.0], np.float32)
  ev = first(evaluation.evaluate(stack, X, y, train.Batching(2), rows=(kept[None], weights[None]),
                            net=Network()))
  np.testing.assert_allclose(ev["loss"], mj.loss(params, X[kept], y[kept], weights), rtol=1e-6)
  np.testing.assert_allclose(ev["accuracy"], mj.accuracy(params, X[kept], y[kept], weights),
                             rtol=1e-6)
  np.testing.assert_array_equal(ev["predictions"], jnp.argmax(mj.logits(params, X[kept]), -1))


@pytest.mark.parametrize("name", options.OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
  X, y = tiny_data(n=32)
  hp = train.Hyperparams(optimizer=name, learning_rate=0.05, schedule="constant",
                         weight_decay=1e-3)
  state = train.init_state([0], 5, 16, 3, hp)
  before = float(mj.loss(first(state.params), X, y))
  epoch = train.make_train_epoch(hp, train.Batching(8))
  for e in range(5):
    state, _ = epoch(state, X, y, e, {})
  assert float(mj.loss(first(state.params), X, y)) < before


def test_schedules():
  hp = train.Hyperparams(learning_rate=1.0, schedule="warmup_cosine", warmup_steps=10,
                         total_steps=100)
  lr = train_state.make_schedule(hp)
  assert float(lr(0)) == 0 and float(lr(10)) == pytest.approx(1.0)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-6)
  cosine = train_state.make_schedule(hp._replace(schedule="cosine"))
  assert float(cosine(0)) == 1 and float(cosine(50)) == pytest.approx(0.5)
  assert float(train_state.make_schedule(hp._replace(schedule="constant"))(77)) == 1
  # A run shorter than its warmup still warms up, then decays to 0 one step later; a
  # cosine over no steps is one step long.
  short = train_state.make_schedule(hp._replace(total_steps=5))
  assert float(short(10)) == pytest.approx(1.0) and float(short(11)) == pytest.approx(0.0)
  empty = train_state.make_schedule(hp._replace(schedule="cosine", total_steps=0))
  assert [float(empty(s)) for s in (0, 1)] == [1.0, 0.0]
  # One peak per model (a sweep): each model's schedule is the schedule of its peak.
  peaks = jnp.array([0.5, 2.0])
  swept = train_state.make_schedule(hp._replace(learning_rate=peaks))
  for step in (0, 5, 10, 60):
    np.testing.assert_allclose(swept(step), [train_state.make_schedule(hp._replace(
        learning_rate=float(p)))(step) for p in peaks], rtol=1e-6)
  with pytest.raises(ValueError, match=r"^unknown schedule 'linear'; choose one of "
                     r"constant, cosine, warmup_cosine\.$"):
    train_state.make_schedule(hp._replace(schedule="linear"))


def hand_updates(name, grads, params, lr, wd, clip):
  """The param steps of `name` for the gradients g_1, g_2, ... (lists of 4 arrays), by its
  textbook rule: g clipped to global norm `clip`; L2 (sgd, momentum, adam: g + wd·W) or
  decoupled decay (adamw: − lr·wd·W) of the weights only; nesterov momentum 0.9; adam's
  bias-corrected moments (0.9, 0.999, ε = 1e-8)."""
  weights = (True, False, True, False)
  m, v, trace, steps = [0.0] * 4, [0.0] * 4, [0.0] * 4, []
  for t, g in enumerate(grads, start=1):
    norm = np.sqrt(sum(np.sum(gi ** 2) for gi in g))
    g = [gi * min(1.0, clip / norm) for gi in g]
    if name != "adamw":
      g = [gi + wd * p if w else gi for gi, p, w in zip(g, params, weights)]
    if name == "sgd":
      step = [-lr * gi for gi in g]
    elif name == "momentum":
      trace = [gi + 0.9 * ti for gi, ti in zip(g, trace)]
      step = [-lr * (gi + 0.9 * ti) for gi, ti in zip(g, trace)]
    else:
      m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
      v = [0.999 * vi + 0.001 * gi ** 2 for vi, gi in zip(v, g)]
      step = [-lr * (mi / (1 - 0.9 ** t)) / (np.sqrt(vi / (1 - 0.999 ** t)) + 1e-8)
              for mi, vi in zip(m, v)]
      if name == "adamw":
        step = [s - lr * wd * p if w else s for s, p, w in zip(step, params, weights)]
    params = [p + s for p, s in zip(params, step)]
    steps.append(params)
  return steps


@pytest.mark.parametrize("name", options.OPTIMIZERS)
def test_each_optimizer_is_its_update_rule_by_hand(name):
  """make_optimizer's chain, three steps of given gradients, against hand_updates: the
  clip, the decay (biases never) and the optimizer, in that order."""
  rng = np.random.default_rng(0)
  params = mj.Params(*[rng.standard_normal(shape).astype(np.float32)
                       for shape in ((4, 3), (4,), (2, 4), (2,))])
  grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params]
           for _ in range(3)]
  hp = train.Hyperparams(optimizer=name, learning_rate=0.1, schedule="constant",
                         weight_decay=0.2, clip_norm=1.5)
  optimizer = train.make_optimizer(hp)
  update = jax.jit(lambda g, state, p: optimizer.update(mj.Params(*g), state, p))
  state, p = optimizer.init(params), params
  for g, want in zip(grads, hand_updates(name, grads, list(params), 0.1, 0.2, 1.5)):
    updates, state = update(g, state, p)
    p = optax.apply_updates(p, updates)
    for got, expected in zip(p, want):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # A sweep's clip norm is traced, one per model: 0 means no clipping for that model.
  swept = jax.jit(lambda g, c: train.make_optimizer(hp._replace(clip_norm=c)).update(
      mj.Params(*g), optimizer.init(params), params)[0])
  for c, clip in ((0.0, np.inf), (0.5, 0.5)):
    want = hand_updates(name, grads[:1], list(params), 0.1, 0.2, clip)[0]
    for got, p, expected in zip(swept(grads[0], c), params, want):
      np.testing.assert_allclose(p + got, expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"^unknown optimizer 'rmsprop'; choose one of "
                     + re.escape(", ".join(options.OPTIMIZERS)) + r"\.$"):
    train.make_optimizer(hp._replace(optimizer="rmsprop"))


def test_weight_decay_leaves_biases_alone():
  params = mj.init_params(jax.random.key(0), 3, 4, 2)
  params = params._replace(b1=jnp.ones(4), b2=jnp.ones(2))
  zero = jax.tree.map(jnp.zeros_like, params)
  for name in ("sgd", "adamw"):
    optimizer = train.make_optimizer(train.Hyperparams(
        optimizer=name, learning_rate=0.1, schedule="constant", weight_decay=0.5))
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    assert not jnp.any(updates.b1) and not jnp.any(updates.b2)
    assert jnp.all(updates.w1 * params.w1 <= 0) and jnp.any(updates.w1)


def test_label_smoothing_targets():
  Y = train.smooth_targets(jnp.array([0, 2]), 3, 0.3)
  np.testing.assert_allclose(Y, [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]], rtol=1e-6)
  np.testing.assert_array_equal(train.smooth_targets(jnp.array([1]), 3, 0.0), [1])


def test_schedule_restarts_a_cycle_at_each_restart_step():
  hp = train.Hyperparams(learning_rate=1.0, schedule="warmup_cosine", warmup_steps=2,
                         total_steps=15, restart_steps=(10,))
  lr = train_state.make_schedule(hp)
  first = optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10)
  second = optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 5)
  np.testing.assert_allclose([lr(s) for s in range(15)],
                             [first(s) for s in range(10)] + [second(s) for s in range(5)],
                             atol=1e-7)


def test_smoothed_targets_of_a_bad_label_are_nan_under_jit():
  Y = jax.jit(train.smooth_targets, static_argnums=(1, 2))(jnp.array([0, 5]), 3, 0.3)
  assert bool(jnp.all(jnp.isfinite(Y[0]))) and bool(jnp.all(jnp.isnan(Y[1])))


@pytest.mark.slow  # compiles over a hundred small programs: seconds
def test_bfloat16_gradients_under_jit_match_float32():
  """The bfloat16 path runs under jit (XLA's CPU runtime has no bfloat16 kernel for one
  of its products, Δ2ᵀ A1, which stays float32) and, leaf by leaf, is within 1% in norm
  of float32 arithmetic on the bfloat16-rounded params and X; so are the DP clipped sum
  and a stack of models. Not closer: the path also rounds Δ1 for dW1, which this
  reference does not (test_gradients.py's bfloat16 test rounds where the path rounds,
  and holds the gradient to float32's summation error)."""
  params = mj.init_params(jax.random.key(0), 48, 64, 10)
  X = jax.random.normal(jax.random.key(1), (96, 48))
  y = jax.random.randint(jax.random.key(2), (96,), 0, 10)
  Y, mask = jax.nn.one_hot(y, 10), jnp.ones(96)
  rounded = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), t)
  grads = jax.jit(mj.grads, static_argnames="compute_dtype")
  clipped = jax.jit(lambda p, X, dt: privacy.clipped_sum_with_logits(
      Network(compute_dtype=dt), p, X, Y, mask, privacy.Clip(1.0))[1], static_argnums=2)
  stack = jax.tree.map(lambda a: jnp.stack([a, -0.5 * a]), params)  # two models
  stacked = jax.jit(jax.vmap(lambda p, dt: mj.grads(p, X, y, compute_dtype=dt),
                             in_axes=(0, None)), static_argnums=1)
  pairs = ((grads(params, X, y, compute_dtype=jnp.bfloat16),
            mj.grads(rounded(params), rounded(X), y)),
           (clipped(params, X, jnp.bfloat16), clipped(rounded(params), rounded(X), None)),
           (stacked(stack, jnp.bfloat16),
            jax.vmap(lambda p: mj.grads(p, rounded(X), y))(rounded(stack))))
  for bf16, f32 in pairs:
    for got, want in zip(bf16, f32):
      assert got.dtype == jnp.float32
      assert float(jnp.linalg.norm(got - want)) <= 1e-2 * float(jnp.linalg.norm(want))


def _dots_of(fn, *args):
  """[(lhs, rhs)] of every dot XLA compiled, each operand as (dtype, shape)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  types = {name: (dtype, tuple(int(n) for n in shape.split(",") if n))
           for name, dtype, shape in re.findall(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]", text)}
  return [(types[a], types[b])
          for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", text)]


def test_bfloat16_hidden_products_compile_to_bfloat16_gemms():
  """In the feature-major kernel (choose_layout's pick on an AMX CPU), both H × D
  products of the manual bfloat16 pass, Z1ᵀ = W1 Xᵀ (H, B) and dW1 = Δ1ᵀ X (H, D), reach
  XLA's CPU backend with bfloat16 operands (its fast GEMM), for one model and a stack.
  The batch-major reference, like jax.grad's transpose of the same forward pass, gets
  dW1 upcast to float32 (so the check can fail)."""
  if jax.default_backend() != "cpu":   # asked here, not at import: collecting starts no JAX
    pytest.skip("XLA's CPU runtime")
  b, d, h, k = 96, 48, 64, 10
  params = mj.init_params(jax.random.key(0), d, h, k)
  X = jax.random.normal(jax.random.key(1), (b, d))
  y = jax.random.randint(jax.random.key(2), (b,), 0, k)
  bf16, fm = jnp.bfloat16, network.FEATURE_MAJOR
  stack = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  runs = {
      "grads": lambda p, X: conftest.manual_grads(fm)(p, X, y, compute_dtype=bf16),
      "stack": lambda p, X: jax.vmap(lambda q: conftest.manual_grads(fm)(
          q, X, y, compute_dtype=bf16))(p)}
  def dtypes_of_products_with_x(fn, p):  # W1 Xᵀ and Δ1ᵀ X: X (B, D) is an operand
    return [(lhs[0], rhs[0]) for lhs, rhs in _dots_of(fn, p, X)
            if (b, d) in (lhs[1][-2:], rhs[1][-2:])]

  for name, fn in runs.items():
    dtypes = dtypes_of_products_with_x(fn, stack if name == "stack" else params)
    assert dtypes == [("bf16", "bf16")] * 2, (name, dtypes)
  for other in (mj.autodiff_grads,
                conftest.manual_grads(network.BATCH_MAJOR)):
    dtypes = dtypes_of_products_with_x(lambda p, X: other(p, X, y, compute_dtype=bf16),  # pylint: disable=cell-var-from-loop
                                       params)
    assert ("f32", "f32") in dtypes, dtypes


def test_ema_is_the_hand_computed_average_of_the_iterates():
  """--ema_decay β: averaged_params is Σ_i (1 − β) β^(t−i) θ_i / (1 − β^t) over the params
  θ_1..θ_t after each step (the bias-corrected EMA), per model of a stack; β = 0 is the
  params themselves, and before any step it is the init."""
  beta = 0.6
  hp = train.Hyperparams(optimizer="sgd", learning_rate=0.5, schedule="constant",
                         weight_decay=0.1, label_smoothing=0.0, ema_decay=beta)
  assert len(train.make_optimizer(hp).init(mj.init_params(jax.random.key(0), 2, 2, 2))) == 3
  optimizer = train.make_optimizer(hp)
  state = train.init_model_state(0, 5, 4, 3, optimizer)
  chex.assert_trees_all_equal(train_state.averaged_params(state), state.params)
  X = jax.random.normal(jax.random.key(1), (6, 5))
  batch = (X, jnp.arange(6) % 3, jnp.ones(6))
  step = jax.jit(train.make_train_step(hp, optimizer))
  iterates = []
  for _ in range(4):
    state, _ = step(state, batch)
    iterates.append(state.params)
  t = len(iterates)
  weights = [(1 - beta) * beta ** (t - i) / (1 - beta ** t) for i in range(1, t + 1)]
  by_hand = jax.tree.map(lambda *leaves: sum(w * a for w, a in zip(weights, leaves)),
                         *iterates)
  chex.assert_trees_all_close(train_state.averaged_params(state), by_hand, rtol=1e-6, atol=1e-7)
  assert not np.allclose(by_hand.w1, state.params.w1)
  ema = train_state.params_ema(beta)
  with pytest.raises(ValueError, match=r"^params_ema averages the params: pass them, "
                     r"optimizer\.update\(updates, state, params\)\.$"):
    ema.update(state.params, ema.init(state.params))
  # A stack sweeping β = 0 and β: model 0's average is its params, model 1's its EMA.
  hp = hp._replace(ema_decay=jnp.array([0.0, beta]))
  stack = train.init_state([0, 0], 5, 4, 3, hp, {"ema_decay": [0.0, beta]})
  epoch = train.make_train_epoch(hp, train.Batching(6, 6))
  for e in range(4):
    stack, _ = epoch(stack, X, batch[1], e, {"ema_decay": jnp.array([0.0, beta])})
  averaged = train_state.averaged_params(stack)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], averaged),
                              jax.tree.map(lambda a: a[0], stack.params), rtol=1e-6)
  assert not np.allclose(averaged.w1[1], stack.params.w1[1])


def test_the_ema_state_has_the_checkpoints_dtypes_whatever_x64_says(x64):
  """count int32, β float32, the average in the params' dtype: a checkpoint's tree."""
  params = mj.init_params(jax.random.key(0), 3, 4, 2)               # float32
  ema_state = train.make_optimizer(train.Hyperparams(ema_decay=0.5)).init(params)[-1]
  assert (ema_state.count.dtype, ema_state.decay.dtype) == (jnp.int32, jnp.float32)
  assert all(leaf.dtype == jnp.float32 for leaf in ema_state.ema)


@pytest.mark.parametrize("dims", [(6, 16, 3), (64, 256, 10), (40, 1024, 4)])
def test_the_stacks_init_is_each_model_built_alone_bit_for_bit(dims):
  """init_state is one jitted vmap; it must give the very params, optimizer state and key
  of init_model_state run eagerly for each seed (the runner's params.npz depends on it)."""
  hp = train.Hyperparams(ema_decay=0.5)
  decays = [0.5, 0.9, 0.99]   # swept: each model's EMA state holds its own β
  stack = train.init_state([0, 7, 2**31 - 1], *dims, hp,
                           {"learning_rate": [1e-3, 2e-3, 3e-3], "ema_decay": decays})
  for m, seed in enumerate((0, 7, 2**31 - 1)):
    optimizer = train.make_optimizer(hp._replace(ema_decay=decays[m]))
    alone = train.init_model_state(seed, *dims, optimizer)
    chex.assert_trees_all_equal(jax.tree.map(lambda a, m=m: a[m], stack), alone,
                                strict=True)
    # One model: PRNGKey(seed) split in two, the params from the first key, the second
    # kept for the batch order and DP noise, no step yet.
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = mj.init_params(init_key, *dims)
    chex.assert_trees_all_equal(alone, train.TrainState(
        params, optimizer.init(params), jnp.zeros((), jnp.int32), data_key), strict=True)


@pytest.mark.parametrize("field, zero, value", [("ema_decay", 0.0, 0.5),
                                                 ("clip_norm", 0.0, 1.0),
                                                 ("weight_decay", 0.0, 0.1)])
def test_the_optimizer_state_depends_on_the_values_not_their_form(field, zero, value):
  """A Python float, a NumPy scalar and a JAX array of the same value build the same
  chain, so the same checkpoint tree; 0 drops the transformation, any nonzero (or one
  nonzero model of a stack) keeps it."""
  params = mj.init_params(jax.random.key(0), 5, 4, 3)

  def tree_of(v):
    hp = train.Hyperparams(optimizer="sgd", **{field: v})
    return jax.tree.structure(train.make_optimizer(hp).init(params))

  for v in (value, np.float32(value), jnp.asarray(value), np.array([0.0, value])):
    assert tree_of(v) == tree_of(value), v
  for v in (zero, np.float32(zero), jnp.asarray(zero), np.zeros(3)):
    assert tree_of(v) == tree_of(zero), v
  assert tree_of(zero) != tree_of(value)


@functools.partial(jax.jit, static_argnames=("hp", "dp"))
def hand_dp_step(params, X, y, key, step, hp, dp):
  """One DP-SGD step with sgd, written apart from train.py: the Poisson batch of
  (key, step) (example j sampled when u_j < q), each sampled example's autodiff gradient
  of its label-smoothed loss clipped to C (flat), their sum plus σC·N(0, I) per leaf,
  over q·N; and the metrics of the params it stepped from (Σ loss, Σ correct, rows)."""
  sample_key, noise_key = privacy.step_keys(key, step)
  sampled = (jax.random.uniform(sample_key, (dp.num_examples,)) < dp.sampling_rate
             ).astype(jnp.float32)
  K = params.b2.shape[0]

  def example_loss(p, x, label):
    z2 = p.w2 @ jnp.maximum(p.w1 @ x + p.b1, 0) + p.b2
    t = (1 - hp.label_smoothing) * jax.nn.one_hot(label, K) + hp.label_smoothing / K
    return -jnp.sum(t * jax.nn.log_softmax(z2)), jnp.argmax(z2) == label

  (loss, hit), g = jax.vmap(jax.value_and_grad(example_loss, has_aux=True),
                            in_axes=(None, 0, 0))(params, X, y)
  norm = jnp.sqrt(sum(jnp.sum(leaf.reshape(len(y), -1) ** 2, axis=1) for leaf in g))
  weight = sampled * jnp.minimum(1.0, dp.clip_norm / norm)
  keys = jax.random.split(noise_key, 4)
  noisy = [jnp.tensordot(weight, leaf, axes=1)
           + dp.noise_multiplier * dp.clip_norm * jax.random.normal(k, leaf.shape[1:])
           for leaf, k in zip(g, keys)]
  new = mj.Params(*[p - hp.learning_rate * n / (dp.sampling_rate * dp.num_examples)
                    for p, n in zip(params, noisy)])
  return new, (jnp.sum(sampled * loss), jnp.sum(sampled * hit), jnp.sum(sampled))


def test_a_dp_step_is_the_noisy_clipped_sum_of_its_poisson_batch():
  X, y = tiny_data(n=12)
  y = y.at[0].set(0)  # example 0, the padding slots' index, predicted right: not a hit
  hp = train.Hyperparams(optimizer="sgd", learning_rate=0.5, schedule="constant",
                         weight_decay=0.0, label_smoothing=0.1)
  dp = privacy.DPSGD(noise_multiplier=0.7, clip_norm=0.3, clipping="flat",
                     sampling_rate=0.4, num_examples=12, padded_batch_size=9)
  optimizer = train.make_optimizer(hp)
  state = train.init_model_state(0, 5, 7, 3, optimizer)
  step = jax.jit(train.make_dp_train_step(hp, optimizer, dp))
  for t in range(2):
    want, (loss_sum, hits, count) = hand_dp_step(state.params, X, y, state.key, t, hp, dp)
    assert 0 < count < 12
    state, metrics = step(state, (X, y))
    chex.assert_trees_all_close(state.params, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics[0], loss_sum, rtol=1e-5)
    assert [float(m) for m in metrics[1:]] == [float(hits), float(count), 0.0]  # 0: no overflow
  assert int(state.step) == 2
  # More rows sampled than the padded batch holds: reported, for the runner to stop.
  small = jax.jit(train.make_dp_train_step(hp, optimizer, dp._replace(padded_batch_size=2)))
  assert bool(small(state, (X, y))[1][3])


def test_a_bfloat16_dp_step_runs_the_clipped_sum_in_bfloat16():
  """The step's sum is privacy.clipped_sum_with_logits with compute_dtype=bfloat16 (whose
  own test checks it against float32 arithmetic on the rounded operands), then noise;
  float32 params stay float32, also with x64 on (traced: dtypes are fixed at trace time)."""
  X, y = tiny_data(n=12)
  hp = train.Hyperparams(optimizer="sgd", learning_rate=0.5, schedule="constant",
                         weight_decay=0.0, label_smoothing=0.0, compute_dtype="bfloat16")
  dp = privacy.DPSGD(noise_multiplier=0.7, clip_norm=0.3, clipping="flat",
                     sampling_rate=0.4, num_examples=12, padded_batch_size=9)
  optimizer = train.make_optimizer(hp)
  state = train.init_model_state(0, 5, 7, 3, optimizer)
  step = train.make_dp_train_step(hp, optimizer, dp)
  new, _ = jax.jit(step)(state, (X, y))

  @jax.jit
  def by_hand(state):
    sample_key, noise_key = privacy.step_keys(state.key, 0)
    i, mask, _ = privacy.poisson_batch(sample_key, 12, 0.4, 9)
    _, grad_sum, _ = privacy.clipped_sum_with_logits(
        Network(compute_dtype="bfloat16"), state.params, X[i],
        jax.nn.one_hot(y[i], 3, dtype=jnp.float32), mask, privacy.Clip(0.3))
    g = privacy.add_noise(grad_sum, noise_key, 0.7, 0.3, "flat", 0.4 * 12)
    return jax.tree.map(lambda p, gi: p - 0.5 * gi, state.params, g)

  chex.assert_trees_all_close(new.params, by_hand(state), rtol=1e-6, atol=1e-7)
  with conftest.float64():
    traced, _ = jax.eval_shape(step, state, (X, y))
  assert all(leaf.dtype == jnp.float32 for leaf in traced.params)


def test_a_dp_epoch_is_its_steps_with_the_mean_over_the_sampled_rows():
  X, y = tiny_data(n=12)
  hp = train.Hyperparams(optimizer="sgd", learning_rate=0.5, schedule="constant")
  dp = privacy.DPSGD(noise_multiplier=0.7, clip_norm=0.3, clipping="flat",
                     sampling_rate=0.4, num_examples=12, padded_batch_size=5)
  optimizer = train.make_optimizer(hp)
  step = jax.jit(train.make_dp_train_step(hp, optimizer, dp))
  state = by_steps = train.init_model_state(0, 5, 7, 3, optimizer)
  sums = np.zeros(4)
  for _ in range(3):
    by_steps, metrics = step(by_steps, (X, y))
    sums += np.array([float(m) for m in metrics])
  epoch = jax.jit(functools.partial(train.dp_train_epoch, step, steps=3))
  state, metrics = epoch(state, X, y, 0)
  chex.assert_trees_all_close(state, by_steps, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["train_loss"], sums[0] / sums[2], rtol=1e-5)
  np.testing.assert_allclose(metrics["train_accuracy"], sums[1] / sums[2], rtol=1e-6)
  assert int(metrics["overflows"]) == sums[3] > 0   # 5 slots for 4.8 rows on average: some overflow
  # At these keys q = 0.08 samples one row in the 3 steps, q = 0.02 none (metrics 0).
  for rate, rows in ((0.08, 1), (0.02, 0)):
    few = jax.jit(train.make_dp_train_step(hp, optimizer, dp._replace(sampling_rate=rate)))
    by_steps, sums = train.init_model_state(0, 5, 7, 3, optimizer), np.zeros(4)
    for _ in range(3):
      by_steps, metrics = few(by_steps, (X, y))
      sums += np.array([float(m) for m in metrics])
    few_epoch = jax.jit(functools.partial(train.dp_train_epoch, few, steps=3))
    metrics = few_epoch(train.init_model_state(0, 5, 7, 3, optimizer), X, y, 0)[1]
    assert sums[2] == rows
    np.testing.assert_allclose(metrics["train_loss"], sums[0] / max(rows, 1), rtol=1e-5)
    assert float(metrics["train_accuracy"]) == sums[1] / max(rows, 1)


def test_a_private_stack_is_each_models_dp_epoch_with_its_own_noise():
  """make_train_epoch with a DPSGD: model m runs ceil(N / B) DP steps of its own σ_m
  (a swept dp_noise_multiplier), as dp_train_epoch of its step alone."""
  X, y = tiny_data(n=12)
  hp = train.Hyperparams(optimizer="sgd", learning_rate=0.5, schedule="constant")
  dp = privacy.DPSGD(noise_multiplier=1.0, clip_norm=0.3, clipping="flat",
                     sampling_rate=0.4, num_examples=12, padded_batch_size=9)
  sigmas = jnp.array([0.7, 2.0])
  states, metrics = train.make_train_epoch(hp, train.Batching(5), dp)(
      train.init_state([0, 1], 5, 7, 3, hp), X, y, 0, {"dp_noise_multiplier": sigmas})
  optimizer = train.make_optimizer(hp)

  @jax.jit
  def alone_epoch(state, sigma):
    step = train.make_dp_train_step(hp, optimizer, dp._replace(noise_multiplier=sigma))
    return train.dp_train_epoch(step, state, X, y, 0, steps=3)  # ceil(12 / 5)

  for m, sigma in enumerate(sigmas):
    alone, alone_metrics = alone_epoch(train.init_model_state(m, 5, 7, 3, optimizer), sigma)
    assert int(alone.step) == 3
    chex.assert_trees_all_close(jax.tree.map(lambda a, m=m: a[m], (states, metrics)),
                                (alone, alone_metrics), rtol=1e-5, atol=1e-7)


def test_map_models_is_fn_on_each_model_alone_in_every_stacking_and_grouping():
  """Model m's output is fn(model m), whether the M models are vmapped, mapped or split
  into groups (one per slice of a mesh's model axis); one model is fn itself, unbatched."""
  tree = jnp.arange(24.0).reshape(4, 6)
  fn = lambda model: model * 2 + jnp.sum(model)   # reads the whole model
  want = jnp.stack([fn(model) for model in tree])
  for stacking in train.STACKINGS:
    for groups in (1, 2, 4):
      np.testing.assert_array_equal(train.map_models(fn, tree, stacking, groups), want)
  batched = []
  def recording(model):
    batched.append(isinstance(model, jax.core.Tracer))
    return fn(model)
  np.testing.assert_array_equal(train.map_models(recording, tree[:1], "vmap", 1), want[:1])
  assert batched == [False]
  with pytest.raises(ValueError, match=r"^unknown stacking 'scan'; choose one of vmap, map\.$"):
    train.map_models(fn, tree, "scan", 1)


def test_with_values_sets_one_models_swept_fields_and_leaves_the_rest():
  """A model's values {name: value}: Hyperparams fields by name, dp_* into the DPSGD,
  the k-fold train mask into neither."""
  hp = train.Hyperparams(learning_rate=0.1, weight_decay=0.2)
  dp = privacy.DPSGD(noise_multiplier=1.0, clip_norm=0.3, clipping="flat",
                     sampling_rate=0.4, num_examples=12, padded_batch_size=9)
  values = {"learning_rate": 0.5, "dp_clip_norm": 2.0, "dp_noise_multiplier": 3.0,
            train.TRAIN_MASK: np.ones(4)}
  model_hp, model_dp = train.with_values(hp, dp, values)
  assert model_hp == hp._replace(learning_rate=0.5)
  assert model_dp == dp._replace(clip_norm=2.0, noise_multiplier=3.0)
  assert train.with_values(hp, None, values) == (model_hp, None)
  assert train.with_values(hp, dp, {}) == (hp, dp)


def test_a_transformation_is_in_use_where_any_value_is_nonzero_or_traced():
  """_in_use decides the optimizer chain, so the checkpoint's tree: a nonzero value in
  any form, any nonzero model of a stack, and any traced value (a sweep's, inside the
  program) keep the transformation; zeros of every form drop it."""
  for value in (0.5, -1, np.float32(2.0), jnp.asarray(0.1), np.array([0.0, 0.3])):
    assert train_state.in_use(value), value
  for value in (0, 0.0, np.float32(0.0), jnp.asarray(0.0), np.zeros(3)):
    assert not train_state.in_use(value), value
  assert jax.jit(lambda v: jnp.float32(train_state.in_use(v)))(0.0) == 1.0
  assert [train_state._is_array(v) for v in (1, 0.5, np.float32(0.5), jnp.ones(2))] == [
      False, False, True, True]


def test_keep_if_empty_keeps_the_state_and_zeroes_the_metrics_of_a_batch_without_rows():
  optimizer = train.make_optimizer(train.Hyperparams(optimizer="adam"))
  state = train.init_model_state(0, 5, 4, 3, optimizer)
  stepped = jax.tree.map(lambda a: a + 1, state)
  metrics = (jnp.float32(2.5), jnp.float32(1.0))
  kept, zeros = train.keep_if_empty(jnp.array(False), (stepped, metrics), state)
  chex.assert_trees_all_equal(kept, state)
  assert [float(m) for m in zeros] == [0.0, 0.0]
  kept, same = train.keep_if_empty(jnp.array(True), (stepped, metrics), state)
  chex.assert_trees_all_equal(kept, stepped)
  assert [float(m) for m in same] == [2.5, 1.0]


def test_default_stacking_maps_big_models_on_a_cpu_only():
  """map from B·D·H = 2^22 multiply-adds per model on a CPU; vmap below it and off CPUs."""
  assert train.default_stacking("cpu", 64, 256, 256) == "map"          # 2^22
  assert train.default_stacking("cpu", 64, 256, 255) == "vmap"
  assert train.default_stacking("cpu", 128, 784, 1024) == "map"
  assert train.default_stacking("gpu", 128, 784, 1024) == "vmap"
  assert train.default_stacking("tpu", 2**11, 2**11, 2**11) == "vmap"
