"""What a finished (or interrupted) run leaves and prints, for one model or many.

    params.npz      the chosen model (the first seed of the chosen configuration; the
                    only model of a single run) with its input preprocessing
    curves.png      the chosen configuration's curves (mean ± std band over its seeds)
    confusion.png   the chosen model's test confusion matrix
    filters.png     the chosen model's W1 rows as images (image datasets)
  and with several models:
    params_all.npz  every model stacked (w1 is (M, H, D)), each model's seed and values
    sweep.json      the configurations ranked on validation, the chosen one's test
A k-fold selection (--cv_folds) has no test and no final model (its refit has them):
it writes curves.png, params_all.npz (with each model's fold) and sweep.json.
"""

import functools
import os
from typing import Any, NamedTuple, Optional, Union

import jax
import numpy as np

from mlp_jax.core.model import Params
from mlp_jax.data import datasets
from mlp_jax.run import plots, trained
from mlp_jax.run.workdir import atomic_file, write_json
from mlp_jax.training import stack as stack_lib
from mlp_jax.training.config import Config
from mlp_jax.training.stack import Row, Stack


class Finished(NamedTuple):
  """The end of a run, as the reports read it (host values)."""

  history: list[Row]              # the metrics rows, epoch 1 on
  stack: Stack
  ranking: list[dict[str, Any]]   # stack.choose's: the chosen configuration first
  # The final test evaluation: accuracy (M,), loss (M,), predictions (M, N); None for a
  # k-fold selection.
  test: Optional[dict[str, np.ndarray]]
  params: Params                  # stacked: leading (M,)

  @property
  def models(self) -> list[int]:
    """The chosen configuration's models."""
    return self.ranking[0]["models"]


def run_title(config: Config, inputs: datasets.Dataset, configuration: dict[str, float],
              band: Optional[str] = None) -> str:
  """What curves.png shows, in a line or two: the data, the network, the settings (the
  chosen configuration's values replacing the flags'), and what a ± std band is."""
  dataset = config.dataset if not config.dataset.startswith("npz:") else (
      "npz:" + os.path.basename(config.dataset[4:]))
  settings: dict[str, Any] = {"optimizer": config.optimizer, "learning_rate": config.learning_rate,
              "weight_decay": config.weight_decay, "batch_size": config.batch_size,
              **configuration}
  text = ", ".join(f"{k}={v:g}" if not isinstance(v, str) else f"{k}={v}"
                   for k, v in settings.items())
  title = (f"{dataset}: a {inputs.mean.shape[-1]}-{config.hidden_dim}-{inputs.num_classes} "
           f"MLP, {text}")
  return title + (f"\nthe band: mean ± std over {band}" if band else "")


def _models_text(stack: Stack, models: list[int]) -> Optional[str]:
  """What the chosen models are: "5 seeds", "5 folds × 2 seeds", or None for one."""
  if len(models) == 1:
    return None
  seeds = f"{len(stack.seeds)} seed{'s' if len(stack.seeds) > 1 else ''}"
  return seeds if stack.row_folds is None else f"{len(stack.folds)} folds × {seeds}"


def _model_name(stack: Stack, m: int) -> str:
  """"model m, seed s" (with its fold for a k-fold model)."""
  fold = stack.model_folds[m]
  return (f"model {m}, seed {stack.model_seeds[m]}"
          + (f", fold {fold}" if fold is not None else ""))


def chosen_test(finished: Finished) -> dict[str, float]:
  """Mean and std over the chosen models of the final test loss and accuracy."""
  if finished.test is None:
    raise ValueError("a k-fold selection has no test evaluation: its refit has one.")
  return stack_lib.mean_std({"test_accuracy": finished.test["accuracy"],
                             "test_loss": finished.test["loss"]}, finished.models)


