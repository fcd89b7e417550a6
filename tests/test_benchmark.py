"""experiments/benchmark.py runs end to end on tiny sizes and writes the JSON it promises."""

import gzip
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
import mlp_jax as mj

BENCHMARK = os.path.join(ROOT, "experiments", "benchmark.py")
LEGEND_START = "us/step: median µs per step over the repeats (min, max and each round: the JSON);"


def legend_lines(lines):
  start = lines.index(LEGEND_START)
  return lines[start:start + 9]


def run(*flags, host_devices=1):
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "   # conftest's
         f"--xla_force_host_platform_device_count={host_devices}"}
  return subprocess.run([sys.executable, BENCHMARK, *flags], capture_output=True,
                        text=True, timeout=300, cwd=ROOT, env=env)


def xla_flops_of_manual_grads(b, d, h, k):
  """What XLA counts for one mj.grads call: an independent check of the FLOP column."""
  params = mj.init_params(jax.random.key(0), d, h, k)
  X, y = jax.numpy.ones((b, d)), jax.numpy.zeros((b,), jax.numpy.int32)
  cost = jax.jit(mj.grads).lower(params, X, y).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.slow
def test_benchmark_writes_a_row_per_variant(tmp_path):
  out = tmp_path / "rows.jsonl"
  # Matmuls dominate at D = 256, H = 64, so XLA's count is close to the formula's.
  result = run("--grads=manual,autodiff", "--batch_sizes=32", "--hidden_dims=64",
               "--in_dim=256", "--num_classes=3", "--steps=3", "--repeats=2",
               "--ceiling_size=256", "--peers=jax", f"--json_out={out}",
               f"--profile_dir={tmp_path / 'profile'}")
  assert result.returncode == 0, result.stderr
  # --profile_dir: one untimed repeat of every variant traced, each a named span.
  trace, = (tmp_path / "profile" / "B32_H64").glob("plugins/profile/*/*.trace.json.gz")
  with gzip.open(trace) as f:
    spans = {event.get("name", "") for event in json.load(f)["traceEvents"]}
  assert {"manual step float32 1", "autodiff scan bfloat16 1"} <= spans   # key: (…, devices)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  plain = [r for r in rows if r["grads"] == "jax_plain"]
  rows = [r for r in rows if r["grads"] != "jax_plain"]
  assert len(rows) == 2 * 2 * 2     # grads × modes × dtypes
  assert {(r["grads"], r["mode"], r["compute_dtype"]) for r in rows} == {
      (g, m, c) for g in ("manual", "autodiff") for m in ("step", "scan")
      for c in ("float32", "bfloat16")}
  assert sorted(r["compute_dtype"] for r in plain) == ["bfloat16", "float32"]
  for r in rows + plain:  # the roofline: its own arithmetic; above 1, an error marked
    assert r["roofline_us"] > 0
    bound = max(r["gflops"] * r["us_per_step"] * 1e-6 / r["gemm_ceiling_gflops"],
                r["step_bytes"] / r["bandwidth_gbs"] / 1e9)
    assert r["roofline_us"] * 1e-6 == pytest.approx(bound)
    assert r["roofline_fraction"] == pytest.approx(r["roofline_us"] / r["us_per_step"])
    # Its noise, stated: the spread of its rounds, and the marks that follow from it.
    assert r["us_per_step_min"] <= r["us_per_step"] <= r["us_per_step_max"]
    q1, q3 = np.percentile(r["us_per_step_rounds"], [25, 75])
    assert r["spread"] == pytest.approx((q3 - q1) / r["us_per_step"])
    assert ("noisy" in r["marks"]) == (r["spread"] > 0.10)
    assert ("roofline>1" in r["marks"]) == (r["roofline_fraction"] > 1)
    assert ("ceiling>1" in r["marks"]) == (r["ceiling_fraction"] > 1)
  assert re.search(r"load average [\d.]+ [\d.]+ [\d.]+", result.stdout), result.stdout
  assert "roof: the step's bound" in result.stdout
  # The header first: the device, the machine and its load, the variants and a time.
  lines = result.stdout.splitlines()
  assert lines[0].startswith("device: cpu") and lines[1].startswith("machine: ")
  assert re.fullmatch(r"variants: 10 at each of 1 sizes \(B, H\), 10 rows; about [\d.]+ min",
                      lines[2]), lines[2]
  table = lines[3:lines.index(LEGEND_START)]
  assert table[0].split() == ["grads", "mode", "dtype", "dev", "B", "H", "us/step", "ex/s",
                              "GFLOP/s", "ceil", "roof", "comp", "s", "!"]
  assert len([line for line in table if " 32    64 " in line]) == 10   # a line a row
  assert max(len(line) for line in table + legend_lines(lines)) <= 100
  assert "manual scan / plain jax.grad+optax scan ex/s  float32" in result.stdout
  flops = xla_flops_of_manual_grads(32, 256, 64, 3)
  for r in rows:
    assert r["us_per_step"] >= r["us_per_step_min"] > 0
    assert len(r["us_per_step_rounds"]) == 2                      # --repeats, per round
    assert np.median(r["us_per_step_rounds"]) == pytest.approx(r["us_per_step"])
    seconds = r["us_per_step"] * 1e-6
    assert r["examples_per_second"] * seconds == pytest.approx(32)
    assert r["gflops"] * 1e9 * seconds == pytest.approx(flops, rel=0.05)
    assert r["ceiling_fraction"] * r["gemm_ceiling_gflops"] == pytest.approx(r["gflops"])
    assert r["compile_seconds"] > 0 and r["hidden_dim"] == 64
  assert "manual / autodiff time" in result.stdout and "ex/s" in result.stdout
  by_key = {(r["grads"], r["mode"], r["compute_dtype"]): r for r in rows}
  manual, auto = by_key[("manual", "scan", "float32")], by_key[("autodiff", "scan", "float32")]
  paired = np.array(manual["us_per_step_rounds"]) / np.array(auto["us_per_step_rounds"])
  line = (f"scan  float32  B=32    H=64: {np.median(paired):.3f} ({paired.min():.3f}-"
          f"{paired.max():.3f})")
  assert line in result.stdout, result.stdout
  q1, q3 = np.percentile(paired, [25, 75])
  noisy = (q3 - q1) / np.median(paired) > 0.10
  assert (line + " noisy" in result.stdout) == noisy
  # The ratio lines of each kind come together, not interleaved across modes.
  kinds = [line.split(" / ")[0] for line in result.stdout.splitlines()
           if line.startswith(("manual / autodiff", "bfloat16 / float32"))]
  runs = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
  assert sorted(runs) == ["bfloat16", "manual"] and len(kinds) == 2 * 2 + 2 * 2 + 1  # + plain


