"""The benchmark's report: one row per variant (the --json_out object), the table's
lines (printed as each size's rows are measured) and the ratios. benchmark.py makes
them."""

import statistics

import jax

from mlp_jax.base.options import GRADIENTS, STACKINGS

from mlp_jax.commands.benchmark_harness import peak_memory_mb, roofline, step_bytes, step_flops
from mlp_jax.commands.benchmark_variants import LAYOUT_ROWS


# A row whose rounds' interquartile range is more than this fraction of their median,
# or a ratio whose per-round values' is, is marked noisy: its digits beyond that are not
# the code's. (The quartiles, not min and max: one slow round of seven is not noise.)
NOISY = 0.10


def spread(values):
  """(q3 − q1) / median of a row's or a ratio's per-round values (0 for one round)."""
  if len(values) < 2:
    return 0.0
  q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
  return (q3 - q1) / median


def marks(row):
  """What makes a row's numbers doubtful: "noisy" (the interquartile range of its rounds
  over NOISY of their median), "ceiling>1" or "roofline>1" (faster than the hardware's
  limit as measured: the ceiling or bandwidth run was slowed, a measurement error)."""
  found = ["noisy"] if row["spread"] > NOISY else []
  found += [f"{name}>1" for name in ("ceiling", "roofline") if row[f"{name}_fraction"] > 1]
  return found


def make_row(key, size, timing, machine, cfg):
  """One result row (the --json_out object) of variant key = (grads, mode, dtype,
  devices) at size (B, H), against machine = (its dtype's GEMM ceiling GFLOP/s, the
  memory bandwidth GB/s); examples/s and GFLOP/s are summed over the models trained
  together."""
  (grads, mode, compute_dtype, devices), (b, h), (ceiling, bandwidth) = key, size, machine
  median, num_models = statistics.median(timing.seconds), timing.num_models
  gflops = num_models * step_flops(b, cfg.in_dim, h, cfg.num_classes) / median / 1e9
  row = {"grads": grads, "mode": mode, "compute_dtype": compute_dtype, "batch_size": b,
          "num_devices": devices, "num_models": num_models, "optimizer": cfg.optimizer,
          "hidden_dim": h, "in_dim": cfg.in_dim, "num_classes": cfg.num_classes,
          "us_per_step": median * 1e6, "us_per_step_min": min(timing.seconds) * 1e6,
          "us_per_step_max": max(timing.seconds) * 1e6,
          "spread": spread(timing.seconds),
          "us_per_step_rounds": [t * 1e6 for t in timing.seconds],
          "examples_per_second": num_models * b / median, "gflops": gflops,
          "gemm_ceiling_gflops": ceiling, "ceiling_fraction": gflops / ceiling,
          "compile_seconds": timing.compile_seconds, "peak_memory_mb": peak_memory_mb(),
          **roofline(median, num_models * step_flops(b, cfg.in_dim, h, cfg.num_classes),
                     num_models * step_bytes(b, cfg.in_dim, h, cfg.num_classes,
                                             cfg.optimizer), ceiling, bandwidth),
          "temp_memory_mb": timing.temp_mb,
          "device": str(jax.devices()[0]), "platform": jax.default_backend()}
  row["marks"] = marks(row)
  return row


# The table's columns: (title, width, the row's text); 97 columns in all, wider details
# (min, max and each round's µs, temporary memory, the roofline's bound) in the JSON.
_MARKS = {"noisy": "n", "ceiling>1": "c", "roofline>1": "r"}
COLUMNS = (
    ("grads", -14, lambda r: r["grads"]), ("mode", -5, lambda r: r["mode"]),
    ("dtype", -8, lambda r: r["compute_dtype"]), ("dev", 3, lambda r: r["num_devices"]),
    ("B", 5, lambda r: r["batch_size"]), ("H", 5, lambda r: r["hidden_dim"]),
    ("us/step", 9, lambda r: f"{r['us_per_step']:.1f}"),
    ("ex/s", 10, lambda r: f"{r['examples_per_second']:,.0f}"),
    ("GFLOP/s", 7, lambda r: f"{r['gflops']:.1f}"),
    ("ceil", 4, lambda r: f"{r['ceiling_fraction']:.2f}"),
    ("roof", 4, lambda r: f"{r['roofline_fraction']:.2f}"),
    ("comp s", 6, lambda r: f"{r['compile_seconds']:.2f}"),
    ("!", -3, lambda r: "".join(_MARKS[m] for m in r["marks"])),
)


