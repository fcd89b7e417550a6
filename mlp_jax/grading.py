"""Grading a class with gradcheck: the submissions of a folder, checked in parallel, and
the results in the formats a course's staff use (the CSV and Gradescope's results.json
are made from a report's JSON, verdicts.Report.as_dict), and the command's --grads.

    python -m mlp_jax.gradcheck --grads=SUBMISSIONS/:grads --csv=grades.csv
    python -m mlp_jax.gradcheck --grads=student.py:grads --gradescope=results.json

A submission is each subfolder of the folder (its own helper modules beside it, on no
other submission's path) or each .py file directly in it. In a subfolder, the function
is looked for in its .py files in name order: the first that defines it at the top
level (read, not run); where none does, its only .py file, or nothing.
"""

import ast
import concurrent.futures
import contextlib
import csv
import json
import os
import sys
from typing import Any, Callable, NamedTuple, Optional

from mlp_jax.base import boundary
from mlp_jax.core.mistakes import LEAVES
from mlp_jax.verdicts import (INTERNAL, NOT_CHECKED, RIGHT, USAGE, Check, Report,
                              check_grads_isolated)

MAX_SOURCE_BYTES = 1 << 20   # a .py file read to find the function (not run)


class Submission(NamedTuple):
  """A submission: its name, the spec to check ("FILE.py:FUNCTION"), or None and why."""

  name: str
  spec: Optional[str]
  why: str = ""


def _defines(path: str, function: str) -> bool:
  """Whether the .py file at `path` defines `function` at its top level (parsed, never
  run; False for a file that does not parse)."""
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top
  try:
    with files.open_regular(path) as f:
      tree = ast.parse(f.read(MAX_SOURCE_BYTES))
  except (OSError, SyntaxError, ValueError):
    return False
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
      return True
    targets = node.targets if isinstance(node, ast.Assign) else []
    if any(isinstance(t, ast.Name) and t.id == function for t in targets):
      return True
  return False


def submissions(folder: str, function: str) -> list[Submission]:
  """The submissions in `folder`, by name: each subfolder, and each .py file in it."""
  found = []
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    if entry.name.startswith((".", "_")) or entry.is_symlink():
      continue
    if entry.is_file() and entry.name.endswith(".py"):
      found.append(Submission(entry.name[:-3], f"{entry.path}:{function}"))
    elif entry.is_dir():
      sources = sorted(e.path for e in os.scandir(entry.path)
                       if e.name.endswith(".py") and e.is_file() and not e.is_symlink())
      defining = next((p for p in sources if _defines(p, function)), None)
      if defining is None and len(sources) == 1:
        defining = sources[0]   # its load will say what is wrong with it
      found.append(Submission(entry.name, f"{defining}:{function}" if defining else None,
                              "" if defining else
                              f"none of its {len(sources)} .py files defines {function}"))
  return found