@pytest.mark.slow
def test_a_signal_says_how_many_rows_were_measured(tmp_path):
  """SIGTERM once the first of two sizes' rows are out (the phase the rows enter):
  those rows were printed, and the one line says where it stopped."""
  env_signal = {"MLP_JAX_SIGNAL_AT": "after 2 of 4 rows:15"}
  result = subprocess.run([sys.executable, BENCHMARK, "--grads=manual", "--modes=scan",
                           "--batch_sizes=16,32", "--hidden_dims=32", "--in_dim=32",
                           "--steps=2", "--repeats=2", "--ceiling_size=64"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **env_signal})
  assert result.returncode == 128 + 15, result.stderr
  assert result.stderr.strip().splitlines()[-1] == "stopped: SIGTERM after 2 of 4 rows."
  assert len([line for line in result.stdout.splitlines()
              if line.startswith("manual         scan")]) == 2, result.stdout


@pytest.mark.slow
def test_benchmark_rejects_unknown_values():
  result = run("--grads=numeric", "--steps=1")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --grads='numeric': must be one of manual, autodiff, manual_vjp, manual_bmajor, "
      "manual_fmajor.")


@pytest.mark.slow
def test_benchmark_times_n_devices_and_n_models_side_by_side(tmp_path):
  out = tmp_path / "rows.jsonl"
  result = run("--num_devices=1,2", "--num_models=2", "--grads=manual",
               "--compute_dtypes=float32", "--batch_sizes=8", "--hidden_dims=16",
               "--in_dim=12", "--num_classes=3", "--steps=3", "--repeats=2",
               "--ceiling_size=32", f"--json_out={out}", host_devices=2)
  assert result.returncode == 0, result.stderr
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted((r["grads"], r["mode"], r["num_devices"], r["num_models"]) for r in rows) == [
      ("manual", "scan", 1, 1), ("manual", "scan", 2, 1), ("manual", "step", 1, 1),
      ("map_2", "scan", 1, 2), ("vmap_2", "scan", 1, 2)]
  for stacked in (r for r in rows if r["num_models"] == 2):
    # Two models' examples per step: 16 per step, summed.
    assert stacked["examples_per_second"] * stacked["us_per_step"] * 1e-6 == pytest.approx(16)
  assert "2 devices / 1 ex/s      manual     scan" in result.stdout
  assert "2 models (vmap) / 2 sequential runs ex/s" in result.stdout
  assert "2 models (map) / 2 sequential runs ex/s" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--num_devices=4"], "--num_devices asks for 4 devices but there are 2"),
    (["--num_devices=2", "--batch_sizes=9"], "batch size 9 does not divide over 2 devices"),
])
def test_benchmark_rejects_impossible_device_counts(flags, message):
  result = run(*flags, "--steps=1", host_devices=2)
  assert result.returncode == 2
  assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_benchmark_dp_rows_time_and_size_each_way(tmp_path):
  out = tmp_path / "rows.jsonl"
  result = run("--dp", "--grads=", "--batch_sizes=8", "--hidden_dims=16", "--in_dim=12",
               "--num_classes=3", "--steps=2", "--repeats=1", "--ceiling_size=32",
               f"--json_out={out}")
  assert result.returncode == 0, result.stderr
  rows = {(r["grads"], r["compute_dtype"]): r
          for r in map(json.loads, out.read_text().splitlines())}
  closed_form = {"plain", "dp_clipped_sum", "dp_closed_form"}
  assert set(rows) == {(kind, dt) for kind in closed_form for dt in ("float32", "bfloat16")
                       } | {("dp_vmap_grad", "float32")}
  # vmap(grad) holds the B per-example gradients (8 · (16·12 + 16 + 3·16 + 3) floats).
  assert rows[("dp_vmap_grad", "float32")]["temp_memory_mb"] * 2**20 >= 8 * 259 * 4
  assert "dp_vmap_grad / dp_closed_form time      float32" in result.stdout
  assert "bfloat16 / float32 ex/s  dp_clipped_sum" in result.stdout
