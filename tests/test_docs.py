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


@pytest.mark.slow   # the README's first command, a process of its own
def test_the_readme_shows_what_the_default_command_prints(tmp_path):
  """"What they print": each line the README shows for `python experiments/train.py`
  is a line the command prints, numbers and the workdir aside (the progress bar, which
  redraws itself, is checked for its shape only)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("## What they print"):]
  shown = re.search(r":\n\n((?:    .*\n)+)", section).group(1)
  shown = [line[4:] for line in shown.splitlines()]
  result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"),
                           f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  printed = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
  for line in shown:
    line = re.sub(r"/tmp/mlp_jax_\w+", "WORKDIR", line)
    pattern = re.sub(r"\d[\d,.]*", r"\\d[\\d,.]*", re.escape(line))
    pattern = pattern.replace("WORKDIR", r"\S+")
    if "epoch/s" in line:   # the progress bar: its shape
      pattern = r"100%\|.*\| \d+/\d+ \[.*epoch/s, acc=.*, loss=.*, test_acc=.*\]"
    assert any(re.fullmatch(pattern, p.rstrip()) for p in printed), (line, printed)
