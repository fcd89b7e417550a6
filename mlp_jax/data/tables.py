"""CSV tables: a header row of column names, then one example per line; every column
but the label column is a feature. Parsed by numpy.loadtxt (numpy's C tokenizer, already
a dependency: quoted fields, any number format, 2× Python's csv module here), one batch
of lines at a time so that memory grows only with what is kept; the header by Python's
csv module. A quoted field may not span lines. Opened and bounded as readers.py's
formats are; every problem is a DataError, one line naming the line and column.
"""

import contextlib
import csv
import io
import itertools
from typing import IO, Iterator, Optional

import numpy as np

from mlp_jax.base import budget
from mlp_jax.data import readers
from mlp_jax.data.readers import DataError

# Rows of a CSV table parsed at once (a training read joins its batches), and the
# longest line read (a million features of 16 characters).
CSV_ROWS = 4096
MAX_CSV_LINE = 1 << 24


@contextlib.contextmanager
def _csv_lines(path: str, min_columns: int = 2
               ) -> Iterator[tuple[tuple[str, ...], Iterator[str]]]:
  """(the header's column names, the data lines) of a CSV file; DataError, one line."""
  raw = readers.open_data(path)
  with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
    try:
      lines = _bounded_lines(text, path)
      header = tuple(name.strip() for name in next(csv.reader([next(lines, "")]), []))
      if len(header) < min_columns or not all(header) or len(set(header)) < len(header):
        raise DataError(f"{path}: the first line must name the columns, at least "
                        f"{min_columns}, each once and none empty; got "
                        f"{','.join(header)[:200]!r}.")
      yield header, lines
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the "
                      "table as UTF-8 CSV.") from None


def _bounded_lines(text: IO[str], path: str) -> Iterator[str]:
  """The lines of `text`, each read up to MAX_CSV_LINE characters: a longer one (a file
  of zeros, a line of a gigabyte) is refused, never held."""
  number = 0
  while line := text.readline(MAX_CSV_LINE):
    number += 1
    if len(line) == MAX_CSV_LINE and not line.endswith("\n"):
      raise DataError(f"{path}, line {number}: longer than {MAX_CSV_LINE:,} characters; "
                      "not a table of numbers (or a row of over a million features).")
    yield line


def _cells(line: str) -> int:
  """The number of cells of a CSV line (its commas + 1; by the csv module if quoted; 0
  for a blank line, which numpy.loadtxt skips)."""
  if not line.strip():
    return 0
  if '"' in line:
    return len(next(csv.reader([line]), []))
  return line.count(",") + 1


def csv_header(path: str) -> tuple[str, ...]:
  """The column names of a CSV file's first line."""
  with _csv_lines(path) as (header, _):
    return header


def _bad_cell(path: str, lines: list[str], first_line: int, header: tuple[str, ...],
              columns: list[int]) -> DataError:
  """The DataError naming the first cell of `lines` (the file's lines from first_line)
  that is missing or not a number, in the feature columns `columns`."""
  for offset, row in enumerate(csv.reader(lines)):
    line = first_line + offset
    if not row:
      continue
    if len(row) != len(header):
      return DataError(f"{path}, line {line}: {len(row)} cells where the header names "
                       f"{len(header)} columns; give every row one cell per column.")
    for j in columns:
      try:
        float(row[j])
      except ValueError:
        what = "is empty" if not row[j].strip() else f"is {row[j][:40]!r}, not a number"
        return DataError(f"{path}, line {line}, column {header[j]!r}: the cell {what}; "
                         "give every feature as a number (encode categories as numbers).")
  return DataError(f"{path}, lines {first_line}-{first_line + len(lines) - 1}: not a table "
                   "numpy.loadtxt can read (a quoted field across lines?).")


