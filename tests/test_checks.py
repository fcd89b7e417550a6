"""A bad shape, dtype or label gives a clear error naming the problem and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlp_jax as mj
from mlp_jax.data import datasets

PARAMS = mj.init_params(jax.random.key(0), 4, 5, 3)
X = jnp.ones((2, 4), jnp.float32)
Y = jnp.array([0, 2])


@pytest.mark.parametrize("fn", [mj.loss, mj.grads, mj.autodiff_grads, mj.accuracy,
                                mj.loss_manual_vjp, mj.per_example_grad_norms])
@pytest.mark.parametrize("X_bad, y_bad, error, message", [
    (jnp.ones((2, 5)), Y, ValueError, r"X must be a batch of shape \(B, 4\)"),
    (jnp.ones(4), Y, ValueError, r"X must be a batch of shape \(B, 4\)"),
    (jnp.ones((2, 4), jnp.int32), Y, TypeError, "X must be floating point"),
    (X, jnp.array([0, 1, 2]), ValueError, r"y must be int labels \(2,\) or targets \(2, 3\)"),
    (X, jnp.ones((2, 4)), ValueError, r"targets \(2, 3\)"),
    (X, jnp.array([0.5, 1.0]), ValueError, "must be whole numbers"),
    (X, jnp.array([True, False]), TypeError, "must be class indices"),
    (X, jnp.array([0, 3]), ValueError, r"labels y must lie in \[0, 3\)"),
    (X, jnp.array([-1, 0]), ValueError, r"labels y must lie in \[0, 3\)"),
])
def test_bad_inputs_raise_clear_errors(fn, X_bad, y_bad, error, message):
  with pytest.raises(error, match=message):
    fn(PARAMS, X_bad, y_bad)


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match=r"X must be a batch of shape \(B, 4\)"):
    jax.jit(mj.grads)(PARAMS, jnp.ones((2, 5)), Y)


def test_bad_params_and_weights():
  with pytest.raises(ValueError, match=r"params.w2 must be \(K, H\) with H = 5"):
    mj.loss(PARAMS._replace(w2=jnp.ones((3, 6))), X, Y)
  with pytest.raises(ValueError, match=r"params.b1 must be \(5,\)"):
    mj.loss(PARAMS._replace(b1=jnp.ones(4)), X, Y)
  with pytest.raises(TypeError, match="params must be mlp_jax.Params"):
    mj.loss({"w1": PARAMS.w1}, X, Y)
  with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
    mj.loss(PARAMS, X, Y, jnp.ones(3))
  with pytest.raises(ValueError, match="method must be 'manual' or 'autodiff'"):
    mj.per_example_grads(PARAMS, X, Y, method="numeric")


def test_forward_takes_one_example():
  with pytest.raises(ValueError, match=r"forward takes ONE example x of shape \(4,\)"):
    mj.forward(PARAMS, X)


# No silent wrong results: what cannot raise under jit becomes NaN.

GRADIENT_FNS = [mj.value_and_grads, mj.autodiff_value_and_grads,
                jax.value_and_grad(mj.loss_manual_vjp)]


@pytest.mark.parametrize("bad_label", [3, 10, -1, 100, 1.5])
def test_out_of_range_label_under_jit_is_nan_not_a_plausible_number(bad_label):
  X4 = jax.random.normal(jax.random.key(1), (4, 4))
  y = jnp.array([0, 1, 2, 1], jnp.float32 if bad_label == 1.5 else jnp.int32)
  y = y.at[2].set(bad_label)
  for fn in GRADIENT_FNS:
    loss, g = jax.jit(fn)(PARAMS, X4, y)
    assert jnp.isnan(loss), fn
    # Every leaf holds NaN (hidden units the ReLU shuts for that row keep their value).
    assert all(bool(jnp.any(jnp.isnan(leaf))) for leaf in g), fn
  assert jnp.isnan(jax.jit(mj.accuracy)(PARAMS, X4, y))
  assert jnp.isnan(jax.jit(mj.per_example_grad_norms)(PARAMS, X4, y)[2])
  # A zero weight does not hide it: 0 · NaN is NaN.
  assert jnp.isnan(jax.jit(mj.loss)(PARAMS, X4, y, jnp.array([1.0, 1.0, 0.0, 1.0])))


def test_float_labels_are_whole_numbers_in_the_library_and_the_runner():
  X3 = jax.random.normal(jax.random.key(1), (3, 4))
  whole, half = np.array([0.0, 2.0, 1.0]), np.array([0.0, 1.5, 1.0])
  np.testing.assert_array_equal(mj.loss(PARAMS, X3, whole),
                                mj.loss(PARAMS, X3, whole.astype(np.int32)))
  np.testing.assert_array_equal(mj.grads(PARAMS, X3, whole).w1,
                                mj.grads(PARAMS, X3, whole.astype(np.int32)).w1)
  with pytest.raises(ValueError, match="labels y must be whole numbers .* got 1.5"):
    mj.loss(PARAMS, X3, half)
  x = np.random.default_rng(0).normal(size=(3, 4))
  ds = datasets.prepare((x, whole, x, whole))           # the runner's loader: accepted alike
  np.testing.assert_array_equal(ds.y_train, [0, 2, 1])
  with pytest.raises(datasets.DataError, match="must hold integer class labels"):
    datasets.prepare((x, half, x, whole))


@pytest.mark.parametrize("call, error, message", [
    (lambda: mj.loss(tuple(PARAMS), X, Y), TypeError,
     r"got a plain tuple; wrap it: mj.Params\(\*params\)"),
    (lambda: mj.grads(PARAMS, jnp.ones((0, 4)), jnp.ones((0,), jnp.int32)), ValueError,
     r"X \(0, 4\) has no rows"),
    (lambda: mj.loss(PARAMS, np.ones((2, 4), np.int64), Y), TypeError,
     "X must be floating point, got int64"),
    (lambda: mj.loss(PARAMS, X, np.array([True, False])), TypeError, "got dtype bool"),
    (lambda: mj.init_params(0, 4, 5, 3), TypeError,
     r"key must be a JAX PRNG key, got int 0; pass jax.random.key\(seed\)"),
])
def test_first_hour_rough_edges_get_one_clear_error(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_init_params_takes_new_and_legacy_keys():
  a = mj.init_params(jax.random.PRNGKey(0), 4, 5, 3)
  b = mj.init_params(jax.random.key(0), 4, 5, 3)
  np.testing.assert_array_equal(a.w1, b.w1)


def test_loss_manual_vjp_is_reverse_mode_only_and_says_so():
  """docs/library.md's sentence, each clause: jvp and jacfwd raise; hessian works (forward
  over the manual backward pass) and equals mj.loss's."""
  assert "jax.jvp" in mj.loss_manual_vjp.__doc__
  with pytest.raises(TypeError, match="forward-mode autodiff"):
    jax.jvp(lambda p: mj.loss_manual_vjp(p, X, Y), (PARAMS,), (PARAMS,))
  with pytest.raises(TypeError, match="forward-mode autodiff"):
    jax.jacfwd(mj.loss_manual_vjp)(PARAMS, X, Y)
  hessians = [jax.jit(jax.hessian(f))(PARAMS, X, Y) for f in (mj.loss_manual_vjp, mj.loss)]
  for got, want in zip(*map(jax.tree.leaves, hessians)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
