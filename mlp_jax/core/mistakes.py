"""The mistakes a hand derivation of this network's gradients makes, each computed as the
gradient it would give, in NumPy float64, so that a learner's wrong gradient can be
named (mlp_jax.gradcheck.check_grads; docs/derivation.md lists each next to its erratum).

With Δ2 = (P − Y)/B (B, K), Δ1 = (Δ2 W2) ⊙ 1[Z1 ≥ 0] (B, H), the right gradients of the
mean cross-entropy are dW1 = Δ1ᵀX, db1 = Σ_rows Δ1, dW2 = Δ2ᵀA1, db2 = Σ_rows Δ2.
`gradients_with(problem, mistakes)` gives, per parameter, every value those lines take
with the named mistakes made (several where a mistake can be made more than one way,
none where its shapes do not fit the problem).
"""

import itertools
import math
from typing import Callable, NamedTuple, Optional

import numpy as np

LEAVES = ("w1", "b1", "w2", "b2")

# id -> (the mistake, the erratum of docs/derivation.md it comes from, if one)
CATALOGUE = {
    "relu_mask_missing": ("δ1 = W2ᵀδ2, without ⊙ f′(z1) (ReLU: 1[z1 ≥ 0])", "erratum 2"),
    "relu_tie_convention": ("right except where z1 = 0, where it takes ReLU′(0) as 0 (or "
                            "½) instead of 1: a convention, not an error", "erratum 7"),
    "w1_for_w2": ("W1 used where W2ᵀ belongs, in δ1 (the seed's (A2 − y)·w1)",
                  "errata 1 and 3"),
    "elementwise_for_outer": ("a weight's gradient as the elementwise product δ ⊙ a of "
                              "its two vectors, not their outer product δ aᵀ (the seed's "
                              "(A2 − y)·A1)", "errata 2 and 4"),
    "sign_flipped": ("y − p instead of p − y", "erratum 5"),
    "softmax_as_sigmoid": ("δ2 = (p − y) ⊙ p ⊙ (1 − p): the derivative of a sigmoid "
                           "output, not of softmax with cross-entropy", "erratum 5"),
    "sum_not_mean": ("the gradient of the summed loss: B times too large", ""),
    "mean_twice": ("divided by B twice", ""),
    "transposed": ("the right values in the transposed shape", ""),
    "bias_not_summed": ("a bias gradient of one example, or not reduced over the batch",
                        ""),
    "leaves_swapped": ("the right value of another parameter returned under this name",
                       ""),
    "labels_shifted": ("the one-hot targets of y − 1 or y + 1 (wrapped to K classes): "
                       "labels counted from 1, or off by one", ""),
    "softmax_jacobian_diagonal": ("only the diagonal of the softmax Jacobian, "
                                  "δ2 = (p − 1) ⊙ y: ∂p_k/∂z_j taken as 0 for j ≠ k",
                                  "erratum 5"),
    "wrong_activation_derivative": ("another activation's derivative in δ1: sigmoid′ or "
                                    "tanh′ (of z1, or of a1) in ReLU′'s place", "erratum 2"),
    "pre_activation_for_activation": ("z1 used where a1 belongs: in dW2 = δ2 z1ᵀ, or also "
                                      "in z2 = W2 z1 + b2", ""),
    "l2_term": ("an added λW: the gradient of a weight-decay term λ/2 ‖W‖² the loss does "
                "not have", ""),
    "scale_factor": ("the right gradient times a constant c that is not a batch-size "
                     "factor", ""),
}
# The mistakes with a parameter fitted to the learner's values (fit_parameter), not
# computed by gradients_with.
FITTED = ("l2_term", "scale_factor")


class Problem(NamedTuple):
  """A network and a batch: w1 (H, D), b1 (H,), w2 (K, H), b2 (K,), X (B, D), y (B,)."""
  w1: np.ndarray
  b1: np.ndarray
  w2: np.ndarray
  b2: np.ndarray
  X: np.ndarray
  y: np.ndarray
  activation: str = "relu"   # f of a1 = f(z1): a key of ACTIVATIONS

  @property
  def ties(self) -> int:
    """How many entries of z1 = X W1ᵀ + b1 are exactly 0 (where ReLU′(0) shows)."""
    return int(np.sum(self.X @ self.w1.T + self.b1 == 0))

  def describe(self) -> str:
    (B, D), (H, K) = self.X.shape, (len(self.b1), len(self.b2))
    ties = self.ties
    return (f"B={B} D={D} H={H} K={K}" + (f", {ties} ties z1 = 0" if ties else "")
            + (f", f = {self.activation}" if self.activation != "relu" else ""))

  @property
  def arrays(self) -> tuple[np.ndarray, ...]:
    """w1, b1, w2, b2, X, y: what a learner's function is given."""
    return tuple(self[:6])


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 1 / (1 + np.exp(-z))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