def write_outputs(workdir: str, finished: Finished, inputs: datasets.Dataset, config: Config
                  ) -> None:
  """params.npz, the plots (unless --noplots), and for several models params_all.npz and
  sweep.json, each written to a temporary name and renamed (workdir.atomic_file).
  `inputs` is the run's datasets.Dataset without its arrays (the preprocessing)."""
  best = finished.models[0]
  params = jax.tree.map(lambda a: a[best], finished.params)
  path = functools.partial(os.path.join, workdir)
  stack = finished.stack
  title = run_title(config, inputs, finished.ranking[0]["configuration"],
                    _models_text(stack, finished.models))
  if config.plots:
    with atomic_file(path("curves.png")) as f:
      plots.plot_curves(stack_lib.chosen_history(finished.history, finished.models), f,
                        config.label_smoothing, title)
  if finished.test is not None:
    with atomic_file(path("params.npz")) as f:
      trained.save(f, params, inputs, config.dataset, config.activation)
  if finished.test is not None and config.plots:
    with atomic_file(path("confusion.png")) as f:
      plots.plot_confusion(plots.confusion_matrix(
          inputs.y_test, finished.test["predictions"][best], inputs.num_classes), f,
                           inputs.class_names,
                           _model_name(stack, best) if stack.num_models > 1 else None)
    if plots.is_image(inputs.input_shape, params.w1.shape[1]):
      with atomic_file(path("filters.png")) as f:
        plots.plot_filters(params.w1, inputs.input_shape, f)
  if stack.num_models == 1:
    return
  folds = {} if stack.row_folds is None else {"fold": np.array(stack.model_folds)}
  with atomic_file(path("params_all.npz")) as f:
    arrays: dict[str, Any] = {**finished.params._asdict(), **folds, **stack.values}
    np.savez(f, seed=np.array(stack.model_seeds), **arrays)
  record: dict[str, Any] = {"chosen": finished.ranking[0]["configuration"],
            "chosen_models": finished.models, "seeds": stack.seeds}
  if stack.row_folds is not None:
    record["folds"] = list(stack.folds)
  if finished.test is not None:
    record["chosen_test"] = chosen_test(finished)
  write_json(path("sweep.json"), {**record, "ranking": finished.ranking})


def write_running_curves(workdir: str, history: list[Row], config: Config,
                         inputs: datasets.Dataset, num_models: int) -> None:
  """curves.png during a run (unless --noplots): every model's mean (± std) so far; the
  end of the run draws the chosen configuration's (write_outputs)."""
  if not config.plots:
    return
  band = f"all {num_models} models, while training" if num_models > 1 else None
  with atomic_file(os.path.join(workdir, "curves.png")) as f:
    plots.plot_curves(stack_lib.chosen_history(history, list(range(num_models))), f,
                      config.label_smoothing, run_title(config, inputs, {}, band))


def span(first: int, last: int, noun: str) -> str:
  """"seed 0" or "seeds 0-4": a run of numbers as a reader says it."""
  return f"{noun} {first}" if first == last else f"{noun}s {first}-{last}"


def speed(new_rows: list[Row], num_examples: int) -> str:
  """One line on this invocation's speed: the first epoch (which compiles) apart, then
  s per epoch and examples/s both from the mean of the later epochs."""
  first = new_rows[0]
  text = f"epoch {first['epoch']} {first['seconds']:.2f} s (with compiling)"
  rest = new_rows[1:]
  if rest:
    mean = sum(row["seconds"] for row in rest) / len(rest)
    text += (f"; {span(rest[0]['epoch'], rest[-1]['epoch'], 'epoch')} {mean:.3f} s per "
             f"epoch, {num_examples / mean:,.0f} examples/s")
  return text


def _table(last: Row, splits: list[str], one: bool) -> list[str]:
  """The loss and accuracy table of the chosen models' last row: one model's values, or
  mean ± std over its seeds."""
  def cell(split: str, metric: str, scale: float, unit: bool) -> str:
    mean = scale * last[f"{split}_{metric}"]
    std = scale * last.get(f"{split}_{metric}_std", 0.0)
    return f"{mean:11.2f}%" if one and unit else f"{mean:12.4f}" if one else (
        f"{mean:9.2f}% ± {std:.2f}" if unit else f"{mean:10.4f} ± {std:.4f}")
  width = 12 if one else 18
  return [f"{'':10}" + "".join(f"{s:>{width}}" for s in splits),
          f"{'loss':10}" + "".join(cell(s, "loss", 1, False) for s in splits),
          f"{'accuracy':10}" + "".join(cell(s, "accuracy", 100, True) for s in splits)]


