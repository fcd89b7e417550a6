"""Every activation of the table (mlp_jax/core/network.py): its hand-written derivative
equals jax.grad of it and float64 finite differences, at its kinks too; every manual
pass with it equals jax.grad; the feature-major kernel equals the reference with it on
every input class the reference is tested on (ties, NaN rows, zero weights, soft
targets); a bad name is refused in one line."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import mlp_jax as mj
from mlp_jax.base import options
from mlp_jax.core import feature_major
from mlp_jax.core import gradients
from mlp_jax.core import losses
from mlp_jax.core import network
from mlp_jax.core import privacy
from mlp_jax.core.network import ACTIVATIONS, Network
from mlp_jax.gradcheck import random_problem
from mlp_jax.gradcheck import relative_error

pytestmark = pytest.mark.usefixtures("x64_module")  # float64: the 1e-12 checks

NAMES = pytest.mark.parametrize("activation", list(ACTIVATIONS))
# Where an activation bends or is special: its kink (0), both sides of it, the flat
# tails of tanh and the logistic, and ordinary points.
POINTS = np.array([0.0, -0.0, 1e-300, -1e-300, 1e-8, -1e-8, 0.5, -0.5, 1.0, -1.0, 2.5,
                   -2.5, 7.0, -7.0, 30.0, -30.0])


def test_the_flags_offer_the_tables_activations():
  """The runner's --activation choices (declared before JAX loads) are the table's rows."""
  assert options.ACTIVATIONS == tuple(ACTIVATIONS) == network.ACTIVATION_NAMES


@NAMES
def test_the_derivative_is_jax_grad_of_the_activation(activation):
  """f′ written by hand equals jax.grad(f) to float64 rounding at every point (a few
  ulps of f′'s scale, 1: 1 − tanh² z and JAX's form round differently), the kinks
  included (ReLU′(0) = 1 both ways: the seed's convention)."""
  row = ACTIVATIONS[activation]
  z = jnp.asarray(POINTS, jnp.float64)
  autodiff = jax.vmap(jax.grad(row.fn))(z)
  np.testing.assert_allclose(row.derivative(z), autodiff, rtol=1e-15, atol=4e-16)
  assert row.derivative(z).dtype == z.dtype == row.fn(z).dtype


@NAMES
def test_the_derivative_is_the_finite_difference(activation):
  """f′ against float64 central differences away from a kink: (f(z+h) − f(z−h)) / 2h."""
  row = ACTIVATIONS[activation]
  z = jnp.asarray(POINTS[np.abs(POINTS) >= 0.5], jnp.float64)
  h = 1e-6
  fd = (row.fn(z + h) - row.fn(z - h)) / (2 * h)
  np.testing.assert_allclose(row.derivative(z), fd, rtol=1e-8, atol=1e-10)


def test_the_activations_are_the_named_functions():
  """Each row computes what its name says, checked against independent formulas."""
  z = jnp.asarray(POINTS, jnp.float64)
  want = {"relu": np.maximum(POINTS, 0.0), "tanh": np.tanh(POINTS),
          "logistic": 1 / (1 + np.exp(-POINTS)), "identity": POINTS,
          "gelu": np.asarray(jax.nn.gelu(z, approximate=False))}
  for name, values in want.items():
    np.testing.assert_allclose(ACTIVATIONS[name].fn(z), values, rtol=1e-12, atol=1e-300)
  # ReLU′ at an exact 0 is 1 (the seed's convention, errata 7); NaN passes through.
  np.testing.assert_array_equal(network.relu_derivative(jnp.array([0.0, -0.0, -1.0])),
                                [1.0, 1.0, 0.0])
  for row in ACTIVATIONS.values():
    assert bool(jnp.isnan(row.fn(jnp.array(jnp.nan)))), row.name


@NAMES
def test_every_manual_pass_equals_jax_grad(activation):
  """value_and_grads in both layouts, loss_manual_vjp, the per-example gradients and
  norms and the DP clipped sum, each with the activation, against jax.grad of mj.loss
  with it (float64, 1e-12 per leaf)."""
  params, X, y = random_problem(3, 6, 4, 5, 3, jnp.float64)
  autodiff = mj.autodiff_grads(params, X, y, activation=activation)
  loss = mj.loss(params, X, y, activation=activation)
  for layout in network.LAYOUTS:
    assert_close(conftest.manual_grads(layout, activation)(params, X, y), autodiff)
  value, g = mj.value_and_grads(params, X, y, activation=activation)
  np.testing.assert_allclose(value, loss, rtol=1e-14)
  assert_close(g, autodiff)
  vjp = functools.partial(mj.loss_manual_vjp, activation=activation)
  assert_close(jax.grad(vjp)(params, X, y), autodiff)
  one = jax.vmap(jax.grad(lambda p, x, t: mj.loss(p, x[None], t[None], activation=activation)),
                 in_axes=(None, 0, 0))(params, X, y)
  for method in ("manual", "autodiff"):
    each = mj.per_example_grads(params, X, y, method, activation=activation)
    assert_close(each, one)
  norms = jnp.sqrt(sum(jnp.sum(leaf.reshape(6, -1) ** 2, axis=1) for leaf in one))
  np.testing.assert_allclose(mj.per_example_grad_norms(params, X, y, activation=activation),
                             norms, rtol=1e-12)
  summed, clip_norms = mj.clipped_grad_sum(params, X, y, 1e9, activation=activation)
  np.testing.assert_allclose(clip_norms, norms, rtol=1e-12)
  assert_close(jax.tree.map(lambda s: s / 6, summed), autodiff)


@NAMES
def test_the_forward_pass_is_the_activation(activation):
  """forward, logits, accuracy and prediction run the network's own f."""
  params, X, y = random_problem(1, 5, 4, 6, 3, jnp.float64)
  f = ACTIVATIONS[activation].fn
  want = f(X @ params.w1.T + params.b1[None]) @ params.w2.T + params.b2[None]
  np.testing.assert_allclose(mj.logits(params, X, activation=activation), want, rtol=1e-13)
  np.testing.assert_allclose(mj.forward(params, X[0], activation=activation), want[0],
                             rtol=1e-13)
  np.testing.assert_allclose(
      mj.accuracy(params, X, y, activation=activation),
      np.mean(np.argmax(want, axis=1) == np.asarray(y)))
  from mlp_jax.core import prediction  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(prediction.probabilities(params, X, activation),
                             jax.nn.softmax(want, axis=1), rtol=1e-13)


def _input_classes(activation):
  """(name, params, X, Y, ŵ) of each input class the reference is tested on."""
  params, X, y = random_problem(0, 6, 4, 5, 3, jnp.float64)
  Y = losses.targets(y, 3, jnp.float64)
  w = jnp.full((6,), 1 / 6)
  # Exact ties: integer inputs and first layer, so z1 = 0 at some units in any order.
  ties = params._replace(w1=jnp.round(params.w1 * 2), b1=jnp.zeros(5))
  X_ties = jnp.round(X * 2)
  assert int(jnp.sum(X_ties @ ties.w1.T == 0)) > 0
  zeros = params._replace(w1=jnp.zeros_like(params.w1), w2=jnp.zeros_like(params.w2))
  soft = 0.8 * Y + 0.2 / 3
  weights = jnp.array([1.0, 0.0, 2.0, 0.5, 0.0, 3.0]) / 6.5
  return [("random", params, X, Y, w), ("ties", ties, X_ties, Y, w),
          ("nan_row", params, X.at[2].set(jnp.nan), Y, w), ("zero_weights", zeros, X, Y, w),
          ("soft_targets", params, X, soft, w), ("mean_weights", params, X, Y, weights)]


@NAMES
def test_the_kernel_equals_the_reference_on_every_input_class(activation):
  """feature_major.backprop against gradients.backprop: the loss, the logits and every
  leaf equal to float64 rounding of a few-term sum (NaN exactly where the reference has
  NaN: a NaN row stays NaN in both, never a finite guess)."""
  net = Network(activation)
  reference = jax.jit(gradients.backprop, static_argnums=0)
  kernel = jax.jit(feature_major.backprop, static_argnums=0)
  for name, params, X, Y, w in _input_classes(activation):
    (want_loss, want_logits), want = reference(net, params, X, Y, w)
    (got_loss, got_logits), got = kernel(net, params, X, Y, w)
    for leaf, a, b in zip(("loss", "logits", *mj.Params._fields),
                          (got_loss, got_logits, *got), (want_loss, want_logits, *want)):
      np.testing.assert_array_equal(jnp.isnan(a), jnp.isnan(b), err_msg=f"{name} {leaf}")
      np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15, err_msg=f"{name} {leaf}")


