"""DP-SGD: the closed-form clipped sum equals vmap(grad) -> clip -> sum; noise, sampling
and the accountant are what they claim."""

import functools
import json
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import pld_epsilon
from conftest import read_metrics
from conftest import tiny_config
import mlp_jax as mj
from mlp_jax.core import privacy
from mlp_jax.core.network import Network
from mlp_jax.data import datasets
from mlp_jax.gradcheck import random_problem
from mlp_jax.gradcheck import relative_error
from mlp_jax.run import experiment


def example_loss(params, x, y):
  return mj.loss(params, x[None], y[None])


@functools.partial(jax.jit, static_argnames=("clipping",))
def reference_clipped_sum(params, X, Y, mask, clip_norm, clipping):
  """What jax_privacy and optax do: per-example grads by vmap(grad), clip, sum."""
  g = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, X, Y)
  b = X.shape[0]
  sq = [jnp.sum(leaf.reshape(b, -1) ** 2, axis=1) for leaf in g]
  if clipping == "flat":
    norm = jnp.sqrt(sum(sq))
    c = jnp.minimum(1.0, clip_norm / norm)
    factors = [c, c, c, c]
  else:
    c1 = jnp.minimum(1.0, clip_norm / np.sqrt(2) / jnp.sqrt(sq[0] + sq[1]))
    c2 = jnp.minimum(1.0, clip_norm / np.sqrt(2) / jnp.sqrt(sq[2] + sq[3]))
    factors = [c1, c1, c2, c2]
  keep = (mask > 0) & jnp.isfinite(sum(sq))
  return mj.Params(*[jnp.sum(jnp.where(keep.reshape((b,) + (1,) * (leaf.ndim - 1)),
                                       (f * mask).reshape((b,) + (1,) * (leaf.ndim - 1))
                                       * leaf, 0), axis=0)
                     for leaf, f in zip(g, factors)])


def hostile_problem(dtype):
  """9 rows: ordinary ones, a padding row, a zero-gradient row, a huge-norm row, a
  non-finite row."""
  params, X, y = random_problem(3, 9, 5, 7, 4, dtype)
  Y = jax.nn.one_hot(y, 4, dtype=dtype)
  Y = Y.at[2].set(0.0)                 # Σy = 0: δ2 = p·0 − 0 = 0, a zero gradient
  X = X.at[3].multiply(1e3)            # a huge norm: clipped hard
  X = X.at[5].set(jnp.inf)             # a non-finite gradient: contributes nothing
  mask = jnp.array([1, 1, 1, 1, 0, 1, 1, 1, 1], dtype)   # row 4 is padding
  return params, X, Y, mask


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_clipped_sum_equals_vmap_grad_then_clip_then_sum(clipping, dtype, tol, x64):
  params, X, Y, mask = hostile_problem(dtype)
  for clip_norm in (0.05, 1.0, 1e6):   # most rows clipped, some, none
    got, norms = jax.jit(privacy.clipped_grad_sum)(
        params, X, Y, privacy.Clip(clip_norm, clipping), mask)
    want = reference_clipped_sum(params, X, Y, mask, clip_norm, clipping=clipping)
    for name, a, b in zip(mj.Params._fields, got, want):
      assert bool(jnp.all(jnp.isfinite(a))), name
      assert relative_error(a, b) <= tol, (name, clip_norm, relative_error(a, b))
  assert norms.shape == ((9,) if clipping == "flat" else (9, 2))
  assert bool(jnp.all(norms[2] == 0)) and not bool(jnp.all(jnp.isfinite(norms[5])))


def test_clipped_sum_keeps_the_params_dtype_for_float64_inputs(x64):
  """float32 params with NumPy float64 X, int labels and no mask (all rows): float32
  sums and norms, equal to the float32 inputs' (so nothing was promoted to float64)."""
  params, X, y = random_problem(0, 6, 4, 5, 3, jnp.float32)
  got, norms = privacy.clipped_grad_sum(params, np.asarray(X, np.float64), np.asarray(y), 0.5)
  want, want_norms = privacy.clipped_grad_sum(params, X, y, 0.5, jnp.ones(6, jnp.float32))
  assert all(leaf.dtype == jnp.float32 for leaf in (*got, norms))
  chex.assert_trees_all_equal((got, norms), (want, want_norms))


