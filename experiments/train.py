"""Train the two-layer MLP: parses flags, calls mlp_jax.experiment.run.

    python experiments/train.py                                   # digits
    python experiments/train.py --flagfile=experiments/configs/fashion_mnist.flags
    python experiments/train.py --num_devices=4                   # data parallel
    python experiments/train.py --dp_target_epsilon=3             # DP-SGD, (3, 1e-5)-DP
    python experiments/train.py --num_seeds=5 --sweep=learning_rate=1e-3,2e-3
                                           # 10 models in one program, chosen on validation
    python experiments/train.py --coordinator_address=HOST:PORT --num_processes=2 \
        --process_id=0 --workdir=/shared/run                      # one line per process
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from mlp_jax import data
from mlp_jax import experiment
from mlp_jax import train

D = experiment.RunConfig()  # the defaults
flags.DEFINE_string("dataset", D.dataset, "digits | fashion_mnist | mnist | npz:PATH.")
flags.DEFINE_string("data_dir", D.data_dir, "Directory of the IDX files (mnist; "
                    f"fashion_mnist defaults to {data.FASHION_MNIST_DIR}).")
flags.DEFINE_integer("hidden_dim", D.hidden_dim, "H, hidden units.", lower_bound=1)
flags.DEFINE_integer("batch_size", D.batch_size, "Examples per step.", lower_bound=1)
flags.DEFINE_integer("epochs", D.epochs, "Passes over the training set.", lower_bound=1)
flags.DEFINE_enum("optimizer", D.optimizer, list(train.OPTIMIZERS), "optax optimizer.")
flags.DEFINE_float("learning_rate", D.learning_rate, "Peak learning rate.", lower_bound=0)
flags.DEFINE_enum("schedule", D.schedule, list(train.SCHEDULES), "Learning-rate schedule.")
flags.DEFINE_float("warmup_epochs", D.warmup_epochs, "Linear warmup (warmup_cosine).",
                   lower_bound=0)
flags.DEFINE_float("weight_decay", D.weight_decay, "Weight decay of W1, W2.", lower_bound=0)
flags.DEFINE_float("clip_norm", D.clip_norm, "Clip gradients to this global norm; 0: off.",
                   lower_bound=0)
flags.DEFINE_float("label_smoothing", D.label_smoothing, "ε of (1−ε) one-hot + ε/K.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_enum("grads", D.grads, list(train.GRADIENTS),
                  "Gradient: the manual formula, jax.grad, or the manual custom_vjp.")
flags.DEFINE_enum("compute_dtype", D.compute_dtype, list(train.COMPUTE_DTYPES),
                  "Matmul dtype; bfloat16 keeps float32 params, softmax and loss.")
flags.DEFINE_integer("seed", D.seed, "Seed of init and shuffling.")
flags.DEFINE_string("workdir", D.workdir, "Output directory; rerun with it to resume. "
                    "Default: a fresh temporary directory.")
flags.DEFINE_float("validation_fraction", D.validation_fraction,
                   "Fraction of train held out for validation. Default 0, or 0.1 with "
                   "--sweep.", lower_bound=0)
flags.DEFINE_bool("progress", D.progress, "Show a progress bar.")
flags.DEFINE_integer("num_devices", D.num_devices, "Devices per process to train on, "
                     "data parallel. Default: every local device.", lower_bound=1)
flags.DEFINE_bool("distributed", D.distributed, "Start jax.distributed; without the three "
                  "flags below JAX detects them (SLURM, TPU pod, Open MPI).")
flags.DEFINE_string("coordinator_address", D.coordinator_address,
                    "host:port of process 0, for a multi-process run (jax.distributed).")
flags.DEFINE_integer("num_processes", D.num_processes, "Processes in a multi-process run.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", D.process_id, "This process's index, 0 to "
                     "num_processes - 1.", lower_bound=0)

flags.DEFINE_float("dp_noise_multiplier", D.dp_noise_multiplier, "DP-SGD with noise "
                   "multiplier σ (Gaussian noise of std σ·C per coordinate).")
flags.DEFINE_float("dp_target_epsilon", D.dp_target_epsilon, "DP-SGD with σ calibrated so "
                   "that the planned steps spend this ε (PLD accountant) at --dp_delta.")
flags.DEFINE_float("dp_clip_norm", D.dp_clip_norm, "DP-SGD: C, the bound on each "
                   "example's gradient norm.")
flags.DEFINE_enum("dp_clipping", D.dp_clipping, ["flat", "per_layer"], "DP-SGD: one norm "
                  "over all parameters, or each layer to C/√2.")
flags.DEFINE_float("dp_delta", D.dp_delta, "DP-SGD: δ of (ε, δ)-DP; must be below 1/N.")

flags.register_validator("learning_rate", lambda v: v > 0,
                         "--learning_rate must be > 0.")
flags.DEFINE_integer("num_seeds", D.num_seeds, "Train this many models together (seeds "
                     "seed, seed + 1, ...) in one program; report mean ± std.",
                     lower_bound=1)
flags.DEFINE_multi_string("sweep", list(D.sweep), "NAME=v1,v2,...: train every "
                          "combination (times the seeds) together and choose on "
                          "validation; NAME one of " + ", ".join(train.SWEEPABLE) + ".")
flags.DEFINE_enum("stacking", D.stacking, list(train.STACKINGS), "How several models "
                  "share one program: vmap (batched, for small models) or map (one after "
                  "another); default vmap, map on a CPU for large steps.")

flags.register_validator("validation_fraction", lambda v: v is None or v < 1,
                         "--validation_fraction must be below 1.")
flags.register_validator(
    "dataset", lambda v: v in ("digits", "fashion_mnist", "mnist") or
    (v.startswith("npz:") and len(v) > 4),
    f"--dataset must be one of {', '.join(data.DATASETS)}.")
flags.register_multi_flags_validator(
    ["num_processes", "process_id"],
    lambda f: f["process_id"] is None or f["num_processes"] is None
    or f["process_id"] < f["num_processes"],
    "--process_id must be below --num_processes (processes count from 0).")
flags.register_validator(
    "coordinator_address",
    lambda v: v is None or (":" in v and v.rsplit(":", 1)[1].isdigit()),
    "--coordinator_address must be host:port, e.g. 10.0.0.1:1234.")


def parse_flags(argv):
  """absl's parser, but a bad flag is one line on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = experiment.RunConfig(**{f: flags.FLAGS[f].value
                                   for f in experiment.RunConfig._fields})
  config = config._replace(sweep=tuple(config.sweep))
  try:
    experiment.run(config)
  except experiment.PeerLost as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(1)  # a normal exit waits ~100 s in JAX's shutdown for the lost process
  except experiment.Interrupted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(130)
  except (data.DataError, experiment.RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
