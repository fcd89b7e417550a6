"""The benchmark's timing harness: FLOPs and bytes of a step, the GEMM ceiling and the
memory bandwidth it is measured against, round-robin timing, memory, the roofline.
experiments/benchmark.py runs it."""

import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp



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


def temp_memory_mb(compiled):
  """XLA's compiled memory analysis: the temporaries one call allocates, MiB."""
  analysis = compiled.memory_analysis()
  return None if analysis is None else analysis.temp_size_in_bytes / 2**20
