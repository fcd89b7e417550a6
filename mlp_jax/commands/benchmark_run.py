"""The benchmark's run (mlp_jax/commands/benchmark.py is the command): its variants, each
size's rows timed round robin and printed as measured, the ratios and the JSON."""

import importlib.util
import itertools
import json
import os
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import tqdm

from mlp_jax.base import boundary, compilation, files, options
from mlp_jax.core import network
from mlp_jax.training import config as config_lib, spec

from mlp_jax.commands.benchmark_harness import (Timing, bandwidth_run, gemm_run, profile_once, step_flops,
                               time_round_robin)
from mlp_jax.commands.benchmark_report import (LEGEND, format_ratios, format_row, make_row,
                                               table_header)
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


DP_KINDS = ("plain", "dp_clipped_sum", "dp_closed_form", "dp_vmap_grad")


def variant_keys(peers, cfg):
  """The rows of one (B, H), each key = (grads, mode, dtype, devices), in the order they
  are compiled."""
  keys = [(grads, mode, dt, n) for dt in cfg.compute_dtypes for mode in cfg.modes
          for grads in cfg.grads
          # XLA's CPU runtime deadlocks with ~20-40 multi-device steps in flight, as
          # `step` mode queues them; the runner's scan is one call per epoch.
          for n in cfg.num_devices if mode == "scan" or n == 1]
  keys += [(kind, "scan", dt, 1) for dt in cfg.compute_dtypes for kind in
           (DP_KINDS if cfg.dp else ())   # vmap(grad): the float32 reference is enough
           if kind != "dp_vmap_grad" or dt == "float32"]
  for dt, n_models, stacking in itertools.product(
      cfg.compute_dtypes if cfg.num_models else (), cfg.num_models, cfg.stackings):
    keys.append((f"{stacking}_{n_models}", "scan", dt, 1))
    if ("manual", "scan", dt, 1) not in keys:  # the one-model run it is compared with
      keys.append(("manual", "scan", dt, 1))
  keys += [(kind, "eager", "float32", 1) for kind in
           (("opacus_hooks", "opacus_ghost") if peers["opacus"] else ())
           + (("torch",) if peers["torch"] or peers["opacus"] else ())]
  if peers["torch"]:  # and the bfloat16 a PyTorch user picks: autocast
    keys.append(("torch_autocast", "eager", "bfloat16", 1))
  keys += [("jax_plain", "scan", dt, 1) for dt in cfg.compute_dtypes if "jax" in cfg.peers]
  return keys


def make_run(key, b, h, cfg):
  """(run(), its partial Timing fields) of the variant `key` at (B, H), compiled."""
  grads, mode, dt, _ = key
  if grads in DP_KINDS:
    run, compile_s, temp = dp_run(grads, dt, b, h, cfg)
    return run, {"compile_seconds": compile_s, "temp_mb": temp}
  if grads.startswith(options.STACKINGS):
    stacking, n_models = grads.split("_")
    run, compile_s = stacked_run(int(n_models), stacking, dt, b, h, cfg)
    return run, {"compile_seconds": compile_s, "num_models": int(n_models)}
  if grads.startswith(("torch", "opacus")):
    run = (torch_run(b, h, cfg, autocast=grads == "torch_autocast")
           if grads.startswith("torch") else opacus_run(grads, b, h, cfg))
    return run, {"compile_seconds": 0.0}
  run, compile_s = plain_jax_run(dt, b, h, cfg) if grads == "jax_plain" else jax_run(
      key, b, h, cfg)
  return run, {"compile_seconds": compile_s}


def prepare_runs(b, h, keys, cfg):
  """({key: run()}, {key: partial Timing fields}, {dtype: GEMM FLOPs per run}) of the
  variants `keys` at (B, H), with the GEMM ceiling of every dtype they use, ("gemm",
  dtype), and the memory bandwidth, ("bandwidth",)."""
  runs, info, gemm_flops = {}, {}, {}
  for key in keys:
    runs[key], info[key] = make_run(key, b, h, cfg)
  for dt in sorted({key[2] for key in keys}):  # every row's roofline needs its ceiling
    runs[("gemm", dt)], gemm_flops[dt] = gemm_run(jnp.dtype(dt), cfg.ceiling_size)
  runs[("bandwidth",)], gemm_flops["bandwidth"] = bandwidth_run()
  return runs, info, gemm_flops


