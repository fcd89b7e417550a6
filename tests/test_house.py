"""The shape of the code, read from its own source: no import circle and no import back
up a layer, no module over 450 lines, no function over 60 lines or 6 parameters (a
scikit-learn __init__, which must list every parameter, aside)."""

import ast
import glob
import os

import pytest

from conftest import ROOT

# The package's layers are its folders, lowest first (README, "Layout"): a module imports
# from its own folder or lower ones, never from a higher one. The modules at the top
# (mlp_jax/__init__.py, estimator.py, gradcheck.py) are the layer above them all, with
# the command line's mains (mlp_jax/commands, TOP_FOLDERS).
LAYERS = ("base", "core", "data", "training", "run")
TOP_FOLDERS = ("commands",)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 6


def _sources():
  """{path relative to ROOT: source} of the package and the scripts."""
  paths = (glob.glob(os.path.join(ROOT, "mlp_jax", "**", "*.py"), recursive=True)
           + glob.glob(os.path.join(ROOT, "experiments", "*.py")))
  sources = {}
  for path in sorted(paths):
    with open(path, encoding="utf-8") as f:
      sources[os.path.relpath(path, ROOT)] = f.read()
  return sources


def _module_name(path):
  return path[:-3].replace(os.sep, ".").removesuffix(".__init__")


def imports_of(source, module, modules):
  """The package modules `source` (of module `module`) imports, at its top level or in a
  function (a deferred import is an arrow too); TYPE_CHECKING imports included."""
  package = module.rsplit(".", 1)[0] if "." in module else module
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names] + [base]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name and name != module and name != "mlp_jax":
        found.add(name)
  return found


def find_circle(graph):
  """One import circle of `graph` {module: modules it imports} as a list, or None."""
  state = {}

  def visit(module, path):
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        return path[path.index(target):] + [target]
      if target not in state:
        circle = visit(target, path + [target])
        if circle:
          return circle
    state[module] = "done"
    return None

  for module in sorted(graph):
    if module not in state:
      circle = visit(module, [module])
      if circle:
        return circle
  return None


def long_or_wide_functions(source):
  """[(name, lines, parameters)] of the functions over the limits (self and cls not
  counted; the __init__ of an estimator class, scikit-learn's contract, aside)."""
  tree = ast.parse(source)
  exempt = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
            and any(getattr(b, "id", "") in ("BaseEstimator", "MLPClassifier") for b in c.bases)
            for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"}
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or id(node) in exempt:
      continue
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    parameters = len([n for n in names if n not in ("self", "cls")])
    lines = node.end_lineno - node.lineno + 1
    if lines > MAX_FUNCTION_LINES or parameters > MAX_PARAMETERS:
      found.append((node.name, lines, parameters))
  return sorted(found)


def test_no_import_circle():
  sources = _sources()
  modules = {_module_name(p) for p in sources if p.startswith("mlp_jax")}
  graph = {_module_name(p): imports_of(s, _module_name(p), modules)
           for p, s in sources.items() if p.startswith("mlp_jax")}
  assert find_circle(graph) is None, find_circle(graph)


def layer_of(module):
  """The index in LAYERS of a package module's folder; len(LAYERS) at the top."""
  folder = module.split(".")[1] if module.count(".") >= 1 else ""
  return LAYERS.index(folder) if folder in LAYERS else len(LAYERS)


def imports_up(graph):
  """[(module, imported module)] of every import from a higher layer."""
  return sorted((m, t) for m, targets in graph.items() for t in targets
                if layer_of(t) > layer_of(m))


def test_no_import_runs_up_a_layer():
  sources = _sources()
  modules = {_module_name(p) for p in sources if p.startswith("mlp_jax")}
  assert ({m.split(".")[1] for m in modules if m.count(".") == 2}
          == set(LAYERS) | set(TOP_FOLDERS))
  graph = {_module_name(p): imports_of(s, _module_name(p), modules)
           for p, s in sources.items() if p.startswith("mlp_jax")}
  assert not imports_up(graph), imports_up(graph)


@pytest.mark.parametrize("path", sorted(_sources()))
def test_each_module_is_short_and_its_functions_small(path):
  source = _sources()[path]
  lines = len(source.splitlines())
  assert lines <= MAX_MODULE_LINES, f"{path}: {lines} lines"
  assert not long_or_wide_functions(source), (path, long_or_wide_functions(source))


# The calls that open, make, move or load a path: only mlp_jax/base/files.py makes
# them, where each is checked on what was opened (a regular file, a real directory).
OPENERS = {"open", "os.open", "os.replace", "os.rename", "shutil.move", "os.makedirs",
           "os.mkdir", "np.load", "numpy.load", "json.load", "gzip.open"}


def openers_in(source):
  """[(line, call)] of the OPENERS `source` calls."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Call):
      name = ast.unparse(node.func)
      devnull = node.args and ast.unparse(node.args[0]) == "os.devnull"
      if name in OPENERS and not devnull:   # /dev/null, opened to silence stdout
        found.append((node.lineno, name))
  return sorted(found)


def test_only_the_files_module_opens_a_path():
  """Every path the package opens, makes, moves or loads goes through files.py's
  functions (open_regular, open_for_update, atomic_file, make_dirs, move, NpzArchive);
  orbax's own files aside, which it opens itself."""
  found = {path: openers_in(source) for path, source in _sources().items()
           if path.startswith("mlp_jax") and path != os.path.join("mlp_jax", "base",
                                                                 "files.py")}
  assert not {p: f for p, f in found.items() if f}, found


def test_the_checks_fail_on_what_they_look_for():
  """Each check finds its fault in a small made-up source: a circle, a long function, a
  function of many parameters (and not a scikit-learn __init__)."""
  assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_circle({"a": {"b"}, "b": set()}) is None
  model, fit = "mlp_jax.core.model", "mlp_jax.training.fit"
  assert imports_up({model: {fit}}) == [(model, fit)]
  assert imports_up({fit: {model}, "mlp_jax.estimator": {fit}}) == []
  assert imports_up({"mlp_jax.run.trained": {"mlp_jax.estimator"}}) != []
  modules = {"mlp_jax.a", "mlp_jax.b", "mlp_jax.sub", "mlp_jax.sub.c"}
  assert imports_of("from mlp_jax import b\nimport mlp_jax.sub.c\n", "mlp_jax.a",
                    modules) == {"mlp_jax.b", "mlp_jax.sub.c"}
  assert imports_of("def f():\n  from . import b\n", "mlp_jax.a", modules) == {"mlp_jax.b"}
  assert imports_of("from .. import a\n", "mlp_jax.sub.c", modules) == {"mlp_jax.a"}
  long = "def f():\n" + "  x = 1\n" * MAX_FUNCTION_LINES
  assert long_or_wide_functions(long) == [("f", MAX_FUNCTION_LINES + 1, 0)]
  wide = "def g(a, b, c, d, e, f, *, g=1):\n  pass\n"
  assert long_or_wide_functions(wide) == [("g", 2, 7)]
  method = "class C:\n  def g(self, a, b, c, d, e, f):\n    pass\n"
  assert long_or_wide_functions(method) == []
  estimator = ("class E(BaseEstimator):\n  def __init__(self, a, b, c, d, e, f, g):\n"
               "    pass\n")
  assert long_or_wide_functions(estimator) == []
  assert openers_in("import json\nwith open(p) as f:\n  json.load(f)\nos.replace(a, b)\n"
                    ) == [(2, "open"), (3, "json.load"), (4, "os.replace")]
  assert openers_in("files.open_regular(p)\nf.open()\nos.open(os.devnull, 1)\n") == []
