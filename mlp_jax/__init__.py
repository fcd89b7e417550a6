"""mlp_jax: the reference two-layer MLP for JAX, with hand-derived gradients.

    z1 = W1 x + b1,  a1 = ReLU(z1),  z2 = W2 a1 + b2,  p = softmax(z2),  L = CE(p, y)

The manual gradient is in mlp_jax/gradients.py; tests/test_gradients.py proves it equals
jax.grad. Every function is pure and jit-able. mj.privacy: DP-SGD from the closed-form
per-example gradients. mj.load(workdir): a finished run's model, predicting raw inputs.
"""

from mlp_jax.gradients import autodiff_grads
from mlp_jax.gradients import autodiff_value_and_grads
from mlp_jax.gradients import grads
from mlp_jax.gradients import loss_manual_vjp
from mlp_jax.gradients import per_example_grad_norms
from mlp_jax.gradients import per_example_grads
from mlp_jax.gradients import value_and_grads
from mlp_jax.losses import accuracy
from mlp_jax.losses import loss
from mlp_jax.model import Params
from mlp_jax.model import forward
from mlp_jax.model import init_params
from mlp_jax.model import logits
from mlp_jax import privacy
from mlp_jax.privacy import clipped_grad_sum
from mlp_jax.trained import TrainedModel
from mlp_jax.trained import load

__version__ = "0.3.0"

__all__ = [
    "Params", "init_params", "forward", "logits", "loss", "accuracy", "grads",
    "value_and_grads", "autodiff_grads", "autodiff_value_and_grads",
    "per_example_grads", "per_example_grad_norms", "loss_manual_vjp", "privacy",
    "clipped_grad_sum", "load", "TrainedModel",
]
