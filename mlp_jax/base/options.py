"""The training choices, in a module without JAX: spec.SETTINGS (the runner's flags and
their --help) is built from these before JAX is imported, and train.py and privacy.py
use the same names."""

import importlib.util

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")
# The hidden layer's activations: the names of mlp_jax.core.network.ACTIVATIONS' rows
# (scikit-learn's four and gelu), here for the flags, which are built before JAX loads.
ACTIVATIONS = ("relu", "tanh", "logistic", "identity", "gelu")
GRADIENTS = ("manual", "autodiff", "manual_vjp")
# The benchmark's rows of the manual step in a fixed layout, and that layout.
LAYOUT_ROWS = {"manual_bmajor": "batch_major", "manual_fmajor": "feature_major"}
CLIPPINGS = ("flat", "per_layer")   # DP-SGD: one norm C, or (C1, C2) per layer
STACKINGS = ("vmap", "map")
# --epochs by default: this many, or more on a small training set, so that training
# takes at least MIN_STEPS steps (iris's 120 rows at B = 16 are 8 steps an epoch).
DEFAULT_EPOCHS = 20
MIN_STEPS = 1500
DP_EXTRA = "pip install dp-accounting (a dependency of mlp_jax, missing here)"


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """The steps of an epoch, ceil(N / B): every example once, the last batch padded (a
  plain epoch), or as many Poisson-sampled steps of expected size B (DP-SGD)."""
  return -(-num_examples // batch_size)


def auto_epochs(num_examples: int, batch_size: int) -> int:
  """The default number of epochs: DEFAULT_EPOCHS, or ceil(MIN_STEPS / steps per epoch)
  where that is more."""
  return max(DEFAULT_EPOCHS, -(-MIN_STEPS // steps_per_epoch(num_examples, batch_size)))


def dp_available() -> bool:
  """True when dp-accounting (DP-SGD's accountant) is installed; found, not imported."""
  return importlib.util.find_spec("dp_accounting") is not None
