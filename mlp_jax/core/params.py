"""The network's parameters, a pytree of four arrays; nothing here imports JAX, so a
learner's gradient runs (mlp_jax/learner.py) in a process that starts in a fraction of
a second."""

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
  import jax


class Params(NamedTuple):
  """The four parameter arrays, a pytree: w1 (H, D), b1 (H,), w2 (K, H), b2 (K,)."""

  w1: "jax.Array"
  b1: "jax.Array"
  w2: "jax.Array"
  b2: "jax.Array"
