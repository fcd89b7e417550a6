"""A kernel: the manual pass of gradients.backprop with each example as a COLUMN.

gradients.backprop is the reference (an example per row, the program jax.grad compiles
to). This is the same pass on the transposed activations, the one layout in which XLA's
fast CPU bfloat16 GEMM takes both H × D products:

    Z1ᵀ = W1 Xᵀ + b1 (H, B)      A1ᵀ = ReLU(Z1ᵀ)      Z2ᵀ = W2 A1ᵀ + b2 (K, B)
    Δ2ᵀ = ŵ ⊙ (Pᵀ Σy − Yᵀ) (K, B)      Δ1ᵀ = (W2ᵀ Δ2ᵀ) ⊙ 1[Z1ᵀ ≥ 0] (H, B)
    dW1 = Δ1ᵀ X    db1 = Σ_cols Δ1ᵀ    dW2 = Δ2ᵀ A1    db2 = Σ_cols Δ2ᵀ

Each product is written as an einsum whose output needs no transpose. tests/
test_feature_major.py proves it equal to the reference (float32, float64, and bfloat16
against float32 arithmetic on the rounded operands); `choose_layout` says where it is
the faster program, and gradients.manual_pass is the one place that asks.
"""

import functools
from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import DTypeLike

from mlp_jax.base import files
from mlp_jax.core import losses
from mlp_jax.core.model import Params, relu, relu_derivative

BATCH_MAJOR = "batch_major"
FEATURE_MAJOR = "feature_major"
LAYOUTS = (BATCH_MAJOR, FEATURE_MAJOR)


def check_layout(layout: str) -> None:
  """ValueError unless `layout` is one of LAYOUTS."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be auto, {' or '.join(LAYOUTS)}, got {layout!r}.")


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


def _einsum(spec: str, a: Array, b: Array, compute_dtype: Optional[DTypeLike] = None
            ) -> Array:
  """jnp.einsum(spec, a, b); with a compute_dtype other than a's (model.matmul's rule),
  both operands rounded to it and the products accumulated in float32 or wider."""
  if compute_dtype is None or jnp.dtype(compute_dtype) == a.dtype:
    return jnp.einsum(spec, a, b)
  return jnp.einsum(spec, a.astype(compute_dtype), b.astype(compute_dtype),
                    preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def backprop(params: Params, X: Array, Y: Array, w: Array,
             compute_dtype: Optional[DTypeLike] = None) -> tuple[tuple[Array, Array], Params]:
  """gradients.backprop's ((loss, logits Z2 (B, K)), Params), computed with examples as
  columns (module docstring); X (B, D), Y (B, K) and ŵ (B,) as it takes them."""
  Z1 = _einsum("hd,bd->hb", params.w1, X, compute_dtype) + params.b1[:, None]   # (H, B)
  A1 = relu(Z1)
  Z2 = jnp.einsum("kh,hb->kb", params.w2, A1) + params.b2[:, None]             # (K, B)
  logits = Z2.T                                                                # (B, K)
  loss = jnp.sum(w * losses.cross_entropy(logits, Y))
  Yt = Y.T
  delta2 = w[None, :] * (jax.nn.softmax(Z2, axis=0) * jnp.sum(Yt, axis=0, keepdims=True)
                         - Yt)                                                 # (K, B)
  delta1 = jnp.einsum("kh,kb->hb", params.w2, delta2) * relu_derivative(Z1, delta2.dtype)
  grads = Params(w1=_einsum("hb,bd->hd", delta1, X, compute_dtype),
                 b1=jnp.sum(delta1, axis=1),
                 w2=jnp.einsum("kb,hb->kh", delta2, A1),
                 b2=jnp.sum(delta2, axis=1))
  return (loss, logits), grads
