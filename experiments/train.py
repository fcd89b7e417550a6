"""Train the two-layer MLP: flags generated from mlp_jax.config.SETTINGS, then
mlp_jax.experiment.run.

    python experiments/train.py                                   # digits
    python experiments/train.py --flagfile=experiments/configs/fashion_mnist.flags
    python experiments/train.py --num_devices=4                   # every device
    python experiments/train.py --dp_target_epsilon=3             # DP-SGD, (3, 1e-5)-DP
    python experiments/train.py --num_seeds=5 --sweep=learning_rate=1e-3,2e-3
                                           # 10 models in one program, chosen on validation
    python experiments/train.py --coordinator_address=HOST:PORT --num_processes=2 \\
        --process_id=0 --workdir=/shared/run                      # one line per process

Every value is checked by mlp_jax.config.resolve, the same check experiment.run makes
from Python: a bad one is one line and exit status 1.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from mlp_jax import config as config_lib
from mlp_jax import data
from mlp_jax import experiment

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, tuple: flags.DEFINE_multi_string}


def define_flags():
  """One flag per setting, with its default and help; the choices listed in the help."""
  for s in config_lib.SETTINGS:
    bounds = config_lib.bounds_text(s)
    text = (s.help + (f" One of: {', '.join(s.choices)}." if s.choices else "")
            + (f" Must be {bounds}." if bounds else ""))
    default = list(s.default) if s.kind is tuple else s.default
    _DEFINE[s.kind](s.name, default, text)


define_flags()


def parse_flags(argv):
  """absl's parser, but a flag it cannot parse is one line on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:  # e.g. a --flagfile line without its leading --
    print(f"error: unexpected arguments {' '.join(argv[1:])!r}: settings are "
          "--name=value, on the command line and on each line of a --flagfile.",
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  values = {s.name: flags.FLAGS[s.name].value for s in config_lib.SETTINGS}
  values["sweep"] = tuple(values["sweep"] or ())
  try:
    experiment.run(config_lib.RunConfig(**values))
  except experiment.PeerLost as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(1)  # a normal exit waits ~100 s in JAX's shutdown for the lost process
  except experiment.Interrupted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)  # 130 after Ctrl-C, 143 after SIGTERM
  except (data.DataError, experiment.RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
