"""Cross-entropy and accuracy, with golden values written out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

import mlp_jax as mj
from mlp_jax.core.losses import cross_entropy
from mlp_jax.core.losses import valid_labels

pytestmark = pytest.mark.usefixtures("x64_module")  # float64: the 1e-12 checks


def identity_params(k):
  """D = H = K, W1 = W2 = I, zero biases: logits(X) = ReLU(X)."""
  eye = jnp.eye(k, dtype=jnp.float64)
  return mj.Params(w1=eye, b1=jnp.zeros(k, jnp.float64), w2=eye, b2=jnp.zeros(k, jnp.float64))


def test_golden_2x3_cross_entropy():
  # Row 0: logits (0, 0, 0) -> L = log 3 for any label.
  # Row 1: logits (1, 2, 3), label 2 -> L = log(e + e² + e³) − 3 = 0.40760596444437...
  z2 = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], jnp.float64)
  Y = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], jnp.float64)
  np.testing.assert_allclose(cross_entropy(z2, Y), [np.log(3), 0.4076059644443804],
                             rtol=1e-15)
  params = identity_params(3)
  np.testing.assert_allclose(mj.loss(params, z2, jnp.array([0, 2])),
                             (np.log(3) + 0.4076059644443804) / 2, rtol=1e-15)


def test_int_labels_equal_one_hot_targets():
  params = identity_params(3)
  X = jnp.array([[0.3, 1.0, 2.0], [2.0, 0.1, 0.0], [0.5, 0.5, 4.0]], jnp.float64)
  y = jnp.array([2, 0, 1])
  one_hot = jnp.eye(3, dtype=jnp.float64)[y]
  np.testing.assert_allclose(mj.loss(params, X, y), mj.loss(params, X, one_hot), rtol=1e-15)


def test_weighted_loss_is_the_weighted_mean():
  params = identity_params(3)
  X = jnp.array([[0.3, 1.0, 2.0], [2.0, 0.1, 0.0]], jnp.float64)
  y = jnp.array([2, 1])
  per_example = cross_entropy(mj.logits(params, X), jnp.eye(3, dtype=jnp.float64)[y])
  np.testing.assert_allclose(mj.loss(params, X, y, jnp.array([3.0, 1.0])),
                             (3 * per_example[0] + per_example[1]) / 4, rtol=1e-15)


def test_accuracy_counts_argmax_hits_with_weights():
  params = identity_params(3)
  X = jnp.array([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
  y = jnp.array([2, 0, 0, 1])           # first two right, last two wrong
  assert mj.accuracy(params, X, y) == 0.5
  assert mj.accuracy(params, X, y, jnp.array([1.0, 1.0, 0.0, 0.0])) == 1.0
  assert mj.accuracy(params, X, jnp.eye(3)[y]) == 0.5
  assert mj.accuracy(params, X[:3], y[:3], jnp.ones(3)) == pytest.approx(2 / 3)
  assert mj.accuracy(params, X[:3], jnp.eye(3)[y[:3]]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("fn", [mj.loss, mj.accuracy, mj.loss_manual_vjp])
def test_loss_and_accuracy_keep_the_params_dtype_and_check_their_weights(fn):
  """float32 params give a float32 value even with float64 enabled, float64 weights
  (jnp.ones here) and float64 NumPy inputs; a weights vector of the wrong length is
  refused by name, not broadcast."""
  params = mj.Params(*[a.astype(jnp.float32) for a in identity_params(3)])
  X = jnp.array([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]], jnp.float32)
  y = jnp.array([2, 1])
  for labels in (y, jnp.eye(3, dtype=jnp.float32)[y]):   # int labels, targets
    assert fn(params, X, labels).dtype == jnp.float32
    assert fn(params, X, labels, jnp.ones(2)).dtype == jnp.float32
    assert fn(params, np.asarray(X, np.float64), labels).dtype == jnp.float32
  with pytest.raises(ValueError, match=r"^weights must have shape \(2,\)"):
    fn(params, X, y, jnp.ones(3))


def test_a_valid_label_is_a_whole_number_in_range():
  """What the loss and accuracy accept under jit (NaN for the rest): 0 <= y < K, and a
  float label must be a whole number."""
  np.testing.assert_array_equal(valid_labels(jnp.array([-1, 0, 2, 3]), 3),
                                [False, True, True, False])
  np.testing.assert_array_equal(valid_labels(jnp.array([-1.0, 0.0, 1.5, 2.0, 3.0]), 3),
                                [False, True, False, True, False])
  np.testing.assert_array_equal(valid_labels(jnp.array([1.5, 1.0], jnp.float32), 3),
                                [False, True])
