"""The seed's final gradient formulas (the source derivation of this project), coded as
written: one example at a time, its products as the seed writes them, then the mean over
the batch. They are wrong in four of the seven places docs/derivation.md lists; see which:

    python -m mlp_jax.gradcheck --grads=docs/seed_as_written.py:grads
"""

import numpy as np


def grads(params, X, y):
  """The seed's ∂L/∂w1, ∂L/∂b1, ∂L/∂w2, ∂L/∂b2, averaged over the rows of X."""
  w1, b1, w2, b2 = params["w1"], params["b1"], params["w2"], params["b2"]
  total = {"w1": 0.0, "b1": 0.0, "w2": 0.0, "b2": 0.0}
  for x, label in zip(X, y):
    z1 = w1 @ x + b1
    A1 = np.where(z1 >= 0, z1, 0)
    z2 = w2 @ A1 + b2
    A2 = np.exp(z2) / np.sum(np.exp(z2))
    y_t = np.eye(len(b2))[label]
    total["w2"] += (A2 - y_t) * A1           # ∂L/∂w2 = (A2 − y)·A1
    total["b2"] += A2 - y_t                  # ∂L/∂b2 = A2 − y
    total["w1"] += ((A2 - y_t) @ w2) * x     # ∂L/∂w1 = (A2 − y)·w2 X
    total["b1"] += (A2 - y_t) @ w1           # ∂L/∂b1 = (A2 − y)·w1
  return {name: value / len(X) for name, value in total.items()}
