"""Data augmentation (mlp_jax/core/augment.py): every augmented image is its image moved
by at most `shift` pixels (and flipped where allowed), its uncovered border the image's
darkest value; the draws are the key's, and every offset occurs."""

import itertools

import jax
import numpy as np
import pytest

from conftest import read_metrics, tiny_config, without_times
from mlp_jax.core import augment as augment_lib
from mlp_jax.core.augment import Augment
from mlp_jax.data import datasets
from mlp_jax.run import experiment
from mlp_jax.training import config as config_lib
from test_parallel import (RTOL, RUNNER_SETTINGS, assert_same_run, finish_all, host_devices,
                           runner)


def moved(image, dy, dx, flip):
  """The reference: `image` (H, W) moved by (dy, dx) (content shifts by -dy, -dx, as a
  crop at offset (dy, dx) of the padded image), then flipped; the border its minimum."""
  h, w = image.shape
  out = np.full_like(image, image.min())
  for r, c in itertools.product(range(h), range(w)):
    if 0 <= r + dy < h and 0 <= c + dx < w:
      out[r, c] = image[r + dy, c + dx]
  return out[:, ::-1] if flip else out


@pytest.mark.parametrize("shift, flip", [(0, False), (1, False), (2, True)])
def test_each_augmented_image_is_its_image_moved_and_flipped(shift, flip):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 5 * 6)).astype(np.float32)
  aug = Augment((5, 6), shift, flip)
  out = np.asarray(augment_lib.augment_batch(x, jax.random.key(3), aug))
  seen = set()
  for image, got in zip(x.reshape(-1, 5, 6), out.reshape(-1, 5, 6)):
    found = [(dy, dx, f) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
             for f in ((False, True) if flip else (False,))
             if np.array_equal(got, moved(image, dy, dx, f))]
    assert found, "an image that is no move of its own"
    seen.update(found)
  assert len(seen) > (2 * shift + 1) ** 2 * (1 + flip) // 2   # the draws spread
  if not shift and not flip:
    np.testing.assert_array_equal(out, x)


def test_the_draws_are_the_keys():
  x = np.arange(2 * 16, dtype=np.float32).reshape(2, 16)
  aug = Augment((4, 4), 1, True)
  key = jax.random.key(0)
  one = augment_lib.augment_batch(x, augment_lib.augment_key(key, 5), aug)
  np.testing.assert_array_equal(one, augment_lib.augment_batch(
      x, augment_lib.augment_key(key, 5), aug))
  others = [augment_lib.augment_batch(x, augment_lib.augment_key(key, s), aug)
            for s in range(6, 12)]
  assert any(not np.array_equal(one, other) for other in others)


# The runner: --augment on images, refused on rows; a resumed run repeats its draws.

@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
  """An .npz of 6×6 images of 3 classes (a bright square in a class's corner)."""
  rng = np.random.default_rng(0)
  y = np.arange(60) % 3
  x = rng.uniform(0, 0.2, size=(60, 6, 6)).astype(np.float32)
  for image, k in zip(x, y):
    image[k:k + 3, k:k + 3] += 1
  path = tmp_path_factory.mktemp("images") / "images.npz"
  np.savez(path, x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
  return f"npz:{path}"


@pytest.mark.slow   # four runs of the runner: seconds
@pytest.mark.parametrize("private", [False, True])
def test_an_augmented_run_resumes_bit_identical(tiny_images, tmp_path, private):
  """M = 2 models, plain or DP-SGD: 4 epochs straight, and 2 then 2 more after a
  resume, give the same params and metrics (the draws are the step's)."""
  extra = {"dp_noise_multiplier": 1.0} if private else {}
  config = tiny_config(tiny_images, tmp_path / "straight", epochs=4, schedule="constant",
                       augment=1, num_seeds=2, **extra)
  experiment.run(config, log=lambda *_: None)
  experiment.run(config._replace(workdir=str(tmp_path / "resumed"), epochs=2),
                 log=lambda *_: None)
  experiment.run(config._replace(workdir=str(tmp_path / "resumed")), log=lambda *_: None)
  with np.load(tmp_path / "straight" / "params_all.npz") as a, \
       np.load(tmp_path / "resumed" / "params_all.npz") as b:
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
  assert (without_times(read_metrics(tmp_path / "straight")) ==
          without_times(read_metrics(tmp_path / "resumed")))
  plain = tiny_config(tiny_images, tmp_path / "plain", epochs=4, schedule="constant",
                      num_seeds=2, **extra)
  experiment.run(plain, log=lambda *_: None)    # and the augmentation changed training
  with np.load(tmp_path / "straight" / "params_all.npz") as a, \
       np.load(tmp_path / "plain" / "params_all.npz") as b:
    assert not np.array_equal(a["w1"], b["w1"])


@pytest.mark.slow   # two runs in fresh processes: JAX fixes its device count at its start
def test_augmented_runs_on_2_devices_match_1(tiny_images, tmp_path):
  """The draws are the model's and the step's wherever its rows are: plain, one model's
  batches split over 2 devices; DP-SGD with --dp_augmult, 2 models one per device. The
  runs on 1 device are their in-process twins (conftest.tiny_config)."""
  cases = {"split": {"augment": 1},
           "stack": {"augment": 1, "dp_noise_multiplier": 1, "dp_augmult": 2, "num_seeds": 2}}
  runs = {name: runner(tiny_images, tmp_path / f"{name}2", "--num_devices=2", "--noplots",
                       *(f"--{k}={v}" for k, v in extra.items()), env=host_devices(2))
          for name, extra in cases.items()}
  for name, extra in cases.items():
    experiment.run(tiny_config(tiny_images, tmp_path / f"{name}1", **RUNNER_SETTINGS,
                               **extra), log=lambda *_: None)
  outputs = dict(zip(runs, finish_all(list(runs.values()))))
  assert "devices: 2 (1 model slice(s) × 2 splitting each batch)" in outputs["split"]
  assert "devices: 2 (2 model slice(s) × 1 splitting each batch)" in outputs["stack"]
  assert_same_run(tmp_path / "split1", tmp_path / "split2")
  for one, two in zip(read_metrics(tmp_path / "stack1"), read_metrics(tmp_path / "stack2"),
                      strict=True):
    for key in ("train_loss", "test_accuracy", "epsilon"):
      np.testing.assert_allclose(one["per_model"][key], two["per_model"][key], rtol=RTOL)
  with np.load(tmp_path / "stack1" / "params_all.npz") as a, \
       np.load(tmp_path / "stack2" / "params_all.npz") as b:
    for k in ("w1", "b1", "w2", "b2"):
      np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=RTOL * np.max(np.abs(a[k])))


