"""One reader for everything read from disk: IDX (.gz or not), .npz and PNG (CSV tables:
tables.py), each
checked on what is opened (a device, a pipe or a directory is refused), bounded by the
memory budget, and streamed in slices where predict reads new data; the class labels
are checked once (`labels`), for training data and predict's inputs alike. Every
problem is a DataError, one line naming it and the fix.
"""

import contextlib
import gzip
import os
import typing
import warnings
import zlib
from typing import IO, Any, Iterator, NamedTuple, Optional

import numpy as np

from mlp_jax.base import boundary, budget, files

IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


# IDX type code -> big-endian numpy dtype.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_IDX_BYTES = 1 << 32  # 4 GiB: a header claiming more is lying or not a dataset.
MAX_NPZ_ARRAY_BYTES = 1 << 32
MAX_CLASSES = 1000


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


class DataError(boundary.UserError, ValueError):
  """A dataset that cannot be used; the message says what is wrong and how to fix it."""


def _read_exactly(f: IO[bytes], size: int, path: str) -> bytes:
  """Reads `size` bytes in chunks (no huge up-front allocation); errors if short."""
  chunks, remaining = [], size
  while remaining > 0:
    chunk = f.read(min(remaining, 1 << 24))
    if not chunk:
      break
    chunks.append(chunk)
    remaining -= len(chunk)
  data = b"".join(chunks)
  if len(data) != size:
    raise DataError(f"{path}: the IDX header promises {size} bytes of data but the file "
                    f"holds {len(data)}; the file is truncated or not the one the header "
                    "describes: download it again.")
  return data


class IdxHeader(NamedTuple):
  """What an IDX header declares: dims (N, ...) and the numpy dtype of its type code."""

  dims: tuple[int, ...]
  dtype: np.dtype

  @property
  def row_bytes(self) -> int:
    """Bytes of one example (dims[1:] × itemsize)."""
    return int(np.prod(self.dims[1:], dtype=np.int64)) * self.dtype.itemsize


def _idx_header(f: IO[bytes], path: str, file_size: int, gzipped: bool) -> IdxHeader:
  """Reads and checks the header: magic, type code, rank, and the size its dims declare
  against the file's real size (a plain file) or the memory budget (a .gz stream)."""
  header = f.read(4)
  if len(header) < 4 or header[:2] != b"\x00\x00":
    raise DataError(f"{path}: not an IDX file (wrong magic number "
                    f"{header[:4].hex() or 'empty'}); expected 0000 then a type code.")
  type_code, rank = header[2], header[3]
  if type_code not in IDX_TYPES:
    raise DataError(f"{path}: unknown IDX type code 0x{type_code:02x}; expected one of "
                    f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)}.")
  if not 1 <= rank <= 4:
    raise DataError(f"{path}: IDX rank {rank} is not 1 to 4.")
  dims_bytes = f.read(4 * rank)
  if len(dims_bytes) != 4 * rank:
    raise DataError(f"{path}: truncated IDX header.")
  dims = tuple(int(d) for d in np.frombuffer(dims_bytes, ">u4"))
  dtype = np.dtype(IDX_TYPES[type_code])
  size = int(np.prod(dims, dtype=np.float64)) * dtype.itemsize
  if size > MAX_IDX_BYTES:
    raise DataError(f"{path}: the IDX header claims dims {dims} ({size} bytes), more "
                    "than any dataset this reader accepts; the file is corrupt.")
  present = file_size - 4 - 4 * rank
  if not gzipped and size != present:
    raise DataError(f"{path}: the IDX header promises {size} bytes of data but the file "
                    f"holds {'more' if present > size else present}; the file is "
                    "truncated or not the one the header describes: download it again.")
  return IdxHeader(dims, dtype)


def open_data(path: str) -> IO[bytes]:
  """The regular file at `path` for reading (files.open_regular: a device, a pipe or a
  directory is refused); DataError, one line, for any problem."""
  try:
    return files.open_regular(path)
  except files.UnsafePath as e:
    raise DataError(f"{e.strerror}.") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read it ({e.strerror or e}).") from None


@contextlib.contextmanager
def open_idx(path: str) -> Iterator[tuple[IO[bytes], IdxHeader]]:
  """(the stream at its first data byte, the checked header) of an IDX file (.gz or
  not); a device, a pipe or a directory is refused. DataError, one line, for any problem."""
  raw = open_data(path)
  gzipped = path.endswith(".gz")
  try:
    with raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gzipped
               else contextlib.nullcontext(raw)) as f:
      stream = typing.cast(IO[bytes], f)
      yield stream, _idx_header(stream, path, os.fstat(raw.fileno()).st_size, gzipped)
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f"{path}: cannot read it ({e}).") from None


