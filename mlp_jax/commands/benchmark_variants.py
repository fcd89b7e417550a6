"""The benchmark's variants and peers, each a run() of `cfg.steps` training steps and
its compile seconds: the runner's step and epoch (every gradient, dtype, device count),
a stack of models, the DP-SGD ways, plain JAX, PyTorch and Opacus.
experiments/benchmark.py runs them."""

import functools
import time

import jax
import jax.numpy as jnp
import optax

import mlp_jax as mj
from mlp_jax.base import compilation, options
from mlp_jax.core import privacy
from mlp_jax.training import parallel, train

from mlp_jax.commands.benchmark_harness import temp_memory_mb

# The manual step in one named layout (options.LAYOUT_ROWS); "manual" is the one
# network.choose_layout picks for each dtype on this machine.
LAYOUT_ROWS = options.LAYOUT_ROWS


@functools.lru_cache(maxsize=2)
def synthetic_data(n, d, k):
  """Random inputs X (N, D) and labels y (N,) in [0, K), on the device, made once per size."""
  x = jax.random.normal(jax.random.key(2), (n, d), jnp.float32)
  y = jax.random.randint(jax.random.key(3), (n,), 0, k)
  return x, y


def epochs_run(fn, state, x, y):
  """(run, compile seconds, temporary MiB) of a jitted epoch program `fn`
  (train.make_train_epoch) from `state` on (x, y): each run() trains the next epoch and
  waits for it."""
  start = time.perf_counter()
  compiled = fn.lower(state, x, y, 0, {}).compile()
  compile_seconds = time.perf_counter() - start
  epoch = 0
  def run():
    nonlocal state, epoch
    state, _ = compiled(state, x, y, epoch, {})
    epoch += 1
    jax.block_until_ready(state)
  run()  # warm up
  return run, compile_seconds, temp_memory_mb(compiled)


def hyperparams(cfg, compute_dtype, grads="manual"):
  """The runner's Hyperparams of every timed step: cfg.optimizer at a constant 1e-3."""
  return train.Hyperparams(optimizer=cfg.optimizer, learning_rate=1e-3, schedule="constant",
                           weight_decay=0.0, label_smoothing=0.0, grads=grads,
                           compute_dtype=compute_dtype)