def _bfloat16_rounded(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


def bfloat16_reference_clipped_sum(params, X, Y, mask, clip_norm):
  """The flat clipped sum the bfloat16 path computes, in float32 arithmetic on operands
  rounded to bfloat16 exactly where it rounds them: X and W1 for Z1 = X W1ᵀ, the
  clipped c_i m_i δ1_i and X for dW1 (a product of two bfloat16 numbers is exact in
  float32). The norms, clip factors and everything else are float32."""
  hi = jax.lax.Precision.HIGHEST
  mm = functools.partial(jnp.matmul, precision=hi)
  Xr = _bfloat16_rounded(X)
  Z1 = mm(Xr, _bfloat16_rounded(params.w1).T) + params.b1[None, :]
  A1 = jnp.maximum(Z1, 0)
  Z2 = mm(A1, params.w2.T) + params.b2[None, :]
  delta2 = jax.nn.softmax(Z2) * jnp.sum(Y, axis=1, keepdims=True) - Y
  delta1 = mm(delta2, params.w2) * (Z1 >= 0)
  norm = jnp.sqrt(jnp.sum(delta1**2, 1) * (jnp.sum(X**2, 1) + 1)
                  + jnp.sum(delta2**2, 1) * (jnp.sum(A1**2, 1) + 1))
  scale = (mask * jnp.minimum(1.0, clip_norm / norm))[:, None]
  d1, d2 = scale * delta1, scale * delta2
  return mj.Params(mm(_bfloat16_rounded(d1).T, Xr), jnp.sum(d1, 0), mm(d2.T, A1),
                   jnp.sum(d2, 0))


def test_bfloat16_clipped_sum_is_float32_arithmetic_on_the_rounded_operands():
  """The DP path in bfloat16, with padding rows and clipped rows, to the float32
  summation bound n·u (n = 64 terms, u = 2^-24): a clip factor or the mask dropped, or a
  0.5% error in one leaf, is a thousand times that."""
  params = mj.init_params(jax.random.key(0), 64, 32, 10)
  X = jax.random.normal(jax.random.key(1), (48, 64), jnp.float32)
  Y = jax.nn.one_hot(jax.random.randint(jax.random.key(2), (48,), 0, 10), 10)
  mask = jnp.ones(48).at[:5].set(0).at[5].set(0.5)    # 5 padding rows; Σ m_i c_i g_i
  net = Network(compute_dtype="bfloat16")
  clipped = jax.jit(lambda p, C: privacy.clipped_sum_with_logits(
      net, p, X, Y, mask, privacy.Clip(C))[1:])
  for clip_norm in (8.0, 1e6):                        # some rows clipped, none
    got, norms = clipped(params, clip_norm)
    assert float(jnp.min(norms[5:])) < 8.0 < float(jnp.max(norms[5:]))
    want = bfloat16_reference_clipped_sum(params, X, Y, mask, clip_norm)
    for name, a, b in zip(mj.Params._fields, got, want):
      error = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      assert error <= 64 * 2.0**-24, (name, clip_norm, error)


def test_norms_are_the_per_example_gradient_norms(x64):
  params, X, y = random_problem(0, 6, 5, 7, 3, jnp.float64)
  _, flat = privacy.clipped_grad_sum(params, X, y, 1.0)
  np.testing.assert_allclose(flat, mj.per_example_grad_norms(params, X, y), rtol=1e-12)
  _, layers = privacy.clipped_grad_sum(params, X, y, privacy.Clip(1.0, "per_layer"))
  np.testing.assert_allclose(jnp.sqrt(jnp.sum(layers ** 2, axis=1)), flat, rtol=1e-12)


def test_clipped_sum_forms_nothing_of_size_bhd():
  B, D, H, K = 16, 32, 64, 10
  params, X, y = random_problem(0, B, D, H, K, jnp.float32)
  for clipping in privacy.CLIPPINGS:
    jaxpr = jax.make_jaxpr(lambda p, x, t: privacy.clipped_grad_sum(  # pylint: disable=cell-var-from-loop
        p, x, t, privacy.Clip(1.0, clipping)))(params, X, y)
    assert conftest.largest_value(jaxpr) < min(B * H * D, B * K * H) / 2


def test_sensitivity_and_bad_clip_norms():
  assert privacy.sensitivity(2.0, "flat") == 2.0
  assert privacy.sensitivity(2.0, "per_layer") == pytest.approx(2.0)   # C/√2 per layer
  assert privacy.sensitivity((3.0, 4.0), "per_layer") == pytest.approx(5.0)
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="clip norm must be > 0"):
      privacy.sensitivity(bad, "flat")
  for bad in ((0.0, 1.0), (1.0, 0.0), (-1.0, 2.0)):   # a pair: each bound must be > 0
    with pytest.raises(ValueError, match="clip norm must be > 0"):
      privacy.sensitivity(bad, "per_layer")
  with pytest.raises(ValueError, match="clipping must be one of flat, per_layer"):
    privacy.sensitivity(1.0, "global")
  with pytest.raises(ValueError, match=r"^a pair of clip norms \(3\.0, 4\.0\) is one per "
                     r"layer: pass Clip\(\(3\.0, 4\.0\), 'per_layer'\) \(clipping "
                     r"per_layer\), or one clip norm C\.$"):
    privacy.sensitivity((3.0, 4.0), "flat")
  assert type(privacy.sensitivity(2.0, "per_layer")) is float   # config.json records it
  # A swept C (one per model, traced under jit): one sensitivity per model.
  per_model = jax.jit(lambda c: privacy.sensitivity(c, "per_layer"))(jnp.array([1.0, 3.0]))
  np.testing.assert_allclose(per_model, [1.0, 3.0], rtol=1e-6)


