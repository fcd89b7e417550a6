"""`mlp-jax`, the installed command (and `python -m mlp_jax`): one subcommand per script,
with that script's flags, help and exit statuses.

    mlp-jax train --preset=digits                  # experiments/train.py
    mlp-jax predict --workdir=W --input=new.npz    # experiments/predict.py
    mlp-jax benchmark                              # experiments/benchmark.py
    mlp-jax gradcheck --grads=my_grads.py:grads    # python -m mlp_jax.gradcheck
    mlp-jax compare --workdirs=A,B --output=c.png  # one metric of runs, on one axes
    mlp-jax train --help                           # a command's flags
"""

import importlib
import sys

from mlp_jax.base import boundary

COMMANDS = {"train": "mlp_jax.commands.train", "predict": "mlp_jax.commands.predict",
            "benchmark": "mlp_jax.commands.benchmark", "gradcheck": "mlp_jax.gradcheck",
            "compare": "mlp_jax.commands.compare"}


def main() -> None:
  """Runs the command named by sys.argv[1] with the arguments after it (exits)."""
  boundary.install_stop_at_once()   # before any third-party import: a signal is one line
  name = sys.argv[1] if len(sys.argv) > 1 else ""
  if name in ("-h", "--help", "help"):
    print(__doc__.strip())
    sys.exit(0)
  if name not in COMMANDS:
    boundary.refuse_usage(f"{'no command' if not name else repr(name) + ' is not a command'}"
                          f": give one of {', '.join(COMMANDS)}, e.g. mlp-jax train "
                          "--preset=digits (mlp-jax --help).")
  sys.argv = [f"mlp-jax {name}", *sys.argv[2:]]
  importlib.import_module(COMMANDS[name]).script()