def grade_all(found: list[Submission], check: Callable[[str], dict[str, Any]],
              not_checked: Callable[[str], dict[str, Any]], workers: int
              ) -> dict[str, dict[str, Any]]:
  """{name: report dict} of each submission, `workers` checked at once (each in a
  process of its own: check(spec)); a submission without a function: not_checked(why)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
    futures = {s.name: pool.submit(check, s.spec) for s in found if s.spec}
    return {s.name: futures[s.name].result() if s.name in futures else not_checked(s.why)
            for s in found}


def write_csv(path: str, reports: dict[str, dict[str, Any]]) -> None:
  """One row a submission: name, status, its words, score, max_score, then each leaf's
  verdict (right, wrong, or empty where not checked) and mistakes, then the message."""
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top
  header = ["name", "status", "status_words", "score", "max_score",
            *(f"{leaf}_{what}" for leaf in LEAVES for what in ("verdict", "mistakes")),
            "message"]
  with files.atomic_file(path, "w") as f:
    out = csv.writer(f)
    out.writerow(header)
    for name, report in reports.items():
      leaves = report.get("leaves", {})
      cells = [(("right" if leaves[leaf]["ok"] else "wrong"),
                " ".join(leaves[leaf]["mistakes"])) if leaf in leaves else ("", "")
               for leaf in LEAVES]
      out.writerow([name, report["status"], report["status_words"], report["score"],
                    report["max_score"], *(c for pair in cells for c in pair),
                    report.get("message", "")])


def gradescope(report: dict[str, Any]) -> dict[str, Any]:
  """Gradescope's results.json of one submission: a test per leaf (score, max_score,
  status, output: the leaf's line), and the total score. A leaf right on every problem
  where the function returned earns its point; the crash is in its output."""
  tests = [{"name": f"gradient of {leaf}", "score": int(v["credit"]), "max_score": 1,
            "status": "passed" if v["credit"] else "failed", "output": v["message"]}
           for leaf, v in report.get("leaves", {}).items()]
  if not tests:   # not checked: every leaf 0, the reason said once
    tests = [{"name": f"gradient of {leaf}", "score": 0, "max_score": 1,
              "status": "failed", "output": report.get("message", "")} for leaf in LEAVES]
  described = "; ".join(f"{m}: {what}" for m, what in report.get("mistakes", {}).items())
  return {"score": sum(t["score"] for t in tests),
          "output": f"gradcheck {report.get('version', '')}: {report['status_words']}"
                    + (f" ({report['message']})" if report.get("message") else "")
                    + (f". Mistakes named: {described}" if described else ""),
          "tests": tests}


def summary_line(name: str, report: dict[str, Any]) -> str:
  """One line of the class's table: name, status, score, the wrong leaves' mistakes."""
  wrong = [f"{leaf} ({' + '.join(v['mistakes']) or 'unnamed'})"
           for leaf, v in report.get("leaves", {}).items() if not v["ok"]]
  return (f"{name}: {report['status_words']}, {report['score']}/{report['max_score']}"
          + (f"; wrong: {', '.join(wrong)}" if wrong else "")
          + (f"; {report['message']}" if report.get("message") else ""))


class Grading(NamedTuple):
  """What the command does: how it checks each submission (verdicts.Check: seed,
  --tolerance, --layout, --activation, --timeout, --memory_limit), --json, and where to
  write --csv and --gradescope ("" for none)."""

  check: Check = Check()
  as_json: bool = False
  csv: str = ""
  gradescope: str = ""


def grade_command(spec: str, how: Grading) -> int:
  """The command with --grads: one submission's report, or with DIR:FUNCTION every
  submission of DIR (mlp_jax/py), printed (as JSON: one object whatever
  happens) and written as asked; its exit status: the submission's (RIGHT, WRONG,
  NOT_CHECKED), for a class RIGHT once every submission was checked (right or wrong)
  and NOT_CHECKED where some could not be; USAGE, INTERNAL."""
  folder, _, function = spec.rpartition(":")
  try:
    if os.path.isdir(folder):
      return _grade_class(folder, function, how)
    if how.csv:
      raise boundary.UsageError("--csv needs --grads=DIR:FUNCTION, a folder of "
                                "submissions; for one submission use --json or "
                                "--gradescope.")
    report = check_grads_isolated(spec, how.check)
    if how.gradescope:
      _write_json(how.gradescope, gradescope(report.as_dict()))
  except boundary.UsageError as e:
    return refused(USAGE, str(e), how.as_json)
  except Exception as e:  # pylint: disable=broad-except  (status 4, with JSON too)
    return refused(INTERNAL, f"internal error ({type(e).__name__}: "
                    f"{boundary.first_line(e)}): a bug in mlp_jax's gradcheck; please "
                    "report it", how.as_json)
  _print(json.dumps(report.as_dict(), indent=2) if how.as_json   # JSON: ASCII escapes
         else f"gradcheck of {spec}\n{report}")
  return report.status


def _grade_class(folder: str, function: str, how: Grading) -> int:
  """Every submission of `folder`, in parallel (one process each, up to the cores)."""
  if how.gradescope:
    raise boundary.UsageError("--gradescope writes one submission's results.json; give "
                              "--grads=FILE.py:FUNCTION (for a folder, use --csv).")
  found = submissions(folder, function)
  if not found:
    raise boundary.UsageError(f"--grads: {folder} holds no submission (a subfolder or a "
                              ".py file).")
  check = lambda one: check_grads_isolated(one, how.check).as_dict()
  unchecked = lambda why: Report(False, {}, [], NOT_CHECKED, why, how.check.seed).as_dict()
  reports = grade_all(found, check, unchecked, os.cpu_count() or 1)
  if how.csv:
    write_csv(how.csv, reports)
  from mlp_jax import __version__  # pylint: disable=g-import-not-at-top
  _print(json.dumps({"version": __version__, "submissions": reports}, indent=2)
         if how.as_json else "\n".join(summary_line(name, report)
                                       for name, report in reports.items()))
  return NOT_CHECKED if any(r["status"] == NOT_CHECKED for r in reports.values()) else RIGHT


def _print(text: str) -> None:
  """`text` on stdout, whatever its encoding (an ASCII or Latin-1 stdout escapes)."""
  with contextlib.suppress(AttributeError, ValueError):
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
  print(text)


def _write_json(path: str, value: Any) -> None:
  from mlp_jax.base import files  # pylint: disable=g-import-not-at-top
  with files.atomic_file(path, "w") as f:
    json.dump(value, f, indent=2)


def refused(status: int, message: str, as_json: bool, said: bool = False) -> int:
  """A usage error or gradcheck's own: its line on stderr (unless `said`), and with
  --json the object."""
  if not said:
    print(f"error: {boundary.escaped(message)}", file=sys.stderr)
  if as_json:   # the one shape of a report, with nothing checked
    print(json.dumps(Report(False, {}, [], status, message).as_dict(), indent=2))
  return status
