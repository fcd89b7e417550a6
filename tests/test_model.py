"""Params, init_params, forward (one example) and logits (its vmap)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlp_jax as mj
from mlp_jax.core.network import relu

pytestmark = pytest.mark.usefixtures("x64_module")  # float64: the 1e-12 checks


def test_init_params_shapes_dtypes_and_scales():
  params = mj.init_params(jax.random.key(0), 400, 300, 10)
  assert isinstance(params, mj.Params)
  assert [leaf.shape for leaf in params] == [(300, 400), (300,), (10, 300), (10,)]
  assert all(leaf.dtype == jnp.float32 for leaf in params)
  np.testing.assert_allclose(jnp.std(params.w1), np.sqrt(2 / 400), rtol=0.02)  # He
  np.testing.assert_allclose(jnp.std(params.w2), np.sqrt(1 / 300), rtol=0.05)  # LeCun
  assert not jnp.any(params.b1) and not jnp.any(params.b2)
  assert mj.init_params(jax.random.key(0), 3, 4, 2, dtype=jnp.float64).w1.dtype == jnp.float64


def test_init_params_is_a_function_of_the_key_alone():
  a = mj.init_params(jax.random.key(1), 5, 6, 3)
  c = mj.init_params(jax.random.key(2), 5, 6, 3)
  assert not np.array_equal(a.w1, c.w1) and not np.array_equal(a.w2, c.w2)
  # Pinned values: a checkpoint's run (its seed) starts from these, in every process,
  # eagerly and under jit (train.init_state, tested bit for bit against this).
  np.testing.assert_allclose(a.w1[0, :3], [0.3364267349, -0.4572761357, 0.5737997293],
                             rtol=1e-6)
  np.testing.assert_allclose(a.w2[0, :3], [-0.0995799378, 0.0501615219, -0.3116200566],
                             rtol=1e-6)
  np.testing.assert_array_equal(jax.jit(mj.init_params, static_argnums=(1, 2, 3))(
      jax.random.key(1), 5, 6, 3).w1, a.w1)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
@pytest.mark.parametrize("position, name", [(0, "in_dim"), (1, "hidden_dim"),
                                            (2, "num_classes")])
def test_init_params_rejects_bad_sizes_by_name(bad, position, name):
  sizes = [4, 5, 3]
  sizes[position] = bad
  with pytest.raises(ValueError, match=re.escape(
      f"init_params: {name} must be a positive int, got {bad!r}.")):
    mj.init_params(jax.random.key(0), *sizes)


def test_init_params_needs_two_classes_and_one_input_and_hidden_unit():
  with pytest.raises(ValueError, match=r"^init_params: num_classes must be >= 2, got 1\.$"):
    mj.init_params(jax.random.key(0), 4, 5, 1)
  smallest = mj.init_params(jax.random.key(0), 1, 1, 2)
  assert [leaf.shape for leaf in smallest] == [(1, 1), (1,), (2, 1), (2,)]


def test_forward_is_the_seeds_formula_and_logits_is_its_vmap():
  params = mj.init_params(jax.random.key(0), 4, 5, 3, dtype=jnp.float64)
  params = params._replace(b1=jnp.linspace(-1, 1, 5), b2=jnp.array([0.5, -0.5, 0.1]))
  X = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
  for i in range(6):
    z1 = params.w1 @ X[i] + params.b1
    z2 = params.w2 @ np.maximum(z1, 0) + params.b2
    np.testing.assert_allclose(mj.forward(params, X[i]), z2, rtol=1e-14)
  expected = np.stack([mj.forward(params, x) for x in X])
  np.testing.assert_allclose(mj.logits(params, X), expected, rtol=1e-14)


def test_relu_is_zero_below_identity_above_and_has_slope_one_at_zero():
  z = jnp.array([-2.0, -0.0, 0.0, 3.0])
  np.testing.assert_array_equal(relu(z), [0.0, 0.0, 0.0, 3.0])
  np.testing.assert_array_equal(jax.vmap(jax.grad(relu))(z), [0.0, 1.0, 1.0, 1.0])