def test_a_bad_activation_is_refused_in_one_line():
  """Every library function, by the Network it builds."""
  params, X, y = random_problem(0, 3, 4, 5, 3, jnp.float64)
  message = ("^activation must be one of relu, tanh, logistic, identity, gelu, got "
             "'softplus'.$")
  calls = [lambda: mj.forward(params, X[0], activation="softplus"),
           lambda: mj.logits(params, X, activation="softplus"),
           lambda: mj.loss(params, X, y, activation="softplus"),
           lambda: mj.accuracy(params, X, y, activation="softplus"),
           lambda: mj.grads(params, X, y, activation="softplus"),
           lambda: mj.autodiff_grads(params, X, y, activation="softplus"),
           lambda: mj.per_example_grads(params, X, y, activation="softplus"),
           lambda: mj.per_example_grad_norms(params, X, y, activation="softplus"),
           lambda: mj.loss_manual_vjp(params, X, y, activation="softplus"),
           lambda: mj.clipped_grad_sum(params, X, y, 1.0, activation="softplus")]
  for call in calls:
    with pytest.raises(ValueError, match=message):
      call()
  for bad in ("bf16", jnp.int32, 3):                 # compute_dtype: a floating dtype
    with pytest.raises(ValueError, match="^compute_dtype must be a floating dtype such as "
                       f"jnp.bfloat16 or 'bfloat16', got {bad!r}.$"):
      mj.grads(params, X, y, compute_dtype=bad)
  assert Network(compute_dtype=jnp.bfloat16) == Network(compute_dtype="bfloat16")
  assert privacy.Clip(1.0).clipping == "flat"