# f and f′ of each activation of mlp_jax (mlp_jax/core/network.py), in NumPy float64:
# what a learner's gradient is checked against. ReLU′(0) = 1, as the seed takes it.
Fn = Callable[[np.ndarray], np.ndarray]
ACTIVATIONS: dict[str, tuple[Fn, Fn]] = {
    "relu": (lambda z: np.where(z < 0, 0.0, z), lambda z: (z >= 0).astype(np.float64)),
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z)**2),
    "logistic": (_sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
    "identity": (lambda z: z, np.ones_like),
    "gelu": (lambda z: z * _normal_cdf(z),
             lambda z: _normal_cdf(z) + z * np.exp(-z**2 / 2) / math.sqrt(2 * math.pi)),
}


def problems(seed: int = 0, activation: str = "relu") -> list[Problem]:
  """The problems every check runs, drawn from `seed` so a verdict is reproducible: one
  of unequal sizes (a transposed or swapped gradient has the wrong shape), one square,
  D = H = K (the seed's shape-invalid formulas run), and one square with integer inputs
  and first layer, so that z1 = 0 exactly at some units, whatever the order of the sums
  (where ReLU′(0) shows); the hidden layer's f = `activation`."""
  rng = np.random.default_rng(seed)

  def draw(B: int, D: int, H: int, K: int, integer: bool) -> Problem:
    if integer:
      first = [rng.integers(-2, 3, shape).astype(np.float64) for shape in ((H, D), (H,))]
      X = rng.integers(-2, 3, (B, D)).astype(np.float64)
    else:
      first = [rng.standard_normal((H, D)) / np.sqrt(D), rng.standard_normal(H)]
      X = rng.standard_normal((B, D))
    w2, b2 = rng.standard_normal((K, H)) / np.sqrt(H), rng.standard_normal(K)
    y = np.arange(B) % K                       # every class, in a drawn order
    return Problem(first[0], first[1], w2, b2, X, rng.permutation(y), activation)

  return [draw(5, 4, 6, 3, False), draw(4, 5, 5, 5, False), draw(6, 4, 4, 4, True)]


def right_gradients(problem: Problem) -> dict[str, np.ndarray]:
  """The gradients of the mean cross-entropy, ReLU′(0) = 1 as the seed takes it (f′ of
  the problem's activation)."""
  return {leaf: values[0] for leaf, values in gradients_with(problem, frozenset()).items()}


