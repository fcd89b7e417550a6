"""JSON records (config.json, metrics.jsonl's lines, orbax's metadata), each bounded by
what it parses to, not only by its bytes: 60 MB of numbers is 60 MB of text but 0.5 GB
of Python floats.

    elements   a record's elements are counted before it is parsed (every ',', '[' and
               '{', outside strings or in: an over-count only), each costing what
               json.loads makes of the dearest kind (an empty dict in a list: 72 bytes,
               measured with tracemalloc on CPython 3.11), plus its text
    budget     the records of one file may parse to MAX_PARSED_BYTES in all (Budget),
               far above what a run writes (a metrics line is ~300 bytes per model)
    depth      at most MAX_DEPTH levels of nesting (a run writes 4)

Anything past a bound is a ValueError naming it: a fault of the file, never a bug here.
"""

import itertools
import json
import re
from typing import Any, Optional, Union

BYTES_PER_ELEMENT = 80
MAX_PARSED_BYTES = 256 << 20
MAX_DEPTH = 64
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class Budget:
  """What the records of one file may still parse to, in bytes."""

  def __init__(self, limit: Optional[int] = None):
    self.left = MAX_PARSED_BYTES if limit is None else limit


def _depth(text: str) -> int:
  """The deepest nesting of [ and { outside strings."""
  brackets = re.sub(r"[^\[\]{}]", "", _STRING.sub("", text))
  return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def parse_json(text: Union[str, bytes], budget: Optional[Budget] = None) -> Any:
  """json.loads of a record within `budget` (a fresh one: MAX_PARSED_BYTES) and
  MAX_DEPTH; ValueError for what no run writes: not JSON, more elements than the
  budget holds, or nesting deeper than MAX_DEPTH."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  budget = budget or Budget()
  elements = text.count(",") + text.count("[") + text.count("{") + 1
  cost = BYTES_PER_ELEMENT * elements + len(text)
  if cost > budget.left:
    raise ValueError(f"JSON of {elements:,} elements, more than any record a run writes "
                     f"(it would take about {cost / 2**20:,.0f} MiB)")
  budget.left -= cost
  if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
    raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels, deeper than any record "
                     "a run writes")
  return json.loads(text)