def test_the_loss_sum_is_over_the_sampled_rows_whatever_the_padding_holds():
  params, X, y = random_problem(0, 4, 5, 6, 3, jnp.float32)
  X = X.at[3].set(jnp.nan)                               # a padding row
  (loss_sum, _), _, _ = privacy.clipped_sum_with_logits(
      Network(), params, X, jax.nn.one_hot(y, 3), jnp.array([1.0, 1.0, 1.0, 0.0]),
      privacy.Clip(1.0))
  np.testing.assert_allclose(loss_sum, 3 * mj.loss(params, X[:3], y[:3]), rtol=1e-6)


def test_clip_factor_is_min_1_c_over_norm_and_0_for_a_non_finite_norm():
  norms = jnp.array([0.0, 0.5, 1.0, 4.0, jnp.inf, jnp.nan])
  np.testing.assert_array_equal(privacy.clip_factor(norms, 1.0), [1, 1, 1, 0.25, 0, 0])


def test_noise_keeps_the_gradients_dtype_and_adds_sigma_s_times_one_normal_per_leaf(x64):
  """The noise of each leaf is σ·S·normal(key_l) with key_l = split(key, 4)[l] (a resume
  redraws it), in the leaf's dtype (float32 stays float32 when x64 is on); / q·N."""
  grad_sum = mj.init_params(jax.random.key(0), 3, 4, 2)       # float32
  sigma, clip, qn = 1.5, (0.3, 0.4), 8.0
  noisy = privacy.add_noise(grad_sum, jax.random.key(1), sigma, clip, "per_layer", qn)
  keys = jax.random.split(jax.random.key(1), 4)
  for got, g, k in zip(noisy, grad_sum, keys):
    assert got.dtype == jnp.float32
    want = (g + sigma * 0.5 * jax.random.normal(k, g.shape, jnp.float32)) / qn  # S = 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_noise_has_std_sigma_c_over_qn():
  zeros = mj.Params(jnp.zeros((200, 100)), jnp.zeros(200), jnp.zeros((10, 200)),
                    jnp.zeros(10))
  sigma, clip, qn = 1.5, 0.5, 64.0
  noisy = jax.jit(privacy.add_noise, static_argnums=(2, 3, 4, 5))(
      zeros, jax.random.key(0), sigma, clip, "flat", qn)
  values = np.concatenate([np.ravel(leaf) for leaf in noisy])      # 22,210 draws
  # The sample std of n normals is within 3·std/√(2n) of the truth (99.7%).
  expected = sigma * clip / qn
  assert abs(values.std() - expected) < 3 * expected / np.sqrt(2 * values.size)
  assert abs(values.mean()) < 4 * expected / np.sqrt(values.size)
  other = privacy.add_noise(zeros, jax.random.key(1), sigma, clip, "flat", qn)
  assert not np.array_equal(noisy.w1, other.w1)