def csv_rows(path: str, label_column: Optional[str], rows: int,
             features: Optional[tuple[str, ...]] = None
             ) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
  """(features (n, D) float64, labels (n,) str or None) of a CSV file, in batches of at
  most `rows` rows; all of them together within the memory budget of a read.

  The label column is `label_column` (None: the last column; "" or a name the file does
  not have, with `features` given: no labels). The features are `features` in that
  order (a trained model's, found by name), else every other column. DataError, one line,
  naming the line and column of a cell that is missing or not a number.
  """
  with _csv_lines(path) as (header, lines):
    if label_column is None:
      label_column = header[-1]
    if label_column and label_column not in header and features is None:
      raise DataError(f"{path} has no column {label_column!r}; its columns are "
                      f"{', '.join(header)[:300]}: give --label_column one of them.")
    label = header.index(label_column) if label_column in header else None
    names = features or tuple(n for n in header if n != label_column)
    missing = [n for n in names if n not in header]
    if missing:
      raise DataError(f"{path} lacks the feature column(s) {', '.join(missing)[:200]} "
                      "the model was trained on; give a table with every one of them.")
    columns = [header.index(n) for n in names]
    limit, held, line = budget.memory_budget(), 0, 2
    while batch := list(itertools.islice(lines, rows)):
      first, line = line, line + len(batch)
      if not all(_cells(text) in (0, len(header)) for text in batch):   # usecols would
        raise _bad_cell(path, batch, first, header, columns)     # not notice (0: blank)
      numbers = [first + k for k, text in enumerate(batch) if text.strip()]
      data = [text for text in batch if text.strip()]
      if not data:
        continue
      try:
        x = np.loadtxt(data, delimiter=",", quotechar='"', usecols=columns, ndmin=2,
                       dtype=np.float64)
        y = (None if label is None else np.loadtxt(data, delimiter=",", quotechar='"',
                                                   usecols=[label], dtype=str, ndmin=1))
      except ValueError:
        raise _bad_cell(path, batch, first, header, columns) from None
      if not np.all(np.isfinite(x)):
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{path}, line {numbers[i]}, column {names[j]!r}: the cell is "
                        f"{x[i, j]}, not a finite number; clean the data first.")
      if y is not None:
        y = np.char.strip(y)
        unlabelled = np.flatnonzero((y == "") | (np.char.lower(y) == "nan"))
        if unlabelled.size:
          i = unlabelled[0]
          raise DataError(f"{path}, line {numbers[i]}, column {label_column!r}: the label "
                          f"is {y[i] or 'empty'}; give every row its label, or drop the row.")
      held += x.nbytes + (0 if y is None else y.nbytes)
      if held > limit:
        raise DataError(f"{path}: its first {numbers[-1] - 1:,} rows already take "
                        f"{held:,} bytes, more than the {limit:,} this reader may use; "
                        "use fewer rows or columns.")
      yield x, y


def csv_column(path: str, column: str) -> np.ndarray:
  """The cells (n,) str of the column `column` of a CSV file (of its only column, if it
  has one and not `column`), stripped; within the memory budget; DataError, one line."""
  with _csv_lines(path, min_columns=1) as (header, lines):
    if column not in header and len(header) > 1:
      raise DataError(f"{path} has no column {column!r}; its columns are "
                      f"{', '.join(header)[:300]}: give a file of one column, or name it "
                      f"{column!r}.")
    index = header.index(column) if column in header else 0
    limit, held, cells = budget.memory_budget(), 0, []
    while batch := list(itertools.islice(lines, CSV_ROWS)):
      data = [text for text in batch if text.strip()]
      if not data:
        continue
      try:
        cells.append(np.char.strip(np.loadtxt(data, delimiter=",", quotechar='"',
                                              usecols=[index], dtype=str, ndmin=1)))
      except ValueError as e:
        raise DataError(f"{path}: a line lacks column {header[index]!r} ({e}).") from None
      held += cells[-1].nbytes
      if held > limit:
        raise DataError(f"{path}: its column {header[index]!r} takes more than the "
                        f"{limit:,} bytes this reader may use.")
  return np.concatenate(cells) if cells else np.array([], str)


def class_names(labels: np.ndarray) -> np.ndarray:
  """A label column's values (n,) as class names (n,): numbers by their value, written
  in the shortest form that reads back as it (1, 1.0 and 1e0 are one class "1";
  123456789 stays whole), where every label is a number; else as written."""
  try:
    values = labels.astype(np.float64)
  except ValueError:
    return labels
  return np.array([np.format_float_positional(v, trim="-") for v in values], dtype=str)
