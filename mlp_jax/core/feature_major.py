"""A kernel: the manual pass of gradients.backprop with each example as a COLUMN.

gradients.backprop's reference pair, model.activations and gradients.backward, has an
example per row (the program jax.grad compiles to). This pair computes the same numbers
on the transposed hidden layer, the one layout in which XLA's fast CPU bfloat16 GEMM
takes both H × D products:

    Z1ᵀ = W1 Xᵀ + b1 (H, B)    A1ᵀ = ReLU(Z1ᵀ)    Z2 = (W2 A1ᵀ + b2)ᵀ (B, K)
    Δ1ᵀ = (W2ᵀ Δ2ᵀ) ⊙ 1[Z1ᵀ ≥ 0] (H, B)    dW1 = Δ1ᵀ X    db1 = Σ_cols Δ1ᵀ
    dW2 = Δ2ᵀ A1    db2 = Σ_rows Δ2

tests/test_feature_major.py proves it equal to the reference (float32 and float64, and
bfloat16 against float32 arithmetic on the rounded operands); `choose_layout` says where
it is the faster program, and gradients.manual_passes is the one place that asks.
"""

import functools
from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import DTypeLike

from mlp_jax.core.model import Params, linear, matmul, relu, relu_derivative

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
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields.get("model name", ""), frozenset(fields.get("flags", "").split())


def activations(params: Params, X: Array, compute_dtype: Optional[DTypeLike] = None
                ) -> tuple[Array, Array, Array]:
  """model.activations with the hidden layer transposed: (Z1ᵀ (H, B), A1ᵀ (H, B),
  Z2 (B, K)) of X (B, D); compute_dtype is what W1 Xᵀ reads."""
  Z1 = linear(params.w1, X, compute_dtype) + params.b1[:, None]       # W1 Xᵀ: (H, B)
  A1 = relu(Z1)
  Z2 = jnp.einsum("kh,hb->bk", params.w2, A1) + params.b2[None, :]
  return Z1, A1, Z2


def param_grads(params: Params, delta2: Array, Z1: Array, X: Array, A1: Array,
                compute_dtype: Optional[DTypeLike] = None) -> Params:
  """gradients.backward from Δ2 (B, K) and the hidden layer of `activations`, Z1ᵀ and
  A1ᵀ (H, B): the same Params, with δ1 a column per example (module docstring)."""
  delta1 = jnp.einsum("kh,bk->hb", params.w2, delta2) * relu_derivative(Z1, delta2.dtype)
  return Params(w1=matmul(delta1, X, compute_dtype),                  # Δ1ᵀ X (H, D)
                b1=jnp.sum(delta1, axis=1),
                w2=jnp.einsum("bk,hb->kh", delta2, A1),
                b2=jnp.sum(delta2, axis=0))
