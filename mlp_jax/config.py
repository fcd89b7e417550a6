"""Every setting of a run, declared once: name, type, default, help and bounds.

`RunConfig`, a frozen dataclass, declares them (a type checker sees every field);
SETTINGS reads them back for experiments/train.py, which makes a flag of each, and for
the estimators, whose parameters are the training part. `resolve` checks a run's
values and `check_training` a training's, so `experiment.run(config)` from Python and
MLPClassifier refuse a bad setting with the same one line as the command line does.
"""

import dataclasses
import itertools
import math
import os
import tempfile
import typing
from typing import Any, Callable, Iterable, NamedTuple, Optional

import numpy as np

from mlp_jax import boundary
from mlp_jax import data
from mlp_jax import options


class RunError(boundary.UserError):
  """A run that cannot go on; the message is one line for the user."""


class SettingError(RunError, boundary.UsageError):
  """A bad setting or settings that cannot go together (exit status 2)."""


Log = Callable[[str], None]   # where a run's messages go (print, or rank 0's absl log)


class Setting(NamedTuple):
  """One setting, as the flags, the estimators and the checks read it: its flag is
  --name. Bounds: lower <= v, above < v, v <= upper, v < below; choices: the allowed
  values; None is allowed where the default is None. part: "training" (what trains a
  model: the estimators' parameters) or "run" (data, files, devices, the stack)."""

  name: str
  kind: type       # int, float, str, bool, or tuple (a repeatable flag)
  default: Any
  help: str
  lower: Optional[float] = None
  above: Optional[float] = None
  upper: Optional[float] = None
  below: Optional[float] = None
  choices: tuple = ()
  part: str = "run"


def _setting(default: Any, help_text: str, part: str = "run", **bounds: Any) -> Any:
  """A RunConfig field: its default, and its help, part and bounds (Setting) as the
  field's metadata."""
  return dataclasses.field(default=default,
                           metadata={"help": help_text, "part": part, **bounds})


