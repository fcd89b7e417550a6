"""Benchmark the training step (loss, gradients, optax Adam update) of a D-H-K MLP.

    python experiments/benchmark.py                      # 784-1024-10, every variant
    python experiments/benchmark.py --batch_sizes=256 --modes=scan --peers=torch

Rows: gradient (manual | autodiff | manual_vjp; manual_bmajor | manual_fmajor: the
manual step in a fixed layout, where "manual" is mlp_jax.feature_major.choose_layout's) × mode (step: a Python loop of the
jitted step; scan: `steps` steps in one jitted lax.scan, the runner's epoch) × compute
dtype (float32 | bfloat16 matmuls with float32 params, softmax and loss) × batch size ×
hidden size × device count (--num_devices: data parallel over a mesh of that many
devices, mlp_jax/parallel.py; on a CPU, start with
XLA_FLAGS=--xla_force_host_platform_device_count=4 to split it into 4 host devices).
Each: median and min µs per step over --repeats, examples/s, GFLOP/s and
its fraction of the GEMM ceiling measured in this run (same device, same dtype), compile
seconds (with the persistent compilation cache, mlp_jax/compilation.py, on by default:
MLP_JAX_COMPILATION_CACHE= for cold compiles), peak device memory where the platform
reports it. Whole commands, fixed costs included: experiments/startup.py.
"""

import functools
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from typing import NamedTuple, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

import mlp_jax as mj
from mlp_jax import parallel
from mlp_jax import privacy
from mlp_jax import train

# The manual step in one named layout (mlp_jax/feature_major.py); "manual" is the one
# feature_major.choose_layout picks for each dtype on this machine.
LAYOUT_ROWS = {"manual_bmajor": "batch_major", "manual_fmajor": "feature_major"}

flags.DEFINE_list("grads", ["manual", "autodiff", "manual_vjp"], "Gradients to time: "
                  f"{', '.join(train.GRADIENTS)}, or the manual step in a fixed layout, "
                  f"{' (batch-major) and '.join(LAYOUT_ROWS)} (feature-major).")
flags.DEFINE_list("modes", ["step", "scan"], "step: Python loop; scan: one lax.scan.")
flags.DEFINE_list("compute_dtypes", ["float32", "bfloat16"], "Matmul dtypes.")
flags.DEFINE_list("batch_sizes", ["64", "256", "1024"], "Batch sizes B.")
flags.DEFINE_list("hidden_dims", ["1024"], "Hidden sizes H.")
flags.DEFINE_list("num_devices", ["1"], "Device counts: data parallel over a mesh of each "
                  "(scan mode only above 1 device; see docs/benchmarks.md).")
flags.DEFINE_integer("in_dim", 784, "D.", lower_bound=1)
flags.DEFINE_integer("num_classes", 10, "K.", lower_bound=2)
flags.DEFINE_integer("steps", 100, "Steps per timed repeat.", lower_bound=1)
flags.DEFINE_integer("repeats", 7, "Timed repeats; the median and min are reported.",
                     lower_bound=1)
flags.DEFINE_integer("ceiling_size", 2048, "N of the N×N×N GEMM that sets the ceiling.",
                     lower_bound=8)
flags.DEFINE_string("json_out", None, "Write one JSON object per row (JSON Lines) here.")
flags.DEFINE_string("profile_dir", None, "After the timed repeats, run one more repeat of "
                    "every variant under jax.profiler, each variant a named span, and "
                    "write the trace to DIR/B<b>_H<h> (not counted: the profiler slows "
                    "what it traces); view with tensorboard --logdir or Perfetto.")
flags.DEFINE_list("peers", [], "Peers timed in the same run: torch (PyTorch eager float32 "
                  "and bfloat16 autocast, on CUDA where there is a GPU); jax (plain "
                  "jax.grad + optax in a lax.scan, each --compute_dtypes); opacus (with "
                  "--dp: Opacus' per-sample hooks and ghost clipping).")