def _dp_line(last: Row, dp_record: dict[str, Any]) -> str:
  delta, clip = dp_record["delta"], dp_record["clip_norm"]
  settings = (f"δ = {delta:g}, σ = {_values_text(dp_record['noise_multiplier'], '.4g')}, "
              f"q = {dp_record['sampling_rate']:.4g}, {last['steps']} steps, C = "
              f"{_values_text(clip, 'g')} ({dp_record['clipping']})")
  if "per_model" not in last:
    return (f"DP-SGD: ε = {last['epsilon']:.3f} (PLD; RDP {last['epsilon_rdp']:.3f}) at "
            f"{settings}")
  eps = [float(f"{e:.3f}") for e in last["per_model"]["epsilon"]]
  return (f"DP-SGD: ε = {_values_text(eps if len(set(eps)) > 1 else eps[0], '.3f')} per "
          "model (PLD), "
          f"{last['epsilon_all_models']:.3f} for all {len(eps)} models released together "
          f"(any one chosen among them), at {settings}")


def _values_text(value: Union[float, list[float]], spec: str) -> str:
  return format(value, spec) if not isinstance(value, list) else (
      f"{format(min(value), spec)}-{format(max(value), spec)}")


def summary(finished: Finished, new_rows: list[Row], num_examples: int, seconds: float,
            dp_record: Optional[dict[str, Any]] = None) -> str:

  """The lines a run prints at its end: the chosen models' last epoch, their test
  accuracy (mean ± std over seeds for several), how they were chosen, the speed, ε."""
  models, stack = finished.models, finished.stack
  one = len(models) == 1     # the chosen configuration's models: no spread to show
  last = stack_lib.chosen_history(finished.history[-1:], models)[0]
  selection = finished.test is None  # a k-fold selection: its refit reads test
  if "test_accuracy" not in last and not selection:  # a sweep: test at the end only
    last.update(chosen_test(finished))
  splits = [s for s in ("train", "validation", "test") if f"{s}_accuracy" in last]
  lines = _table(last, splits, one)
  if not one and finished.test is not None:
    accuracy = 100 * np.asarray(finished.test["accuracy"])[models]
    seeds = f"{len(models)} {span(stack.seeds[0], stack.seeds[-1], 'seed')}"
    lines.append(f"test accuracy {accuracy.mean():.2f} ± {accuracy.std():.2f}% (min "
                 f"{accuracy.min():.2f}, max {accuracy.max():.2f}) over {seeds}")
  if len(finished.ranking) > 1 or selection:
    best = finished.ranking[0]
    chosen = ", ".join(f"{k}={v:g}" for k, v in best["configuration"].items())
    over = (f" over {len(stack.folds)} fold(s) × {len(stack.seeds)} seed(s)"
            if selection else "")
    read = ("test is read by the refit only" if selection
            else "test read for the chosen one only")
    spread = (f" ± {100 * best['validation_accuracy_std']:.2f}"
              if len(stack.seeds) * len(stack.folds) > 1 else "")
    lines.append(f"chosen: {chosen or 'the one configuration'}, by validation accuracy "
                 f"{100 * best['validation_accuracy_mean']:.2f}{spread}%{over} among "
                 f"{len(finished.ranking)} configuration(s) (ranked in sweep.json; {read})")
  lines.append(f"epochs {finished.history[-1]['epoch']}, {seconds:.1f} s in all"
               + (f"; {speed(new_rows, num_examples * stack.num_models)}" if new_rows else ""))
  if dp_record is not None:
    lines.append(_dp_line(finished.history[-1], dp_record))
  return "\n".join(lines)