def jax_run(key, b, h, cfg):
  """(run, compile seconds): run() does `cfg.steps` Adam steps of the runner's train step,
  for the variant key = (grads, mode, compute dtype, devices).

  The batch is split over a mesh of `devices` devices, the state replicated.
  """
  grads, mode, compute_dtype, devices = key
  d, k, steps = cfg.in_dim, cfg.num_classes, cfg.steps
  hp = hyperparams(cfg, compute_dtype,
                   f"manual_{LAYOUT_ROWS[grads]}" if grads in LAYOUT_ROWS else grads)
  optimizer = train.make_optimizer(hp)
  mesh = parallel.run_mesh(devices)
  if mode == "scan":
    state = parallel.shard_models(train.init_state([0], d, h, k, hp), mesh)
    x, y = (parallel.shard_rows(a, mesh) for a in synthetic_data(b * steps, d, k))
    run, compile_seconds, _ = epochs_run(
        train.make_train_epoch(hp, train.Batching(b, mesh=mesh)), state, x, y)
    return run, compile_seconds
  state = parallel.replicate(train.init_model_state(0, d, h, k, optimizer), mesh)
  batch = tuple(parallel.shard_rows(a, mesh)
                for a in (*synthetic_data(b, d, k), jnp.ones((b,), jnp.float32)))
  fn = jax.jit(train.make_train_step(hp, optimizer), donate_argnums=(0,),
               out_shardings=parallel.replicated(mesh))
  start = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start

  def run():
    nonlocal state
    for _ in range(steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
  run()  # warm up
  return run, compile_seconds


def plain_jax_run(compute_dtype, b, h, cfg):
  """(run, compile seconds): what a user writes in plain JAX, `cfg.steps` steps of
  jax.grad + optax in one lax.scan over pre-batched data, no metrics, no gather; in
  bfloat16 the matmuls read bfloat16 and accumulate in float32."""
  d, k, steps = cfg.in_dim, cfg.num_classes, cfg.steps
  dt = jnp.dtype(compute_dtype)
  params = mj.init_params(jax.random.key(0), d, h, k)
  x, y = synthetic_data(b * steps, d, k)
  xs, ys = x.reshape(steps, b, d), y.reshape(steps, b)
  optimizer = optax.adam(1e-3) if cfg.optimizer == "adam" else optax.sgd(1e-3)

  def loss(p, xb, yb):
    dot = lambda a, w: jnp.matmul(a.astype(dt), w.T.astype(dt),
                                  preferred_element_type=jnp.float32)
    z2 = dot(jax.nn.relu(dot(xb, p.w1) + p.b1), p.w2) + p.b2
    return optax.softmax_cross_entropy_with_integer_labels(z2, yb).mean()

  def step(carry, batch):
    p, opt_state = carry
    g = jax.grad(loss)(p, *batch)
    updates, opt_state = optimizer.update(g, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  epoch = jax.jit(lambda carry, xs, ys: jax.lax.scan(step, carry, (xs, ys))[0],
                  donate_argnums=0)
  state = (params, optimizer.init(params))
  start = time.perf_counter()
  with compilation.not_cached():   # a user's program, not mlp_jax's: not in its cache
    compiled = epoch.lower(state, xs, ys).compile()
  compile_seconds = time.perf_counter() - start

  def run():
    nonlocal state
    state = compiled(state, xs, ys)
    jax.block_until_ready(state)
  run()
  return run, compile_seconds


def stacked_run(num_models, stacking, compute_dtype, b, h, cfg):
  """(run, compile seconds): `cfg.steps` steps of N models at once, one lax.scan (the
  runner's --num_seeds epoch): every model its own init and batch order, shared data."""
  hp = hyperparams(cfg, compute_dtype)
  states = train.init_state(range(num_models), cfg.in_dim, h, cfg.num_classes, hp)
  x, y = synthetic_data(b * cfg.steps, cfg.in_dim, cfg.num_classes)
  run, compile_seconds, _ = epochs_run(
      train.make_train_epoch(hp, train.Batching(b, stacking=stacking)), states, x, y)
  return run, compile_seconds


def vmap_grad_clipped_sum(params, x, Y, clip_norm):
  """Σ_i min(1, C/‖g_i‖) g_i the way jax_privacy's clipped_grad and optax's
  contrib.dpsgd do it: per-example gradients by jax.vmap(jax.grad) (B·H·D numbers held),
  their norms, clip, sum."""
  def example_loss(p, xi, yi):
    return mj.loss(p, xi[None], yi[None])
  g = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, Y)
  norms = jnp.sqrt(sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in g))
  c = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
  return jax.tree.map(lambda leaf: jnp.tensordot(c, leaf, axes=1), g)