def gradients_with(problem: Problem, mistakes: frozenset[str]) -> dict[str, list[np.ndarray]]:
  """{leaf: [every value it takes with `mistakes` made]} ([] where they do not fit)."""
  w1, b1, w2, b2, X, y = problem.arrays
  B, K = len(X), len(b2)
  Z1 = X @ w1.T + b1
  A1 = ACTIVATIONS[problem.activation][0](Z1)
  values: dict[str, list[np.ndarray]] = {leaf: [] for leaf in LEAVES}
  for hidden in _hidden_uses(Z1, A1, mistakes):   # (in z2, in dW2)
    Z2 = hidden[0] @ w2.T + b2
    P = np.exp(Z2 - Z2.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    for Y in _targets(y, K, mistakes):
      delta2 = _output_delta(P, Y, mistakes) * _scale(B, mistakes)
      delta1s = [back * mask for back in _backs(problem, delta2, mistakes)
                 for mask in _masks(Z1, A1, mistakes, problem.activation)
                 if back.shape == Z1.shape]
      outer = "elementwise_for_outer" not in mistakes
      values["w1"] += [d1.T @ X if outer else np.sum(d1 * X, axis=0)
                       for d1 in delta1s if outer or d1.shape == X.shape]
      values["b1"] += _bias(delta1s, B, mistakes)
      values["w2"] += [delta2.T @ hidden[1]] if outer else (
          [np.sum(delta2 * hidden[1], axis=0)] if delta2.shape == hidden[1].shape else [])
      values["b2"] += _bias([delta2], B, mistakes)
  if "transposed" in mistakes:
    values = {leaf: [v.T for v in vs if v.ndim == 2] if leaf[0] == "w" else []
              for leaf, vs in values.items()}
  if "leaves_swapped" in mistakes:
    values = {leaf: [v for other in LEAVES if other != leaf for v in values[other]]
              for leaf in LEAVES}
  return values


def _hidden_uses(Z1: np.ndarray, A1: np.ndarray, mistakes: frozenset[str]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """What stands for a1 in z2 = W2 a1 + b2 and in dW2 = δ2 a1ᵀ: a1 in both, or z1 in
  dW2 alone, or z1 in both."""
  if "pre_activation_for_activation" in mistakes:
    return [(A1, Z1), (Z1, Z1)]
  return [(A1, A1)]


def _targets(y: np.ndarray, K: int, mistakes: frozenset[str]) -> list[np.ndarray]:
  """The one-hot targets Y (B, K) of y, or of y − 1 and y + 1, wrapped."""
  if "labels_shifted" in mistakes:
    return [np.eye(K)[(y + shift) % K] for shift in (-1, 1)]
  return [np.eye(K)[y]]


def _output_delta(P: np.ndarray, Y: np.ndarray, mistakes: frozenset[str]) -> np.ndarray:
  """Each example's δ2 (B, K), before the 1/B of the mean."""
  if "softmax_jacobian_diagonal" in mistakes:   # Σ_j ∂L/∂p_j ∂p_j/∂z_k with j = k only
    delta2 = (P - 1) * Y
  else:
    delta2 = P - Y
  delta2 = -delta2 if "sign_flipped" in mistakes else delta2
  return delta2 * P * (1 - P) if "softmax_as_sigmoid" in mistakes else delta2


def _scale(B: int, mistakes: frozenset[str]) -> float:
  """1/B of the mean loss, or what a sum or a second mean makes of it."""
  if "sum_not_mean" in mistakes:
    return 1.0
  return 1.0 / B**2 if "mean_twice" in mistakes else 1.0 / B


def _backs(problem: Problem, delta2: np.ndarray, mistakes: frozenset[str]
           ) -> list[np.ndarray]:
  """∂L/∂A1 (B, H) = Δ2 W2, or with W1 in W2ᵀ's place, either way round that fits."""
  if "w1_for_w2" not in mistakes:
    return [delta2 @ problem.w2]
  w1 = problem.w1
  return [delta2 @ m for m in (w1.T, w1) if m.shape[0] == delta2.shape[1]]


def _masks(Z1: np.ndarray, A1: np.ndarray, mistakes: frozenset[str], activation: str
           ) -> list[np.ndarray]:
  """f′(Z1) (ReLU′: 1[Z1 ≥ 0]); none; for ReLU, 0 (or ½) at the ties Z1 = 0; or another
  activation's derivative: σ′ and tanh′ of z1 or of a1, and as written from the output,
  a(1 − a) and 1 − a² (each that is not f′ itself)."""
  right = ACTIVATIONS[activation][1](Z1)
  if "relu_mask_missing" in mistakes:
    return [np.ones_like(Z1)]
  if "relu_tie_convention" in mistakes:
    return ([(Z1 > 0).astype(np.float64), np.where(Z1 == 0, 0.5, Z1 > 0)]
            if activation == "relu" else [])
  if "wrong_activation_derivative" in mistakes:
    others = [m for v in (Z1, A1) for m in (_sigmoid(v) * (1 - _sigmoid(v)),
                                            1 - np.tanh(v)**2)] + [A1 * (1 - A1), 1 - A1**2]
    return [m for m in others if not np.allclose(m, right, rtol=1e-12, atol=1e-15)]
  return [right]


def _bias(deltas: list[np.ndarray], B: int, mistakes: frozenset[str]) -> list[np.ndarray]:
  """Σ_rows Δ; not summed: Δ itself, or its first or last row, as it is or times B
  (one example's own δ)."""
  if "bias_not_summed" not in mistakes:
    return [np.sum(d, axis=0) for d in deltas]
  return [v for d in deltas for v in (d, d[0], d[-1], B * d[0], B * d[-1])]


def mistake_sets() -> list[frozenset[str]]:
  """Every mistake computed here alone, then every two together, in the catalogue's
  order (the FITTED ones: fit_parameter)."""
  ids = [m for m in CATALOGUE if m not in FITTED]
  return ([frozenset([m]) for m in ids]
          + [frozenset(pair) for pair in itertools.combinations(ids, 2)])


def matching(values: list[Optional[np.ndarray]], problem_list: list[Problem], leaf: str,
             close: "Close") -> list[frozenset[str]]:
  """The fewest mistakes that give `values` (one leaf's value per problem, None where the
  function raised) on every problem where there is one, where it is not right on all: a
  computed mistake alone, else a FITTED one (fit_parameters), else two computed ones."""
  ran = [(v, p) for v, p in zip(values, problem_list) if v is not None]
  if all(close(v, right_gradients(p)[leaf]) for v, p in ran):
    return []                               # right wherever it ran: no mistake to name
  found: list[frozenset[str]] = []
  pairs = False
  for mistakes in mistake_sets():
    if found and len(mistakes) > len(found[0]):
      break
    if len(mistakes) == 2 and not pairs:    # before the pairs, the fitted ones alone
      pairs = True
      found = [frozenset([m]) for m in fit_parameters(values, problem_list, leaf, close)]
      if found:
        break
    if all(any(close(v, c) for c in gradients_with(p, mistakes)[leaf]) for v, p in ran):
      found.append(mistakes)
  return found


def fit_parameters(values: list[Optional[np.ndarray]], problem_list: list[Problem],
                   leaf: str, close: "Close") -> dict[str, float]:
  """{id: its parameter} of the FITTED mistakes that give `values` on every problem
  where there is one: l2_term, v = r + λW (W the leaf's own parameter), and
  scale_factor, v = c·r, each parameter fitted by least squares over the problems
  together; c within 1e-4 of ±1 (right to float32's precision, or sign_flipped) is no
  scale factor."""
  ran = [(v, right_gradients(p)[leaf], getattr(p, leaf)) for v, p in zip(values, problem_list)
         if v is not None]
  if not ran or any(v.size != r.size for v, r, _ in ran):
    return {}
  ran = [(v.reshape(r.shape), r, w) for v, r, w in ran]
  found = {}
  lam = _fit([v - r for v, r, _ in ran], [w for _, _, w in ran])
  if lam and all(close(v, r + lam * w) for v, r, w in ran):
    found["l2_term"] = lam
  c = _fit([v for v, _, _ in ran], [r for _, r, _ in ran])
  if c and min(abs(c - 1), abs(c + 1)) > 1e-4 and all(close(v, c * r) for v, r, _ in ran):
    found["scale_factor"] = c
  return found


def label_shift(values: list[Optional[np.ndarray]], problem_list: list[Problem], leaf: str,
                close: "Close") -> Optional[int]:
  """The shift s (−1 or +1) whose targets y + s (wrapped) give `values` alone, or None:
  labels_shifted's parameter."""
  for shift in (-1, 1):
    if all(v is None or (v.size == r.size and close(v.reshape(r.shape), r))
           for v, r in ((v, right_gradients(p._replace(y=(p.y + shift) % len(p.b2)))[leaf])
                        for v, p in zip(values, problem_list))):
      return shift
  return None


def _fit(targets: list[np.ndarray], bases: list[np.ndarray]) -> Optional[float]:
  """The t ≈ a·b least-squares a over every pair, or None where the b are all 0."""
  norm = sum(float(np.sum(b * b)) for b in bases)
  return sum(float(np.sum(t * b)) for t, b in zip(targets, bases)) / norm if norm else None


class Close:
  """close(value, want): the same number of entries and max|v − w| ≤ tol·max(|v|, |w|)."""

  def __init__(self, tol: float):
    self.tol = tol

  def __call__(self, value: np.ndarray, want: np.ndarray) -> bool:
    return value.size == want.size and relative_error(value.reshape(want.shape),
                                                      want) <= self.tol


def relative_error(value: np.ndarray, want: np.ndarray) -> float:
  """max|v − w| / max(max|v|, max|w|): the leaf's relative error, 0 when both are 0."""
  scale = max(float(np.max(np.abs(value), initial=0)), float(np.max(np.abs(want), initial=0)))
  return float(np.max(np.abs(value - want), initial=0)) / scale if scale > 0 else 0.0
