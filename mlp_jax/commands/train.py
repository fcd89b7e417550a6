"""Train the two-layer MLP: flags generated from mlp_jax.training.config.SETTINGS, then
mlp_jax.run.experiment.run. `mlp-jax train` and experiments/train.py run it.

    python experiments/train.py                                   # digits
    python experiments/train.py --flagfile=experiments/configs/fashion_mnist.flags
    mlp-jax train --preset=fashion_mnist                          # the same, installed
    python experiments/train.py --num_devices=4                   # 4 devices (default: all)
    python experiments/train.py --dp_target_epsilon=3             # DP-SGD, (3, 1e-5)-DP
    python experiments/train.py --num_seeds=5 --sweep=learning_rate=1e-3,2e-3
                                           # 10 models in one program, chosen on validation
    python experiments/train.py --coordinator_address=HOST:PORT --num_processes=2 \\
        --process_id=0 --workdir=/shared/run                      # one line per process

Every value is checked by mlp_jax.training.config.resolve, the same check experiment.run makes
from Python: a bad one is one line and exit status 2. Whatever else fails is one line
too (mlp_jax.base.boundary); an unexpected fault, or any once the run has its workdir,
also writes its traceback to a log file that line names.
"""

import os
import sys

from absl import app, flags

from mlp_jax.base import boundary, environment


def define_flags():
  """One flag per setting, with its default and help (the choices listed), and --preset.
  Called inside the error boundary (boundary.script), and by parse_flags for a parse in
  this process (the tests'); once."""
  if "dataset" in flags.FLAGS:  # defined already (tests parse many times in-process)
    return
  flags.DEFINE_string("preset", None, f"A preset's flags, as a --flagfile: one of "
                      f"{', '.join(preset_names())} (mlp_jax/presets).")
  from mlp_jax.training import spec  # pylint: disable=g-import-not-at-top
  spec.define_flags(spec.SETTINGS)


# The presets: NAME.flags, installed with the package (experiments/configs is a link here).
PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")


def preset_names():
  return sorted(n.removesuffix(".flags") for n in os.listdir(PRESETS) if n.endswith(".flags"))


def with_presets(argv):
  """argv with each --preset=NAME made --flagfile=PRESETS/NAME.flags, where it stands (the
  flags after it override it, as after a --flagfile); an unknown name: one line, status 2."""
  expanded = [argv[0]]
  for arg in argv[1:]:
    name = arg.removeprefix("--preset=")
    if arg.startswith("--preset=") and name not in preset_names():
      boundary.refuse_usage(f"--preset={name!r} is not a preset; the presets are "
                            f"{', '.join(preset_names())}.")
    expanded.append(f"--flagfile={os.path.join(PRESETS, name)}.flags"
                    if arg.startswith("--preset=") else arg)
  return expanded


def parse_flags(argv):
  """boundary.parse_flags, with the runner's flags defined first and --preset read."""
  define_flags()
  rest = boundary.parse_flags(with_presets(argv))
  if flags.FLAGS.preset is not None:   # given as "--preset NAME", or in a flagfile
    boundary.refuse_usage("--preset goes on the command line as --preset=NAME (in a "
                          "flagfile: --flagfile=FILE).")
  return rest


def train(argv):
  """The run of the parsed flags (argv: none left, boundary.parse_flags); raises what
  experiment.run raises."""
  del argv
  environment.make_host_devices(flags.FLAGS["num_devices"].value)   # before JAX starts
  from mlp_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from mlp_jax.run import experiment  # pylint: disable=g-import-not-at-top
  values = {s.name: flags.FLAGS[s.name].value for s in config_lib.SETTINGS}
  values["sweep"] = tuple(values["sweep"] or ())
  experiment.run(config_lib.RunConfig(**values))
  return 0


def main(argv):
  """train() in the error boundary: any failure is one line; exits with its status."""
  sys.exit(boundary.run(lambda: train(argv)))


def script():
  """The command: its flags parsed from sys.argv, then main, in the error boundary
  (exits). Its caller installs the signal handlers before importing this module."""
  boundary.script(lambda: app.run(main, flags_parser=parse_flags), __name__,
                  define_flags)
