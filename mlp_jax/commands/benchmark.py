"""Benchmark the training step (loss, gradients, optax Adam update) of a D-H-K MLP.

    python experiments/benchmark.py                      # 784-1024-10, every variant
    python experiments/benchmark.py --batch_sizes=256 --modes=scan --peers=torch

Rows: gradient (manual | autodiff | manual_vjp; manual_bmajor | manual_fmajor: the
manual step in a fixed layout, where "manual" is mlp_jax.core.network.choose_layout's) × mode (step: a Python loop of the
jitted step; scan: `steps` steps in one jitted lax.scan, the runner's epoch) × compute
dtype (float32 | bfloat16 matmuls with float32 params, softmax and loss) × batch size ×
hidden size × device count (--num_devices: data parallel over a mesh of that many
devices, mlp_jax/training/parallel.py; on a CPU, start with
XLA_FLAGS=--xla_force_host_platform_device_count=4 to split it into 4 host devices).
Each: median and min µs per step over --repeats, examples/s, GFLOP/s and
its fraction of the GEMM ceiling measured in this run (same device, same dtype), compile
seconds (with the persistent compilation cache, mlp_jax/base/compilation.py, on by default:
MLP_JAX_COMPILATION_CACHE= for cold compiles), peak device memory where the platform
reports it. Whole commands, fixed costs included: experiments/startup.py.
"""

import importlib.util
import itertools
import json
import os
import statistics
import sys

from mlp_jax.base import boundary


# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
import jax.numpy as jnp

from mlp_jax.base import files
from mlp_jax.training import config as config_lib, spec

from mlp_jax.commands.benchmark_harness import (Timing, bandwidth_run, gemm_run, profile_once,
                               time_round_robin)
from mlp_jax.commands.benchmark_report import format_ratios, format_table, make_row
from mlp_jax.commands.benchmark_variants import (dp_run, jax_run, opacus_run, plain_jax_run, stacked_run,
                                torch_run)


def read_config(flag_values):
  """The flags as a spec.BenchmarkConfig, each value checked by its declaration (type,
  choices, bounds; a list item by item), then the device counts against this machine:
  a bad value is one line on stderr and exit status 2."""
  values = {}
  for s in spec.BENCHMARK:
    value = flag_values[s.name].value
    if s.kind is tuple:
      value = tuple(int(v) if s.item is int and v.strip().lstrip("-").isdigit() else v
                    for v in value)
    try:
      config_lib.check_setting(s, value)
    except config_lib.SettingError as e:
      _exit(str(e))
    values[s.name] = value
  cfg = spec.BenchmarkConfig(**values)
  local = jax.local_device_count()
  if max(cfg.num_devices) > local:
    _exit(f"--num_devices asks for {max(cfg.num_devices)} devices but there are {local}; "
          "on a CPU start with XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{max(cfg.num_devices)}.")
  uneven = [(b, n) for b in cfg.batch_sizes for n in cfg.num_devices if b % n]
  if uneven:
    _exit(f"batch size {uneven[0][0]} does not divide over {uneven[0][1]} devices; use "
          "batch sizes that are multiples of every --num_devices.")
  return cfg


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


