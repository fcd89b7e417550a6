"""mlp_jax: the reference two-layer MLP for JAX, with hand-derived gradients.

    z1 = W1 x + b1,  a1 = ReLU(z1),  z2 = W2 a1 + b2,  p = softmax(z2),  L = CE(p, y)

The manual gradient is in mlp_jax/core/gradients.py; tests/test_gradients.py proves it
equals jax.grad. Every function is pure and jit-able. mj.privacy: DP-SGD from the
closed-form per-example gradients. mj.load(workdir): a finished run's model, predicting raw inputs.
mj.MLPClassifier, mj.MLPClassifierCV: scikit-learn estimators over the same training.
mj.check_grads(fn): a learner's own gradient function checked, its mistakes named.

The names below are imported on first use (PEP 562), so `import mlp_jax.base.boundary`
(what the scripts load first) does not import JAX.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"

# the module that defines each public name
_EXPORTS = {name: module for module, names in {
    "core.model": ("Params", "init_params", "forward", "logits"),
    "core.losses": ("loss", "accuracy"),
    "core.gradients": ("grads", "value_and_grads", "autodiff_grads",
                       "autodiff_value_and_grads", "per_example_grads",
                       "per_example_grad_norms", "loss_manual_vjp"),
    "core.privacy": ("clipped_grad_sum",),
    "run.trained": ("load", "TrainedModel"),
    "estimator": ("MLPClassifier", "MLPClassifierCV"),
    "verdicts": ("check_grads",),
}.items() for name in names}

__all__ = [
    "Params", "init_params", "forward", "logits", "loss", "accuracy", "grads",
    "value_and_grads", "autodiff_grads", "autodiff_value_and_grads",
    "per_example_grads", "per_example_grad_norms", "loss_manual_vjp", "privacy",
    "clipped_grad_sum", "load", "TrainedModel", "MLPClassifier", "MLPClassifierCV",
    "check_grads",
]


def __dir__() -> list[str]:
  """The public API (what tab completion offers), not this module's machinery."""
  return sorted([*__all__, "__version__"])


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mlp_jax.{_EXPORTS[name]}"), name)
  if name == "privacy":
    return importlib.import_module("mlp_jax.core.privacy")
  raise AttributeError(f"module 'mlp_jax' has no attribute {name!r}")


if TYPE_CHECKING:  # what mypy and editors see: the same names, imported eagerly
  from mlp_jax.core import privacy
  from mlp_jax.estimator import MLPClassifier, MLPClassifierCV
  from mlp_jax.verdicts import check_grads
  from mlp_jax.core.gradients import (autodiff_grads, autodiff_value_and_grads, grads,
                                      loss_manual_vjp, per_example_grad_norms,
                                      per_example_grads, value_and_grads)
  from mlp_jax.core.losses import accuracy, loss
  from mlp_jax.core.model import Params, forward, init_params, logits
  from mlp_jax.core.privacy import clipped_grad_sum
  from mlp_jax.run.trained import TrainedModel, load