_HP = options.Hyperparams()  # the defaults shared with the library
_DATASETS = "digits | fashion_mnist | mnist | npz:PATH"
_TRAINING = "training"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a run, each declared once with its type, default, help and bounds;
  experiment.run(RunConfig(...)) trains it, experiments/train.py makes a flag of each,
  and the estimators take the training part as their parameters (SETTINGS)."""

  dataset: str = _setting("digits", _DATASETS + ".")
  data_dir: Optional[str] = _setting(None, "Directory of the IDX files (mnist; "
                                     f"fashion_mnist defaults to {data.FASHION_MNIST_DIR}).")
  input_scaling: str = _setting(
      "auto", "x' = (x - mean) / std with one mean and std over all features (global), "
      "each feature its own (per_feature), or the data as given (none); from the train "
      "split, for a private run from constants fixed in advance. auto: per_feature where "
      f"the features' ranges differ more than {data.SHARED_RANGE_RATIO:g}-fold (a table), "
      "else global (pixels).", _TRAINING, choices=data.SCALINGS)
  hidden_dim: int = _setting(256, "H, hidden units.", _TRAINING, lower=1)
  batch_size: int = _setting(16, "Examples per step (DP-SGD: the expected batch).",
                             _TRAINING, lower=1)
  epochs: Optional[int] = _setting(
      None, f"Passes over the training set. Default: {options.DEFAULT_EPOCHS}, or more on "
      f"a small training set, so that training takes at least {options.MIN_STEPS} steps.",
      _TRAINING, lower=1)
  optimizer: str = _setting(_HP.optimizer, "optax optimizer.", _TRAINING,
                            choices=options.OPTIMIZERS)
  learning_rate: float = _setting(_HP.learning_rate, "Peak learning rate.", _TRAINING,
                                  above=0)
  schedule: str = _setting(_HP.schedule, "Learning-rate schedule.", _TRAINING,
                           choices=options.SCHEDULES)
  warmup_epochs: float = _setting(1.0, "Linear warmup (warmup_cosine).", _TRAINING, lower=0)
  weight_decay: float = _setting(_HP.weight_decay, "Weight decay of W1, W2.", _TRAINING,
                                 lower=0)
  clip_norm: float = _setting(_HP.clip_norm, "Clip gradients to this global norm; 0: off.",
                              _TRAINING, lower=0)
  label_smoothing: float = _setting(_HP.label_smoothing, "ε of (1−ε) one-hot + ε/K.",
                                    _TRAINING, lower=0, upper=1)
  ema_decay: float = _setting(
      _HP.ema_decay, "β of an exponential moving average of the params, the model "
      "evaluated, chosen and saved (bias-corrected); 0: off.", _TRAINING, lower=0, below=1)
  grads: str = _setting(_HP.grads, "Gradient: the manual formula, jax.grad, or the manual "
                        "custom_vjp.", _TRAINING, choices=options.GRADIENTS)
  compute_dtype: str = _setting(
      _HP.compute_dtype, "Dtype of the hidden layer's matmuls; bfloat16 keeps float32 "
      "params, output layer, softmax and loss.", _TRAINING, choices=options.COMPUTE_DTYPES)
  seed: int = _setting(0, "Seed of init and shuffling (and DP noise).", _TRAINING, lower=0,
                       upper=2**31 - 1)
  workdir: Optional[str] = _setting(None, "Output directory; rerun with it to resume. "
                                    "Default: a fresh temporary directory.")
  validation_fraction: Optional[float] = _setting(
      None, "Fraction of train held out for validation. Default 0, or 0.1 with --sweep.",
      lower=0, below=1)
  cv_folds: int = _setting(
      0, "K > 1: choose among the --sweep configurations by k-fold cross-validation, every "
      "configuration trained on K stratified folds of train in the same program, then "
      "refit on all of train in WORKDIR/refit and tested once; 0: off.", lower=0)
  cv_fold: Optional[int] = _setting(
      None, "With --cv_folds: train fold F alone (0 to K - 1), one job of a selection "
      "spread over jobs; no refit and no test.", lower=0)
  progress: bool = _setting(True, "Show a progress bar.")
  checkpoint_seconds: float = _setting(
      30.0, "At most one checkpoint per this many seconds of training (a kill -9 loses at "
      "most that much), and always one after the last epoch and on Ctrl-C or SIGTERM; 0: "
      "after every epoch.", lower=0)
  compilation_cache: Optional[str] = _setting(
      None, "Directory of JAX's persistent compilation cache, shared by the runs of this "
      "machine; '' turns it off. Default: $MLP_JAX_COMPILATION_CACHE, else "
      "~/.cache/mlp_jax/jax (mlp_jax/compilation.py).")
  profile_dir: Optional[str] = _setting(
      None, "Write a jax.profiler trace of this invocation's 2nd and 3rd epochs (the 1st "
      "compiles) here; view it with tensorboard --logdir=DIR (Profile tab, "
      "tensorboard-plugin-profile), XProf, or the .trace.json.gz in Perfetto.")
  num_devices: Optional[int] = _setting(
      None, "Devices per process. Default: every local device (models split over them, "
      "each model's batches too: docs/devices.md).", lower=1)
  distributed: bool = _setting(False, "Start jax.distributed; without the three settings "
                               "below JAX detects them (SLURM, TPU pod, Open MPI).")
  coordinator_address: Optional[str] = _setting(
      None, "host:port of process 0, for a multi-process run (jax.distributed).")
  num_processes: Optional[int] = _setting(None, "Processes in a multi-process run.",
                                          lower=1)
  process_id: Optional[int] = _setting(None, "This process's index, 0 to num_processes - 1.",
                                       lower=0)
  peer_timeout: float = _setting(
      120.0, "Seconds a multi-process run waits for its peers (to join at the start, to "
      "reach a checkpoint or a barrier) before it stops with one line.", above=0)
  dp_noise_multiplier: Optional[float] = _setting(
      None, "DP-SGD with noise multiplier σ (Gaussian noise of std σ·C per coordinate); "
      "below 0.1 the privacy is nil and its accounting intractable.", _TRAINING, lower=0.1)
  dp_target_epsilon: Optional[float] = _setting(
      None, "DP-SGD with σ calibrated so that the planned steps spend this ε (PLD "
      "accountant) at --dp_delta.", _TRAINING, above=0)
  dp_clip_norm: float = _setting(1.0, "DP-SGD: C, the bound on each example's gradient "
                                 "norm.", _TRAINING, above=0)
  dp_clipping: str = _setting("flat", "DP-SGD: one norm over all parameters, or each layer "
                              "to C/√2.", _TRAINING, choices=options.CLIPPINGS)
  dp_delta: float = _setting(1e-5, "DP-SGD: δ of (ε, δ)-DP; must be below 1/N.", _TRAINING,
                             lower=1e-12, below=1)
  num_seeds: int = _setting(1, "Train this many models together (seeds seed, seed + 1, "
                            "...) in one program; report mean ± std.", lower=1)
  sweep: tuple[str, ...] = _setting(
      (), "NAME=v1,v2,...: train every combination (times the seeds) together and choose "
      "on validation; NAME one of {}.".format(", ".join(options.SWEEPABLE
                                                         + ("dp_target_epsilon",))))
  stacking: Optional[str] = _setting(
      None, "How several models share one program: vmap (batched) or map (one after "
      "another); default vmap, map on a CPU for large steps.", choices=options.STACKINGS)

  @property
  def num_epochs(self) -> int:
    """`epochs`, once made explicit (with_data for a run, fit for an estimator)."""
    if self.epochs is None:
      raise ValueError("the number of epochs is not chosen yet (config.with_data chooses "
                       "it from the data).")
    return self.epochs

  def _replace(self, **changes: Any) -> "RunConfig":
    """A copy with `changes` (dataclasses.replace; the name a NamedTuple gives it)."""
    return dataclasses.replace(self, **changes)

  def _asdict(self) -> dict[str, Any]:
    """{name: value} of every setting, in declaration order (config.json's record)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _kind(annotation: Any) -> type:
  """A field's type without Optional: int, float, str, bool, or tuple."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if typing.get_origin(annotation) is tuple:
    return tuple
  return args[0] if args else annotation


SETTINGS = tuple(
    Setting(f.name, _kind(hint), f.default, f.metadata["help"],
            **{k: v for k, v in f.metadata.items() if k != "help"})
    for f, hint in zip(dataclasses.fields(RunConfig),
                       typing.get_type_hints(RunConfig).values()))
BY_NAME = {s.name: s for s in SETTINGS}
TRAINING = tuple(s.name for s in SETTINGS if s.part == _TRAINING)  # the estimators'
Config = RunConfig   # the name the library's annotations use

# The sweepable settings: options.SWEEPABLE (traced per model) and the DP target, which
# becomes one σ per model before the program starts.
SWEEPABLE = options.SWEEPABLE + ("dp_target_epsilon",)


def bounds_text(s: Setting) -> str:
  """Setting `s`'s bounds in words, e.g. "> 0 and < 1" ("" if it has none)."""
  def number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"
  parts = [f">= {number(s.lower)}" if s.lower is not None else None,
           f"> {number(s.above)}" if s.above is not None else None,
           f"<= {number(s.upper)}" if s.upper is not None else None,
           f"< {number(s.below)}" if s.below is not None else None]
  return " and ".join(p for p in parts if p)


def _is_kind(value: Any, kind: type) -> bool:
  """isinstance for a setting's kind: an int is also a float, a bool neither."""
  kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[kind]
  return isinstance(value, kinds) and (kind is bool or not isinstance(value, bool))


def check_setting(s: Setting, value: Any) -> None:
  """RunError in one line unless `value` suits Setting `s`: type, finite, bounds,
  choices (None only for a setting whose default is None)."""
  flag = f"--{s.name}={value!r}" if isinstance(value, str) else f"--{s.name}={value}"
  if value is None and s.default is None:
    return
  if s.kind is tuple:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
      raise SettingError(f"--{s.name} must be a list of strings NAME=v1,v2, got {value!r}.")
    return
  if not _is_kind(value, s.kind):
    raise SettingError(f"{flag}: must be {'an' if s.kind is int else 'a'} {s.kind.__name__}.")
  if s.kind is float and not math.isfinite(value):
    raise SettingError(f"{flag}: must be a finite number"
                   + (f" {bounds_text(s)}." if bounds_text(s) else "."))
  if s.choices and value not in s.choices:
    raise SettingError(f"{flag}: must be one of {', '.join(s.choices)}.")
  if s.kind in (int, float) and not ((s.lower is None or value >= s.lower) and
                                     (s.above is None or value > s.above) and
                                     (s.upper is None or value <= s.upper) and
                                     (s.below is None or value < s.below)):
    raise SettingError(f"{flag}: must be {bounds_text(s)}.")


def is_private(config: Config) -> bool:
  """True for a differentially private (DP-SGD) run."""
  swept = {spec.partition("=")[0].strip() for spec in config.sweep}
  return (config.dp_noise_multiplier is not None or config.dp_target_epsilon is not None
          or bool(swept & {"dp_noise_multiplier", "dp_target_epsilon"}))


def parse_sweep(specs: Iterable[str]) -> dict[str, tuple[float, ...]]:
  """("name=v1,v2", ...) -> {name: (v1, v2)}; RunError naming what is wrong."""
  grid: dict[str, tuple[float, ...]] = {}
  for spec in specs:
    name, _, text = spec.partition("=")
    name = name.strip()
    if name in BY_NAME and name not in SWEEPABLE:
      raise SettingError(f"--sweep {name} cannot be vmapped: it changes the shapes or the "
                     "program; loop over it instead, one run per value (e.g. for v in A B; "
                     f"do python experiments/train.py --{name}=$v --workdir=runs/$v; done).")
    if name not in SWEEPABLE:
      raise SettingError(f"--sweep {spec!r}: unknown name {name!r}; sweepable are "
                     f"{', '.join(SWEEPABLE)}.")
    if name in grid:
      raise SettingError(f"--sweep {name} is given twice; list all its values in one flag.")
    try:
      values = tuple(float(v) for v in text.split(","))
    except ValueError:
      values = ()
    if not text.strip() or not values or not all(math.isfinite(v) and v >= 0 for v in values):
      raise SettingError(f"--sweep {spec!r} needs numbers >= 0 after '=', e.g. "
                     f"--sweep={name}=1e-3,2e-3.")
    for v in values:  # each value must be a valid setting itself
      try:
        check_setting(BY_NAME[name], v)
      except RunError as e:
        raise SettingError(f"--sweep {name}: {e}") from None
    grid[name] = values
  return grid


def sweep_grid(config: Config) -> list[dict[str, float]]:
  """The configurations of --sweep in grid order, [{name: value}] ([{}] with none)."""
  grid = parse_sweep(config.sweep)
  return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def fold_indices(config: Config) -> list[Optional[int]]:
  """The folds a run trains: all K of --cv_folds, the one of --cv_fold, or [None]."""
  if not config.cv_folds:
    return [None]
  return [config.cv_fold] if config.cv_fold is not None else list(range(config.cv_folds))


def _check_cluster(config: Config) -> None:
  if config.dataset not in ("digits", "fashion_mnist", "mnist") and not (
      config.dataset.startswith("npz:") and len(config.dataset) > 4):
    raise SettingError(f"--dataset={config.dataset!r}: must be one of {_DATASETS}.")
  address = config.coordinator_address
  if address is not None and not (":" in address and address.rsplit(":", 1)[1].isdigit()):
    raise SettingError(f"--coordinator_address={address!r}: must be host:port, e.g. "
                   "10.0.0.1:1234.")
  if (config.process_id is not None and config.num_processes is not None
      and config.process_id >= config.num_processes):
    raise SettingError(f"--process_id={config.process_id}: must be below --num_processes="
                   f"{config.num_processes} (processes count from 0).")


def _check_folds(config: Config) -> None:
  """--cv_folds and --cv_fold with the settings they cannot go with."""
  if config.cv_fold is not None and config.cv_folds < 2:
    raise SettingError(f"--cv_fold={config.cv_fold} is one fold of a k-fold selection: give "
                   "--cv_folds=K as well (K >= 2).")
  if not config.cv_folds:
    return
  if config.cv_folds == 1:
    raise SettingError("--cv_folds=1: k-fold cross-validation needs K >= 2 folds (0: off).")
  if config.cv_fold is not None and config.cv_fold >= config.cv_folds:
    raise SettingError(f"--cv_fold={config.cv_fold}: must be below --cv_folds="
                   f"{config.cv_folds} (folds count from 0).")
  if config.validation_fraction:
    raise SettingError("--cv_folds validates on the held-out folds: drop --validation_fraction "
                   "(or drop --cv_folds to hold out a fraction).")
  if is_private(config):
    raise SettingError("--cv_folds is not available with DP-SGD (each row would train K - 1 "
                   "private models); choose on a --validation_fraction split instead.")


def _check_dp(config: Config) -> None:
  """DP settings that cannot work together, before any data is read."""
  if not is_private(config):
    swept = [name for name in parse_sweep(config.sweep) if name.startswith("dp_")]
    if swept:
      raise SettingError(f"--sweep {swept[0]} is a DP-SGD setting: add --dp_noise_multiplier "
                     "or --dp_target_epsilon (or sweep one of them).")
    return
  if not options.dp_available():
    raise SettingError(f"the --dp_* flags need the dp extra: {options.DP_EXTRA}.")
  grid = parse_sweep(config.sweep)
  noise = [n for n in ("dp_noise_multiplier", "dp_target_epsilon")
           if getattr(config, n) is not None or n in grid]
  if len(noise) > 1:
    raise SettingError("give --dp_noise_multiplier or --dp_target_epsilon (set or swept), "
                   "not both.")
  if config.grads != "manual":
    raise SettingError("a DP run always uses the closed-form clipped gradient; drop "
                   f"--grads={config.grads}.")


def _check_writable_dir(flag: str, path: str) -> None:
  """RunError unless `path` is a directory this process can write, or can be created in
  its nearest existing ancestor (tried with a probe directory, removed at once: `access`
  says yes to root even on /proc)."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(f"{existing} is not a directory")
    os.rmdir(tempfile.mkdtemp(prefix=".mlp_jax-probe-", dir=existing))
  except OSError as e:
    raise SettingError(f"{flag}={path} cannot be written ({e.strerror or e} in {existing}); "
                   "choose another path.") from None


def check_warmup(config: Config) -> None:
  """RunError unless the warmup fits in the run's epochs."""
  if config.warmup_epochs > config.num_epochs:
    raise SettingError(f"--warmup_epochs {config.warmup_epochs:g} is longer than --epochs "
                   f"{config.epochs}: the learning rate would never reach its peak; use "
                   f"--warmup_epochs of at most {config.epochs} (e.g. 1).")


def with_data(config: Config, ds: data.Dataset) -> tuple[Config, list[str]]:
  """(config, notes): a resolved config with the choices made from its loaded data.Dataset
  `ds` made explicit (the scaling of --input_scaling=auto, the number of --epochs by
  default: options.auto_epochs), and one line for each such choice."""
  notes = []
  if ds.scaling_reason:
    notes.append(f"input scaling: {ds.scaling}, by auto: {ds.scaling_reason} (--input_scaling)")
  epochs = config.epochs
  if epochs is None:
    n = len(ds.y_train)
    epochs = options.auto_epochs(n, config.batch_size)
    if epochs > options.DEFAULT_EPOCHS:
      notes.append(f"epochs: {epochs}, for at least {options.MIN_STEPS} steps of "
                   f"{config.batch_size} on {n} training examples (--epochs)")
  config = config._replace(input_scaling=ds.scaling, epochs=epochs)
  check_warmup(config)
  return config, notes


def plain(value: Any) -> Any:
  """A NumPy scalar as the Python value it holds (np.int64(4) -> 4, np.float32 -> float,
  np.bool_ -> bool); any other value as it is."""
  return value.item() if isinstance(value, np.generic) else value


def _checked_values(config: Config, names: Iterable[str]) -> Config:
  """`config` with NumPy scalars made Python values, each setting of `names` checked by
  check_setting."""
  config = config._replace(**{s.name: plain(getattr(config, s.name)) for s in SETTINGS})
  for name in names:
    check_setting(BY_NAME[name], getattr(config, name))
  return config


def _check_training_together(config: Config) -> None:
  """The training settings that cannot go together: the warmup and the epochs, the
  sweep grid, DP-SGD with what it cannot take, the folds."""
  if config.epochs is not None:
    check_warmup(config)
  parse_sweep(config.sweep)
  _check_dp(config)
  _check_folds(config)
  if is_private(config) and config.input_scaling == "per_feature":
    raise SettingError("--input_scaling=per_feature: a private run cannot scale by statistics "
                   "of its training data (they would leak it); use global (the dataset's "
                   "published constants) or none.")


def check_training(config: Config) -> Config:
  """The training part of `config` (TRAINING: the estimators' parameters, and the sweep
  and folds they train) checked, NumPy scalars made Python values; RunError (one line)
  for a bad value or values that cannot go together. The run's settings (data, files,
  devices) are not looked at."""
  config = _checked_values(config, TRAINING)
  _check_training_together(config)
  return config._replace(sweep=tuple(config.sweep))


def resolve(config: Config) -> Config:
  """`config` checked, with its defaults made explicit and NumPy scalars made Python
  values; RunError (one line) for a bad value or settings that cannot work together. A
  sweep holds out 10% of train for validation unless told otherwise."""
  config = _checked_values(config, BY_NAME)
  _check_cluster(config)
  fraction = config.validation_fraction
  if config.sweep:
    parse_sweep(config.sweep)
    if fraction is not None and fraction <= 0 and not config.cv_folds:
      raise SettingError("a --sweep chooses its configuration on validation data: give "
                     "--validation_fraction > 0 (default 0.1) or --cv_folds=K, never the "
                     "test set.")
  _check_training_together(config)
  for flag in ("profile_dir", "compilation_cache"):
    if getattr(config, flag):
      _check_writable_dir(f"--{flag}", getattr(config, flag))
  if fraction is None:
    fraction = 0.1 if config.sweep and not config.cv_folds else 0.0
  return config._replace(validation_fraction=fraction, sweep=tuple(config.sweep))


def hyperparams(config: Config, steps_per_epoch: int, cycle_ends: list[int]
                ) -> options.Hyperparams:

  """The options.Hyperparams of `config`: its fields of the same names, and a
  learning-rate cycle ending at each epoch of `cycle_ends` (workdir.schedule_epochs)."""
  shared = {f: getattr(config, f) for f in options.Hyperparams._fields if f in BY_NAME}
  return options.Hyperparams(
      warmup_steps=int(config.warmup_epochs * steps_per_epoch),
      total_steps=cycle_ends[-1] * steps_per_epoch,
      restart_steps=tuple(e * steps_per_epoch for e in cycle_ends[:-1]), **shared)
