"""The network as a value: which activation f, which dtype the H × D products read, and
which layout the manual pass runs in.

    z1 = W1 x + b1      a1 = f(z1)      z2 = W2 a1 + b2      p = softmax(z2)

`Network` is static and hashable (a jit static argument): every pass of the package
(the forward pass, the manual backward pass and its kernel, the custom VJP, the
per-example norms, the DP clipped sum, prediction) takes one and reads f and f′ from
ACTIVATIONS, a table of rows each with its derivative written by hand beside it
(tests/test_activations.py proves each equal to jax.grad, at its kinks too). A new
activation is one row here. `choose_layout` is the one place the faster layout of a
manual pass is picked, by the machine, outside the mathematics.
"""

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import DTypeLike

from mlp_jax.base import files


class Activation(NamedTuple):
  """An activation a = f(z) and its derivative f′(z), both elementwise, z's dtype."""

  name: str
  fn: Callable[[Array], Array]
  derivative: Callable[[Array], Array]


def relu(z: Array) -> Array:
  """ReLU(z) = 0 if z < 0 else z, written so that autodiff takes ReLU′(0) = 1.

  The source derivation's convention (errata 7 in docs/derivation.md): jax.nn.relu would
  give ReLU′(0) = 0 and jnp.maximum(z, 0) gives 1/2, so the manual and autodiff
  gradients would differ at exact ties. Testing z < 0 (not z >= 0) lets a NaN through:
  NaN < 0 is false, so a NaN input gives NaN logits, never a finite guess.
  """
  return jnp.where(z < 0, jnp.zeros_like(z), z)


def relu_derivative(z: Array) -> Array:
  """ReLU′(z) = 1[z ≥ 0], written as 1 − 1[z < 0] to match `relu`: a NaN z passes (as
  autodiff of `relu` passes it), so NaN stays NaN in δ1 too."""
  return (~(z < 0)).astype(z.dtype)


def tanh_derivative(z: Array) -> Array:
  """tanh′(z) = 1 − tanh(z)²."""
  return 1 - jnp.tanh(z) ** 2


def logistic_derivative(z: Array) -> Array:
  """σ′(z) = σ(z)(1 − σ(z)), σ(z) = 1 / (1 + e^−z)."""
  s = jax.nn.sigmoid(z)
  return s * (1 - s)


def gelu(z: Array) -> Array:
  """GELU(z) = z Φ(z), Φ(z) = (1 + erf(z/√2)) / 2 the standard normal CDF (the erf
  form, not tanh's approximation)."""
  return z * _normal_cdf(z)


def gelu_derivative(z: Array) -> Array:
  """GELU′(z) = Φ(z) + z φ(z), φ(z) = e^(−z²/2) / √(2π) the standard normal density."""
  return _normal_cdf(z) + z * jnp.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _normal_cdf(z: Array) -> Array:
  """Φ(z) = (1 + erf(z/√2)) / 2, computed as erfc(−z/√2) / 2: the same number without
  the cancellation of 1 + erf in the left tail (Φ(−30) ≈ 5e-198, not 0)."""
  return jax.lax.erfc(-z / math.sqrt(2)) / 2


# Each row's f and f′ in words: docs/derivation.md, "Other activations".
ACTIVATIONS = {a.name: a for a in (
    Activation("relu", relu, relu_derivative),
    Activation("tanh", jnp.tanh, tanh_derivative),
    Activation("logistic", jax.nn.sigmoid, logistic_derivative),
    Activation("identity", lambda z: z, jnp.ones_like),
    Activation("gelu", gelu, gelu_derivative),
)}
ACTIVATION_NAMES = tuple(ACTIVATIONS)

BATCH_MAJOR = "batch_major"
FEATURE_MAJOR = "feature_major"
LAYOUTS = (BATCH_MAJOR, FEATURE_MAJOR)


@dataclasses.dataclass(frozen=True)
class Network:
  """The network's static description: activation (ACTIVATIONS), compute_dtype (the
  dtype X W1ᵀ and Δ1ᵀ X read, e.g. "bfloat16"; None: the params' dtype) and layout of
  the manual pass (LAYOUTS; None or "auto": `choose_layout`'s). Hashable: a jit static
  argument. A bad value is refused here, once, with a ValueError naming it."""

  activation: str = "relu"
  compute_dtype: Optional[DTypeLike] = None   # kept as its name, e.g. "bfloat16"
  layout: Optional[str] = None

  def __post_init__(self) -> None:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {', '.join(ACTIVATION_NAMES)}, got "
                       f"{self.activation!r}.")
    if self.compute_dtype is not None:
      object.__setattr__(self, "compute_dtype", _float_dtype_name(self.compute_dtype))
    if self.layout == "auto":
      object.__setattr__(self, "layout", None)
    if self.layout is not None and self.layout not in LAYOUTS:
      raise ValueError(f"layout must be auto, {' or '.join(LAYOUTS)}, got {self.layout!r}.")

  @property
  def f(self) -> Callable[[Array], Array]:
    """The activation a = f(z)."""
    return ACTIVATIONS[self.activation].fn

  @property
  def f_prime(self) -> Callable[[Array], Array]:
    """Its hand-written derivative f′(z)."""
    return ACTIVATIONS[self.activation].derivative

  def layout_for(self, params_dtype: DTypeLike) -> str:
    """The layout the manual pass runs in: the one asked for, else `choose_layout`'s."""
    return self.layout or choose_layout(params_dtype, self.compute_dtype)


def _float_dtype_name(dtype: DTypeLike) -> str:
  """The name of a floating dtype ("bfloat16" for jnp.bfloat16); ValueError otherwise."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = ""
  if not name or not jnp.issubdtype(name, jnp.floating):
    raise ValueError(f"compute_dtype must be a floating dtype such as jnp.bfloat16 or "
                     f"'bfloat16', got {dtype!r}.")
  return name


def choose_layout(params_dtype: DTypeLike, compute_dtype: Optional[DTypeLike]) -> str:
  """The layout of a batch's manual pass, by measurement on the CPUs we measured
  (docs/benchmarks.md, "The batch layout": `experiments/benchmark.py
  --grads=manual,manual_bmajor,manual_fmajor,autodiff`, B = 64 to 1024):

      bfloat16 matmuls on a CPU with AMX, or on   FEATURE_MAJOR  (the fast bfloat16
        an AMD EPYC with AVX512_BF16                             GEMM takes both H × D
                                                                 products)
      float32 on an AMD EPYC                      FEATURE_MAJOR  (faster than autodiff
                                                                 on both AMD EPYCs)
      everything else (GPUs, other CPUs)          BATCH_MAJOR    (gradients.backprop,
                                                                 jax.grad's own program)

  An Intel Xeon with AVX512_BF16 and no AMX keeps batch-major bfloat16: its bfloat16
  GEMM ran slower than its float32 one.
  """
  narrow = compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.dtype(params_dtype)
  if jax.default_backend() != "cpu":
    return BATCH_MAJOR
  model, flags = cpu_info()
  amd = model.startswith("AMD EPYC")
  if narrow:
    fast_bfloat16 = "amx_bf16" in flags or (amd and "avx512_bf16" in flags)
    return FEATURE_MAJOR if fast_bfloat16 else BATCH_MAJOR
  return FEATURE_MAJOR if amd else BATCH_MAJOR


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
  """(model name, flags) of the host CPU, from Linux's /proc/cpuinfo; ("", {}) elsewhere."""
  fields: dict[str, str] = {}
  try:
    with files.open_regular("/proc/cpuinfo") as f:
      for line in f.read().decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields.get("model name", ""), frozenset(fields.get("flags", "").split())
