"""The IDX reader, the npz loader, checks, standardisation, k-fold folds, and the real
Fashion-MNIST."""

import gzip
import os

import numpy as np
import pytest

from mlp_jax.base import budget
from mlp_jax.data import datasets
from mlp_jax.data import readers
from mlp_jax.data import tables
from mlp_jax.training import stack as stack_lib


def write_idx(path, array, type_code=0x08, dims=None, magic=b"\x00\x00"):
  dims = array.shape if dims is None else dims
  header = magic + bytes([type_code, len(dims)]) + np.asarray(dims, ">u4").tobytes()
  payload = header + array.astype(readers.IDX_TYPES[type_code]).tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)
  return str(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("type_code", [0x08, 0x0B, 0x0D])
def test_read_idx_round_trips(tmp_path, suffix, type_code):
  array = (np.arange(2 * 3 * 4) % 200).reshape(2, 3, 4)
  got = readers.read_idx(write_idx(tmp_path / f"x{suffix}", array, type_code))
  np.testing.assert_array_equal(got, array)
  assert got.dtype.isnative


def test_read_idx_rejects_truncated_lying_and_foreign_files(tmp_path):
  array = np.arange(24, dtype=np.uint8).reshape(2, 12)
  write_idx(tmp_path / "good", array)
  raw = (tmp_path / "good").read_bytes()
  cases = {
      "truncated": (raw[:-5], "truncated"),
      "magic": (b"\x01\x02" + raw[2:], "wrong magic"),
      "type": (raw[:2] + b"\x07" + raw[3:], "unknown IDX type code 0x07"),
      "lying": (raw[:4] + np.asarray([3, 12], ">u4").tobytes() + raw[12:], "truncated"),
      "longer": (raw + b"\x00", "holds more"),
      "huge": (raw[:4] + np.asarray([2**31, 2**31], ">u4").tobytes() + raw[12:],
               "claims dims"),
      "empty": (b"", "wrong magic"),
  }
  for name, (content, message) in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(datasets.DataError, match=message):
      readers.read_idx(str(path))


def test_mnist_from_a_directory_and_missing_files(tmp_path):
  rng = np.random.default_rng(0)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 4, 4)))
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
  write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 4, 4)))
  with pytest.raises(datasets.DataError, match="missing t10k-labels-idx1-ubyte"):
    datasets.load(datasets.Source("mnist", str(tmp_path)))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10))
  ds = datasets.load(datasets.Source("mnist", str(tmp_path)))
  assert ds.x_train.shape == (20, 16) and ds.x_test.shape == (10, 16)
  assert ds.num_classes == 10 and ds.y_train.dtype == np.int32
  with pytest.raises(datasets.DataError, match="does not exist"):
    datasets.load(datasets.Source("mnist", str(tmp_path / "nowhere")))
  with pytest.raises(datasets.DataError, match="needs --data_dir"):
    datasets.load("mnist")


