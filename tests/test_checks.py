"""A bad shape, dtype or label gives a clear error naming the problem and the fix."""

import jax
import jax.numpy as jnp
import pytest

import mlp_jax as mj

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
    (X, jnp.array([0.0, 1.0]), TypeError, "must be integers"),
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
