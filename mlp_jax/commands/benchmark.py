"""Benchmark the training step (loss, gradients, optax Adam update) of a D-H-K MLP.

    python experiments/benchmark.py                      # 784-1024-10, B = 64, 256
    python experiments/benchmark.py --batch_sizes=256 --modes=scan --peers=torch

Rows: gradient (manual | autodiff | manual_vjp; manual_bmajor | manual_fmajor: the
manual step in a fixed layout, where "manual" is mlp_jax.core.network.choose_layout's) × mode (step: a Python loop of the
jitted step; scan: `steps` steps in one jitted lax.scan, the runner's epoch) × compute
dtype (float32 | bfloat16 matmuls with float32 params, softmax and loss) × batch size ×
hidden size × device count (--num_devices: data parallel over a mesh of that many
devices, mlp_jax/training/parallel.py; on a CPU host, the largest count is made into
that many host devices before JAX starts, as train.py's --num_devices is).
Each: median and min µs per step over --repeats, examples/s, GFLOP/s and
its fraction of the GEMM ceiling measured in this run (same device, same dtype), compile
seconds (with the persistent compilation cache, mlp_jax/base/compilation.py, on by default:
MLP_JAX_COMPILATION_CACHE= for cold compiles), peak device memory where the platform
reports it. Whole commands, fixed costs included: experiments/startup.py.
"""

from absl import app, flags

from mlp_jax.base import boundary, environment


def define_flags():
  """The benchmark's flags, one per setting of spec.BenchmarkConfig."""
  from mlp_jax.training import spec  # pylint: disable=g-import-not-at-top
  spec.define_flags(spec.BENCHMARK)


def main(argv):
  """On a CPU host, the --num_devices the run needs as host devices (before JAX
  starts), then the run (benchmark_run.main)."""
  counts = [int(v) for v in flags.FLAGS["num_devices"].value or ()
            if str(v).strip().isdigit()]   # the others: refused by the run's checks
  environment.make_host_devices(max(counts, default=None))
  from mlp_jax.commands import benchmark_run  # pylint: disable=g-import-not-at-top  (JAX)
  benchmark_run.main(argv)


def script():
  """The command: its flags parsed from sys.argv, then main, in the error boundary
  (exits). Its caller installs the signal handlers before importing this module."""
  boundary.script(lambda: app.run(main, flags_parser=boundary.parse_flags), __name__,
                  define_flags)
