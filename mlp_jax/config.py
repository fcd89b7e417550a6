"""Every setting of a run, declared once: name, type, default, help and bounds.

`RunConfig` (a NamedTuple) is built from SETTINGS; experiments/train.py generates its
flags from the same list, and `resolve` checks every value in the library, so
`experiment.run(config)` from Python refuses a bad setting with the same one line as
the command line does.
"""

import itertools
import math
import os
import tempfile
import typing
from typing import Any, Callable, Iterable, NamedTuple, Optional

from mlp_jax import boundary
from mlp_jax import data
from mlp_jax import options


class RunError(boundary.UserError):
  """A run that cannot go on; the message is one line for the user."""


class SettingError(RunError, boundary.UsageError):
  """A bad setting or settings that cannot go together (exit status 2)."""


Log = Callable[[str], None]   # where a run's messages go (print, or rank 0's absl log)


class Setting(NamedTuple):
  """One setting: its flag is --name. Bounds: lower <= v, above < v, v <= upper,
  v < below; choices: the allowed values; optional: None is allowed (the default)."""

  name: str
  kind: type       # int, float, str, bool, or tuple (a repeatable flag)
  default: Any
  help: str
  lower: Optional[float] = None
  above: Optional[float] = None
  upper: Optional[float] = None
  below: Optional[float] = None
  choices: tuple = ()


_HP = options.Hyperparams()  # the defaults shared with the library
_DATASETS = "digits | fashion_mnist | mnist | npz:PATH"

SETTINGS = (
    Setting("dataset", str, "digits", _DATASETS + "."),
    Setting("data_dir", str, None, "Directory of the IDX files (mnist; fashion_mnist "
            f"defaults to {data.FASHION_MNIST_DIR})."),
    Setting("input_scaling", str, "auto", "x' = (x - mean) / std with one mean and "
            "std over all features (global), each feature its own (per_feature), or the "
            "data as given (none); from the train split, for a private run from "
            "constants fixed in advance. auto: per_feature where the features' ranges "
            f"differ more than {data.SHARED_RANGE_RATIO:g}-fold (a table), else global "
            "(pixels).", choices=data.SCALINGS),
    Setting("hidden_dim", int, 256, "H, hidden units.", lower=1),
    Setting("batch_size", int, 16, "Examples per step (DP-SGD: the expected batch).",
            lower=1),
    Setting("epochs", int, None, "Passes over the training set. Default: "
            f"{options.DEFAULT_EPOCHS}, or more on a small training set, so that training "
            f"takes at least {options.MIN_STEPS} steps.", lower=1),
    Setting("optimizer", str, _HP.optimizer, "optax optimizer.", choices=options.OPTIMIZERS),
    Setting("learning_rate", float, _HP.learning_rate, "Peak learning rate.", above=0),
    Setting("schedule", str, _HP.schedule, "Learning-rate schedule.",
            choices=options.SCHEDULES),
    Setting("warmup_epochs", float, 1.0, "Linear warmup (warmup_cosine).", lower=0),
    Setting("weight_decay", float, _HP.weight_decay, "Weight decay of W1, W2.", lower=0),
    Setting("clip_norm", float, _HP.clip_norm, "Clip gradients to this global norm; 0: "
            "off.", lower=0),
    Setting("label_smoothing", float, _HP.label_smoothing, "ε of (1−ε) one-hot + ε/K.",
            lower=0, upper=1),
    Setting("ema_decay", float, _HP.ema_decay, "β of an exponential moving average of "
            "the params, the model evaluated, chosen and saved (bias-corrected); 0: off.",
            lower=0, below=1),
    Setting("grads", str, _HP.grads, "Gradient: the manual formula, jax.grad, or the "
            "manual custom_vjp.", choices=options.GRADIENTS),
    Setting("compute_dtype", str, _HP.compute_dtype, "Dtype of the hidden layer's "
            "matmuls; bfloat16 keeps float32 params, output layer, softmax and loss.",
            choices=options.COMPUTE_DTYPES),
    Setting("seed", int, 0, "Seed of init and shuffling (and DP noise).", lower=0,
            upper=2**31 - 1),
    Setting("workdir", str, None, "Output directory; rerun with it to resume. Default: a "
            "fresh temporary directory."),
    Setting("validation_fraction", float, None, "Fraction of train held out for "
            "validation. Default 0, or 0.1 with --sweep.", lower=0, below=1),
    Setting("cv_folds", int, 0, "K > 1: choose among the --sweep configurations by k-fold "
            "cross-validation, every configuration trained on K stratified folds of train "
            "in the same program, then refit on all of train in WORKDIR/refit and tested "
            "once; 0: off.", lower=0),
    Setting("cv_fold", int, None, "With --cv_folds: train fold F alone (0 to K - 1), one "
            "job of a selection spread over jobs; no refit and no test.", lower=0),
    Setting("progress", bool, True, "Show a progress bar."),
    Setting("checkpoint_seconds", float, 30.0, "At most one checkpoint per this many "
            "seconds of training (a kill -9 loses at most that much), and always one "
            "after the last epoch and on Ctrl-C or SIGTERM; 0: after every epoch.",
            lower=0),
    Setting("compilation_cache", str, None, "Directory of JAX's persistent compilation "
            "cache, shared by the runs of this machine; '' turns it off. Default: "
            "$MLP_JAX_COMPILATION_CACHE, else ~/.cache/mlp_jax/jax (mlp_jax/compilation.py)."),
    Setting("profile_dir", str, None, "Write a jax.profiler trace of this invocation's "
            "2nd and 3rd epochs (the 1st compiles) here; view it with tensorboard "
            "--logdir=DIR (Profile tab, tensorboard-plugin-profile), XProf, or the "
            ".trace.json.gz in Perfetto."),
    Setting("num_devices", int, None, "Devices per process. Default: every local device "
            "(models split over them, each model's batches too: docs/devices.md).",
            lower=1),
    Setting("distributed", bool, False, "Start jax.distributed; without the three "
            "settings below JAX detects them (SLURM, TPU pod, Open MPI)."),
    Setting("coordinator_address", str, None, "host:port of process 0, for a "
            "multi-process run (jax.distributed)."),
    Setting("num_processes", int, None, "Processes in a multi-process run.", lower=1),
    Setting("process_id", int, None, "This process's index, 0 to num_processes - 1.",
            lower=0),
    Setting("peer_timeout", float, 120.0, "Seconds a multi-process run waits for its "
            "peers (to join at the start, to reach a checkpoint or a barrier) before it "
            "stops with one line.", above=0),
    Setting("dp_noise_multiplier", float, None, "DP-SGD with noise multiplier σ "
            "(Gaussian noise of std σ·C per coordinate); below 0.1 the privacy is nil and "
            "its accounting intractable.", lower=0.1),
    Setting("dp_target_epsilon", float, None, "DP-SGD with σ calibrated so that the "
            "planned steps spend this ε (PLD accountant) at --dp_delta.", above=0),
    Setting("dp_clip_norm", float, 1.0, "DP-SGD: C, the bound on each example's gradient "
            "norm.", above=0),
    Setting("dp_clipping", str, "flat", "DP-SGD: one norm over all parameters, or each "
            "layer to C/√2.", choices=options.CLIPPINGS),
    Setting("dp_delta", float, 1e-5, "DP-SGD: δ of (ε, δ)-DP; must be below 1/N.",
            lower=1e-12, below=1),
    Setting("num_seeds", int, 1, "Train this many models together (seeds seed, seed + 1, "
            "...) in one program; report mean ± std.", lower=1),
    Setting("sweep", tuple, (), "NAME=v1,v2,...: train every combination (times the "
            "seeds) together and choose on validation; NAME one of "
            "{sweepable}.".format(sweepable=", ".join(options.SWEEPABLE + (
                "dp_target_epsilon",)))),
    Setting("stacking", str, None, "How several models share one program: vmap "
            "(batched) or map (one after another); default vmap, map on a CPU for large "
            "steps.", choices=options.STACKINGS),
)

