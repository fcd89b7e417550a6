"""The checks of the typed spec (mlp_jax/training/spec.py: RunConfig, every setting declared
once): `resolve` checks a run's values and `check_training` a training's, so
`experiment.run(config)` from Python, MLPClassifier and the command line refuse a bad
setting with the same one line; and what a resolved config gives the library (its
sweep grid, folds, Hyperparams, the choices made from its data).
"""

import itertools
import math
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import numpy as np

from mlp_jax.base import boundary, compilation, options, trusted
from mlp_jax.base.errors import escaped
from mlp_jax.core.augment import Augment
from mlp_jax.data import datasets
from mlp_jax.training.spec import (BY_NAME, DATASETS, Config, Hyperparams, RESUME_FIELDS,
                                   SETTINGS, Setting, SWEEPABLE, TRAINING, bounds_text)
from mlp_jax.training.spec import RunConfig  # pylint: disable=unused-import  (config.RunConfig)


class Named(NamedTuple):
  """A setting named in a refusal, worded by the front end that shows it: --name on the
  runner's command line, name for the estimators and the library (RunError.worded)."""

  name: str


class RunError(boundary.UserError):
  """A run that cannot go on: one line for the user, made of text and the settings it
  names (Named), worded only at the boundary; str() is the runner's words (--name)."""

  def __init__(self, *parts: Union[str, Named]):
    self.parts = parts
    super().__init__(self.worded("--"))

  def worded(self, prefix: str) -> str:
    """The line with each named setting written prefix + name ("--" or "")."""
    return "".join(f"{prefix}{p.name}" if isinstance(p, Named) else p for p in self.parts)


class SettingError(RunError, boundary.UsageError):
  """A bad setting or settings that cannot go together (exit status 2)."""


SWEEP = Named("sweep")
Log = Callable[[str], None]   # where a run's messages go (print, or rank 0's absl log)


def _is_kind(value: Any, kind: type) -> bool:
  """isinstance for a setting's kind: an int is also a float, a bool neither."""
  kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[kind]
  return isinstance(value, kinds) and (kind is bool or not isinstance(value, bool))


def check_setting(s: Setting, value: Any) -> None:
  """RunError in one line unless `value` suits Setting `s`: type, finite, bounds,
  choices (None only for a setting whose default is None)."""
  flag = Named(s.name), f"={value!r}" if isinstance(value, str) else f"={value}"
  if value is None and s.default is None:
    return
  if s.kind is tuple:   # a list: each item checked as a setting of the item's kind
    if not isinstance(value, (tuple, list)):
      raise SettingError(Named(s.name), f" must be a list, got {value!r}.")
    for item in value:
      check_setting(s._replace(kind=s.item or str, default=()), item)
    return
  if not _is_kind(value, s.kind):
    raise SettingError(*flag, f": must be {'an' if s.kind is int else 'a'} "
                       f"{s.kind.__name__}.")
  if s.kind is float and not math.isfinite(value):
    raise SettingError(*flag, ": must be a finite number"
                       + (f" {bounds_text(s)}." if bounds_text(s) else "."))
  if s.choices and value not in s.choices:
    raise SettingError(*flag, f": must be one of {', '.join(s.choices)}.")
  if s.kind in (int, float) and not ((s.lower is None or value >= s.lower) and
                                     (s.above is None or value > s.above) and
                                     (s.upper is None or value <= s.upper) and
                                     (s.below is None or value < s.below)):
    raise SettingError(*flag, f": must be {bounds_text(s)}.")


class Sweep(tuple):
  """A --sweep parsed once (parse_sweep): ((name, (v1, v2, ...)), ...) in the order
  given, each name sweepable and given once, each value a valid setting of its own. A
  tuple, so that a config holding it stays hashable; config.json holds it as
  [[name, [v1, v2, ...]], ...]."""

  def grid(self) -> dict[str, tuple[float, ...]]:
    """{name: values} in the order given."""
    return dict(self)

  def names(self) -> list[str]:
    """The swept names in the order given."""
    return [name for name, _ in self]


