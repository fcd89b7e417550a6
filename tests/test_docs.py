"""Every ```python block of README.md and docs/*.md runs as a user pastes it: a block of
`>>>` lines is a doctest (each output it shows is checked), any other block runs as a
script. Each block starts from an empty namespace."""

import contextlib
import doctest
import glob
import importlib
import io
import os
import re
import shlex

import pytest

from conftest import ROOT

FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def doc_blocks(pattern=FENCE):
  """[(path:line, source)] of every python block (every match of `pattern`) of README.md
  and docs/*.md, in file order."""
  paths = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
  blocks = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for match in pattern.finditer(text):
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


HEREDOC = re.compile(r"^python - <<'PY'\n(.*?)^PY$", re.MULTILINE | re.DOTALL)  # in a block


@pytest.mark.parametrize("where, source", doc_blocks(HEREDOC),
                         ids=[where for where, _ in doc_blocks(HEREDOC)])
def test_each_measuring_script_of_the_docs_runs_on_a_run_of_its_kind(where, source,
                                                                    reference_run, tiny_npz):
  """The script, with the workdir it reads (a /tmp/NAME) replaced by a finished small run,
  runs to its end and prints its measurement."""
  workdirs = set(re.findall(r"/tmp/[a-z0-9_]+", source))
  assert len(workdirs) == 1, (where, workdirs)
  script = source.replace(workdirs.pop(), str(reference_run(tiny_npz)))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(script, where, "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  assert printed.getvalue().strip(), where


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


# A placeholder of the docs' commands -> a value of its kind (nothing is read or run).
PLACEHOLDERS = {"PATH": "/data/x.npz", "TABLE.npz": "/data/t.npz", "S": "1", "DIR": "/data",
                "HOST:PORT": "host0:1234", "B": "/tmp/b"}
def runner_commands(script="train"):
  """[(path:line, its arguments)] of every `python experiments/SCRIPT.py ...` and
  `mlp-jax SCRIPT ...` the README, the docs, the command's docstring and the presets'
  headers show (continued lines joined; a trailing comment, `...`, `&` and `(timed)`
  dropped)."""
  command = re.compile(rf"(?:python3? experiments/{script}\.py|mlp-jax {script})([^`|#]*)")
  module = (f"mlp_jax/commands/{script}.py" if os.path.exists(
      os.path.join(ROOT, "mlp_jax", "commands", f"{script}.py")) else f"experiments/{script}.py")
  paths = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT)), module,
           *sorted(glob.glob("experiments/configs/*.flags", root_dir=ROOT))]
  found = []
  for path in paths:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      text = re.sub(r"\\\\?\n\s*", " ", f.read())   # a continued line, also as \\ in a docstring
    for number, line in enumerate(text.splitlines(), 1):
      for match in command.finditer(line):
        args = [a for a in shlex.split(match.group(1).strip().rstrip('"'))
                if a not in ("...", "&", "(timed)")]
        found.append((f"{path}:{number}", [_placeholder(a) for a in args]))
  return found


def _placeholder(arg):
  return re.sub(r"(?<=[=:])(PATH|TABLE\.npz|S|DIR|HOST:PORT|B)$",
                lambda m: PLACEHOLDERS[m.group(1)], arg)


def test_the_docs_show_runner_commands():
  places = [place for place, _ in runner_commands()]
  assert len(places) > 40 and any(p.startswith("experiments/configs/") for p in places)


@pytest.mark.parametrize("place, args", runner_commands(),
                         ids=[place for place, _ in runner_commands()])
def test_every_runner_command_in_the_docs_is_accepted(place, args):
  """Each command line the docs show parses (every flag exists, every value is of its
  kind) and passes config.resolve, the run's own checks: a renamed or removed setting,
  or a value out of its bounds, fails here."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from conftest import _runner_module  # pylint: disable=g-import-not-at-top
  from mlp_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  runner = _runner_module()
  runner.flags.FLAGS.unparse_flags()
  if "--help" in args:
    return
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), contextlib.chdir(ROOT):
    try:
      runner.parse_flags(["train.py", *args])
    except SystemExit as e:
      pytest.fail(f"{place}: exit {e.code}: {stderr.getvalue().strip()}")
    values = {s.name: flags.FLAGS[s.name].value for s in config_lib.SETTINGS}
  values["sweep"] = tuple(values["sweep"] or ())
  config_lib.resolve(config_lib.RunConfig(**values))


DOC_PATH = re.compile(r"(?<![\w/.])((?:mlp_jax|experiments|tests|docs|\.ci)/[\w/.\-]*\w)(?![\w{])")
NAME_IN_FILE = re.compile(r"`([\w.]+)(?:\([^`]*\))?` (?:in|of|from) "
                          r"`((?:mlp_jax|experiments|tests)/[\w/]+\.py)`")


def test_every_file_the_docs_name_exists_and_holds_what_they_say():
  """A path of the project in README.md or docs/*.md exists; "`name` in `path.py`"
  names a function, class or variable that path.py defines."""
  wrong = []
  for path in ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      text = f.read()
    wrong += [(path, p) for p in DOC_PATH.findall(text)
              if not glob.glob(os.path.join(ROOT, p))]
    for name, source in NAME_IN_FILE.findall(text):
      defined = rf"\b(def|class)\s+{name.split('.')[-1]}\b|^\s*{name.split('.')[-1]}\s*[:=]"
      with open(os.path.join(ROOT, source), encoding="utf-8") as f:
        if not re.search(defined, f.read(), re.MULTILINE):
          wrong.append((path, f"{name} in {source}"))
  assert not wrong, wrong


DOTTED = re.compile(r"\bmlp_jax(?:\.[A-Za-z_]\w*)+")


def resolves(dotted):
  """True when `dotted` (mlp_jax.a.b.c) is a module, or an attribute of the longest
  module it starts with."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      thing = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for name in parts[i:]:
      if not hasattr(thing, name):
        return False
      thing = getattr(thing, name)
    return True
  return False


def test_every_dotted_name_of_the_package_the_docs_and_code_give_exists():
  """`mlp_jax.core.losses.cross_entropy` and the like, in README.md, docs/*.md, the
  scripts' help and docstrings and the package's own comments, name what is there."""
  paths = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT)),
           *sorted(glob.glob("experiments/*.py", root_dir=ROOT)),
           *sorted(glob.glob("mlp_jax/**/*.py", root_dir=ROOT, recursive=True))]
  wrong = []
  for path in paths:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      text = f.read()
    wrong += [(path, name) for name in sorted(set(DOTTED.findall(text)))
              if not resolves(name.rstrip("."))]
  assert not wrong, wrong


@pytest.mark.slow   # a process per script
@pytest.mark.parametrize("script", ["predict", "benchmark", "startup", "tables"])
def test_every_flag_the_docs_give_the_other_scripts_exists(script):
  """The flags of each `python experiments/predict.py ...` (`benchmark.py`, `startup.py`,
  `tables.py`) command the docs and the script's docstring show are flags of that
  script (its --helpfull); train.py's are checked by config.resolve above."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{script}.py"),
                           "--helpfull"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  defined = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", result.stdout, re.MULTILINE))
  commands = runner_commands(script)
  used = {(place, arg.split("=")[0][2:]) for place, args in commands
          for arg in args if arg.startswith("--")}
  assert len(commands) >= 2 and used
  assert not [(place, name) for place, name in used
              if name not in defined and name.removeprefix("no") not in defined]