def test_npz_loader_and_its_errors(tmp_path):
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.normal(size=(12, 3)), y_train=np.arange(12) % 3,
                x_test=rng.normal(size=(6, 3)), y_test=np.arange(6) % 3)
  np.savez(tmp_path / "ok.npz", **arrays)
  ds = datasets.load(f"npz:{tmp_path / 'ok.npz'}")
  assert ds.num_classes == 3 and ds.x_train.dtype == np.float32
  np.savez(tmp_path / "pickled.npz", **{**arrays, "y_test": np.array([object()] * 6)})
  with pytest.raises(datasets.DataError, match="y_test holds Python objects"):
    datasets.load(f"npz:{tmp_path / 'pickled.npz'}")
  np.savez(tmp_path / "partial.npz", x_train=arrays["x_train"])
  with pytest.raises(datasets.DataError, match="missing arrays y_train, x_test, y_test"):
    datasets.load(f"npz:{tmp_path / 'partial.npz'}")
  bad = {**arrays, "x_train": np.where(np.eye(12, 3) > 0, np.nan, arrays["x_train"])}
  np.savez(tmp_path / "nan.npz", **bad)
  with pytest.raises(datasets.DataError, match="x_train contains NaN or inf"):
    datasets.load(f"npz:{tmp_path / 'nan.npz'}")
  np.savez(tmp_path / "short.npz", **{**arrays, "y_train": np.arange(11) % 3})
  with pytest.raises(datasets.DataError, match=r"y_train must have shape \(12,\)"):
    datasets.load(f"npz:{tmp_path / 'short.npz'}")
  np.savez(tmp_path / "neg.npz", **{**arrays, "y_test": -np.ones(6, int)})
  with pytest.raises(datasets.DataError, match=r"y_test must lie in \[0, K\)"):
    datasets.load(f"npz:{tmp_path / 'neg.npz'}")
  with pytest.raises(datasets.DataError, match="unknown dataset 'cifar'"):
    datasets.load("cifar")
  np.savez(tmp_path / "empty.npz", **{**arrays, "x_train": np.zeros((12, 0)),
                                      "x_test": np.zeros((6, 0))})   # no feature at all
  with pytest.raises(datasets.DataError, match=r"x_train must be \(N, ...\) with N >= 1 "
                     r"examples of at least one feature, got shape \(12, 0\)"):
    datasets.load(f"npz:{tmp_path / 'empty.npz'}")


def test_standardised_with_train_statistics_only():
  x_train = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
  x_test = np.array([[100.0, 7.0]])
  ds = datasets.prepare((x_train, np.array([0, 1, 0]), x_test, np.array([1])),
                    scaling="per_feature")
  np.testing.assert_allclose(ds.x_train.mean(axis=0), [0, 0], atol=1e-6)
  np.testing.assert_allclose(ds.x_train[:, 0].std(), 1, rtol=1e-6)
  # Test rows use TRAIN μ = (2, 5), σ = (1.633, 1): a constant feature keeps σ = 1.
  np.testing.assert_allclose(ds.x_test, [[98 / np.sqrt(8 / 3), 2.0]], rtol=1e-6)


def test_global_and_no_scaling():
  x_train = np.array([[0.0, 4.0], [2.0, 6.0]])   # all values: mean 3, std sqrt(5)
  x_test = np.array([[3.0, 8.0]])
  y = np.array([0, 1])
  ds = datasets.prepare((x_train, y, x_test, y[:1]), scaling="global")
  np.testing.assert_allclose(ds.mean, [3, 3])
  np.testing.assert_allclose(ds.std, [5**0.5] * 2)
  np.testing.assert_allclose(ds.x_test, [[0, 5 / 5**0.5]], rtol=1e-6)
  ds = datasets.prepare((x_train, y, x_test, y[:1]), scaling="none")
  np.testing.assert_array_equal(ds.x_train, x_train.astype(np.float32))
  assert ds.mean.shape == ds.std.shape == (2,)
  with pytest.raises(datasets.DataError, match="scaling must be one of auto, global, per_feature, none"):
    datasets.prepare((x_train, y, x_test, y[:1]), scaling="minmax")
  with pytest.raises(datasets.DataError, match="^scaling per_feature: a private run cannot "
                     "scale by statistics of its training data"):
    datasets.load("digits", scaling="per_feature", private=True)


