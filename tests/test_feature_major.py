"""The feature-major kernel (mlp_jax/core/feature_major.py) equals the reference pass,
gradients.backprop, and is chosen by one rule. (Its bfloat16 arithmetic: test_gradients'
test_bfloat16_gradient_is_float32_arithmetic_on_the_rounded_operands, in both layouts;
its bfloat16 GEMMs: test_train's test_bfloat16_hidden_products_compile_to_bfloat16_gemms.)
"""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlp_jax.core import feature_major
from mlp_jax.core import gradients
from mlp_jax.core import losses
from mlp_jax.core import network
from mlp_jax.core.network import Network
from mlp_jax.gradcheck import random_problem

SHAPES = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40),
                   st.integers(2, 12), st.integers(0, 2**16))


def _both(shape, dtype):
  B, D, H, K, seed = shape
  params, X, y = random_problem(seed, B, D, H, K, dtype)
  Y = losses.targets(y, K, dtype) * 0.9 + 0.1 / K          # soft targets
  w = jax.random.uniform(jax.random.key(seed), (B,), dtype)  # any mean weights
  net = Network()
  return (jax.jit(gradients.backprop, static_argnums=0)(net, params, X, Y, w),
          jax.jit(feature_major.backprop, static_argnums=0)(net, params, X, Y, w),
          max(B, D, H, K))


@pytest.mark.slow   # over a hundred compilations: a program per drawn shape
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(shape=SHAPES)
def test_the_kernel_equals_the_reference(x64_module, shape, dtype):
  """The loss, the logits and every gradient leaf, to the rounding of a sum of n terms
  in another order (n·u of each output's scale, n the longest sum): the same numbers but
  for the order of the GEMMs' sums (small shapes are bitwise equal)."""
  (ref_loss_logits, ref_grads), (got_loss_logits, got_grads), n = _both(shape, dtype)
  u = float(jnp.finfo(dtype).eps)
  for name, want, got in zip(("loss", "logits", "w1", "b1", "w2", "b2"),
                             (*ref_loss_logits, *ref_grads), (*got_loss_logits, *got_grads)):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    assert float(jnp.max(jnp.abs(got - want))) <= 4 * n * u * scale, name


def test_small_problems_are_bitwise_equal(x64_module):
  """Where every GEMM is a sum of a few terms both orders agree: no tolerance at all."""
  for dtype in (jnp.float64, jnp.float32):
    (ref, ref_g), (got, got_g), _ = _both((5, 4, 6, 3, 0), dtype)
    for want, have in zip((*ref, *ref_g), (*got, *got_g)):
      np.testing.assert_array_equal(have, want)


def test_the_layout_is_chosen_by_dtype_and_machine(monkeypatch):
  """On a CPU: feature-major for bfloat16 with AMX or on an AMD EPYC with AVX512_BF16,
  and for float32 on an AMD EPYC (where each was measured faster), else batch-major;
  batch-major on other backends."""
  fm, bm = network.FEATURE_MAJOR, network.BATCH_MAJOR
  cpus = {"Intel(R) Xeon(R) Processor": (bm, fm, {"avx512_bf16", "amx_bf16"}),
          "Intel(R) Xeon(R) CPU": (bm, bm, {"avx512_bf16"}),
          "AMD EPYC 9B14": (fm, fm, {"avx2", "avx512_bf16"}),
          "AMD EPYC 7B13": (fm, bm, {"avx2"}), "": (bm, bm, {"avx512_bf16"})}
  on_cpu = jax.default_backend() == "cpu"
  for model, (float32, bfloat16, flags) in cpus.items():
    monkeypatch.setattr(network, "cpu_info", lambda m=model, f=flags: (m, frozenset(f)))
    choose = network.choose_layout
    assert choose(jnp.float32, None) == (float32 if on_cpu else bm)
    assert choose(jnp.float32, jnp.float32) == (float32 if on_cpu else bm)
    assert choose(jnp.float32, jnp.bfloat16) == (bfloat16 if on_cpu else bm)
  for asked, runs in ((fm, fm), (bm, bm), ("auto", None), (None, None)):
    assert Network(layout=asked).layout == runs
  with pytest.raises(ValueError, match="layout must be auto, batch_major or feature_major, "
                                       "got 'row_major'"):
    Network(layout="row_major")


def test_cpu_info_reads_the_model_and_flags():
  """The model name and flags of /proc/cpuinfo's first processor, or nothing."""
  network.cpu_info.cache_clear()
  model, flags = network.cpu_info()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      text = f.read()
  except OSError:
    assert (model, flags) == ("", frozenset())
    return
  first = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in
                                                 text.split("\n\n")[0].splitlines())}
  assert model == first.get("model name", "")
  assert flags == frozenset(first.get("flags", "").split())