def _idx_array(buffer: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
  return np.frombuffer(buffer, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally .gz) into a numpy array, checking its header: its
  rows (read_idx_rows) in one slice, which must fit the memory budget.

  Header: two zero bytes, a type code, the rank, then one big-endian uint32 per dim.
  """
  with open_idx(path) as (_, header):
    size = header.dims[0] * header.row_bytes
  if size > budget.memory_budget():
    raise DataError(f"{path}: the IDX header claims dims {header.dims} ({size:,} bytes), "
                    "more than the memory this reader may use; read fewer examples.")
  slices = list(read_idx_rows(path, max(header.dims[0], 1)))
  return slices[0] if slices else np.zeros(header.dims, header.dtype.newbyteorder("="))


def read_idx_rows(path: str, rows: int) -> Iterator[np.ndarray]:
  """An IDX file (.gz or not) in slices of at most `rows` examples: memory does not
  grow with the file. A .gz stream is read up to the size its header declares (never
  more); more data than that is refused."""
  with open_idx(path) as (f, header):
    for start in range(0, header.dims[0], rows):
      count = min(rows, header.dims[0] - start)
      yield _idx_array(_read_exactly(f, count * header.row_bytes, path), header.dtype,
                       (count, *header.dims[1:]))
    if path.endswith(".gz") and f.read(1):
      raise DataError(f"{path}: the file holds more than its IDX header's "
                      f"{header.dims[0] * header.row_bytes} bytes; it is not the one the "
                      "header describes: download it again.")


def _find_idx(data_dir: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    if os.path.exists(os.path.join(data_dir, name)):
      return os.path.join(data_dir, name)
  raise DataError(f"missing {stem}[.gz] in {data_dir}; for fashion_mnist run "
                  "`apt-get install dataset-fashion-mnist`, for mnist put the four IDX "
                  "files there and pass --data_dir.")


def load_idx_dir(data_dir: Optional[str]) -> Arrays:
  """The four MNIST-layout IDX files of data_dir -> (x_train, y_train, x_test, y_test)."""
  if not data_dir or not os.path.isdir(data_dir):
    raise DataError(f"data directory {data_dir!r} does not exist; pass --data_dir=DIR "
                    "holding train-images-idx3-ubyte[.gz] and the other three IDX files.")
  x_train, y_train, x_test, y_test = (read_idx(_find_idx(data_dir, IDX_FILES[k]))
                                      for k in IDX_FILES)
  return x_train, y_train, x_test, y_test


def _check_npz_shapes(npz: files.NpzArchive) -> None:
  """The four arrays' declared shapes fit together: checked before any is read."""
  h = {name: npz.header(name) for name in IDX_FILES}
  for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
    if len(h[x].shape) < 2 or h[x].shape[0] == 0:
      raise DataError(f"{npz.path}: {x} must be (N, ...) with N >= 1 examples, got shape "
                      f"{h[x].shape}.")
    if h[y].shape != h[x].shape[:1]:
      raise DataError(f"{npz.path}: {y} must have shape ({h[x].shape[0]},), one label per "
                      f"example of {x}, got {h[y].shape}.")
  if h["x_train"].shape[1:] != h["x_test"].shape[1:]:
    raise DataError(f"{npz.path}: x_train's examples are {h['x_train'].shape[1:]} but "
                    f"x_test's {h['x_test'].shape[1:]}.")
  as_float32 = sum(4 * int(np.prod(h[x].shape, dtype=np.float64)) for x in ("x_train", "x_test"))
  if as_float32 > npz.max_bytes:
    raise DataError(f"{npz.path}: x_train and x_test take {as_float32:,} bytes as float32, "
                    f"more than the {npz.max_bytes:,} bytes of memory this loader may use; "
                    "use fewer examples.")


def load_npz(path: str) -> Arrays:
  """x_train, y_train, x_test, y_test from an .npz file (files.NpzArchive: members by
  exact name, every header and the shapes checked before any array is read; pickled
  objects are refused)."""
  with files.NpzArchive(path, min(budget.memory_budget(), MAX_NPZ_ARRAY_BYTES), DataError) as npz:
    missing = [k for k in IDX_FILES if k not in npz.names]
    if missing:
      raise DataError(f"{path}: missing arrays {', '.join(missing)}; the .npz must hold "
                      "x_train, y_train, x_test, y_test.")
    _check_npz_shapes(npz)
    x_train, y_train, x_test, y_test = (npz.read(k) for k in IDX_FILES)
  return x_train, y_train, x_test, y_test


def labels(y: Any, n: int, name: str, num_classes: Optional[int] = None) -> np.ndarray:
  """Class labels y (n,) checked, as int64: integers (or integral floats) in [0, K), K
  the model's num_classes, or at most MAX_CLASSES for a dataset. The one label check of
  everything read: training data and predict's inputs. DataError, one line."""
  y = np.asarray(y)
  if y.shape != (n,):
    raise DataError(f"{name} must have shape ({n},), one label per example, got {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y))
            and np.all(y == np.round(y))):
      raise DataError(f"{name} must hold integer class labels, got dtype {y.dtype}.")
  if num_classes is not None and n and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(f"{name} run from {y.min():g} to {y.max():g}, but this model has "
                    f"classes 0 to {num_classes - 1}: give labels of the same classes.")
  if n and (y.min() < 0 or y.max() >= MAX_CLASSES):
    raise DataError(f"{name} must lie in [0, K) with K <= {MAX_CLASSES}, got min "
                    f"{y.min():g}, max {y.max():g}.")
  return y.astype(np.int64)


def input_paths(path: str) -> list[str]:
  """The files of a predict --input: one path, a comma-separated list, or a directory
  of *.png (of any case)."""
  paths = [p for p in path.split(",") if p]
  if len(paths) == 1 and os.path.isdir(paths[0]):
    directory = paths[0]
    paths = sorted(os.path.join(directory, n) for n in os.listdir(directory)
                   if n.lower().endswith(".png"))
    if not paths:
      raise ValueError(f"{path} holds no .png files (of any case: .png, .PNG).")
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing or not paths:
    raise ValueError(f"no such file: {', '.join(missing) or path!r}.")
  return paths


def npz_rows(path: str, rows: int) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
  """(x, y or None) slices of an .npz of x (or x_test) and y (or y_test)."""
  with files.NpzArchive(path, budget.memory_budget()) as npz:
    key = next((k for k in ("x", "x_test") if k in npz.names), None)
    if key is None:
      raise ValueError(f"{path} holds {', '.join(npz.names) or 'no arrays'}; name the "
                       "inputs x (and the labels y).")
    label_key = {"x": "y", "x_test": "y_test"}[key]
    x_header = npz.header(key)
    if not x_header.shape:
      raise ValueError(f"{path}: the inputs must be an array (N, ...) of real numbers, "
                       f"got {x_header.dtype} of shape ().")
    if label_key not in npz.names:
      for x in npz.read_rows(key, rows):
        yield x, None
      return
    y_header = npz.header(label_key)
    if y_header.shape != x_header.shape[:1]:
      raise ValueError(labels_do_not_fit(x_header.shape[0], y_header.shape))
    yield from zip(npz.read_rows(key, rows), npz.read_rows(label_key, rows))


def labels_do_not_fit(count: int, shape: tuple[int, ...]) -> str:
  """The one line for labels whose shape is not one label per input."""
  if len(shape) == 1:
    return (f"there are {shape[0]:,} labels for {count:,} inputs: give one label per "
            "input (the labels file of the same split).")
  return (f"the labels must be one label per input, shape ({count},), got shape "
          f"{tuple(shape)}.")


def idx_rows(path: str, rows: int) -> Iterator[tuple[np.ndarray, None]]:
  """(x, None) slices of an IDX file of inputs."""
  try:
    for x in read_idx_rows(path, rows):
      yield x, None
  except DataError as e:
    raise ValueError(f"{e} Inputs are read from .npz, IDX, CSV or .png files.") from None


def read_png(path: str, image_shape: tuple[int, ...], pixel_max: float, dataset: str
             ) -> np.ndarray:
  """One 8-bit grayscale PNG of a model's image_shape (h, w) -> raw values (h, w)
  float32, 0..255 mapped to 0..pixel_max (0: the model's inputs are not images, trained
  on `dataset`); anything else raises ValueError naming the fix."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not pixel_max or len(image_shape) != 2:
    raise ValueError(f"{path}: this model was trained on {dataset}, not on images; "
                     "give an .npz of raw inputs.")
  h, w = image_shape
  try:
    with warnings.catch_warnings(), files.open_regular(path) as f:
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(f) as image:  # reads the header only
        mode, size = image.mode, image.size
        if mode != "L" or size != (w, h):  # checked before any pixel is decoded
          raise ValueError(f"{path}: an image of {size[0]}×{size[1]} pixels, mode {mode}; this "
                           f"model takes 8-bit grayscale (mode L) images of {w}×{h} "
                           "pixels: convert it first.")
        pixels = np.asarray(image)
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds on a bad file)
    raise ValueError(f"{path}: not a readable image of {w}×{h} pixels "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})."
                     ) from None
  return pixels.astype(np.float32) * np.float32(pixel_max / 255)