def test_validation_split_is_held_out_of_train():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 3)) * 5 + np.arange(20)[:, None]   # every row distinct
  y = np.arange(20) % 2
  ds = datasets.prepare((x, y, x[:4], y[:4]), validation_fraction=0.25, seed=3,
                    scaling="per_feature")
  assert len(ds.x_val) == 5 and len(ds.x_train) == 15
  # Undo the standardisation: each split's rows are rows of x, disjoint, together all.
  train_rows = ds.x_train * ds.std + ds.mean
  val_rows = ds.x_val * ds.std + ds.mean

  def index_in_x(rows):
    distances = np.abs(rows[:, None, :] - x[None, :, :]).max(axis=2)
    assert np.all(distances.min(axis=1) < 1e-4)
    return distances.argmin(axis=1)

  train_index, val_index = index_in_x(train_rows), index_in_x(val_rows)
  assert sorted([*train_index, *val_index]) == list(range(20))
  np.testing.assert_array_equal(ds.y_train, y[train_index])   # labels travel with rows
  np.testing.assert_array_equal(ds.y_val, y[val_index])
  # μ and σ are those of the 15 remaining train rows, not of all 20 nor of validation.
  np.testing.assert_allclose(ds.mean, x[train_index].mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(ds.std, x[train_index].std(axis=0), rtol=1e-5)
  assert not np.allclose(ds.mean, x.mean(axis=0), rtol=1e-3)


@pytest.mark.parametrize("counts, num_folds", [((7, 5, 9), 3), ((50, 50), 5),
                                                ((3, 40, 11, 6), 3), ((2, 2), 2)])
def test_stratified_folds_are_disjoint_stratified_and_cover_train(counts, num_folds):
  y = np.random.default_rng(1).permutation(np.repeat(np.arange(len(counts)), counts))
  folds = datasets.stratified_folds(y, num_folds, seed=4)
  stack = stack_lib.Stack([{}], [0], {}, folds=tuple(range(num_folds)), row_folds=folds)
  held_out = [np.flatnonzero(stack.train_masks()[f] == 0) for f in range(num_folds)]
  # Disjoint and together every row: each row is held out by exactly one fold's model.
  assert sorted(np.concatenate(held_out).tolist()) == list(range(len(y)))
  indices, weights = stack.validation_rows()
  for f, rows in enumerate(held_out):
    np.testing.assert_array_equal(indices[f][weights[f] == 1], rows)
  # Stratified: each class's rows split over the folds within one row of even.
  for c, n in enumerate(counts):
    per_fold = np.bincount(folds[y == c], minlength=num_folds)
    assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == n
  sizes = np.bincount(folds, minlength=num_folds)
  assert sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(folds, datasets.stratified_folds(y, num_folds, seed=4))
  assert not np.array_equal(folds, datasets.stratified_folds(y, num_folds, seed=5))


def test_folds_too_many_for_a_class_are_refused_with_the_fix():
  with pytest.raises(datasets.DataError, match="class 1 has 2 training examples, fewer than "
                     "the 3 folds .* use at most 2 folds"):
    datasets.stratified_folds(np.array([0, 0, 0, 1, 1, 0]), 3)


def test_digits_split():
  ds = datasets.load("digits")
  assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10) >= 35, True)


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIR),
                    reason="apt-get install dataset-fashion-mnist (.ci/run does)")
def test_fashion_mnist_real_files():
  ds = datasets.load("fashion_mnist")
  assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
  np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
  assert np.all(np.isfinite(ds.x_train))


def test_one_based_or_gapped_labels_are_refused_with_the_fix():
  x = np.random.default_rng(0).normal(size=(6, 2))
  with pytest.raises(datasets.DataError, match="run from 1 to 3, not from 0.*subtract 1"):
    datasets.prepare((x, np.array([1, 2, 3, 1, 2, 3]), x, np.array([1, 2, 3, 1, 2, 3])))
  with pytest.raises(datasets.DataError, match="class 1 of 0..2 never occurs in the training"):
    datasets.prepare((x, np.array([0, 2, 0, 2, 0, 2]), x, np.array([0, 1, 2, 0, 1, 2])))