def assert_close(tree_a, tree_b, tol=1e-12):
  for name, a, b in zip(mj.Params._fields, tree_a, tree_b):
    assert relative_error(a, b) <= tol, f"{name}: {relative_error(a, b):.3e} > {tol:g}"


@NAMES
def test_gradcheck_checks_the_network_with_each_activation(activation):
  """gradcheck.check: manual ~ autodiff ~ float64 finite differences, with `activation`."""
  from mlp_jax.gradcheck import check  # pylint: disable=g-import-not-at-top
  params, X, y = random_problem(2, 8, 6, 10, 4)
  for name, m_a, m_f, a_f in check(params, X, y, jnp.float64, activation=activation):
    assert m_a <= 1e-12 and m_f <= 1e-6 and a_f <= 1e-6, (activation, name)


@pytest.mark.slow  # python -m mlp_jax.gradcheck, a process each
def test_the_gradcheck_command_takes_an_activation():
  """--activation=NAME checks that network, ours or (with --grads) a learner's: the
  activation is taken there too (tests/test_learner_gradcheck.py checks its verdicts)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  run = lambda *args: subprocess.run([sys.executable, "-m", "mlp_jax.gradcheck", *args],
                                     capture_output=True, text=True, timeout=120)
  ok = run("--activation=gelu")
  assert ok.returncode == 0 and "activation=gelu" in ok.stdout, ok.stdout + ok.stderr
  assert "OK: manual == autodiff == finite differences" in ok.stdout
  missing = run("--activation=tanh", "--grads=mine.py:grads")   # past the activation
  assert missing.returncode == 2, missing.stderr
  lines = [l for l in missing.stderr.splitlines() if "xla_bridge" not in l]
  assert lines == ["error: --grads: no file mine.py; give the path of the .py file that "
                   "defines the function."], missing.stderr