def is_private(config: Config) -> bool:
  """True for a differentially private (DP-SGD) run."""
  return (config.dp_noise_multiplier is not None or config.dp_target_epsilon is not None
          or bool(set(parse_sweep(config.sweep).names())
                  & {"dp_noise_multiplier", "dp_target_epsilon"}))


def _sweep_item(spec: Any) -> tuple[str, str, Any]:
  """(name, the item as the user gave it, its values unparsed) of one --sweep item: the
  flag's "name=v1,v2" text, or a (name, values) pair (config.json's, the estimator's)."""
  if isinstance(spec, str):
    name, _, text = spec.partition("=")
    return name.strip(), repr(spec), text
  if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
    return spec[0], repr(f"{spec[0]}={','.join(map(str, np.ravel(spec[1])))}"), spec[1]
  raise SettingError(SWEEP, f" {spec!r}: each item is NAME=v1,v2,... .")


def _sweep_values(values: Any) -> tuple[float, ...]:
  """The numbers of a --sweep item: its text split at commas, or its list; () if any is
  not a number."""
  try:
    if isinstance(values, str):
      return tuple(float(v) for v in values.split(",")) if values.strip() else ()
    return tuple(float(plain(v)) for v in np.ravel(values))
  except (TypeError, ValueError):
    return ()


def parse_sweep(specs: Any) -> Sweep:
  """The Sweep of --sweep's items ("name=v1,v2" texts or (name, values) pairs); a Sweep
  (a checked config's: resolve and check_training parse it) as it is; RunError naming
  what is wrong."""
  if isinstance(specs, Sweep):
    return specs
  if not isinstance(specs, (tuple, list)):
    raise SettingError(SWEEP, f" must be a list, got {specs!r}.")
  grid: dict[str, tuple[float, ...]] = {}
  for spec in specs:
    name, given, raw = _sweep_item(spec)
    if name in BY_NAME and name not in SWEEPABLE:
      raise SettingError(SWEEP, f" {name} cannot be vmapped: it changes the shapes or the "
                         "program; loop over it instead, one run per value (e.g. for v in A "
                         f"B; do python experiments/train.py --{name}=$v --workdir=runs/$v; "
                         "done).")
    if name not in SWEEPABLE:
      raise SettingError(SWEEP, f" {given}: unknown name {name!r}; sweepable are "
                         f"{', '.join(SWEEPABLE)}.")
    if name in grid:
      raise SettingError(SWEEP, f" {name} is given twice; list all its values in one flag.")
    values = _sweep_values(raw)
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
      raise SettingError(SWEEP, f" {given} needs numbers >= 0 after '=', e.g. ", SWEEP,
                         f"={name}=1e-3,2e-3.")
    for v in values:  # each value must be a valid setting itself
      try:
        check_setting(BY_NAME[name], v)
      except RunError as e:
        raise SettingError(SWEEP, f" {name}: ", *e.parts) from None
    grid[name] = values
  return Sweep(grid.items())


def sweep_grid(config: Config) -> list[dict[str, float]]:
  """The configurations of a config's sweep in grid order, [{name: value}] ([{}] with
  none)."""
  grid = parse_sweep(config.sweep).grid()
  return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def fold_indices(config: Config) -> list[Optional[int]]:
  """The folds a run trains: all K of --cv_folds, the one of --cv_fold, or [None]."""
  if not config.cv_folds:
    return [None]
  return [config.cv_fold] if config.cv_fold is not None else list(range(config.cv_folds))


def _multi_process(config: Config) -> bool:
  return config.distributed or any(getattr(config, name) is not None for name in
                                   ("coordinator_address", "num_processes", "process_id"))


def _several_models(config: Config) -> bool:
  return config.num_seeds > 1 or bool(config.sweep) or config.cv_folds > 1