RunConfig = typing.NamedTuple(  # type: ignore[misc]  # built from SETTINGS
    "RunConfig", [(s.name, Optional[s.kind]) for s in SETTINGS])
RunConfig.__new__.__defaults__ = tuple(s.default for s in SETTINGS)
RunConfig.__doc__ = ("Every setting of a run (SETTINGS declares each: type, default, "
                     "help, bounds); experiment.run(RunConfig(...)) trains it.")
BY_NAME = {s.name: s for s in SETTINGS}
# A RunConfig in annotations: its fields are made from SETTINGS at import, which a
# static type checker cannot see.
Config = Any

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
  if config.warmup_epochs > config.epochs:
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


def resolve(config: Config) -> Config:
  """`config` checked, with its defaults made explicit; RunError (one line) for a bad
  value or settings that cannot work together. A sweep holds out 10% of train for
  validation unless told otherwise."""
  for s in SETTINGS:
    check_setting(s, getattr(config, s.name))
  _check_cluster(config)
  if config.epochs is not None:
    check_warmup(config)
  fraction = config.validation_fraction
  if config.sweep:
    parse_sweep(config.sweep)
    if fraction is not None and fraction <= 0 and not config.cv_folds:
      raise SettingError("a --sweep chooses its configuration on validation data: give "
                     "--validation_fraction > 0 (default 0.1) or --cv_folds=K, never the "
                     "test set.")
  _check_dp(config)
  _check_folds(config)
  for flag in ("profile_dir", "compilation_cache"):
    if getattr(config, flag):
      _check_writable_dir(f"--{flag}", getattr(config, flag))
  if fraction is None:
    fraction = 0.1 if config.sweep and not config.cv_folds else 0.0
  if is_private(config) and config.input_scaling == "per_feature":
    raise SettingError("--input_scaling=per_feature: a private run cannot scale by statistics "
                   "of its training data (they would leak it); use global (the dataset's "
                   "published constants) or none.")
  return config._replace(validation_fraction=fraction, sweep=tuple(config.sweep))


def hyperparams(config: Config, steps_per_epoch: int, cycle_ends: list[int]
                ) -> options.Hyperparams:

  """The options.Hyperparams of `config`: its fields of the same names, and a
  learning-rate cycle ending at each epoch of `cycle_ends` (workdir.schedule_epochs)."""
  shared = {f: getattr(config, f) for f in options.Hyperparams._fields if f in RunConfig._fields}
  return options.Hyperparams(
      warmup_steps=int(config.warmup_epochs * steps_per_epoch),
      total_steps=cycle_ends[-1] * steps_per_epoch,
      restart_steps=tuple(e * steps_per_epoch for e in cycle_ends[:-1]), **shared)
