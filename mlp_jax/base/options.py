"""The training choices and defaults, in a module without JAX: config.SETTINGS (the
runner's flags and their --help) is built from these before JAX is imported, and
train.py and privacy.py use the same names (train.Hyperparams is Hyperparams)."""

import importlib.util
from typing import NamedTuple

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")
# The hidden layer's activations: the names of mlp_jax.core.network.ACTIVATIONS' rows
# (scikit-learn's four and gelu), here for the flags, which are built before JAX loads.
ACTIVATIONS = ("relu", "tanh", "logistic", "identity", "gelu")
GRADIENTS = ("manual", "autodiff", "manual_vjp")
CLIPPINGS = ("flat", "per_layer")   # DP-SGD: one norm C, or (C1, C2) per layer
# The settings that may differ between the models of one stack (train.py).
SWEEPABLE = ("learning_rate", "weight_decay", "label_smoothing", "clip_norm", "ema_decay",
             "dp_clip_norm", "dp_noise_multiplier")
STACKINGS = ("vmap", "map")
# --epochs by default: this many, or more on a small training set, so that training
# takes at least MIN_STEPS steps (iris's 120 rows at B = 16 are 8 steps an epoch).
DEFAULT_EPOCHS = 20
MIN_STEPS = 1500
DP_EXTRA = "pip install dp-accounting (a dependency of mlp_jax, missing here)"


class Hyperparams(NamedTuple):
  """What the optimizer and the loss need to know. The defaults are the runner's:
  config.SETTINGS (RunConfig and the runner's flags) take theirs from here."""

  optimizer: str = "adamw"
  learning_rate: float = 1e-3     # peak
  schedule: str = "warmup_cosine"
  warmup_steps: int = 0
  total_steps: int = 1
  restart_steps: tuple = ()       # steps where a new warmup/cosine cycle starts (resume)
  weight_decay: float = 0.03      # of W1 and W2, never of the biases
  clip_norm: float = 0.0          # 0: no clipping
  label_smoothing: float = 0.1
  grads: str = "manual"           # GRADIENTS, or gradients.METHODS (a fixed layout)
  compute_dtype: str = "float32"  # float32 | bfloat16 (hidden-layer matmuls)
  activation: str = "relu"        # ACTIVATIONS
  ema_decay: float = 0.0          # β of the params' moving average; 0: none


def auto_epochs(num_examples: int, batch_size: int) -> int:
  """The default number of epochs: DEFAULT_EPOCHS, or ceil(MIN_STEPS / steps per epoch)
  where that is more (steps per epoch: ceil(num_examples / batch_size))."""
  steps_per_epoch = -(-num_examples // batch_size)
  return max(DEFAULT_EPOCHS, -(-MIN_STEPS // steps_per_epoch))


def dp_available() -> bool:
  """True when dp-accounting (DP-SGD's accountant) is installed; found, not imported."""
  return importlib.util.find_spec("dp_accounting") is not None