flags.DEFINE_bool("dp", False, "Add DP-SGD rows: the plain step (plain), the closed-form "
                  "clipped sum without (dp_clipped_sum) and with noise (dp_closed_form), and "
                  "vmap(grad) -> clip -> sum with noise (dp_vmap_grad, what jax_privacy "
                  "and optax do), each with its memory.")
flags.DEFINE_list("num_models", [], "Model counts N: add rows of N models trained together "
                  "(train.make_train_epoch of a stack, seeds 0..N-1, manual float32, scan), "
                  "examples/s summed over the models, next to one model's scan.")
flags.DEFINE_list("stackings", ["vmap", "map"], "How the --num_models models share the "
                  "program: vmap (batched) and/or map (one after another).")
flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"],
                  "The update in the step: optax Adam, or plain SGD to see the optimizer's share.")


def step_flops(b, d, h, k):
  """FLOPs of one step: forward 2BDH + 2BHK, backward 2BHK + 2BHK + 2BDH."""
  return 4 * b * d * h + 6 * b * h * k


def step_bytes(b, d, h, k, optimizer="adam"):
  """Bytes one step must move through memory, at least (float32 state; caches ignored,
  since W1 alone outgrows a core's L2 at the default sizes): the params read by the
  forward and backward matmuls and the gradient written (3 passes over the P params),
  the optimizer's reads and writes (Adam: params, gradient, μ, ν read; params, μ, ν
  written: 7 passes; SGD: 3), the batch read twice (forward, dW1) and the hidden
  activations Z1, A1, Δ1 written and read (6 passes over B·H)."""
  params = h * (d + 1) + k * (h + 1)
  optimizer_passes = 7 if optimizer == "adam" else 3
  return 4 * params * (3 + optimizer_passes) + 4 * (2 * b * d + 6 * b * h)


def bandwidth_run(num_bytes=2**28):
  """(run, bytes per run): a jitted elementwise pass x ← 1.5 x + 0.5 over `num_bytes` of
  float32 (read once, written once, in place: the buffer is donated, as the train
  step's state is; a fresh output would time the OS's page faults, ~6× slower here),
  the memory bandwidth measured in the same run."""
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  scale = jax.jit(lambda x: 1.5 * x + 0.5, donate_argnums=0)
  x = scale(x)
  x.block_until_ready()

  def run():
    nonlocal x
    x = scale(x)
    x.block_until_ready()
  return run, 2 * num_bytes


def time_round_robin(runs, repeats):
  """Seconds per call of each fn in `runs`, calling them in turn `repeats` times.

  Interleaving spreads a shared machine's noise over every variant alike, so their
  ratios hold even when the absolute numbers drift. Each round starts one variant later
  than the last, so that no variant always runs first, after the bandwidth pass has
  emptied the caches.
  """
  seconds = {name: [] for name in runs}
  names = list(runs)
  for i in range(repeats):
    start_at = i % len(names) if names else 0
    for name in names[start_at:] + names[:start_at]:
      fn = runs[name]
      start = time.perf_counter()
      fn()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def profile_once(runs, profile_dir):
  """One more call of each fn in `runs` under jax.profiler, each a span named for its
  variant (e.g. "manual step float32"), traced into profile_dir; not timed."""
  with jax.profiler.trace(profile_dir):
    for name, fn in runs.items():
      with jax.profiler.TraceAnnotation(" ".join(map(str, name))):
        fn()


