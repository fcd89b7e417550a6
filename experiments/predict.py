"""Classify new examples with a finished run's model (mlp_jax.trained).

    python experiments/predict.py --workdir=W --input=new.npz          # x [, y]
    python experiments/predict.py --workdir=W --input=t10k-images-idx3-ubyte.gz \
        --labels=t10k-labels-idx1-ubyte.gz
    python experiments/predict.py --workdir=W --input=a.png,b.png --output=pred.csv

Prints one line per example (name, class, its name, probability), or writes them all
with every class probability to --output (CSV); with labels, the accuracy.
"""

import csv
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mlp_jax import data
from mlp_jax import trained

flags.DEFINE_string("workdir", None, "Workdir of a finished run (or its params.npz).",
                    required=True)
flags.DEFINE_string("input", None, "An .npz (x, optional y), an IDX file, PNG files "
                    "(comma-separated) or a directory of PNGs.", required=True)
flags.DEFINE_string("labels", None, "IDX file of the labels of an IDX --input.")
flags.DEFINE_string("output", None, "CSV to write: name, class, class name, then p of "
                    "each class. Default: print one line per example.")


def write_csv(path, model, names, probabilities):
  with open(path, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["name", "class", "class_name", *(f"p_{c}" for c in model.class_names)])
    for name, p in zip(names, probabilities):
      k = int(np.argmax(p))
      out.writerow([name, k, model.class_names[k], *(f"{v:.6g}" for v in p)])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  try:
    model = trained.load(FLAGS.workdir)
    names, x, labels = trained.read_inputs(FLAGS.input, model, FLAGS.labels)
    probabilities = np.asarray(model.predict_proba(x))
  except (ValueError, data.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  predicted = probabilities.argmax(axis=1)
  if FLAGS.output:
    write_csv(FLAGS.output, model, names, probabilities)
    print(f"wrote {len(names)} predictions to {FLAGS.output}")
  else:
    for name, k, p in zip(names, predicted, probabilities):
      print(f"{name}\t{k}\t{model.class_names[k]}\t{p[k]:.4f}")
  if labels is not None:
    print(f"accuracy {100 * np.mean(predicted == labels):.2f}% on {len(labels)} examples")


if __name__ == "__main__":
  app.run(main)