def test_augment_is_refused_for_rows_and_per_pixel_scaling_and_flips_where_allowed(tiny_npz,
                                                                           tmp_path):
  with pytest.raises(experiment.RunError, match=r"^--augment=1 translates images, but "
                     r"npz:.* holds rows of \d+ features: drop it.$"):
    experiment.run(tiny_config(tiny_npz, tmp_path / "w", augment=1), log=lambda *_: None)
  assert not (tmp_path / "w").exists()
  images = datasets.Dataset(*([None] * 9), input_shape=(28, 28), class_names=())
  for name, flip in (("fashion_mnist", True), ("mnist", False), ("digits", False),
                     ("npz:x.npz", False)):
    config = experiment.RunConfig(dataset=name, augment=2)
    assert config_lib.augmentation(config, images) == Augment((28, 28), 2, flip)
  assert config_lib.augmentation(experiment.RunConfig(), images) is None
  per_pixel = images._replace(scaling="per_feature")   # a moved pixel keeps another's μ, σ
  with pytest.raises(config_lib.SettingError, match=r"^--augment=2 moves pixels, but "
                     r"per_feature scaling .* use --input_scaling=global\.$"):
    config_lib.augmentation(experiment.RunConfig(augment=2), per_pixel)


@pytest.mark.slow   # runs of the runner: seconds
def test_augmentation_multiplicity_costs_the_privacy_of_one_example(tiny_images, tmp_path):
  """--dp_augmult=3: the same σ, q and steps spend the same ε as one copy (the
  accountant sees one example's clipped gradient), the training differs, and a resume
  is bit-identical."""
  private = dict(epochs=4, schedule="constant", augment=1, dp_noise_multiplier=1.0,
                 dp_delta=1e-3)
  one = tiny_config(tiny_images, tmp_path / "one", **private)
  experiment.run(one, log=lambda *_: None)
  three = tiny_config(tiny_images, tmp_path / "three", dp_augmult=3, **private)
  experiment.run(three, log=lambda *_: None)
  resumed = three._replace(workdir=str(tmp_path / "resumed"))
  experiment.run(resumed._replace(epochs=2), log=lambda *_: None)
  experiment.run(resumed, log=lambda *_: None)
  rows = {name: read_metrics(tmp_path / name) for name in ("one", "three", "resumed")}
  assert [r["epsilon"] for r in rows["three"]] == [r["epsilon"] for r in rows["one"]]
  assert without_times(rows["three"]) == without_times(rows["resumed"])
  with np.load(tmp_path / "one" / "params.npz") as a, \
       np.load(tmp_path / "three" / "params.npz") as b:
    assert not np.array_equal(a["w1"], b["w1"])


def test_augmentation_multiplicity_needs_augment_and_dp_sgd(tiny_images, tmp_path):
  for extra in ({}, {"augment": 1}, {"dp_noise_multiplier": 1.0}):
    with pytest.raises(experiment.RunError, match=r"^--dp_augmult=2 acts only with "
                       "--augment in a DP-SGD run"):
      experiment.run(tiny_config(tiny_images, tmp_path / "w", dp_augmult=2, **extra),
                     log=lambda *_: None)
