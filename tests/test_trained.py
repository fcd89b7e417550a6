"""A finished run used on new data: mj.load, predict on raw inputs, experiments/predict.py."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from conftest import read_metrics
from conftest import tiny_config
import mlp_jax as mj
from mlp_jax.data import datasets
from mlp_jax.run import experiment
from mlp_jax.run import trained
from test_data import write_idx


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """A finished 2-epoch digits run: its workdir and the raw test split."""
  workdir = tmp_path_factory.mktemp("digits_run")
  experiment.run(tiny_config("digits", workdir, epochs=2), log=lambda *_: None)
  _, _, x_test, y_test = datasets.load_digits()
  return workdir, x_test, y_test


def test_loaded_model_predicts_raw_inputs_as_the_run_evaluated_them(digits_run):
  workdir, x_test, y_test = digits_run
  model = mj.load(str(workdir))
  assert model.input_shape == (8, 8) and model.dataset == "digits"
  assert model.class_names == tuple("0123456789") and model.pixel_max == 16
  predicted = np.asarray(model.predict(x_test))                   # raw pixels 0..16
  accuracy = np.mean(predicted == y_test)
  assert accuracy == pytest.approx(read_metrics(workdir)[-1]["test_accuracy"], abs=1e-6)
  images = x_test.reshape(-1, 8, 8)
  np.testing.assert_array_equal(jax.jit(model.predict)(images), predicted)
  p = np.asarray(jax.jit(model.predict_proba)(images))
  assert p.shape == (360, 10) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
  np.testing.assert_array_equal(p.argmax(axis=1), predicted)
  assert mj.load(str(workdir / "params.npz")).input_shape == (8, 8)
  assert repr(model) == ("TrainedModel(64-16-10 relu MLP, dataset='digits', input_shape=(8, 8), "
                         "classes: 0, 1, 2, 3, ...)")  # one line, not its arrays


@pytest.mark.parametrize("scaling", datasets.SCALINGS)
def test_each_input_scaling_round_trips_through_load(tiny_npz, tmp_path, scaling):
  """The run's μ, σ are saved with the model: predict on RAW inputs gives the run's own
  test accuracy under every --input_scaling."""
  experiment.run(tiny_config(tiny_npz, tmp_path, epochs=2, input_scaling=scaling),
                 log=lambda *_: None)
  raw = np.load(tiny_npz[4:])
  ds = datasets.load(tiny_npz, scaling=scaling)
  model = mj.load(str(tmp_path))
  np.testing.assert_array_equal(model.mean, ds.mean)
  np.testing.assert_array_equal(model.std, ds.std)
  accuracy = np.mean(np.asarray(model.predict(raw["x_test"])) == raw["y_test"])
  assert accuracy == pytest.approx(read_metrics(tmp_path)[-1]["test_accuracy"], abs=1e-6)


def test_bad_inputs_and_files_are_one_clear_error(digits_run, tmp_path):
  workdir, x_test, _ = digits_run
  model = mj.load(str(workdir))
  with pytest.raises(ValueError, match=r"shape \(3, 7\) do not fit this model: give "
                     r"\(N, 8, 8\) or \(N, 64\)"):
    model.predict(np.ones((3, 7)))
  with pytest.raises(ValueError, match="no params.npz at .*give the --workdir of a finished"):
    mj.load(str(tmp_path))
  np.savez(tmp_path / "params.npz", **{k: np.zeros(2) for k in ("w1", "b1", "w2", "b2")})
  with pytest.raises(ValueError, match="lacks input_mean, .*train the run again"):
    mj.load(str(tmp_path))


def test_inputs_from_npz_idx_and_png(digits_run, tmp_path):
  workdir, x_test, y_test = digits_run
  model = mj.load(str(workdir))
  np.savez(tmp_path / "new.npz", x=x_test[:5], y=y_test[:5])
  names, x, labels = trained.read_inputs(str(tmp_path / "new.npz"), model)
  assert names == ["0", "1", "2", "3", "4"] and x.shape == (5, 64)
  np.testing.assert_array_equal(labels, y_test[:5])
  images = write_idx(tmp_path / "images-idx3-ubyte.gz", x_test[:4].reshape(4, 8, 8))
  labels_file = write_idx(tmp_path / "labels-idx1-ubyte", y_test[:4])
  _, x, labels = trained.read_inputs(images, model, labels_file)
  np.testing.assert_array_equal(x.reshape(4, 64), x_test[:4])
  np.testing.assert_array_equal(labels, y_test[:4])
  # An 8-bit PNG maps 0..255 to the raw 0..16 of digits.
  pixels = np.array(x_test[:2].reshape(2, 8, 8) * 255 / 16, np.uint8)
  paths = []
  for i, image in enumerate(pixels):
    Image.fromarray(image, mode="L").save(tmp_path / f"d{i}.png")
    paths.append(str(tmp_path / f"d{i}.png"))
  names, x, labels = trained.read_inputs(",".join(paths), model)
  assert names == ["d0.png", "d1.png"] and labels is None
  np.testing.assert_allclose(x, pixels * np.float32(16 / 255))
  assert trained.read_inputs(str(tmp_path), model)[0] == ["d0.png", "d1.png"]  # a directory
  Image.fromarray(np.zeros((8, 8, 3), np.uint8), mode="RGB").save(tmp_path / "rgb.png")
  with pytest.raises(ValueError, match="mode RGB; this model takes 8-bit grayscale"):
    trained.read_inputs(str(tmp_path / "rgb.png"), model)
  Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(tmp_path / "big.png")
  with pytest.raises(ValueError, match="an image of 28×28 pixels, .* images of 8×8 pixels"):
    trained.read_inputs(str(tmp_path / "big.png"), model)


# predict's --labels: every kind of input x every kind of labels file. An input that
# holds its own labels refuses a second set.
def _png_inputs(path, x):
  path.mkdir(exist_ok=True)
  for i, image in enumerate(np.array(x.reshape(-1, 8, 8) * 255 / 16, np.uint8)):
    Image.fromarray(image, mode="L").save(path / f"d{i}.png")
  return str(path)


INPUT_KINDS = {
    "npz": lambda path, x, y: np.savez(path / "x.npz", x=x) or str(path / "x.npz"),
    "npz_with_y": lambda path, x, y: np.savez(path / "x.npz", x=x, y=y) or str(path / "x.npz"),
    "idx": lambda path, x, y: write_idx(path / "x-idx3-ubyte", x.reshape(-1, 8, 8)),
    "idx_gz": lambda path, x, y: write_idx(path / "x-idx3-ubyte.gz", x.reshape(-1, 8, 8)),
    "png_directory": lambda path, x, y: _png_inputs(path / "pngs", x),
    "png_files": lambda path, x, y: ",".join(
        os.path.join(_png_inputs(path / "pngs", x), f"d{i}.png") for i in range(len(x))),
    "csv": lambda path, x, y: _csv(path / "x.csv", [f"p{i}" for i in range(64)], x),
}


def _csv(path, header, rows):
  path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n"
                                                    for r in rows))
  return str(path)


LABEL_KINDS = {
    "npy": lambda path, y: np.save(path / "y.npy", y) or str(path / "y.npy"),
    "npz_y": lambda path, y: np.savez(path / "y.npz", y=y) or str(path / "y.npz"),
    "npz_its_one_array": lambda path, y: np.savez(path / "y.npz", t=y) or str(path / "y.npz"),
    "idx": lambda path, y: write_idx(path / "y-idx1-ubyte", np.asarray(y, np.float64), 0x0E),
    "idx_gz": lambda path, y: write_idx(path / "y-idx1-ubyte.gz", np.asarray(y, np.float64),
                                        0x0E),
    "csv_one_column": lambda path, y: _csv(path / "y.csv", ["class"], [[v] for v in y]),
    "csv_label_column": lambda path, y: _csv(path / "y.csv", ["id", "label"],
                                             [[i, v] for i, v in enumerate(y)]),
}


@pytest.mark.parametrize("labels_kind", LABEL_KINDS)
@pytest.mark.parametrize("input_kind", INPUT_KINDS)
def test_labels_go_with_every_kind_of_input(digits_run, tmp_path, input_kind, labels_kind):
  workdir, x_test, y_test = digits_run
  model = mj.load(str(workdir))
  x, y = x_test[:6], y_test[:6]
  inputs = INPUT_KINDS[input_kind](tmp_path, x, y)
  labels_file = LABEL_KINDS[labels_kind](tmp_path, y)
  if input_kind == "npz_with_y":
    with pytest.raises(ValueError, match=r"x.npz holds its own labels; drop --labels"):
      trained.read_inputs(inputs, model, labels_file)
    return
  names, got_x, labels = trained.read_inputs(inputs, model, labels_file)
  assert len(names) == len(got_x) == 6
  np.testing.assert_array_equal(labels, y)


# A labels file that cannot be the inputs' labels: fault -> (the labels written, the line).
LABEL_FAULTS = {
    "one_too_many": (lambda y: np.append(y, 1), "there are 7 labels for 6 inputs"),
    "one_too_few": (lambda y: y[:-1], "there are 5 labels for more than 5 inputs"),
    "past_the_classes": (lambda y: np.append(y[:-1], 10),
                         r"run from \d to 10, but this model has classes 0 to 9"),
    "a_fraction": (lambda y: np.append(y[:-1], 0.5), "must hold integer class labels"),
    "missing": (None, "no such file|cannot read it|not a readable"),
}


@pytest.mark.parametrize("fault", LABEL_FAULTS)
@pytest.mark.parametrize("labels_kind", LABEL_KINDS)
def test_a_wrong_labels_file_is_one_line(digits_run, tmp_path, labels_kind, fault):
  workdir, x_test, y_test = digits_run
  model = mj.load(str(workdir))
  inputs = INPUT_KINDS["npz"](tmp_path, x_test[:6], None)
  change, line = LABEL_FAULTS[fault]
  if change is None:
    labels_file = LABEL_KINDS[labels_kind](tmp_path, y_test[:6])
    os.remove(labels_file)
  else:
    labels_file = LABEL_KINDS[labels_kind](tmp_path, change(np.asarray(y_test[:6], float)))
  with pytest.raises(ValueError, match=line) as e:
    trained.read_inputs(inputs, model, labels_file)
  assert "\n" not in str(e.value)


def test_png_for_a_model_of_non_image_data_is_refused(tiny_npz, tmp_path):
  experiment.run(tiny_config(tiny_npz, tmp_path, epochs=1), log=lambda *_: None)
  Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "a.png")
  with pytest.raises(ValueError, match="trained on npz:.*not on images; give an .npz"):
    trained.read_inputs(str(tmp_path / "a.png"), mj.load(str(tmp_path)))


@pytest.mark.slow
def test_predict_script_end_to_end(digits_run, tmp_path):
  workdir, x_test, y_test = digits_run
  images = write_idx(tmp_path / "images-idx3-ubyte", x_test.reshape(-1, 8, 8))
  labels = write_idx(tmp_path / "labels-idx1-ubyte", y_test)
  script = os.path.join(ROOT, "experiments", "predict.py")
  out = tmp_path / "predictions.csv"
  result = subprocess.run([sys.executable, script, f"--workdir={workdir}",
                           f"--input={images}", f"--labels={labels}", f"--output={out}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  accuracy = 100 * read_metrics(workdir)[-1]["test_accuracy"]
  assert f"accuracy {accuracy:.2f}% on 360 examples" in result.stdout
  rows = out.read_text().splitlines()
  assert rows[0].startswith("name,class,class_name,p_0,p_1") and len(rows) == 361
  result = subprocess.run([sys.executable, script, f"--workdir={workdir}",
                           f"--input={tmp_path / 'missing.npz'}"],
                          capture_output=True, text=True, timeout=120)
  lines = [line for line in result.stderr.splitlines() if "libtpu" not in line]
  assert result.returncode == 1 and lines == [f"error: no such file: "
                                              f"{str(tmp_path / 'missing.npz')!r}."]
  (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 garbage")
  result = subprocess.run([sys.executable, script, f"--workdir={tmp_path / 'garbage.npz'}",
                           f"--input={images}"], capture_output=True, text=True, timeout=120)
  lines = [line for line in result.stderr.splitlines() if "libtpu" not in line]
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert "garbage.npz is not a readable params.npz" in lines[0]
  huge = x_test[:4].astype(np.float64)   # finite in float64, inf once cast to float32
  huge[2, 3] = 1e300
  np.savez(tmp_path / "huge.npz", x=huge)
  result = subprocess.run([sys.executable, script, f"--workdir={workdir}",
                           f"--input={tmp_path / 'huge.npz'}"],
                          capture_output=True, text=True, timeout=120)
  lines = [line for line in result.stderr.splitlines() if "libtpu" not in line]
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith("error: input row 2 is not a finite float32 number once "
                             "scaled"), lines
  assert not result.stdout, result.stdout   # no row printed before the refusal
  np.savez(tmp_path / "few.npz", x=x_test[:3])
  result = subprocess.run([sys.executable, script, f"--workdir={workdir}",
                           f"--input={tmp_path / 'few.npz'}"],
                          capture_output=True, text=True, timeout=120)
  printed = result.stdout.splitlines()
  assert printed[0] == "name\tclass\tclass_name\tprobability" and len(printed) == 4
  assert all(len(line.split("\t")) == 4 for line in printed[1:]), printed
  np.savez(tmp_path / "x.npz", x=x_test)         # an .npz's labels in a CSV beside it
  (tmp_path / "y.csv").write_text("label\n" + "".join(f"{v}\n" for v in y_test))
  result = subprocess.run([sys.executable, script, f"--workdir={workdir}",
                           f"--input={tmp_path / 'x.npz'}", f"--labels={tmp_path / 'y.csv'}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == f"accuracy {accuracy:.2f}% on 360 examples"


def _write_params(workdir, path, **changes):
  with np.load(os.path.join(workdir, "params.npz")) as f:
    arrays = {**dict(f), **changes}
  np.savez(path, **arrays)
  return str(path)


def test_broken_params_files_are_one_line_each(digits_run, tmp_path):
  workdir, _, _ = digits_run
  good = (workdir / "params.npz").read_bytes()
  (tmp_path / "truncated.npz").write_bytes(good[:len(good) // 2])
  (tmp_path / "garbage.npz").write_bytes(b"not a zip at all" * 10)
  with np.load(workdir / "params.npz") as f:
    w1 = f["w1"]
  cases = {
      str(tmp_path / "truncated.npz"): "is not a readable params.npz",
      str(tmp_path / "garbage.npz"): "is not a readable params.npz",
      _write_params(workdir, tmp_path / "nan.npz", w1=np.full_like(w1, np.nan)):
          "w1 holds values that are not finite numbers",
      _write_params(workdir, tmp_path / "shape.npz", w1=w1[:, :10]):
          r"input_mean is \(64,\) where w1 \(16, 10\) and w2 \(10, 16\) need \(10,\)",
  }
  for path, message in cases.items():
    with pytest.raises(ValueError, match=message) as error:
      mj.load(path)
    assert "\n" not in str(error.value)


def test_nan_inputs_predict_no_class(digits_run):
  workdir, x_test, _ = digits_run
  model = mj.load(str(workdir))
  x = x_test[:3].astype(np.float32)
  x[1, 5] = np.nan
  predicted = np.asarray(jax.jit(model.predict)(x))
  assert predicted[1] == -1 and predicted[0] >= 0 and predicted[2] >= 0


def test_hostile_inputs_are_one_line_each(digits_run, tmp_path):
  workdir, x_test, y_test = digits_run
  model = mj.load(str(workdir))
  np.savez(tmp_path / "labels.npz", x=x_test[:5], y=y_test[:5] + 10)
  np.savez(tmp_path / "scalar.npz", x=np.float32(3))
  np.savez(tmp_path / "complex.npz", x=x_test[:5].astype(np.complex64))
  bomb = tmp_path / "bomb.png"
  Image.new("L", (8, 8)).save(bomb)
  data = bytearray(bomb.read_bytes())   # the IHDR claims 30000×30000 pixels
  data[16:24] = (30000).to_bytes(4, "big") * 2
  bomb.write_bytes(bytes(data))
  (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 torn")
  for name, message in (("torn.npz", "torn.npz is not a readable .npz"),
                        ("labels.npz", "the labels run from 1[0-9] to 1[0-9], but this model has "
                                       "classes 0 to 9"),
                        ("scalar.npz", r"must be an array \(N, ...\) of real numbers"),
                        ("complex.npz", r"must be an array \(N, ...\) of real numbers"),
                        ("bomb.png", "bomb.png: not a readable image of 8×8 pixels|a "
                                     "30000×30000 image")):
    with pytest.raises(ValueError, match=message) as error:
      trained.read_inputs(str(tmp_path / name), model)
    assert "\n" not in str(error.value)


def test_a_params_npz_with_huge_extra_members_reads_only_what_the_model_needs(
    digits_run, tmp_path, monkeypatch):
  """The trial's bomb: the real params plus members declaring far more than the memory
  budget (here 40 MB, with 3 members of 100 MB of zeros, compressed to a few hundred
  KB). mj.load reads only the params and the preprocessing, each once, straight into its
  array: peak memory stays a small part of the budget. Asked for more than the budget in
  all, one archive read is refused in one line."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  from mlp_jax.base import budget, files  # pylint: disable=g-import-not-at-top
  workdir, _, _ = digits_run
  path = tmp_path / "bomb.npz"
  with np.load(workdir / "params.npz") as f:
    arrays = dict(f)
  np.savez(path, **arrays)
  zeros = np.zeros(100 << 20, np.uint8)
  with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z:
    for k in range(3):
      with z.open(f"bomb{k}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, zeros)
  del zeros
  monkeypatch.setattr(budget, "memory_budget", lambda: 40 << 20)
  tracemalloc.start()
  model = mj.load(str(path))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  np.testing.assert_array_equal(np.asarray(model.params.w1), arrays["w1"])
  assert peak < 4 << 20, peak
  with files.NpzArchive(str(path), max_bytes=40 << 20) as npz:
    with pytest.raises(ValueError, match="more than the .* bytes of memory this reader "
                                         "may still use") as refused:
      npz.read("bomb0")
  assert "\n" not in str(refused.value)
  with files.NpzArchive(str(path), max_bytes=arrays["w1"].nbytes * 3 // 2) as npz:
    npz.read("w1")                                  # the budget is for the whole read
    with pytest.raises(ValueError, match="may still use"):
      npz.read("w1")


@pytest.mark.slow   # --help, a process of its own
def test_predict_help_shows_its_examples_as_written():
  """The usage's continued command stays on two lines (a backslash, then the next flag
  indented), as a user copies it."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "predict.py"),
                           "--help"], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0
  lines = result.stdout.splitlines()
  continued = [i for i, line in enumerate(lines) if line.endswith(" \\")]
  assert continued and lines[continued[0] + 1].strip().startswith("--labels="), lines[:8]


@pytest.mark.slow
def test_predict_script_uses_the_runs_activation(tiny_npz, tmp_path):
  """A gelu run's predict.py probabilities are its own network's (mj.load's), not a
  ReLU network's of the same params."""
  workdir = tmp_path / "run"
  experiment.run(tiny_config(tiny_npz, workdir, epochs=2, activation="gelu"),
                 log=lambda *_: None)
  x = np.load(tiny_npz.removeprefix("npz:"))["x_test"][:5]
  np.savez(tmp_path / "new.npz", x=x)
  out = tmp_path / "p.csv"
  result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "predict.py"),
                           f"--workdir={workdir}", f"--input={tmp_path / 'new.npz'}",
                           f"--output={out}"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
  written = np.array([[float(v) for v in row[3:]] for row in rows])
  model = mj.load(str(workdir))
  np.testing.assert_allclose(written, model.predict_proba(x), rtol=1e-5)
  relu = model._replace(activation="relu")
  assert not np.allclose(written, relu.predict_proba(x), rtol=1e-3)


def test_the_output_is_never_a_file_predict_reads(digits_run, tmp_path):
  """Every file of the workdir, the input, the labels, and another name of one (a hard
  link): refused before anything is written, the file as it was."""
  workdir, x_test, y_test = digits_run
  model = mj.load(str(workdir))
  images = write_idx(tmp_path / "images-idx3-ubyte", x_test.reshape(-1, 8, 8))
  labels = write_idx(tmp_path / "labels-idx1-ubyte", y_test)
  os.link(images, tmp_path / "another_name")
  reads = [str(workdir), str(images), str(labels)]
  targets = [os.path.join(root, name) for root, _, names in os.walk(workdir)
             for name in names] + [images, labels, tmp_path / "another_name"]
  assert len(targets) > 8 and any("checkpoints" in str(t) for t in targets)
  for target in targets:
    before = pathlib.Path(target).read_bytes()
    with pytest.raises(ValueError, match=r"a file predict reads .* give a new file name"):
      with trained.prediction_csv(str(target), model, reads):
        pass
    assert pathlib.Path(target).read_bytes() == before, target
  with trained.prediction_csv(str(tmp_path / "new.csv"), model, reads) as write:
    write(["a"], np.full((1, 10), 0.1))
  assert (tmp_path / "new.csv").read_text().startswith("name,class")