def peak_memory_mb():
  """Peak device memory in MiB where the platform reports it (GPU, TPU); None on CPU."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def gemm_run(dtype, n):
  """(run, flops): a jitted N×N @ N×N matmul in `dtype` (bfloat16 accumulates in float32)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  # ~50 GFLOP per timed call, in at most 100 calls: a small N (a test's) is timed by
  # dispatch anyway, and N = 32 would need 760,000 calls a round.
  calls = min(100, max(1, int(5e10 // (2 * n**3))))
  def run():
    for _ in range(calls):
      out = matmul(a, b)
    out.block_until_ready()
  return run, 2 * n**3 * calls


@functools.lru_cache(maxsize=2)
def synthetic_data(n, d, k):
  """Random inputs X (N, D) and labels y (N,) in [0, K), on the device, made once per size."""
  x = jax.random.normal(jax.random.key(2), (n, d), jnp.float32)
  y = jax.random.randint(jax.random.key(3), (n,), 0, k)
  return x, y


def jax_run(grads, mode, compute_dtype, b, h, devices, cfg):
  """(run, compile seconds): run() does `cfg.steps` Adam steps of the runner's train step.

  The batch is split over a mesh of `devices` devices, the state replicated.
  """
  d, k, steps = cfg.in_dim, cfg.num_classes, cfg.steps
  hp = train.Hyperparams(optimizer=cfg.optimizer, learning_rate=1e-3, schedule="constant",
                         weight_decay=0.0, label_smoothing=0.0,
                         grads=f"manual_{LAYOUT_ROWS[grads]}" if grads in LAYOUT_ROWS else grads,
                         compute_dtype=compute_dtype)
  optimizer = train.make_optimizer(hp)
  mesh = parallel.run_mesh(devices)
  if mode == "step":
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
  else:
    state = parallel.shard_models(train.init_state([0], d, h, k, hp), mesh)
    x, y = (parallel.shard_rows(a, mesh) for a in synthetic_data(b * steps, d, k))
    fn = train.make_train_epoch(hp, b, mesh=mesh)
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

  epoch = jax.jit(lambda carry: jax.lax.scan(step, carry, (xs, ys))[0], donate_argnums=0)
  state = (params, optimizer.init(params))
  start = time.perf_counter()
  compiled = epoch.lower(state).compile()
  compile_seconds = time.perf_counter() - start

  def run():
    nonlocal state
    state = compiled(state)
    jax.block_until_ready(state)
  run()
  return run, compile_seconds


def stacked_run(num_models, stacking, compute_dtype, b, h, cfg):
  """(run, compile seconds): `cfg.steps` steps of N models at once, one lax.scan (the
  runner's --num_seeds epoch): every model its own init and batch order, shared data."""
  d, k, steps = cfg.in_dim, cfg.num_classes, cfg.steps
  hp = train.Hyperparams(optimizer=cfg.optimizer, learning_rate=1e-3, schedule="constant",
                         weight_decay=0.0, label_smoothing=0.0, compute_dtype=compute_dtype)
  states = train.init_state(range(num_models), d, h, k, hp)
  x, y = synthetic_data(b * steps, d, k)
  fn = train.make_train_epoch(hp, b, stacking=stacking)
  start = time.perf_counter()
  compiled = fn.lower(states, x, y, 0, {}).compile()
  compile_seconds = time.perf_counter() - start
  epoch = 0
  def run():
    nonlocal states, epoch
    states, _ = compiled(states, x, y, epoch, {})
    epoch += 1
    jax.block_until_ready(states)
  run()  # warm up
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


def dp_run(kind, compute_dtype, b, h, cfg):
  """(run, compile seconds, temporary MiB): `cfg.steps` Adam steps of `kind` whose
  matmuls read `compute_dtype`:

  plain: the runner's step (manual gradient); dp_clipped_sum: privacy's closed-form
  clipped sum over B, no noise (the gradient's own cost); dp_closed_form: the same plus
  noise σ = 1, C = 1; dp_vmap_grad: vmap(grad) -> clip -> sum, the same noise. All on one
  fixed batch of B (Poisson sampling, the same for every DP kind, is left out).
  """
  d, k = cfg.in_dim, cfg.num_classes
  hp = train.Hyperparams(optimizer=cfg.optimizer, learning_rate=1e-3, schedule="constant",
                         weight_decay=0.0, label_smoothing=0.0, compute_dtype=compute_dtype)
  dtype = None if compute_dtype == "float32" else jnp.dtype(compute_dtype)
  optimizer = train.make_optimizer(hp)
  state = train.init_model_state(0, d, h, k, optimizer)
  x, y = synthetic_data(b, d, k)
  batch = (x, y, jnp.ones((b,), jnp.float32))
  if kind == "plain":
    step = train.make_train_step(hp, optimizer)
  else:
    def step(state, batch):
      x, y, w = batch
      Y = jax.nn.one_hot(y, k, dtype=jnp.float32)
      if kind == "dp_vmap_grad":
        grad_sum = vmap_grad_clipped_sum(state.params, x, Y, 1.0)
      else:
        _, grad_sum, _ = privacy.clipped_sum_with_logits(state.params, x, Y, w, (1.0, "flat"),
                                                         dtype)
      if kind == "dp_clipped_sum":
        g = jax.tree.map(lambda leaf: leaf / b, grad_sum)
      else:
        g = privacy.add_noise(grad_sum, jax.random.fold_in(state.key, state.step), 1.0, 1.0,
                              "flat", b)
      updates, opt_state = optimizer.update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return train.TrainState(params, opt_state, state.step + 1, state.key), None
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  def run():
    nonlocal state
    for _ in range(cfg.steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
  run()
  return run, compile_seconds, temp_memory_mb(compiled)


def temp_memory_mb(compiled):
  """XLA's compiled memory analysis: the temporaries one call allocates, MiB."""
  analysis = compiled.memory_analysis()
  return None if analysis is None else analysis.temp_size_in_bytes / 2**20


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


class Timing(NamedTuple):
  """What was measured of one variant: seconds per step of each repeat, compile seconds,
  temporary memory (MiB, where measured) and the models it trains together."""

  seconds: list
  compile_seconds: float
  temp_mb: Optional[float] = None
  num_models: int = 1


def roofline(seconds, flops, num_bytes, ceiling, bandwidth):
  """The step's roofline bound, the larger of its FLOPs at the GEMM ceiling and its
  bytes at the memory bandwidth (both measured in this run), and the fraction of it
  reached (bound / measured time: 1 is the hardware's limit)."""
  bound = max(flops / (ceiling * 1e9), num_bytes / (bandwidth * 1e9))
  return {"step_bytes": num_bytes, "bandwidth_gbs": bandwidth, "roofline_us": bound * 1e6,
          "roofline_fraction": bound / seconds}


def make_row(key, b, h, timing, ceiling, cfg, bandwidth):
  """One result row (the --json_out object) of variant key = (grads, mode, dtype,
  devices); examples/s and GFLOP/s are summed over the models trained together."""
  grads, mode, compute_dtype, devices = key
  median, num_models = statistics.median(timing.seconds), timing.num_models
  gflops = num_models * step_flops(b, cfg.in_dim, h, cfg.num_classes) / median / 1e9
  return {"grads": grads, "mode": mode, "compute_dtype": compute_dtype, "batch_size": b,
          "num_devices": devices, "num_models": num_models, "optimizer": cfg.optimizer,
          "hidden_dim": h, "in_dim": cfg.in_dim, "num_classes": cfg.num_classes,
          "us_per_step": median * 1e6, "us_per_step_min": min(timing.seconds) * 1e6,
          "us_per_step_rounds": [t * 1e6 for t in timing.seconds],
          "examples_per_second": num_models * b / median, "gflops": gflops,
          "gemm_ceiling_gflops": ceiling, "ceiling_fraction": gflops / ceiling,
          "compile_seconds": timing.compile_seconds, "peak_memory_mb": peak_memory_mb(),
          **roofline(median, num_models * step_flops(b, cfg.in_dim, h, cfg.num_classes),
                     num_models * step_bytes(b, cfg.in_dim, h, cfg.num_classes,
                                             cfg.optimizer), ceiling, bandwidth),
          "temp_memory_mb": timing.temp_mb,
          "device": str(jax.devices()[0]), "platform": jax.default_backend()}


def format_table(rows):
  """The rows as the fixed-width table printed on stdout."""
  header = (f"{'grads':14} {'mode':5} {'dtype':8} {'dev':>3} {'B':>5} {'H':>5} {'us/step':>9} "
            f"{'min':>9} {'examples/s':>11} {'GFLOP/s':>8} {'ceiling':>7} {'roofline':>8} "
            f"{'compile s':>9} {'temp MiB':>9}")
  lines = [header, "-" * len(header)]
  for r in rows:
    temp = "" if r["temp_memory_mb"] is None else f"{r['temp_memory_mb']:9.1f}"
    lines.append(f"{r['grads']:14} {r['mode']:5} {r['compute_dtype']:8} "
                 f"{r['num_devices']:3d} {r['batch_size']:5d} "
                 f"{r['hidden_dim']:5d} {r['us_per_step']:9.1f} {r['us_per_step_min']:9.1f} "
                 f"{r['examples_per_second']:11,.0f} {r['gflops']:8.1f} "
                 f"{r['ceiling_fraction']:7.2f} {r['roofline_fraction']:8.2f} "
                 f"{r['compile_seconds']:9.2f} {temp}")
  return "\n".join(lines + LEGEND)


LEGEND = [
    "us/step: median µs per step over the repeats (min: the fastest); examples/s and "
    "GFLOP/s from the median, summed over the models of a stack",
    "ceiling: GFLOP/s as a fraction of a jitted N×N×N matmul's in the same dtype, timed "
    "in the same rounds",
    "roofline: the step's bound, max(FLOPs at that ceiling, its bytes at the measured "
    "bandwidth; optimizer state included), as a fraction of the measured time (1 = the "
    "hardware's limit)",
    "compile s: jit lowering and compilation alone (0 for PyTorch, which does not "
    "compile); temp MiB: blank where not measured (only the --dp rows)"]


def paired_ratio(r, other):
  """The median over rounds of row r's time over row other's in the same round: the two
  ran one after the other, so the machine's drift between rounds cancels in each ratio."""
  return statistics.median(a / b for a, b in zip(r["us_per_step_rounds"],
                                                 other["us_per_step_rounds"], strict=True))


def format_ratios(rows):
  """manual / autodiff time, bfloat16 and N-device speed-ups, JAX vs PyTorch, one run;
  the lines of each kind together."""
  by_key = {(r["grads"], r["mode"], r["compute_dtype"], r["num_devices"], r["batch_size"],
             r["hidden_dim"]): r for r in rows}
  kinds = {"manual": [], "bfloat16": [], "devices": [], "models": [], "torch": [], "dp": []}
  # Mode, dtype, grads, devices, H, B: each kind's lines read down one variable at a time.
  order = sorted(by_key, key=lambda key: (key[1], key[2], key[0], key[3], key[5], key[4]))
  for (g, mode, dt, n, b, h) in order:
    r = by_key[(g, mode, dt, n, b, h)]
    where = f"B={b:<5} H={h}" + (f" devices={n}" if n > 1 else "")
    if g in ("manual", *LAYOUT_ROWS) and ("autodiff", mode, dt, n, b, h) in by_key:
      auto = by_key[("autodiff", mode, dt, n, b, h)]
      kinds["manual"].append(f"{g} / autodiff time".ljust(31) + f"{mode:5} {dt:8} {where}: "
                             f"{r['us_per_step'] / auto['us_per_step']:.3f}, paired "
                             f"{paired_ratio(r, auto):.3f}")
    if dt == "bfloat16" and (g, mode, "float32", n, b, h) in by_key:
      f32 = by_key[(g, mode, "float32", n, b, h)]
      kinds["bfloat16"].append(
          f"bfloat16 / float32 ex/s  {g:10} {mode:5} {where}: "
          f"{r['examples_per_second'] / f32['examples_per_second']:.3f}")
    if n > 1 and (g, mode, dt, 1, b, h) in by_key:
      one = by_key[(g, mode, dt, 1, b, h)]
      kinds["devices"].append(
          f"{n} devices / 1 ex/s      {g:10} {mode:5} {dt:8} B={b:<5} H={h}: "
          f"{r['examples_per_second'] / one['examples_per_second']:.3f}")
    if g.startswith(train.STACKINGS) and ("manual", "scan", dt, 1, b, h) in by_key:
      one = by_key[("manual", "scan", dt, 1, b, h)]
      n_models, stacking = r["num_models"], g.split("_")[0]
      kinds["models"].append(
          f"{n_models} models ({stacking}) / {n_models} sequential runs ex/s".ljust(46) +
          f"{dt:8} B={b:<5} H={h}: "
          f"{r['examples_per_second'] / one['examples_per_second']:.3f}")
    kinds["torch"].extend(_peer_lines(r, rows, by_key))
    kinds["dp"].extend(_dp_lines(r, by_key))
  return "\n".join(line for lines in kinds.values() for line in lines)


# The peer each JAX row is compared with: (peer grads, its dtype, the label).
_TORCH_PEERS = {"torch": ("float32", "best JAX float32 / torch eager ex/s"),
                "torch_autocast": ("bfloat16", "best JAX bfloat16 / torch bf16 autocast ex/s")}


def _peer_lines(r, rows, by_key):
  """This run's ratios of row r to the peers: the manual or autodiff scan over plain
  jax.grad + optax in the same dtype; for a torch row, the best JAX row of its B, H and
  dtype over it."""
  g, mode, dt, n, b, h = (r["grads"], r["mode"], r["compute_dtype"], r["num_devices"],
                          r["batch_size"], r["hidden_dim"])
  plain = by_key.get(("jax_plain", mode, dt, n, b, h))
  if g in ("manual", "autodiff") and mode == "scan" and plain:
    yield (f"{g} scan / plain jax.grad+optax scan ex/s  {dt:8} B={b:<5} H={h}: "
           f"{r['examples_per_second'] / plain['examples_per_second']:.3f}")
  if g in _TORCH_PEERS:
    dtype, label = _TORCH_PEERS[g]
    best = max((q for q in rows if q["grads"] in (*train.GRADIENTS, "plain")
                and (q["batch_size"], q["hidden_dim"], q["compute_dtype"],
                     q["num_devices"]) == (b, h, dtype, 1)),
               key=lambda q: q["examples_per_second"], default=None)
    if best:
      yield (f"{label}  B={b:<5} H={h}: "
             f"{best['examples_per_second'] / r['examples_per_second']:.2f} "
             f"({best['grads']}, {best['mode']})")


def _dp_lines(r, by_key):
  """The DP rows' ratios: the closed form over the plain step, vmap(grad) and Opacus."""
  g, dt, b, h = r["grads"], r["compute_dtype"], r["batch_size"], r["hidden_dim"]
  for num, den, what in (("dp_clipped_sum", "plain", "time"),
                         ("dp_closed_form", "plain", "time"),
                         ("dp_vmap_grad", "dp_closed_form", "time"),
                         ("opacus_hooks", "torch", "time"), ("opacus_ghost", "torch", "time"),
                         ("dp_closed_form", "opacus_ghost", "ex/s")):
    other = next((q for (qg, _, qdt, _, qb, qh), q in by_key.items()
                  if qg == den and qb == b and qh == h
                  and (qdt == dt or qg.startswith(("torch", "opacus")))), None)
    if g == num and other is not None:
      value = (r["us_per_step"] / other["us_per_step"] if what == "time"
               else r["examples_per_second"] / other["examples_per_second"])
      yield f"{num} / {den} {what}".ljust(40) + f"{dt:8} B={b:<5} H={h}: {value:.3f}"


def check_flags(cfg):
  """(batch sizes, hidden sizes, device counts, model counts) of the flags; a bad value
  is one line on stderr and exit status 2."""
  unknown = ([g for g in cfg.grads if g not in (*train.GRADIENTS, *LAYOUT_ROWS)]
             + [m for m in cfg.modes if m not in ("step", "scan")]
             + [c for c in cfg.compute_dtypes if c not in train.COMPUTE_DTYPES]
             + [p for p in cfg.peers if p not in ("torch", "opacus", "jax")]
             + [s for s in cfg.stackings if s not in train.STACKINGS])
  try:
    sizes = ([int(v) for v in cfg.batch_sizes], [int(v) for v in cfg.hidden_dims],
             [int(v) for v in cfg.num_devices], [int(v) for v in cfg.num_models])
  except ValueError:
    unknown.append("--batch_sizes/--hidden_dims/--num_devices/--num_models must be comma "
                   "lists of integers")
    sizes = ([], [], [], [])
  if unknown or min(sum(sizes, []), default=1) < 1:
    _exit(f"unknown or invalid values: {', '.join(unknown) or 'sizes must be >= 1'}")
  batch_sizes, _, device_counts, _ = sizes
  local = jax.local_device_count()
  if max(device_counts) > local:
    _exit(f"--num_devices asks for {max(device_counts)} devices but there are {local}; on "
          f"a CPU start with XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{max(device_counts)}.")
  uneven = [(b, n) for b in batch_sizes for n in device_counts if b % n]
  if uneven:
    _exit(f"batch size {uneven[0][0]} does not divide over {uneven[0][1]} devices; use "
          "batch sizes that are multiples of every --num_devices.")
  return sizes


def _exit(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def available_peers(cfg):
  """{"torch": bool, "opacus": bool}: the peers asked for that can run here (a line
  says why one is skipped)."""
  torch_ok = "torch" in cfg.peers and importlib.util.find_spec("torch") is not None
  if "torch" in cfg.peers and not torch_ok:
    print("peer torch: PyTorch is not installed (pip install torch); its rows are skipped")
  opacus_ok = (cfg.dp and "opacus" in cfg.peers
               and importlib.util.find_spec("opacus") is not None)
  if "opacus" in cfg.peers and not opacus_ok:
    print("peer opacus: needs --dp, torch and opacus (pip install torch opacus); its rows "
          "are skipped")
  return {"torch": torch_ok, "opacus": opacus_ok}


def prepare_runs(b, h, device_counts, model_counts, peers, cfg):
  """({key: run()}, {key: partial Timing fields}, {dtype: GEMM FLOPs per run}) for
  every variant of one (B, H): key = (grads, mode, dtype, devices), or ("gemm", dtype)."""
  runs, info, gemm_flops = {}, {}, {}
  for dt in cfg.compute_dtypes:
    runs[("gemm", dt)], gemm_flops[dt] = gemm_run(jnp.dtype(dt), cfg.ceiling_size)
    for mode in cfg.modes:
      for grads in cfg.grads:
        # XLA's CPU runtime deadlocks with ~20-40 multi-device steps in flight,
        # as `step` mode queues them; the runner's scan is one call per epoch.
        for n in [n for n in device_counts if mode == "scan" or n == 1]:
          runs[(grads, mode, dt, n)], compile_s = jax_run(grads, mode, dt, b, h, n, cfg)
          info[(grads, mode, dt, n)] = {"compile_seconds": compile_s}
  dp_kinds = ("plain", "dp_clipped_sum", "dp_closed_form", "dp_vmap_grad") if cfg.dp else ()
  for dt, kind in itertools.product(cfg.compute_dtypes, dp_kinds):
    if kind != "dp_vmap_grad" or dt == "float32":  # the float32 reference is enough
      runs[(kind, "step", dt, 1)], compile_s, temp = dp_run(kind, dt, b, h, cfg)
      info[(kind, "step", dt, 1)] = {"compile_seconds": compile_s, "temp_mb": temp}
  for dt, n_models, stacking in itertools.product(
      cfg.compute_dtypes if model_counts else (), model_counts, cfg.stackings):
    key = (f"{stacking}_{n_models}", "scan", dt, 1)
    runs[key], compile_s = stacked_run(n_models, stacking, dt, b, h, cfg)
    info[key] = {"compile_seconds": compile_s, "num_models": n_models}
    if ("manual", "scan", dt, 1) not in runs:  # the one-model run it is compared with
      runs[("manual", "scan", dt, 1)], compile_s = jax_run("manual", "scan", dt, b, h, 1, cfg)
      info[("manual", "scan", dt, 1)] = {"compile_seconds": compile_s}
  peer_kinds = ((("opacus_hooks", "opacus_ghost") if peers["opacus"] else ())
                + (("torch",) if peers["torch"] or peers["opacus"] else ()))
  for kind in peer_kinds:
    runs[(kind, "eager", "float32", 1)] = (torch_run(b, h, cfg) if kind == "torch"
                                           else opacus_run(kind, b, h, cfg))
    info[(kind, "eager", "float32", 1)] = {"compile_seconds": 0.0}
  if peers["torch"]:  # and the bfloat16 a PyTorch user picks: autocast
    runs[("torch_autocast", "eager", "bfloat16", 1)] = torch_run(b, h, cfg, autocast=True)
    info[("torch_autocast", "eager", "bfloat16", 1)] = {"compile_seconds": 0.0}
  for dt in (cfg.compute_dtypes if "jax" in cfg.peers else ()):
    runs[("jax_plain", "scan", dt, 1)], compile_s = plain_jax_run(dt, b, h, cfg)
    info[("jax_plain", "scan", dt, 1)] = {"compile_seconds": compile_s}
  for dt in ("float32", "bfloat16"):  # every row's roofline needs its dtype's ceiling
    if ("gemm", dt) not in runs and any(key[2] == dt for key in info):
      runs[("gemm", dt)], gemm_flops[dt] = gemm_run(jnp.dtype(dt), cfg.ceiling_size)
  runs[("bandwidth",)], gemm_flops["bandwidth"] = bandwidth_run()
  return runs, info, gemm_flops


def time_one_size(b, h, device_counts, model_counts, peers, cfg):
  """The rows of every variant of one (B, H), timed in turn (round robin) with the GEMM
  ceilings."""
  runs, info, gemm_flops = prepare_runs(b, h, device_counts, model_counts, peers, cfg)
  # vmap(grad) holds B per-example gradients (GBs at B = 1024): freeing them slowed the
  # variant timed next by up to 5x, so it is timed on its own, after the others.
  alone = {key: runs.pop(key) for key in list(runs) if key[0] == "dp_vmap_grad"}
  seconds = time_round_robin(runs, cfg.repeats) | time_round_robin(alone, cfg.repeats)
  if cfg.profile_dir:
    profile_once(runs | alone, os.path.join(cfg.profile_dir, f"B{b}_H{h}"))
  bandwidth = gemm_flops.pop("bandwidth") / statistics.median(seconds[("bandwidth",)]) / 1e9
  ceilings = {dt: flops / statistics.median(seconds[("gemm", dt)]) / 1e9
              for dt, flops in gemm_flops.items()}
  print(f"B={b} H={h}: GEMM ceiling " + ", ".join(
      f"{dt} {gf:.1f} GFLOP/s" for dt, gf in ceilings.items()) +
        f" (median of a {cfg.ceiling_size}^3 jitted matmul); memory bandwidth "
        f"{bandwidth:.1f} GB/s (an elementwise pass over 256 MiB)")
  return [make_row(key, b, h, Timing([t / cfg.steps for t in s], **info[key]),
                   ceilings[key[2]], cfg, bandwidth)
          for key, s in seconds.items() if key[0] not in ("gemm", "bandwidth")]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = flags.FLAGS
  from mlp_jax import compilation  # pylint: disable=g-import-not-at-top
  cache = compilation.enable()  # compile seconds: a read of the cache when it is warm
  batch_sizes, hidden_dims, device_counts, model_counts = check_flags(cfg)
  print(f"device: {jax.devices()[0]} ({jax.default_backend()}, "
        f"{jax.local_device_count()} local), jax {jax.__version__}, "
        f"D={cfg.in_dim} K={cfg.num_classes} steps={cfg.steps} repeats={cfg.repeats} "
        f"optimizer={cfg.optimizer}, compilation cache {cache or 'off'}")
  peers = available_peers(cfg)
  rows = [row for h in hidden_dims for b in batch_sizes
          for row in time_one_size(b, h, device_counts, model_counts, peers, cfg)]
  print(format_table(rows))
  print(format_ratios(rows))
  if cfg.json_out:
    from mlp_jax import files  # pylint: disable=g-import-not-at-top
    with files.atomic_file(cfg.json_out, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
  from mlp_jax import boundary  # pylint: disable=g-import-not-at-top
  boundary.script(lambda: app.run(main, flags_parser=boundary.parse_flags))
