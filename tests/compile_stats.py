"""Where the suite's time goes: `PYTHONPATH=tests pytest -p compile_stats [...]`.

Sums JAX's own compile-time events (tracing, lowering to MLIR, XLA's compile or its
read from the persistent cache) over every test of every pytest-xdist worker, and prints
them at the end beside the tests' own time (setup, call and teardown). The processes
that tests start are not counted.
"""

import collections
import glob
import json
import os
import tempfile
import time

from jax import monitoring
import pytest

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "tracing",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowering",
          "/jax/core/compile/backend_compile_duration": "compiling"}
DIR_ENV = "MLP_JAX_COMPILE_STATS_DIR"   # where each worker leaves its sums
totals: collections.Counter = collections.Counter()


def _on_event(event, seconds, **_):
  if event in EVENTS:
    totals[EVENTS[event]] += seconds
    totals["programs"] += event.endswith("backend_compile_duration")


monitoring.register_event_duration_secs_listener(_on_event)


def pytest_configure(config):
  del config
  if "PYTEST_XDIST_WORKER" not in os.environ:   # the workers, started later, inherit it
    os.environ[DIR_ENV] = tempfile.mkdtemp(prefix="mlp_jax_compile_stats_")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del item, nextitem
  start = time.perf_counter()
  yield
  totals["test time"] += time.perf_counter() - start


def pytest_sessionfinish(session):
  del session
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(os.path.join(os.environ[DIR_ENV], f"{worker}.json"), "w") as f:
    json.dump(totals, f)


def pytest_terminal_summary(terminalreporter):
  summed: collections.Counter = collections.Counter()
  for path in glob.glob(os.path.join(os.environ[DIR_ENV], "*.json")):
    with open(path) as f:
      summed.update(json.load(f))
  terminalreporter.write_line(
      f"compile_stats: {int(summed['programs'])} programs compiled or read from the "
      f"cache; tracing {summed['tracing']:.1f} s, lowering {summed['lowering']:.1f} s, "
      f"compiling {summed['compiling']:.1f} s, of {summed['test time']:.1f} s of test "
      "time (summed over the workers)")
