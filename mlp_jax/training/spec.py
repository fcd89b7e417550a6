"""The typed spec: every setting declared once, with its type, default, help, bounds,
part, whether it may be swept and whether a resume must keep it: a run's in RunConfig,
the benchmark's in BenchmarkConfig (frozen dataclasses a type checker sees). SETTINGS
and BENCHMARK read them back for the flags (define_flags: experiments/train.py and
benchmark.py), the estimators' parameters (TRAINING), the resume check (RESUME_FIELDS),
the sweep (SWEEPABLE) and the checks (config.py); Hyperparams takes its defaults from
RunConfig's."""

import dataclasses
import typing
from typing import Any, Callable, NamedTuple, Optional

from mlp_jax.base import options
from mlp_jax.core.augment import Augment
from mlp_jax.data import datasets


class Setting(NamedTuple):
  """One setting, as the flags, the estimators and the checks read it: its flag is
  --name. Bounds: lower <= v, above < v, v <= upper, v < below; choices: the allowed
  values; None is allowed where the default is None. part: "training" (what trains a
  model: the estimators' parameters) or "run" (data, files, devices, the stack);
  sweepable: a --sweep may give it one value per model; resume: a resumed run must keep
  it."""

  name: str
  kind: type       # int, float, str, bool, or tuple (of `item`s: a list flag)
  default: Any
  help: str
  lower: Optional[float] = None
  above: Optional[float] = None
  upper: Optional[float] = None
  below: Optional[float] = None
  choices: tuple = ()
  part: str = "run"
  sweepable: bool = False   # may differ between the models of one run (--sweep)
  resume: bool = False      # a resume must keep it (workdir.py, the checkpoint's record)
  item: Optional[type] = None   # a tuple's items: int or str
  repeated: bool = False    # a tuple given as a repeated flag (--sweep=a --sweep=b), not
                            # a comma list (--batch_sizes=64,256)


def _setting(default: Any, help_text: str, part: str = "run", **bounds: Any) -> Any:
  """A settings dataclass's field: its default, and its help, part, bounds and the
  rest of its Setting as the field's metadata."""
  return dataclasses.field(default=default,
                           metadata={"help": help_text, "part": part, **bounds})