def test_poisson_batches_have_binomial_sizes_and_reach_every_example():
  n, q, steps = 50, 0.2, 2000
  padded, p_overflow = privacy.padded_batch_size(n, q, steps)
  assert p_overflow <= 1e-9 and n * q < padded <= n

  @jax.jit
  def draw(step):
    sample_key, _ = privacy.step_keys(jax.random.key(0), step)
    return privacy.poisson_batch(sample_key, n, q, padded)

  idx, mask, overflow = jax.vmap(draw)(jnp.arange(steps))
  sizes = np.asarray(mask.sum(axis=1))
  assert not np.any(overflow)
  # Binomial(50, 0.2): mean qN = 10, variance qN(1 − q) = 8; bounds of ~4 std errors.
  assert abs(sizes.mean() - 10) < 4 * np.sqrt(8 / steps)
  assert abs(sizes.var() - 8) < 4 * 8 * np.sqrt(2 / steps)
  drawn = np.zeros(n, int)
  np.add.at(drawn, np.asarray(idx)[np.asarray(mask) > 0], 1)
  assert drawn.min() > 0                                   # every example, at some step
  # Each example joins a step independently with probability q.
  assert abs(drawn.mean() / steps - q) < 0.01
  # The sampled indices are distinct within a batch.
  for i in range(5):
    chosen = np.asarray(idx[i])[np.asarray(mask[i]) > 0]
    assert len(set(chosen.tolist())) == len(chosen)


def test_overflow_is_reported_not_dropped():
  idx, mask, overflow = privacy.poisson_batch(jax.random.key(0), 100, 0.5, 10)
  assert bool(overflow) and mask.sum() == 10
  # A batch that fills its M slots exactly is no overflow.
  count = int(privacy.poisson_batch(jax.random.key(0), 100, 0.5, 100)[1].sum())
  assert not bool(privacy.poisson_batch(jax.random.key(0), 100, 0.5, count)[2])


def test_a_poisson_batch_is_the_examples_whose_uniform_draw_is_below_q():
  """Example j joins when u_j < q (u = uniform(key, (N,)) in float32): its indices in
  order, then index 0 with mask 0; the same batch and a float32 mask with x64 on (a
  float64 draw would pick other examples, and a resume under x64 other batches)."""
  u = np.asarray(jax.random.uniform(jax.random.key(3), (20,), jnp.float32))
  rows = np.nonzero(u < 0.3)[0]
  with conftest.float64():
    x64_batch = privacy.poisson_batch(jax.random.key(3), 20, 0.3, 12)
  for idx, mask, overflow in (privacy.poisson_batch(jax.random.key(3), 20, 0.3, 12),
                              x64_batch):
    assert 0 < len(rows) < 12 and not bool(overflow) and mask.dtype == jnp.float32
    np.testing.assert_array_equal(idx, np.concatenate([rows, np.zeros(12 - len(rows), int)]))
    np.testing.assert_array_equal(mask, np.arange(12) < len(rows))


def test_step_keys_are_pinned():
  """A resume redraws each step's batch and noise from (key, step): a change of the
  derivation would break the bit-identical resume of an older checkpoint."""
  sample_key, noise_key = privacy.step_keys(jax.random.PRNGKey(0), 3)
  assert np.asarray(sample_key).tolist() == [2232846749, 3415878460]
  assert np.asarray(noise_key).tolist() == [1300015767, 1196016749]


