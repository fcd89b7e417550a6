"""Draw one metric of several finished (or running) runs against their epochs, on one
axes: the runs' own metrics.jsonl, drawn by the runner's plots (mlp_jax.run.plots).

    mlp-jax compare --workdirs=runs/plain,runs/augment --labels="no augmentation,--augment=1" \\
        --metric=test_accuracy --output=compare.png

A run of several models (--num_seeds) is drawn as its mean ± std band. Any failure is
one line (mlp_jax.base.boundary).
"""

import os

from absl import flags

from mlp_jax.base import boundary

METRICS = [f"{split}_{kind}" for split in ("train", "validation", "test")
           for kind in ("accuracy", "loss")]


def define_flags():
  """compare's flags (when it runs: importing this module defines none)."""
  flags.DEFINE_list("workdirs", None, "The runs' workdirs, comma-separated.", required=True)
  flags.DEFINE_list("labels", None, "The name of each run in the legend, comma-separated "
                    "in the order of --workdirs. Default: each workdir's name.")
  flags.DEFINE_enum("metric", "test_accuracy", METRICS, "What to draw.")
  flags.DEFINE_string("output", None, "The PNG to write.", required=True)
  flags.DEFINE_string("title", None, "A title above the plot.")


def legend_names(workdirs, labels):
  """The name of each workdir's run: `labels`, or by default each workdir's name;
  UserError unless there is one distinct name per workdir."""
  names = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(names) != len(workdirs) or len(set(names)) != len(names):
    raise boundary.UserError(f"{len(names)} names ({len(set(names))} distinct) for "
                             f"{len(workdirs)} --workdirs: give --labels, one distinct "
                             "name per workdir.")
  return names


def histories(workdirs, labels, metric):
  """{label: that workdir's `metric` per epoch}; UserError for a workdir without metrics,
  without `metric` (a run without validation, say) or with rows no run writes."""
  return {label: _history(workdir, metric) for label, workdir in zip(labels, workdirs)}


def _history(workdir, metric):
  """The rows of WORKDIR/metrics.jsonl that hold `metric`, a run of several models' as
  the mean and std over all of them (stack.chosen_history)."""
  from mlp_jax.run import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from mlp_jax.training import stack  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise boundary.UserError(f"no metrics.jsonl in {workdir}: give the --workdirs of "
                             "runs of mlp-jax train.")
  try:
    rows = [row for row in workdir_lib.read_rows(path)[0]
            if metric in row.get("per_model", row)]
    models = list(range(len(stack.model_values(rows[0], metric)))) if rows else []
    history = stack.chosen_history(rows, models)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise boundary.UserError(f"{path} holds rows that mlp-jax train does not write "
                             f"({type(e).__name__}: {e}); give the workdir of a run."
                             ) from None
  if not history:
    raise boundary.UserError(f"{workdir} recorded no {metric} (its metrics.jsonl has "
                             f"{'no epoch' if not os.path.getsize(path) else 'others'}); "
                             "pick another --metric.")
  return history


def compare():
  """Draws --metric of --workdirs into --output; returns the exit status."""
  FLAGS = flags.FLAGS
  labels = legend_names(FLAGS.workdirs, FLAGS.labels)
  from mlp_jax.commands.predict import check_output  # pylint: disable=g-import-not-at-top
  check_output(FLAGS.output)
  runs = histories(FLAGS.workdirs, labels, FLAGS.metric)
  from mlp_jax.base.files import atomic_file  # pylint: disable=g-import-not-at-top
  from mlp_jax.run import plots  # pylint: disable=g-import-not-at-top
  with atomic_file(FLAGS.output) as f:
    plots.save(plots.comparison_figure(runs, FLAGS.metric, FLAGS.title), f)
  print(f"wrote {FLAGS.output}: {FLAGS.metric} of {len(runs)} runs")
  return 0


def script():
  """The command: its flags parsed from sys.argv, then compare, in the error boundary
  (exits). Its caller installs the signal handlers before importing this module."""
  boundary.command(compare, __name__, define_flags)