def prepare_runs(b, h, peers, cfg):
  """({key: run()}, {key: partial Timing fields}, {dtype: GEMM FLOPs per run}) for
  every variant of one (B, H): key = (grads, mode, dtype, devices), or ("gemm", dtype)."""
  runs, info, gemm_flops = {}, {}, {}
  for dt in cfg.compute_dtypes:
    runs[("gemm", dt)], gemm_flops[dt] = gemm_run(jnp.dtype(dt), cfg.ceiling_size)
    for mode in cfg.modes:
      for grads in cfg.grads:
        # XLA's CPU runtime deadlocks with ~20-40 multi-device steps in flight,
        # as `step` mode queues them; the runner's scan is one call per epoch.
        for n in [n for n in cfg.num_devices if mode == "scan" or n == 1]:
          runs[(grads, mode, dt, n)], compile_s = jax_run((grads, mode, dt, n), b, h, cfg)
          info[(grads, mode, dt, n)] = {"compile_seconds": compile_s}
  dp_kinds = ("plain", "dp_clipped_sum", "dp_closed_form", "dp_vmap_grad") if cfg.dp else ()
  for dt, kind in itertools.product(cfg.compute_dtypes, dp_kinds):
    if kind != "dp_vmap_grad" or dt == "float32":  # the float32 reference is enough
      runs[(kind, "scan", dt, 1)], compile_s, temp = dp_run(kind, dt, b, h, cfg)
      info[(kind, "scan", dt, 1)] = {"compile_seconds": compile_s, "temp_mb": temp}
  for dt, n_models, stacking in itertools.product(
      cfg.compute_dtypes if cfg.num_models else (), cfg.num_models, cfg.stackings):
    key = (f"{stacking}_{n_models}", "scan", dt, 1)
    runs[key], compile_s = stacked_run(n_models, stacking, dt, b, h, cfg)
    info[key] = {"compile_seconds": compile_s, "num_models": n_models}
    if ("manual", "scan", dt, 1) not in runs:  # the one-model run it is compared with
      runs[("manual", "scan", dt, 1)], compile_s = jax_run(("manual", "scan", dt, 1), b, h, cfg)
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


def time_one_size(b, h, peers, cfg):
  """The rows of every variant of one (B, H), timed in turn (round robin) with the GEMM
  ceilings."""
  runs, info, gemm_flops = prepare_runs(b, h, peers, cfg)
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
  return [make_row(key, (b, h), Timing([t / cfg.steps for t in s], **info[key]),
                   (ceilings[key[2]], bandwidth), cfg)
          for key, s in seconds.items() if key[0] not in ("gemm", "bandwidth")]


def machine_load():
  """(the load averages, the CPU times of /proc/stat's first line or None)."""
  try:
    with files.open_regular("/proc/stat") as f:
      times = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    times = None
  return os.getloadavg(), times


def describe_load(before, after):
  """The load average when the timing ended, and the CPU time stolen by the hypervisor
  while it ran (steal, /proc/stat's 8th field) where the platform counts it."""
  (one, five, fifteen), text = after[0], ""
  if before[1] and after[1] and len(after[1]) > 7:
    spent = [b - a for a, b in zip(before[1], after[1])]
    text = f", CPU steal {spent[7] / max(sum(spent), 1):.1%} while timing"
  return (f"load average {one:.2f} {five:.2f} {fifteen:.2f} (at the end){text}; a loaded "
          "machine's rows are marked noisy")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = read_config(flags.FLAGS)
  from mlp_jax.base import compilation  # pylint: disable=g-import-not-at-top
  cache = compilation.enable()  # compile seconds: a read of the cache when it is warm
  print(f"device: {jax.devices()[0]} ({jax.default_backend()}, "
        f"{jax.local_device_count()} local), jax {jax.__version__}, "
        f"D={cfg.in_dim} K={cfg.num_classes} steps={cfg.steps} repeats={cfg.repeats} "
        f"optimizer={cfg.optimizer}, compilation cache {cache or 'off'}")
  peers = available_peers(cfg)
  before = machine_load()
  rows = [row for h in cfg.hidden_dims for b in cfg.batch_sizes
          for row in time_one_size(b, h, peers, cfg)]
  print(f"machine: {describe_load(before, machine_load())}")
  print(format_table(rows))
  print(format_ratios(rows))
  if cfg.json_out:
    with files.atomic_file(cfg.json_out, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)


def script():
  """The command: its flags parsed from sys.argv, then main, in the error boundary
  (exits). Its caller installs the signal handlers before importing this module."""
  boundary.script(lambda: app.run(main, flags_parser=boundary.parse_flags), __name__,
                  lambda: spec.define_flags(spec.BENCHMARK))