def time_one_size(b, h, keys, cfg):
  """The rows of the variants `keys` at one (B, H), timed in turn (round robin) with the
  GEMM ceilings."""
  runs, info, gemm_flops = prepare_runs(b, h, keys, cfg)
  # vmap(grad) holds B per-example gradients (GBs at B = 1024): freeing them slowed the
  # variant timed next by up to 5x, so it is timed on its own, after the others.
  alone = {key: runs.pop(key) for key in list(runs) if key[0] == "dp_vmap_grad"}
  seconds = time_round_robin(runs, cfg.repeats) | time_round_robin(alone, cfg.repeats)
  if cfg.profile_dir:
    profile_once(runs | alone, os.path.join(cfg.profile_dir, f"B{b}_H{h}"))
  bandwidth = gemm_flops.pop("bandwidth") / statistics.median(seconds[("bandwidth",)]) / 1e9
  ceilings = {dt: flops / statistics.median(seconds[("gemm", dt)]) / 1e9
              for dt, flops in gemm_flops.items()}
  tqdm.tqdm.write(f"B={b} H={h}: ceiling " + ", ".join(
      f"{dt} {gf:.1f}" for dt, gf in ceilings.items()) + f" GFLOP/s ({cfg.ceiling_size}³ "
      f"matmul), bandwidth {bandwidth:.1f} GB/s", file=sys.stdout)
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


def estimate_seconds(sizes, keys, cfg):
  """A rough time for the run: each variant compiled (2 s) and timed (its steps, the
  warm-up included, at half a float32 matmul's speed measured now; bfloat16 on a CPU at
  half that), with the GEMM ceilings' calls."""
  run, flops = gemm_run(jnp.float32, 512)
  run()
  start = time.perf_counter()
  run()
  speed = flops / (time.perf_counter() - start) / 2
  step = lambda b, h, key: (step_flops(b, cfg.in_dim, h, cfg.num_classes) / speed
                            * (2 if key[2] == "bfloat16" and jax.default_backend() == "cpu"
                               else 1) * _models(key))
  timed = sum(2 + cfg.steps * (cfg.repeats + 1) * step(b, h, key)
              for b, h in sizes for key in keys)
  ceilings = len(sizes) * len({key[2] for key in keys}) * cfg.repeats * 5e10 / speed
  return timed + ceilings


def _models(key):
  return int(key[0].split("_")[1]) if key[0].startswith(options.STACKINGS) else 1


def describe_machine():
  """The host: CPU model and cores, and its load average now."""
  model = network.cpu_info()[0] or "unknown CPU"
  return (f"machine: {model}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the start")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = read_config(flags.FLAGS)
  cache = compilation.enable()  # compile seconds: a read of the cache when it is warm
  print(f"device: {jax.devices()[0]} ({jax.default_backend()}, "
        f"{jax.local_device_count()} local), jax {jax.__version__}, "
        f"D={cfg.in_dim} K={cfg.num_classes} steps={cfg.steps} repeats={cfg.repeats} "
        f"optimizer={cfg.optimizer}, compilation cache {cache or 'off'}")
  print(describe_machine())
  peers = available_peers(cfg)
  sizes = [(b, h) for h in cfg.hidden_dims for b in cfg.batch_sizes]
  keys = variant_keys(peers, cfg)
  total, started = len(sizes) * len(keys), time.perf_counter()
  print(f"variants: {len(keys)} at each of {len(sizes)} sizes (B, H), {total} rows; about "
        f"{estimate_seconds(sizes, keys, cfg) / 60:.1f} min", flush=True)
  before, rows = machine_load(), []
  boundary.phase(f"after 0 of {total} rows")
  print(table_header(), flush=True)
  with tqdm.tqdm(total=total, unit="row", file=sys.stderr, disable=None) as bar:
    for b, h in sizes:
      bar.set_postfix_str(f"B={b} H={h}")
      measured = time_one_size(b, h, keys, cfg)
      for row in measured:
        tqdm.tqdm.write(format_row(row), file=sys.stdout)
      sys.stdout.flush()
      rows += measured
      bar.update(len(measured))
      boundary.phase(f"after {len(rows)} of {total} rows")
  print("\n".join(LEGEND))
  print(f"machine: {describe_load(before, machine_load())}; "
        f"{time.perf_counter() - started:.0f} s in all")
  print(format_ratios(rows))
  if cfg.json_out:
    with files.atomic_file(cfg.json_out, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
