"""Train the two-layer MLP: flags generated from mlp_jax.training.config.SETTINGS, then
mlp_jax.run.experiment.run.

    python experiments/train.py                                   # digits
    python experiments/train.py --flagfile=experiments/configs/fashion_mnist.flags
    python experiments/train.py --num_devices=4                   # 4 devices (default: all)
    python experiments/train.py --dp_target_epsilon=3             # DP-SGD, (3, 1e-5)-DP
    python experiments/train.py --num_seeds=5 --sweep=learning_rate=1e-3,2e-3
                                           # 10 models in one program, chosen on validation
    python experiments/train.py --coordinator_address=HOST:PORT --num_processes=2 \\
        --process_id=0 --workdir=/shared/run                      # one line per process

Every value is checked by mlp_jax.training.config.resolve, the same check experiment.run makes
from Python: a bad one is one line and exit status 2. Whatever else fails is one line
too (mlp_jax.base.boundary), with the traceback in a log file that line names.
"""

import sys

from mlp_jax.base import boundary

if __name__ == "__main__":   # before any third-party import: a signal is one line
  boundary.install_stop_at_once()

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

def define_flags():
  """One flag per setting, with its default and help; the choices listed in the help.
  Called when the flags are first parsed: JAX is imported inside the error boundary."""
  if "dataset" in flags.FLAGS:  # defined already (tests parse many times in-process)
    return
  from mlp_jax.training import spec  # pylint: disable=g-import-not-at-top
  spec.define_flags(spec.SETTINGS)


def parse_flags(argv):
  """boundary.parse_flags, with the runner's flags defined first."""
  define_flags()
  return boundary.parse_flags(argv)


def train(argv):
  """The run of the parsed flags (argv: none left, boundary.parse_flags); raises what
  experiment.run raises."""
  del argv
  boundary.make_host_devices(flags.FLAGS["num_devices"].value)   # before JAX starts
  from mlp_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from mlp_jax.run import experiment  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  values = {s.name: flags.FLAGS[s.name].value for s in config_lib.SETTINGS}
  values["sweep"] = tuple(values["sweep"] or ())
  experiment.run(config_lib.RunConfig(**values))
  return 0


def main(argv):
  """train() in the error boundary: any failure is one line; exits with its status."""
  sys.exit(boundary.run(lambda: train(argv)))


if __name__ == "__main__":
  boundary.script(lambda: app.run(main, flags_parser=parse_flags))
