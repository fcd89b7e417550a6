"""Every ```python block of README.md and docs/*.md runs as a user pastes it: a block of
`>>>` lines is a doctest (each output it shows is checked), any other block runs as a
script. Each block starts from an empty namespace."""

import doctest
import glob
import os
import re

import pytest

from conftest import ROOT

FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def doc_blocks():
  """[(path:line, source)] of every python block, in file order."""
  paths = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
  blocks = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for match in FENCE.finditer(text):
      line = text.count("\n", 0, match.start()) + 2
      blocks.append((f"{os.path.relpath(path, ROOT)}:{line}", match.group(1)))
  return blocks


def _param(name, source):
  trains = ".fit(" in source  # the estimators train for seconds each
  return pytest.param(source, id=name, marks=[pytest.mark.slow] if trains else [])


def test_the_docs_have_python_blocks():
  names = [name for name, _ in doc_blocks()]
  assert any(n.startswith("README.md") for n in names), names
  assert any(n.startswith("docs/many_models.md") for n in names), names


@pytest.mark.parametrize("source", [_param(*b) for b in doc_blocks()])
def test_doc_block_runs_as_written(source):
  if source.lstrip().startswith(">>>"):
    test = doctest.DocTestParser().get_doctest(source, {}, "block", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    failures = []
    runner.run(test, out=failures.append)
    assert runner.failures == 0, "".join(failures)
    assert runner.tries > 0
  else:
    exec(compile(source, "block", "exec"), {"__name__": "__doc_block__"})  # pylint: disable=exec-used