DATASETS = " | ".join(datasets.DATASETS)
_TRAINING = "training"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a run, each declared once with its type, default, help and bounds;
  experiment.run(RunConfig(...)) trains it, experiments/train.py makes a flag of each,
  and the estimators take the training part as their parameters (SETTINGS)."""

  dataset: str = _setting("digits", DATASETS + ".", resume=True)
  data_dir: Optional[str] = _setting(
      None, "Directory of the IDX files (mnist; fashion_mnist defaults to "
      f"{datasets.FASHION_MNIST_DIR}).", resume=True)
  label_column: Optional[str] = _setting(
      None, "csv: the name of the label column (default: the last); every other column is "
      "a feature.", resume=True)
  input_scaling: str = _setting(
      "auto", "x' = (x - mean) / std with one mean and std over all features (global), "
      "each feature its own (per_feature), or the data as given (none); from the train "
      "split, for a private run from constants fixed in advance. auto: per_feature where "
      f"the features' ranges differ more than {datasets.SHARED_RANGE_RATIO:g}-fold (a table), "
      "else global (pixels).", _TRAINING, choices=datasets.SCALINGS, resume=True)
  hidden_dim: int = _setting(256, "H, hidden units.", _TRAINING, lower=1, resume=True)
  activation: str = _setting("relu", "f of the hidden layer, a1 = f(z1): relu (the "
                             "seed's, f′(0) = 1), tanh, logistic, identity, or gelu (erf "
                             "form).", _TRAINING, choices=options.ACTIVATIONS, resume=True)
  batch_size: int = _setting(16, "Examples per step (DP-SGD: the expected batch).",
                             _TRAINING, lower=1, resume=True)
  epochs: Optional[int] = _setting(
      None, f"Passes over the training set. Default: {options.DEFAULT_EPOCHS}, or more on "
      f"a small training set, so that training takes at least {options.MIN_STEPS} steps.",
      _TRAINING, lower=1)
  optimizer: str = _setting("adamw", "optax optimizer.", _TRAINING,
                            choices=options.OPTIMIZERS, resume=True)
  learning_rate: float = _setting(1e-3, "Peak learning rate.", _TRAINING,
                                  above=0, sweepable=True, resume=True)
  schedule: str = _setting("warmup_cosine", "Learning-rate schedule.", _TRAINING,
                           choices=options.SCHEDULES, resume=True)
  warmup_epochs: float = _setting(1.0, "Linear warmup (warmup_cosine).", _TRAINING, lower=0, resume=True)
  weight_decay: float = _setting(0.03, "Weight decay of W1, W2.", _TRAINING,
                                 lower=0, sweepable=True, resume=True)
  clip_norm: float = _setting(0.0, "Clip gradients to this global norm; 0: off.",
                              _TRAINING, lower=0, sweepable=True, resume=True)
  label_smoothing: float = _setting(0.1, "ε of (1−ε) one-hot + ε/K.",
                                    _TRAINING, lower=0, upper=1, sweepable=True)
  ema_decay: float = _setting(
      0.0, "β of an exponential moving average of the params, the model "
      "evaluated, chosen and saved (bias-corrected); 0: off.", _TRAINING, lower=0, below=1, sweepable=True, resume=True)
  augment: int = _setting(
      0, "Translate each training image by a random offset of up to N pixels each way, "
      "every step (and flip it left-right where the dataset allows it: fashion_mnist); "
      "0: off. Images only, scaled globally (or not).", lower=0, upper=8, resume=True)
  grads: str = _setting("manual", "Gradient: the manual formula, jax.grad, or the manual "
                        "custom_vjp.", _TRAINING, choices=options.GRADIENTS)
  compute_dtype: str = _setting(
      "float32", "Dtype of the hidden layer's matmuls; bfloat16 keeps float32 "
      "params, output layer, softmax and loss.", _TRAINING, choices=options.COMPUTE_DTYPES)
  seed: int = _setting(0, "Seed of init and shuffling (and DP noise).", _TRAINING, lower=0,
                       upper=2**31 - 1, resume=True)
  workdir: Optional[str] = _setting(None, "Output directory; rerun with it to resume. "
                                    "Default: a fresh temporary directory.")
  # The models of the run first: they set validation_fraction's default, so a resume
  # without the --sweep is told so, not blamed on validation_fraction.
  num_seeds: int = _setting(1, "Train this many models together (seeds seed, seed + 1, "
                            "...) in one program; report mean ± std.", lower=1, resume=True)
  sweep: tuple[Any, ...] = _setting(   # "name=v1,v2" texts; resolved: a config.Sweep
      (), "NAME=v1,v2,...: train every combination (times the seeds) together and choose "
      "on validation; NAME one of {sweepable}.", resume=True, repeated=True)
  cv_folds: int = _setting(
      0, "K > 1: choose among the --sweep configurations by k-fold cross-validation, every "
      "configuration trained on K stratified folds of train in the same program, then "
      "refit on all of train in WORKDIR/refit and tested once; 0: off.", lower=0, resume=True)
  cv_fold: Optional[int] = _setting(
      None, "With --cv_folds: train fold F alone (0 to K - 1), one job of a selection "
      "spread over jobs; no refit and no test.", lower=0, resume=True)
  validation_fraction: Optional[float] = _setting(
      None, "Fraction of train held out for validation. Default 0, or 0.1 with --sweep.",
      lower=0, below=1, resume=True)
  progress: bool = _setting(True, "Show a progress bar.")
  plots: bool = _setting(True, "Draw curves.png, confusion.png and filters.png "
                         "(matplotlib, about half a second a run); --noplots writes the "
                         "metrics, params and TensorBoard events alone.")
  checkpoint_seconds: float = _setting(
      30.0, "At most one checkpoint per this many seconds of training (a kill -9 loses at "
      "most that much), and always one after the last epoch and on Ctrl-C or SIGTERM; 0: "
      "after every epoch.", lower=0)
  compilation_cache: Optional[str] = _setting(
      None, "Directory of JAX's persistent compilation cache, shared by the runs of this "
      "machine; '' turns it off. Default: $MLP_JAX_COMPILATION_CACHE, else "
      "~/.cache/mlp_jax/jax. Used only if it is yours and no one else can write it "
      "(JAX runs what it finds there: mlp_jax/base/compilation.py).")
  compilation_cache_gib: Optional[float] = _setting(
      None, "GiB the compilation cache may hold; beyond it JAX evicts the programs used "
      "longest ago. Default: $MLP_JAX_COMPILATION_CACHE_GIB, else 1.", above=0)
  memory_budget: Optional[float] = _setting(
      None, "GiB any one read of the data, a model or a record may allocate; a file that "
      "would need more is refused in one line before it is read. Default: "
      "$MLP_JAX_MEMORY_BUDGET, else 4 GiB or half the free memory, whichever is smaller.",
      above=0)
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
      "below 0.1 the privacy is nil and its accounting intractable.", _TRAINING, lower=0.1, sweepable=True, resume=True)
  dp_target_epsilon: Optional[float] = _setting(
      None, "DP-SGD with σ calibrated so that the planned steps spend this ε (PLD "
      "accountant) at --dp_delta.", _TRAINING, above=0, sweepable=True, resume=True)
  dp_clip_norm: float = _setting(1.0, "DP-SGD: C, the bound on each example's gradient "
                                 "norm.", _TRAINING, above=0, sweepable=True, resume=True)
  dp_clipping: str = _setting("flat", "DP-SGD: one norm over all parameters, or each layer "
                              "to C/√2.", _TRAINING, choices=options.CLIPPINGS, resume=True)
  dp_delta: float = _setting(1e-5, "DP-SGD: δ of (ε, δ)-DP; must be below 1/N.", _TRAINING,
                             lower=1e-12, below=1, resume=True)
  dp_augmult: int = _setting(
      1, "DP-SGD with --augment: each example's gradient is the mean over K augmented "
      "copies of it, clipped as one (augmentation multiplicity, De et al. 2022); the "
      "privacy cost stays one example's.", lower=1, upper=64, resume=True)
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


def settings_of(cls: type) -> tuple[Setting, ...]:
  """The Settings of a dataclass of `_setting` fields, in declaration order; a help's
  "{sweepable}" names the fields that may be swept."""
  fields = dataclasses.fields(cls)
  hints = typing.get_type_hints(cls)
  sweepable = ", ".join(f.name for f in fields if f.metadata.get("sweepable"))
  return tuple(
      Setting(f.name, _kind(hints[f.name]), f.default,
              f.metadata["help"].replace("{sweepable}", sweepable),
              item=(typing.get_args(hints[f.name]) or (None,))[0]
              if _kind(hints[f.name]) is tuple else None,
              **{k: v for k, v in f.metadata.items() if k != "help"})
      for f in fields)


def bounds_text(s: Setting) -> str:
  """Setting `s`'s bounds in words, e.g. "> 0 and < 1" ("" if it has none)."""
  def number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"
  parts = [f">= {number(s.lower)}" if s.lower is not None else None,
           f"> {number(s.above)}" if s.above is not None else None,
           f"<= {number(s.upper)}" if s.upper is not None else None,
           f"< {number(s.below)}" if s.below is not None else None]
  return " and ".join(p for p in parts if p)


