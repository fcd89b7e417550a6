"""Classify new examples with a finished run's model (mlp_jax.run.trained).

    python experiments/predict.py --workdir=W --input=new.npz          # x [, y]
    python experiments/predict.py --workdir=W --input=t10k-images-idx3-ubyte.gz \\
        --labels=t10k-labels-idx1-ubyte.gz
    python experiments/predict.py --workdir=W --input=a.png,b.png --output=pred.csv \\
        --labels=labels.csv

Prints a header line and one line per example (name, class, its name, probability;
tab-separated), or writes them all with every class probability to --output (CSV,
atomically: a failed write leaves any earlier file as it was); with labels, the
accuracy. The inputs are read and classified
in batches of trained.PREDICT_ROWS examples, so memory does not grow with the input.
Any failure is one line (mlp_jax.base.boundary).
"""

import contextlib
import os

from absl import flags

from mlp_jax.base import boundary


def define_flags():
  """predict's flags (when it runs: importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Workdir of a finished run (or its params.npz).",
                      required=True)
  flags.DEFINE_string("input", None, "An .npz (x, optional y), an IDX file, PNG files "
                      "(comma-separated) or a directory of PNGs.", required=True)
  flags.DEFINE_string("labels", None, "The labels of --input, one per example in its order: "
                      ".npy, .npz (y), IDX, or CSV (a column 'label', or the only one). "
                      "Prints the accuracy.")
  flags.DEFINE_string("output", None, "CSV to write: name, class, class name, then p of "
                      "each class. Default: print one line per example.")


def check_output(path):
  """UserError unless `path` can be a new or replaced file: not a directory, in a
  directory that exists."""
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise boundary.UserError(f"--output={path} is a directory; give a file name, e.g. "
                             f"{os.path.join(path, 'predictions.csv')}.")
  if not os.path.isdir(directory):
    raise boundary.UserError(f"--output={path}: the directory {directory} does not exist; "
                             "create it first.")
  if os.path.lexists(path) and not (os.path.isfile(path) and not os.path.islink(path)):
    raise boundary.UserError(f"--output={path} is a link, a device, a pipe or a socket, not "
                             "a file: predict.py replaces only a regular file; give "
                             "another file name.")


def check_paths(workdir, inputs, labels):
  """UserError for a --workdir, an --input or --labels that is not there (before JAX
  starts)."""
  if not os.path.exists(workdir):
    raise boundary.UserError(f"no params.npz at {workdir}: give the --workdir of a "
                             "finished run.")
  missing = [repr(p) for p in [*inputs.split(","), *labels] if p and not os.path.exists(p)]
  if missing:
    raise boundary.UserError(f"no such file: {', '.join(missing)}.")


def predict():
  """Streams the inputs through the model; returns the exit status."""
  FLAGS = flags.FLAGS
  check_paths(FLAGS.workdir, FLAGS.input, [FLAGS.labels] if FLAGS.labels else [])
  if FLAGS.output:
    check_output(FLAGS.output)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mlp_jax.base import compilation  # pylint: disable=g-import-not-at-top
  from mlp_jax.core import prediction  # pylint: disable=g-import-not-at-top
  from mlp_jax.run import trained  # pylint: disable=g-import-not-at-top
  compilation.enable()
  try:
    model = trained.load(FLAGS.workdir)
    batches = trained.iter_inputs(FLAGS.input, model, FLAGS.labels)
    count = hits = 0
    has_labels = False
    reads = [FLAGS.workdir, *FLAGS.input.split(","), *([FLAGS.labels] if FLAGS.labels else [])]
    with (trained.prediction_csv(FLAGS.output, model, reads) if FLAGS.output
          else contextlib.nullcontext()) as write:
      for names, x, labels in batches:
        probabilities = np.asarray(prediction.probabilities(
            model.params, model.inputs(x, names), model.activation, names))
        predicted = np.asarray(prediction.classes(probabilities))
        if write is not None:
          write(names, probabilities)
        else:
          if not count:   # the header, once the first rows are known to be good
            print("name\tclass\tclass_name\tprobability")
          for name, k, p in zip(names, predicted, probabilities):
            print(f"{name}\t{k}\t{model.class_names[k]}\t{p[k]:.4f}")
        count += len(names)
        if labels is not None:
          has_labels, hits = True, hits + int(np.sum(predicted == labels))
      if not count:  # raised inside: no CSV of a header alone replaces an earlier one
        raise boundary.UserError(f"--input={FLAGS.input} holds no examples.")
  except ValueError as e:  # trained's one-line refusals
    raise boundary.UserError(str(e)) from None
  if FLAGS.output:
    print(f"wrote {count} predictions to {FLAGS.output}")
  if has_labels:
    print(f"accuracy {100 * hits / count:.2f}% on {count} examples")
  return 0


def script():
  """The command: its flags parsed from sys.argv, then predict, in the error boundary
  (exits). Its caller installs the signal handlers before importing this module."""
  boundary.command(predict, __name__, define_flags)