def vmap_grad_dp_step(dp, optimizer):
  """jax_privacy's and optax's DP-SGD step, beside the runner's: the same Poisson batch,
  noise and update (train.make_dp_train_step), the clipped sum by vmap_grad_clipped_sum."""
  def step(state, data):
    X, y = data
    sample_key, noise_key = privacy.step_keys(state.key, state.step)
    i, mask, _ = privacy.poisson_batch(sample_key, dp.num_examples, dp.sampling_rate,
                                       dp.padded_batch_size)
    Y = jax.nn.one_hot(y[i], state.params.b2.shape[0], dtype=jnp.float32)
    grad_sum = vmap_grad_clipped_sum(state.params, X[i], Y * mask[:, None], dp.clip_norm)
    g = privacy.add_noise(grad_sum, noise_key, dp.noise_multiplier, dp.clip_norm,
                          dp.clipping, dp.sampling_rate * dp.num_examples)
    updates, opt_state = optimizer.update(g, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    zero = jnp.zeros(())
    return train.TrainState(params, opt_state, state.step + 1, state.key), (zero,) * 4
  return step


def dp_run(kind, compute_dtype, b, h, cfg):
  """(run, compile seconds, temporary MiB): an epoch of `cfg.steps` Adam steps of `kind`,
  on N = B·steps rows, whose matmuls read `compute_dtype`:

  plain: the runner's epoch (train.make_train_epoch, the manual gradient), B rows a
  step; dp_clipped_sum, dp_closed_form: the runner's DP-SGD epoch (the same program
  given a privacy.DPSGD): Poisson batches of expected size B (q = B/N, padded to the
  runner's M), the closed-form clipped sum, C = 1, noise σ = 0 (the clipped gradient's
  own cost) or σ = 1; dp_vmap_grad: that step with vmap(grad) -> clip -> sum, σ = 1.
  """
  d, k, steps = cfg.in_dim, cfg.num_classes, cfg.steps
  hp = hyperparams(cfg, compute_dtype)
  n = b * steps
  padded, _ = privacy.padded_batch_size(n, b / n, steps)
  dp = privacy.DPSGD(0.0 if kind == "dp_clipped_sum" else 1.0, 1.0, "flat", b / n, n, padded)
  state = train.init_state([0], d, h, k, hp)
  x, y = synthetic_data(n, d, k)
  if kind != "dp_vmap_grad":
    return epochs_run(
        train.make_train_epoch(hp, train.Batching(b), None if kind == "plain" else dp),
        state, x, y)
  optimizer = train.make_optimizer(hp)
  one = train.init_model_state(0, d, h, k, optimizer)
  step = vmap_grad_dp_step(dp, optimizer)
  epoch = jax.jit(lambda s, x, y, e, v: train.dp_train_epoch(step, s, x, y, e, steps),
                  donate_argnums=(0,))
  return epochs_run(epoch, one, x, y)


def opacus_run(kind, b, h, cfg):
  """run() does `cfg.steps` Opacus DP-SGD steps (σ = 1, C = 1, Adam) of the same network:
  kind "opacus_hooks" (GradSampleModule, per-sample gradients from hooks) or
  "opacus_ghost" (ghost clipping, grad_sample_mode="ghost"); torch_run is the plain step."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  d, k = cfg.in_dim, cfg.num_classes
  model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k))
  x, y = torch.randn(b, d), torch.randint(0, k, (b,))
  adam = torch.optim.Adam(model.parameters(), lr=1e-3)
  if kind == "opacus_hooks":
    from opacus import GradSampleModule  # pylint: disable=g-import-not-at-top
    from opacus.optimizers import DPOptimizer  # pylint: disable=g-import-not-at-top
    module = GradSampleModule(model)
    optimizer = DPOptimizer(adam, noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=b)
    def one_step():
      optimizer.zero_grad(set_to_none=True)
      nn.functional.cross_entropy(module(x), y).backward()
      optimizer.step()
  else:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping  # pylint: disable=g-import-not-at-top
    from opacus.optimizers import DPOptimizerFastGradientClipping  # pylint: disable=g-import-not-at-top
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # pylint: disable=g-import-not-at-top
    module = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0,
                                                  use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(adam, noise_multiplier=1.0, max_grad_norm=1.0,
                                                expected_batch_size=b)
    criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss())
    def one_step():
      optimizer.zero_grad(set_to_none=True)
      criterion(module(x), y).backward()
      optimizer.step()

  def run():
    for _ in range(cfg.steps):
      one_step()
  run()
  return run


def torch_run(b, h, cfg, autocast=False):
  """run() does `cfg.steps` PyTorch eager steps of the same network, loss and Adam;
  with `autocast`, inside torch.autocast(bfloat16), what a PyTorch user would pick
  for bfloat16 (on CUDA where there is a GPU, else on the CPU)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  context = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else (
      contextlib.nullcontext)
  d, k = cfg.in_dim, cfg.num_classes
  torch.manual_seed(0)
  new = lambda *shape: torch.zeros(*shape, device=device)
  w1 = (torch.randn(h, d, device=device) * (2 / d) ** 0.5).requires_grad_()
  b1 = new(h).requires_grad_()
  w2 = (torch.randn(k, h, device=device) * (1 / h) ** 0.5).requires_grad_()
  b2 = new(k).requires_grad_()
  optimizer = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)(
      [w1, b1, w2, b2], lr=1e-3)
  x, y = torch.randn(b, d, device=device), torch.randint(0, k, (b,), device=device)

  def run():
    for _ in range(cfg.steps):
      optimizer.zero_grad(set_to_none=True)
      with context():
        z2 = torch.relu(x @ w1.T + b1) @ w2.T + b2
        loss = torch.nn.functional.cross_entropy(z2, y)
      loss.backward()
      optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  run()
  return run