_PRIVATE = (Named("dp_noise_multiplier"), " or ", Named("dp_target_epsilon"))
# Settings that act only with another: name -> (whether it acts in a config, what it
# needs). Set to anything but its default where it cannot act, it is refused, never
# ignored (_check_acting).
ACTS_ONLY_WITH: dict[str, tuple[Callable[[Config], bool], tuple[Union[str, Named], ...]]] = {
    "warmup_epochs": (lambda c: c.schedule == "warmup_cosine",
                      (Named("schedule"), "=warmup_cosine")),
    "dp_clip_norm": (is_private, _PRIVATE),
    "dp_clipping": (is_private, _PRIVATE),
    "dp_delta": (is_private, _PRIVATE),
    "data_dir": (lambda c: c.dataset in ("mnist", "fashion_mnist"),
                 (Named("dataset"), "=mnist or fashion_mnist")),
    "peer_timeout": (_multi_process, ("a multi-process run (", Named("distributed"), ")")),
    "stacking": (_several_models, ("several models (", Named("num_seeds"), ", ", SWEEP,
                                   " or ", Named("cv_folds"), ")")),
    "dp_augmult": (lambda c: is_private(c) and c.augment > 0,
                   (Named("augment"), " in a DP-SGD run (", *_PRIVATE, ")")),
    "compilation_cache_gib": (lambda c: c.compilation_cache != "",
                              ("a compilation cache (", Named("compilation_cache"),
                               " not '')")),
}


def _check_acting(config: Config, names: Iterable[str]) -> None:
  """SettingError for a setting of `names` set where it cannot act (ACTS_ONLY_WITH)."""
  for name in names:
    acts, needs = ACTS_ONLY_WITH.get(name, (None, ()))
    value, default = getattr(config, name), BY_NAME[name].default
    is_default = value == default or (isinstance(default, float)   # to float32's
                                      and math.isclose(value, default, rel_tol=1e-6))
    if acts and not is_default and not acts(config):
      raise SettingError(Named(name), f"={value} acts only with ", *needs, ": give that, "
                         "or drop ", Named(name), ".")


def _check_cluster(config: Config) -> None:
  if not datasets.known(config.dataset):
    raise SettingError(Named("dataset"), f"={config.dataset!r}: must be one of {DATASETS}.")
  if config.label_column is not None and not config.dataset.startswith("csv:"):
    raise SettingError(Named("label_column"), f"={config.label_column!r} names a column of a "
                       "CSV table: give ", Named("dataset"), "=csv:TRAIN.csv, or drop it.")
  address = config.coordinator_address
  if address is not None and not (":" in address and address.rsplit(":", 1)[1].isdigit()):
    raise SettingError(Named("coordinator_address"), f"={address!r}: must be host:port, "
                       "e.g. 10.0.0.1:1234.")
  if (config.process_id is not None and config.num_processes is not None
      and config.process_id >= config.num_processes):
    raise SettingError(Named("process_id"), f"={config.process_id}: must be below ",
                       Named("num_processes"), f"={config.num_processes} (processes count "
                       "from 0).")


def _check_folds(config: Config) -> None:
  """--cv_folds and --cv_fold with the settings they cannot go with."""
  if config.cv_fold is not None and config.cv_folds < 2:
    raise SettingError(Named("cv_fold"), f"={config.cv_fold} is one fold of a k-fold "
                       "selection: give ", Named("cv_folds"), "=K as well (K >= 2).")
  if not config.cv_folds:
    return
  if config.cv_folds == 1:
    raise SettingError(Named("cv_folds"), "=1: k-fold cross-validation needs K >= 2 folds "
                       "(0: off).")
  if config.cv_fold is not None and config.cv_fold >= config.cv_folds:
    raise SettingError(Named("cv_fold"), f"={config.cv_fold}: must be below ",
                       Named("cv_folds"), f"={config.cv_folds} (folds count from 0).")
  if config.validation_fraction:
    raise SettingError(Named("cv_folds"), " validates on the held-out folds: drop ",
                       Named("validation_fraction"), " (or drop ", Named("cv_folds"),
                       " to hold out a fraction).")
  if is_private(config):
    raise SettingError(Named("cv_folds"), " is not available with DP-SGD (each row would "
                       "train K - 1 private models); choose on a ",
                       Named("validation_fraction"), " split instead.")


