"""Where the example axis sits: the one choice the batched formulas leave open.

model.activations, gradients.py and privacy.py write every formula once, as a contraction
over named axes: d (inputs), h (hidden units), k (classes) and b (examples). A Layout
names the axes of each array; the data X is always (B, D), as it comes:

    BATCH_MAJOR    Z1, A1, Δ1 (B, H)     Z2, Δ2, Y (B, K)     an example per row
    FEATURE_MAJOR  Z1ᵀ, A1ᵀ, Δ1ᵀ (H, B)  Z2ᵀ, Δ2ᵀ, Yᵀ (K, B)  an example per column
    ONE_EXAMPLE    z1, a1, δ1 (H,)       z2, δ2, y (K,)       the derivation's vectors

so that, for instance, Δ1 = (Δ2 W2) ⊙ 1[Z1 ≥ 0] and Δ1ᵀ = (W2ᵀ Δ2ᵀ) ⊙ 1[Z1ᵀ ≥ 0] are one
line, `contract(f"kh,{L.output}->{L.hidden}", W2, Δ2)`. The layouts give the same numbers
up to the order of float32 sums; they differ in speed only, and `choose_layout` picks one.
"""

import functools
from typing import NamedTuple, Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import DTypeLike


class Layout(NamedTuple):
  """The axes of the arrays of one layout, as einsum strings (module docstring)."""

  name: str
  input: str    # X: "bd", or "d" for one example
  hidden: str   # Z1, A1, Δ1: "bh" | "hb" | "h"
  output: str   # Z2, Δ2, Y: "bk" | "kb" | "k"

  @property
  def class_axis(self) -> int:
    """The axis of Z2 along which softmax normalises."""
    return self.output.index("k")


BATCH_MAJOR = Layout("batch_major", "bd", "bh", "bk")
FEATURE_MAJOR = Layout("feature_major", "bd", "hb", "kb")
ONE_EXAMPLE = Layout("one_example", "d", "h", "k")
LAYOUTS = {layout.name: layout for layout in (BATCH_MAJOR, FEATURE_MAJOR)}


def layout_named(name: str) -> Optional[Layout]:
  """The batch layout called `name` (Hyperparams.layout); None for "auto" (choose_layout)."""
  if name == "auto":
    return None
  if name not in LAYOUTS:
    raise ValueError(f"layout must be auto, {' or '.join(LAYOUTS)}, got {name!r}.")
  return LAYOUTS[name]


def choose_layout(params_dtype: DTypeLike, compute_dtype: Optional[DTypeLike]) -> Layout:
  """The layout of a batch's manual passes, by measurement on the CPUs we measured
  (docs/benchmarks.md, "The batch layout": `experiments/benchmark.py
  --grads=manual,manual_bmajor,manual_fmajor,autodiff`, B = 64 to 1024):

      bfloat16 matmuls on a CPU with AMX, or on   FEATURE_MAJOR  (the fast bfloat16
        an AMD EPYC with AVX512_BF16                             GEMM takes both H × D
                                                                 products)
      float32 on an AMD EPYC                      FEATURE_MAJOR  (faster than autodiff
                                                                 on both AMD EPYCs)
      everything else (GPUs, other CPUs)          BATCH_MAJOR    (jax.grad's own program)

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


def contract(spec: str, a: Array, b: Array, compute_dtype: Optional[DTypeLike] = None
             ) -> Array:
  """jnp.einsum(spec, a, b) for two operands, as ONE dot_general with no transpose: the
  output axes must be a's free axes then b's, or b's then a's (the operands are swapped
  for the second). With a compute_dtype (bfloat16) both are cast to it and the products
  accumulate in float32, the dtype the result keeps."""
  inputs, out = spec.split("->")
  a_axes, b_axes = inputs.split(",")
  if (a.ndim, b.ndim) != (len(a_axes), len(b_axes)):
    raise ValueError(f"contract({spec!r}): operands of {a.ndim} and {b.ndim} axes")
  summed = [axis for axis in a_axes if axis in b_axes and axis not in out]
  a_free = "".join(axis for axis in a_axes if axis not in summed)
  b_free = "".join(axis for axis in b_axes if axis not in summed)
  if out == b_free + a_free and out != a_free + b_free:
    a, b, a_axes, b_axes = b, a, b_axes, a_axes
  elif out != a_free + b_free:
    raise ValueError(f"contract({spec!r}): the output must be one operand's free axes "
                     "then the other's")
  dims = ((tuple(a_axes.index(x) for x in summed), tuple(b_axes.index(x) for x in summed)),
          ((), ()))
  if compute_dtype is None or jnp.dtype(compute_dtype) == a.dtype:
    return jax.lax.dot_general(a, b, dims)
  return jax.lax.dot_general(a.astype(compute_dtype), b.astype(compute_dtype), dims,
                             preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def along_features(v: Array, axes: str) -> Array:
  """A per-feature vector v (F,) (a bias) shaped to add to an array of `axes`."""
  return jnp.expand_dims(v, axes.index("b")) if "b" in axes else v


def along_examples(v: Array, axes: str) -> Array:
  """A per-example vector v (B,) (weights, clip factors) shaped to scale an array of
  `axes`; for one example, v is a scalar and stays one."""
  return jnp.expand_dims(v, 1 - axes.index("b")) if "b" in axes else v


def sum_examples(a: Array, axes: str) -> Array:
  """Σ over the example axis of `a` (the bias gradients); `a` itself for one example."""
  return jnp.sum(a, axis=axes.index("b")) if "b" in axes else a


def sum_features(a: Array, axes: str) -> Array:
  """Σ over the feature axis of `a`, one value per example (B,) (squared norms)."""
  return jnp.sum(a, axis=len(axes) - 1 - axes.index("b") if "b" in axes else -1)


def as_rows(a: Array, axes: str) -> Array:
  """`a` with its example axis first: logits (B, K) whatever the layout."""
  return jnp.moveaxis(a, axes.index("b"), 0) if "b" in axes else a


def from_rows(a: Array, axes: str) -> Array:
  """A (B, ·) array such as the targets Y in the layout of `axes`."""
  return jnp.moveaxis(a, 0, axes.index("b")) if "b" in axes else a