def test_the_padded_batch_is_the_binomial_bound_rounded_up_to_the_devices():
  """M: at most one above the smallest m with steps·P(Bin(N, q) > m) ≤ p (scipy's exact
  tail), rounded up to a multiple of the devices and at most N so rounded; p its bound."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  for n, q, steps, multiple in ((1000, 0.05, 300, 1), (1000, 0.05, 1, 1), (60, 0.3, 0, 1),
                                (1000, 0.05, 300, 8)):
    m, p = privacy.padded_batch_size(n, q, steps, multiple=multiple)
    assert type(m) is int and m % multiple == 0
    assert p == steps * stats.binom.sf(m, n, q) <= 1e-9
    smallest = next(k for k in range(n + 1) if max(steps, 1) * stats.binom.sf(k, n, q) <= 1e-9)
    assert smallest <= m <= -(-(smallest + 1) // multiple) * multiple, (n, q, steps, m)
  assert privacy.padded_batch_size(10, 0.99, 100, multiple=4) == (12, 0.0)  # all 10, rounded
  assert privacy.padded_batch_size(1000, 0.05, 300)[0] == 105               # one device: odd M


def test_accountant_matches_published_values():
  # TensorFlow Privacy's compute_dp_sgd_privacy test: N = 60000, batch 150, σ = 1.3,
  # 15 epochs, δ = 1e-5 -> RDP ε = 0.7242234026.
  q, steps = 150 / 60000, 15 * 60000 // 150
  assert privacy.epsilon(1.3, q, steps, 1e-5, "rdp") == pytest.approx(0.7242234026,
                                                                      rel=1e-8)
  # jax_privacy's doctest: σ = 3, 512 steps, q = 0.1, δ = 1e-6 -> PLD ε ≈ 3.77.
  assert privacy.epsilon(3.0, 0.1, 512, 1e-6, "pld") == pytest.approx(3.77, abs=0.01)
  # PLD is tighter than RDP.
  assert privacy.epsilon(1.3, q, steps, 1e-5, "pld") < 0.7242234026
  assert privacy.epsilon(1.3, q, 0, 1e-5) == 0.0
  with pytest.raises(ValueError, match="accountant must be 'pld' or 'rdp', got 'x'"):
    privacy.epsilon(1.3, q, 7, 1e-5, "x")


def test_epsilon_of_runs_is_the_pld_composition_of_every_run():
  """Three runs, two of equal σ: dp-accounting's PLD accountant composing the three
  directly (conftest.pld_epsilon); no steps, no privacy spent."""
  sigmas, q, steps = (1.1, 2.0, 1.1), 0.01, 50
  assert privacy.epsilon_of_runs(sigmas, q, steps, 1e-5) == pytest.approx(
      pld_epsilon(sigmas, q, steps, 1e-5), rel=1e-9)
  assert privacy.epsilon_of_runs(sigmas, q, 0, 1e-5) == 0.0


def test_accounting_without_dp_accounting_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "dp_accounting", None)    # import fails, as uninstalled
  with pytest.raises(ImportError, match="needs dp-accounting: pip install dp-accounting"):
    privacy.epsilon.__wrapped__(1.3, 0.01, 11, 1e-5)   # past the cache: the accountant


@pytest.mark.slow  # the DP accountant's calibrations: seconds
def test_calibration_inverts_the_accountant():
  q, steps, delta = 0.01, 300, 1e-5
  sigma = privacy.calibrate_noise_multiplier(2.0, q, steps, delta)
  assert privacy.epsilon(sigma, q, steps, delta) <= 2.0
  assert privacy.epsilon(sigma - 0.01, q, steps, delta) > 2.0
  with pytest.raises(ValueError, match="no noise multiplier up to 100 reaches"):
    privacy.calibrate_noise_multiplier(1e-4, 0.5, 10_000, delta)


# The runner: --dp_* flags.

def dp_config(dataset, workdir, **overrides):
  return tiny_config(dataset, workdir, **{
      "epochs": 4, "learning_rate": 0.05, "schedule": "constant", "label_smoothing": 0.0,
      "dp_noise_multiplier": 0.8, "dp_delta": 1e-3, **overrides})


@pytest.mark.slow  # the DP accountant's calibrations: seconds
def test_dp_run_killed_and_resumed_equals_an_uninterrupted_one_epsilon_included(
    tiny_npz, tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  lines = []
  experiment.run(dp_config(tiny_npz, straight, dp_clipping="per_layer"), log=lines.append)
  assert any("\nDP-SGD: ε = " in line for line in lines)
  experiment.run(dp_config(tiny_npz, killed, dp_clipping="per_layer"), log=lambda *_: None)
  # As if killed after epoch 2: the later checkpoints and metrics lines never written.
  for epoch in (3, 4):
    shutil.rmtree(killed / "checkpoints" / str(epoch))
  rows = read_metrics(killed)[:2]
  (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = []
  experiment.run(dp_config(tiny_npz, killed, dp_clipping="per_layer"), log=lines.append)
  assert "resuming from the checkpoint after epoch 2" in lines
  timeless = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds",  # pylint: disable=g-long-lambda
                                                                  "examples_per_second")}
                           for r in rows]
  assert timeless(read_metrics(killed)) == timeless(read_metrics(straight))
  with np.load(straight / "params.npz") as a, np.load(killed / "params.npz") as b:
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
  last = read_metrics(straight)[-1]
  q = 8 / 60
  assert last["steps"] == 4 * 8
  assert last["epsilon"] == privacy.epsilon(0.8, q, 32, 1e-3)
  assert last["epsilon_rdp"] == privacy.epsilon(0.8, q, 32, 1e-3, "rdp")
  assert 0 < read_metrics(straight)[0]["epsilon"] < last["epsilon"] < last["epsilon_rdp"]
  record = json.loads((straight / "config.json").read_text())["dp"]
  assert record["noise_multiplier"] == 0.8 and record["sampling_rate"] == q
  assert record["planned_steps"] == 32 and record["overflow_probability"] <= 1e-9
  assert record["sensitivity"] == pytest.approx(1.0)


def test_dp_run_scales_inputs_with_constants_not_train_statistics():
  raw = datasets.load_digits()
  private = datasets.load("digits", private=True)
  np.testing.assert_allclose(private.x_train, (raw[0] / 16 - 0.5) / 0.5, rtol=1e-6)
  np.testing.assert_allclose(private.x_test, (raw[2] / 16 - 0.5) / 0.5, rtol=1e-6)


@pytest.mark.slow  # the DP accountant's calibrations: seconds
def test_target_epsilon_calibrates_sigma_for_the_planned_steps(tiny_npz, tmp_path):
  lines = []
  experiment.run(dp_config(tiny_npz, tmp_path, dp_noise_multiplier=None,
                           dp_target_epsilon=4.0, epochs=2), log=lines.append)
  last = read_metrics(tmp_path)[-1]
  assert 3.99 <= last["epsilon"] <= 4.0
  assert any(line.startswith("DP: σ = ") and "reaches ε = 4 (PLD)" in line for line in lines)
  # σ was calibrated for 2 epochs: another length would change σ within the run.
  lines = []
  with pytest.raises(experiment.RunError, match="resume it with --epochs=2"):
    experiment.run(dp_config(tiny_npz, tmp_path, dp_noise_multiplier=None,
                             dp_target_epsilon=4.0, epochs=3), log=lines.append)
  assert not any("extends a run" in line for line in lines)  # refused, not announced
  assert len(read_metrics(tmp_path)) == 2


@pytest.mark.parametrize("overrides, message", [
    ({"dp_noise_multiplier": 0.0}, "--dp_noise_multiplier=0.0: must be >= 0.1"),
    ({"dp_noise_multiplier": -1.0}, "--dp_noise_multiplier=-1.0: must be >= 0.1"),
    ({"dp_clip_norm": 0.0}, "--dp_clip_norm=0.0: must be > 0"),
    ({"dp_noise_multiplier": None, "dp_target_epsilon": -3.0},
     "--dp_target_epsilon=-3.0: must be > 0"),
    ({"dp_delta": 0.02}, r"--dp_delta 0.02 is not below 1/N = 0.0167"),
    ({"dp_noise_multiplier": None, "dp_target_epsilon": 1e-4},
     "--dp_target_epsilon: no noise multiplier up to 100 reaches"),
    ({"dp_target_epsilon": 3.0}, "not both"),
    ({"grads": "autodiff"}, "always uses the closed-form clipped gradient"),
    ({"input_scaling": "per_feature"}, "--input_scaling=per_feature: a private run cannot"),
])
def test_bad_dp_settings_are_one_line_and_write_nothing(tiny_npz, tmp_path, overrides,
                                                        message):
  with pytest.raises(experiment.RunError, match=message) as error:
    experiment.run(dp_config(tiny_npz, tmp_path / "w", **overrides), log=lambda *_: None)
  assert "\n" not in str(error.value)
  assert not (tmp_path / "w").exists()


def test_dp_settings_without_dp_accounting_name_the_install(tiny_npz, tmp_path,
                                                           monkeypatch):
  monkeypatch.setitem(sys.modules, "dp_accounting", None)    # import fails, as uninstalled
  with pytest.raises(experiment.RunError, match=r"differential privacy \(dp_noise_multiplier, "
                                                r"dp_target_epsilon\) needs dp-accounting: pip "
                                                "install dp-accounting"):
    experiment.run(dp_config(tiny_npz, tmp_path), log=lambda *_: None)


# Augmentation multiplicity (De et al. 2022): an example's gradient is the mean over its
# K augmented copies, clipped as one, from the same closed form.

@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_the_clipped_sum_over_copies_is_the_sum_of_each_examples_clipped_mean(x64, clipping):
  """Against jax.grad: each example's K rows' mean gradient, clipped to C, summed over
  the unmasked examples; the norms are the means' (Gram matrices over the copies)."""
  b, k, d, h, c = 5, 3, 4, 6, 3
  rng = np.random.default_rng(0)
  params = mj.init_params(jax.random.key(1), d, h, c, dtype=jnp.float64)
  X = jnp.asarray(rng.normal(size=(b * k, d)))
  y = jnp.asarray(rng.integers(0, c, b * k))
  Y = jax.nn.one_hot(y, c, dtype=jnp.float64)
  mask = jnp.repeat(jnp.array([1.0, 1.0, 0.0, 1.0, 1.0]), k)
  clip = privacy.Clip((0.5, 0.3) if clipping == "per_layer" else 0.4, clipping, copies=k)
  (loss_sum, _), got, norms = privacy.clipped_sum_with_logits(
      Network("relu"), params, X, Y, mask, clip)
  def mean_grad(i):
    rows = slice(i * k, i * k + k)
    return jax.grad(mj.loss)(params, X[rows], y[rows])   # the mean over its copies
  want = jax.tree.map(jnp.zeros_like, params)
  for i in range(b):
    g = mean_grad(i)
    layers = ((g.w1, g.b1), (g.w2, g.b2))
    sq = [sum(jnp.sum(a * a) for a in layer) for layer in layers]
    if clipping == "flat":
      scale = [min(1.0, 0.4 / float(jnp.sqrt(sum(sq))))] * 2
      np.testing.assert_allclose(norms[i], jnp.sqrt(sum(sq)), rtol=1e-10)
    else:
      scale = [min(1.0, bound / float(jnp.sqrt(s))) for bound, s in zip((0.5, 0.3), sq)]
      np.testing.assert_allclose(norms[i], jnp.sqrt(jnp.array(sq)), rtol=1e-10)
    if mask[i * k]:
      want = want._replace(w1=want.w1 + scale[0] * g.w1, b1=want.b1 + scale[0] * g.b1,
                           w2=want.w2 + scale[1] * g.w2, b2=want.b2 + scale[1] * g.b2)
  for name in ("w1", "b1", "w2", "b2"):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-10,
                               atol=1e-14)
  losses_each = jax.vmap(example_loss, (None, 0, 0))(params, X, y).reshape(b, k).mean(1)
  np.testing.assert_allclose(loss_sum, jnp.sum(losses_each * mask[::k]), rtol=1e-12)