def define_flags(settings: tuple[Setting, ...]) -> None:
  """One absl flag per setting, with its default and help, the choices and bounds said
  in the help (a script's flags: experiments/train.py's and benchmark.py's)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.disclaim_key_flags()   # the flags are the calling script's (its --helpshort)
  define: dict[type, Callable[..., Any]] = {
      bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
      str: flags.DEFINE_string}
  for s in settings:
    bounds = bounds_text(s)
    text = (s.help + (f" One of: {', '.join(s.choices)}." if s.choices else "")
            + (f" Must be {bounds}." if bounds else ""))
    if s.kind is tuple:
      items = [str(v) for v in s.default]
      (flags.DEFINE_multi_string if s.repeated else flags.DEFINE_list)(s.name, items, text)
    else:
      define[s.kind](s.name, s.default, text)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """The settings of experiments/benchmark.py, each declared once (its flags are made
  from these: settings_of, define_flags): which variants it times and how."""

  grads: tuple[str, ...] = _setting(
      ("manual", "autodiff", "manual_vjp"), "Gradients to time: manual, autodiff, "
      "manual_vjp, or the manual step in a fixed layout, manual_bmajor (batch-major) and "
      "manual_fmajor (feature-major).", choices=(*options.GRADIENTS, *options.LAYOUT_ROWS))
  modes: tuple[str, ...] = _setting(("step", "scan"), "step: Python loop; scan: one "
                                    "lax.scan.", choices=("step", "scan"))
  compute_dtypes: tuple[str, ...] = _setting(("float32", "bfloat16"), "Matmul dtypes.",
                                             choices=options.COMPUTE_DTYPES)
  batch_sizes: tuple[int, ...] = _setting((64, 256), "Batch sizes B.", lower=1)
  hidden_dims: tuple[int, ...] = _setting((1024,), "Hidden sizes H.", lower=1)
  num_devices: tuple[int, ...] = _setting(
      (1,), "Device counts: data parallel over a mesh of each (scan mode only above 1 "
      "device; see docs/benchmarks.md).", lower=1)
  in_dim: int = _setting(784, "D.", lower=1)
  num_classes: int = _setting(10, "K.", lower=2)
  steps: int = _setting(50, "Steps per timed repeat.", lower=1)
  repeats: int = _setting(5, "Timed repeats; the median and min are reported.", lower=1)
  ceiling_size: int = _setting(2048, "N of the N×N×N GEMM that sets the ceiling.", lower=8)
  json_out: Optional[str] = _setting(None, "Write one JSON object per row (JSON Lines) "
                                     "here.")
  profile_dir: Optional[str] = _setting(
      None, "After the timed repeats, run one more repeat of every variant under "
      "jax.profiler, each variant a named span, and write the trace to DIR/B<b>_H<h> (not "
      "counted: the profiler slows what it traces); view with tensorboard --logdir or "
      "Perfetto.")
  peers: tuple[str, ...] = _setting(
      (), "Peers timed in the same run: torch (PyTorch eager float32 and bfloat16 "
      "autocast, on CUDA where there is a GPU); jax (plain jax.grad + optax in a "
      "lax.scan, each --compute_dtypes); opacus (with --dp: Opacus' per-sample hooks and "
      "ghost clipping).", choices=("torch", "jax", "opacus"))
  dp: bool = _setting(False, "Add DP-SGD rows: the plain step (plain), the closed-form "
                      "clipped sum without (dp_clipped_sum) and with noise "
                      "(dp_closed_form), and vmap(grad) -> clip -> sum with noise "
                      "(dp_vmap_grad, what jax_privacy and optax do), each with its memory.")
  num_models: tuple[int, ...] = _setting(
      (), "Model counts N: add rows of N models trained together (train.make_train_epoch "
      "of a stack, seeds 0..N-1, manual float32, scan), examples/s summed over the "
      "models, next to one model's scan.", lower=1)
  stackings: tuple[str, ...] = _setting(("vmap", "map"), "How the --num_models models "
                                        "share the program: vmap (batched) and/or map "
                                        "(one after another).", choices=options.STACKINGS)
  optimizer: str = _setting("adam", "The update in the step: optax Adam, or plain SGD to "
                            "see the optimizer's share.", choices=("adam", "sgd"))


BENCHMARK = settings_of(BenchmarkConfig)
SETTINGS = settings_of(RunConfig)
# The settings that may differ between the models of one stack (traced per model; the
# DP target becomes one σ per model before the program starts), and those a resume
# must match, in declaration order.
SWEEPABLE = tuple(s.name for s in SETTINGS if s.sweepable)
RESUME_FIELDS = tuple(s.name for s in SETTINGS if s.resume)
BY_NAME = {s.name: s for s in SETTINGS}
TRAINING = tuple(s.name for s in SETTINGS if s.part == _TRAINING)  # the estimators'
Config = RunConfig   # the name the library's annotations use

_DEFAULT = RunConfig()


class Hyperparams(NamedTuple):
  """What the optimizer, the loss and the network of one model need to know: the
  training settings of RunConfig of the same names, with their defaults
  (config.hyperparams fills them from a RunConfig), and the schedule in steps."""

  optimizer: str = _DEFAULT.optimizer
  learning_rate: float = _DEFAULT.learning_rate     # peak
  schedule: str = _DEFAULT.schedule
  warmup_steps: int = 0
  total_steps: int = 1
  restart_steps: tuple = ()       # steps where a new warmup/cosine cycle starts (resume)
  weight_decay: float = _DEFAULT.weight_decay       # of W1 and W2, never of the biases
  clip_norm: float = _DEFAULT.clip_norm             # 0: no clipping
  label_smoothing: float = _DEFAULT.label_smoothing
  grads: str = _DEFAULT.grads     # options.GRADIENTS, or gradients.METHODS (a fixed layout)
  compute_dtype: str = _DEFAULT.compute_dtype
  ema_decay: float = _DEFAULT.ema_decay             # 0: no moving average
  augmentation: Optional[Augment] = None           # of the images (config.augmentation)
  activation: str = _DEFAULT.activation