def test_stratified_split_is_scikit_learns():
  """The same rows as train_test_split(stratify=y), on generated label vectors (ties in
  the rounding drawn from the same random stream) and on the digits."""
  from sklearn import datasets as sklearn_datasets, model_selection  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for _ in range(100):
    n, k = int(rng.integers(12, 150)), int(rng.integers(2, 6))
    y = np.concatenate([np.arange(k), np.arange(k), rng.integers(0, k, n - 2 * k)])
    fraction, seed = float(rng.choice([0.1, 0.2, 0.25, 0.5])), int(rng.integers(0, 2**31))
    if int(np.ceil(fraction * n)) < k or n - int(np.ceil(fraction * n)) < k:
      continue  # scikit-learn refuses a split smaller than the number of classes
    expected = model_selection.train_test_split(np.arange(n), test_size=fraction,
                                                stratify=y, random_state=seed)
    got = datasets.stratified_split(y, fraction, seed)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
  digits = sklearn_datasets.load_digits()
  expected = model_selection.train_test_split(digits.data, digits.target, test_size=0.2,
                                              stratify=digits.target, random_state=0)
  x_train, y_train, x_test, y_test = datasets.load_digits()
  for got, want in zip((x_train, x_test, y_train, y_test), expected):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype


def test_labels_of_another_length_name_both_lengths(tmp_path):
  """An .npz's own labels: 60,000 labels for 10 inputs (the train labels beside the test
  images) say so in numbers, not in dtypes (a --labels file: test_trained.py)."""
  np.savez(tmp_path / "x.npz", x=np.zeros((10, 4), np.uint8), y=np.zeros(60000, np.uint8))
  with pytest.raises(ValueError, match="there are 60,000 labels for 10 inputs: give one "
                                       "label per input"):
    next(readers.npz_rows(str(tmp_path / "x.npz"), 4))


# CSV tables (csv:TRAIN.csv[,TEST.csv]): mlp_jax/data/readers.py's csv_rows and
# datasets.load_csv.

def write_csv(path, header, rows):
  path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n"
                                                      for r in rows))
  return str(path)


def test_a_table_is_its_features_and_its_label_column(tmp_path):
  """Features by column, labels by value (numeric order: 2 before 10), the classes'
  names kept; the label column named anywhere; a quoted header name with a comma."""
  rows = [(1.5, 10, "x"), (2, 2, "y"), (-3e-1, 10, "z"), (4, 2, "w")] * 3
  train = write_csv(tmp_path / "train.csv", ['"a, b"', "label", "note"],
                    [(a, y, 0.5 * i) for i, (a, y, _) in enumerate(rows)])
  test = write_csv(tmp_path / "test.csv", ['"a, b"', "label", "note"], [(7, 2, 1), (8, 10, 2)])
  ds = datasets.load(datasets.Source(f"csv:{train},{test}", label_column="label"),
                     scaling="none")
  assert ds.feature_names == ("a, b", "note") and ds.label_column == "label"
  assert ds.class_names == ("2", "10") and ds.num_classes == 2
  np.testing.assert_array_equal(ds.y_train, [1, 0, 1, 0] * 3)
  np.testing.assert_array_equal(ds.x_test, [[7, 1], [8, 2]])
  np.testing.assert_array_equal(ds.y_test, [0, 1])
  assert ds.input_shape == (2,) and not ds.test_split
  words = write_csv(tmp_path / "w.csv", ["f", "kind"], [(i, ("cat", "ant", "bee")[i % 3])
                                                         for i in range(12)])
  assert datasets.load(f"csv:{words}").class_names == ("ant", "bee", "cat")  # text order
  same = write_csv(tmp_path / "s.csv", ["f", "y"], [(i, ("1", "1.0", "2", "2e0")[i % 4])
                                                     for i in range(12)])
  ds = datasets.load(f"csv:{same}")          # numbers are classes by their value
  assert ds.class_names == ("1", "2") and ds.num_classes == 2


def test_without_a_test_file_a_stratified_fifth_is_the_test_split(tmp_path):
  y = np.arange(50) % 3
  path = write_csv(tmp_path / "t.csv", ["f1", "f2", "y"], [(i, -i, k) for i, k in enumerate(y)])
  ds = datasets.load(f"csv:{path}", scaling="none")
  train, test = datasets.stratified_split(y, 0.2, seed=0)
  np.testing.assert_array_equal(ds.x_test[:, 0], test)
  np.testing.assert_array_equal(ds.x_train[:, 0], train)
  assert ds.test_split.startswith(f"a stratified 20% of {path} (seed 0, 10 rows")
  assert set(ds.y_test) == set(ds.y_train) == {0, 1, 2}


