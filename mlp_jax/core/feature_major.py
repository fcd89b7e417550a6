"""A kernel: δ1 and the four gradients of gradients.backward, with δ1 as a COLUMN.

gradients.backward is the reference (δ1 an example per row, the program jax.grad
compiles to). This computes the same numbers from the same Δ2, Z1, X and A1, with
δ1 transposed, the one layout in which XLA's fast CPU bfloat16 GEMM takes dW1:

    Δ1ᵀ = (W2ᵀ Δ2ᵀ) ⊙ 1[Z1ᵀ ≥ 0] (H, B)    dW1 = Δ1ᵀ X    db1 = Σ_cols Δ1ᵀ

(dW2 = Δ2ᵀ A1 and db2 as the reference writes them). tests/test_feature_major.py proves
it equal to the reference (float32 and float64, and bfloat16 against float32 arithmetic
on the rounded operands); `choose_layout` says where it is the faster program, and
gradients.backward is the one place that asks.
"""

import functools
from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import DTypeLike

from mlp_jax.core.model import Params, matmul, relu_derivative

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


def param_grads(params: Params, delta2: Array, Z1: Array, X: Array, A1: Array,
                compute_dtype: Optional[DTypeLike] = None) -> Params:
  """gradients.param_grads(gradients.hidden_delta(params, delta2, Z1), delta2, X, A1):
  the same Params, with δ1 formed as a column per example (module docstring)."""
  delta1 = jnp.einsum("kh,bk->hb", params.w2, delta2) * relu_derivative(Z1, delta2.dtype).T
  return Params(w1=matmul(delta1, X, compute_dtype),      # Δ1ᵀ X: no transpose
                b1=jnp.sum(delta1, axis=1),
                w2=delta2.T @ A1,
                b2=jnp.sum(delta2, axis=0))