def _cells(texts):
  return " ".join(f"{t:<{-w}}" if w < 0 else f"{t:>{w}}"
                  for t, (_, w, _) in zip(texts, COLUMNS)).rstrip()


def table_header():
  """The table's two header lines (its rows follow as they are measured: format_row)."""
  title = _cells([c[0] for c in COLUMNS])
  return f"{title}\n{'-' * len(title)}"


def format_row(row):
  """One row of the table (100 columns at most)."""
  return _cells([str(c[2](row)) for c in COLUMNS])


LEGEND = [
    "us/step: median µs per step over the repeats (min, max and each round: the JSON);",
    "  ex/s and GFLOP/s from the median, summed over the models of a stack.",
    "ceil: GFLOP/s as a fraction of a jitted N×N×N matmul's in the same dtype, timed in "
    "the same",
    "  rounds. roof: the step's bound, max(FLOPs at that ceiling, its bytes at the "
    "measured",
    "  bandwidth; optimizer state included), as a fraction of the measured time (1 = the "
    "limit).",
    "comp s: jit lowering and compilation alone (0 for PyTorch); temporary memory: the "
    "JSON (--dp).",
    f"!: n = noisy, the interquartile range of its rounds over {NOISY:.0%} of their median "
    "(trust",
    "  no digit past that); c, r = faster than the ceiling or the roofline as measured: a",
    "  measurement error (the ceiling or bandwidth run was slowed), not a speed."]


def ratio(r, other, what="time"):
  """Row r over row other, each round's pair (the two ran one after the other, so the
  machine's drift between rounds cancels in each): time, or examples/s ("ex/s"), as
  "median (min-max)", marked noisy where their interquartile range is over NOISY of
  their median."""
  values = [a / b if what == "time" else
            (r["num_models"] * r["batch_size"] / a) / (other["num_models"] * other["batch_size"] / b)
            for a, b in zip(r["us_per_step_rounds"], other["us_per_step_rounds"], strict=True)]
  median = statistics.median(values)
  return (f"{median:.3f} ({min(values):.3f}-{max(values):.3f})"
          + (" noisy" if spread(values) > NOISY else ""))


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
                             f"{ratio(r, auto)}")
    if dt == "bfloat16" and (g, mode, "float32", n, b, h) in by_key:
      f32 = by_key[(g, mode, "float32", n, b, h)]
      kinds["bfloat16"].append(
          f"bfloat16 / float32 ex/s  {g:10} {mode:5} {where}: {ratio(r, f32, 'ex/s')}")
    if n > 1 and (g, mode, dt, 1, b, h) in by_key:
      one = by_key[(g, mode, dt, 1, b, h)]
      kinds["devices"].append(
          f"{n} devices / 1 ex/s      {g:10} {mode:5} {dt:8} B={b:<5} H={h}: "
          f"{ratio(r, one, 'ex/s')}")
    if g.startswith(STACKINGS) and ("manual", "scan", dt, 1, b, h) in by_key:
      one = by_key[("manual", "scan", dt, 1, b, h)]
      n_models, stacking = r["num_models"], g.split("_")[0]
      kinds["models"].append(
          f"{n_models} models ({stacking}) / {n_models} sequential runs ex/s".ljust(46) +
          f"{dt:8} B={b:<5} H={h}: {ratio(r, one, 'ex/s')}")
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
           f"{ratio(r, plain, 'ex/s')}")
  if g in _TORCH_PEERS:
    dtype, label = _TORCH_PEERS[g]
    best = max((q for q in rows if q["grads"] in (*GRADIENTS, "plain")
                and (q["batch_size"], q["hidden_dim"], q["compute_dtype"],
                     q["num_devices"]) == (b, h, dtype, 1)),
               key=lambda q: q["examples_per_second"], default=None)
    if best:
      yield (f"{label}  B={b:<5} H={h}: {ratio(best, r, 'ex/s')} "
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
      yield (f"{num} / {den} {what}".ljust(40) + f"{dt:8} B={b:<5} H={h}: "
             f"{ratio(r, other, what)}")