# fault -> (the table's lines after a good header "a,b,y", the message, its line and column)
CSV_FAULTS = {
    "empty_cell": (["1,2,0", "3,,1"], r"line 3, column 'b': the cell is empty"),
    "text_cell": (["1,2,0", "red,4,1"], r"line 3, column 'a': the cell is 'red', not a number"),
    "nan_cell": (["1,2,0", "3,nan,1"], r"line 3, column 'b': the cell is nan, not a finite"),
    "inf_cell": (["1,2,0", "-inf,4,1"], r"line 3, column 'a': the cell is -inf, not a finite"),
    "too_few_cells": (["1,2,0", "3,1"], r"line 3: 2 cells where the header names 3 columns"),
    "too_many_cells": (["1,2,0", "3,4,1,9"], r"line 3: 4 cells where the header names 3"),
    "no_rows": ([], r"holds a header but no rows"),
    "one_class": (["1,2,0", "3,4,0"], r"the labels name a single class"),
    "empty_label": (["1,2,0", "3,4, "], r"line 3, column 'y': the label is empty; give "
                    "every row its label"),
    "nan_label": (["1,2,0", "3,4,NaN"], r"line 3, column 'y': the label is NaN"),
}


@pytest.mark.parametrize("fault", CSV_FAULTS)
def test_every_bad_table_is_one_line_naming_where(fault, tmp_path):
  lines, message = CSV_FAULTS[fault]
  path = tmp_path / "t.csv"
  path.write_text("a,b,y\n" + "".join(line + "\n" for line in lines))
  with pytest.raises(datasets.DataError, match=message) as raised:
    datasets.load(f"csv:{path}")
  assert "\n" not in str(raised.value)


@pytest.mark.parametrize("header, message", [
    (b"a\n1\n", "the first line must name the columns, at least 2"),
    (b"a,a,y\n1,2,0\n", "each once"),
    (b"a,,y\n1,2,0\n", "none empty"),
    (b"a,b,y\n1,2,\xff\n", "not UTF-8 text"),
])
def test_a_table_without_a_good_header_or_text_is_one_line(header, message, tmp_path):
  path = tmp_path / "t.csv"
  path.write_bytes(header)
  with pytest.raises(datasets.DataError, match=message):
    datasets.load(f"csv:{path}")


def test_a_table_names_its_label_column_and_test_header(tmp_path):
  train = write_csv(tmp_path / "a.csv", ["x", "y"], [(i, i % 2) for i in range(10)])
  other = write_csv(tmp_path / "b.csv", ["x", "z"], [(1, 0), (2, 1)])
  with pytest.raises(datasets.DataError, match=r"has no column 'label'; its columns are x, "
                     r"y: give --label_column one of them"):
    datasets.load(datasets.Source(f"csv:{train}", label_column="label"))
  with pytest.raises(datasets.DataError, match="has other columns than"):
    datasets.load(f"csv:{train},{other}")
  with pytest.raises(datasets.DataError, match="give csv:TRAIN.csv or csv:TRAIN.csv,TEST.csv"):
    datasets.load(f"csv:{train},{other},{train}")


def test_a_table_is_read_in_batches_within_the_memory_budget(tmp_path, monkeypatch):
  path = write_csv(tmp_path / "t.csv", ["a", "b", "y"], [(i, -i, i % 2) for i in range(100)])
  batches = list(tables.csv_rows(path, None, 32))
  assert [len(x) for x, _ in batches] == [32, 32, 32, 4]
  np.testing.assert_array_equal(np.concatenate([x for x, _ in batches])[:, 0], range(100))
  monkeypatch.setattr(budget, "memory_budget", lambda: 1000)
  with pytest.raises(datasets.DataError, match=r"its first 64 rows already take 1,280 bytes, "
                     "more than the 1,000 this reader may use"):
    list(tables.csv_rows(path, None, 32))
