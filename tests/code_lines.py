"""Lines of code in mlp_jax/ and experiments/, as issue 49 counts them: docstrings,
comments and blank lines not counted.

    python tests/code_lines.py            # the total, then each file's count
"""

import ast
import glob
import io
import os
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
        tokenize.ENCODING, tokenize.ENDMARKER)


def docstring_lines(source):
  """The line numbers of every module, class and function docstring."""
  lines = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      first = node.body[0] if node.body else None
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str)):
        lines.update(range(first.lineno, first.end_lineno + 1))
  return lines


def code_lines(source):
  """The number of lines holding a token of code, not of a docstring."""
  docs = docstring_lines(source)
  tokens = tokenize.generate_tokens(io.StringIO(source).readline)
  return len({line for tok in tokens if tok.type not in SKIP
              for line in range(tok.start[0], tok.end[0] + 1) if line not in docs})


def counts(root=ROOT):
  """{path relative to root: code lines} of mlp_jax/**/*.py and experiments/*.py."""
  paths = (glob.glob(os.path.join(root, "mlp_jax", "**", "*.py"), recursive=True)
           + glob.glob(os.path.join(root, "experiments", "*.py")))
  result = {}
  for path in sorted(paths):
    with open(path, encoding="utf-8") as f:
      result[os.path.relpath(path, root)] = code_lines(f.read())
  return result


if __name__ == "__main__":
  by_file = counts(sys.argv[1] if len(sys.argv) > 1 else ROOT)
  print(f"{sum(by_file.values())} lines of code in {len(by_file)} files")
  print("\n".join(f"{n:6} {path}" for path, n in
                  sorted(by_file.items(), key=lambda item: -item[1])))