def _check_dp(config: Config) -> None:
  """DP settings that cannot work together, before any data is read."""
  if not is_private(config):
    swept = [name for name in parse_sweep(config.sweep).names() if name.startswith("dp_")]
    if swept:
      raise SettingError(SWEEP, f" {swept[0]} is a DP-SGD setting: add ",
                         Named("dp_noise_multiplier"), " or ", Named("dp_target_epsilon"),
                         " (or sweep one of them).")
    return
  if not options.dp_available():
    raise SettingError("differential privacy (dp_noise_multiplier, dp_target_epsilon) "
                       f"needs dp-accounting: {options.DP_EXTRA}.")
  noise = [n for n in ("dp_noise_multiplier", "dp_target_epsilon")
           if getattr(config, n) is not None or n in parse_sweep(config.sweep).names()]
  if len(noise) > 1:
    raise SettingError("give ", Named("dp_noise_multiplier"), " or ",
                       Named("dp_target_epsilon"), " (set or swept), not both.")
  if config.grads != "manual":
    raise SettingError("a DP run always uses the closed-form clipped gradient; drop ",
                       Named("grads"), f"={config.grads}.")


def _check_writable_dir(name: str, path: str) -> None:
  """RunError unless `path` is a directory this process can write, or can be created in
  its nearest existing ancestor (tried with a probe directory, removed at once: `access`
  says yes to root even on /proc), on a path no other user can change (base/trusted.py:
  JAX writes there by name, later)."""
  why = trusted.why_untrusted(path)
  if why:
    raise SettingError(Named(name), f"={escaped(path)}: {escaped(why)}, so another user "
                       f"could swap where JAX writes; {trusted.FIX}.")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(f"{existing} is not a directory")
    os.rmdir(tempfile.mkdtemp(prefix=".mlp_jax-probe-", dir=existing))
  except OSError as e:
    raise SettingError(Named(name), f"={escaped(path)} cannot be written "
                       f"({e.strerror or e} in {escaped(existing)}); choose another "
                       "path.") from None


def _is_text(path: str) -> bool:
  """False for a path Python could only decode with surrogates (bytes that are not
  text in the locale's encoding, e.g. UTF-8 under LANG=C)."""
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def check_warmup(config: Config) -> None:
  """RunError unless the warmup fits in the run's epochs."""
  if config.warmup_epochs > config.num_epochs:
    raise SettingError(Named("warmup_epochs"), f" {config.warmup_epochs:g} is longer than ",
                       Named("epochs"), f" {config.epochs}: the learning rate would never "
                       "reach its peak; use ", Named("warmup_epochs"), " of at most "
                       f"{config.epochs} (e.g. 1).")


def with_data(config: Config, ds: datasets.Dataset) -> tuple[Config, list[str]]:
  """(config, notes): a resolved config with the choices made from its loaded datasets.Dataset
  `ds` made explicit (the scaling of --input_scaling=auto, the number of --epochs by
  default: options.auto_epochs), and one line for each such choice."""
  notes = [f"test split: {ds.test_split}"] if ds.test_split else []
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
  check_setting, the sweep parsed (parse_sweep: it is checked there)."""
  config = config._replace(**{s.name: plain(getattr(config, s.name)) for s in SETTINGS})
  config = config._replace(sweep=parse_sweep(config.sweep))
  for name in names:
    if name != SWEEP.name:
      check_setting(BY_NAME[name], getattr(config, name))
  return config


def _check_training_together(config: Config) -> None:
  """The training settings that cannot go together: the warmup and the epochs, the
  sweep grid, DP-SGD with what it cannot take, the folds."""
  if config.epochs is not None:
    check_warmup(config)
  _check_dp(config)
  _check_folds(config)
  refusal = datasets.private_scaling_refusal(config.input_scaling, is_private(config))
  if refusal:
    raise SettingError(Named("input_scaling"), f"={config.input_scaling}: {refusal}")


def check_training(config: Config) -> Config:
  """The training part of `config` (TRAINING: the estimators' parameters, and the sweep
  and folds they train) checked, NumPy scalars made Python values; RunError (one line)
  for a bad value or values that cannot go together. The run's settings (data, files,
  devices) are not looked at."""
  config = _checked_values(config, TRAINING)
  _check_acting(config, TRAINING)
  _check_training_together(config)
  return config


def resolve(config: Config) -> Config:
  """`config` checked, with its defaults made explicit and NumPy scalars made Python
  values; RunError (one line) for a bad value or settings that cannot work together. A
  sweep holds out 10% of train for validation unless told otherwise."""
  config = _checked_values(config, BY_NAME)
  _check_acting(config, BY_NAME)
  _check_cluster(config)
  fraction = config.validation_fraction
  if config.sweep:
    if fraction is not None and fraction <= 0 and not config.cv_folds:
      raise SettingError("a ", SWEEP, " chooses its configuration on validation data: give ",
                         Named("validation_fraction"), " > 0 (default 0.1) or ",
                         Named("cv_folds"), "=K, never the test set.")
  _check_training_together(config)
  cache = config.compilation_cache
  why = cache and os.path.lexists(cache) and compilation.unsafe(cache)
  if cache and why:
    raise SettingError(compilation.refusal(cache, why))
  for flag in ("profile_dir", "compilation_cache"):
    if getattr(config, flag):
      _check_writable_dir(flag, getattr(config, flag))
  if config.workdir is not None and not _is_text(config.workdir):
    raise SettingError(Named("workdir"), f" {config.workdir!a} is not text in this "
                       f"locale's encoding ({sys.getfilesystemencoding()}), and orbax cannot "
                       "store checkpoints under it: run in a UTF-8 locale (LANG=C.UTF-8, or "
                       "PYTHONUTF8=1), or use an ASCII path.")
  if fraction is None:
    fraction = 0.1 if config.sweep and not config.cv_folds else 0.0
  return config._replace(validation_fraction=fraction)


def augmentation(config: Config, ds: datasets.Dataset) -> Optional[Augment]:
  """The Augment of --augment=N on the loaded `ds` (None: off); SettingError where its
  rows are not images (a table, a CSV) or are scaled per pixel (a moved pixel would keep
  its old place's μ and σ)."""
  if not config.augment:
    return None
  if len(ds.input_shape) != 2:
    raise SettingError(Named("augment"), f"={config.augment} translates images, but "
                       f"{config.dataset} holds rows of {ds.input_shape[0]} features: "
                       "drop it.")
  if ds.scaling == "per_feature":
    raise SettingError(Named("augment"), f"={config.augment} moves pixels, but "
                       "per_feature scaling gives each pixel its own μ and σ: a moved "
                       "pixel would keep another's; use --input_scaling=global.")
  preset = datasets.PRESETS.get(config.dataset)
  height, width = ds.input_shape
  return Augment((height, width), config.augment, bool(preset and preset.flips))


def hyperparams(config: Config, steps_per_epoch: int, cycle_ends: list[int],
                augment: Optional[Augment] = None) -> Hyperparams:
  """The Hyperparams of `config`: its fields of the same names, a learning-rate cycle
  ending at each epoch of `cycle_ends` (workdir.schedule_epochs), and `augment`."""
  shared = {f: getattr(config, f) for f in Hyperparams._fields if f in BY_NAME}
  return Hyperparams(augmentation=augment,
      warmup_steps=int(config.warmup_epochs * steps_per_epoch),
      total_steps=cycle_ends[-1] * steps_per_epoch,
      restart_steps=tuple(e * steps_per_epoch for e in cycle_ends[:-1]), **shared)
