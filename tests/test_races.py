"""Harnesses for "no one else reaches in" (docs/reliability.md): while a real run goes,

    races        this user's own swaps: each path the run touches, at random moments,
                 replaced by a link to a victim, a directory or a file, then put back
    second user  another uid (made for the test) plants, swaps and chmods along every
                 directory of a trusted workdir's path, and of the run's workdir

and on every victim, "nothing of another's read, written or deleted" is asserted: its
files' bytes, names and modification times are as they were. Slow: real processes.
"""

import os
import pathlib
import random
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import runner_command, wait_for_epochs

pytestmark = pytest.mark.slow

ATTACKER = 64123   # a uid no account has: "another user" for the second-user harness


def _victim(root):
  """Another's files (a run's checkpoint steps, a metrics file, a picture) and their
  listing: {relative path: (bytes, mtime_ns)}."""
  for relative, content in (("1/data", b"step 1"), ("2/data", b"step 2"),
                            ("metrics.jsonl", b'{"epoch": 1}\n'), ("curves.png", b"png")):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
  return _listing(root)


def _listing(root):
  return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# What the run touches in its workdir, each swapped by the race harness.
TOUCHED = ("metrics.jsonl", "checkpoints", "tensorboard", "config.json", ".lock",
           "curves.png", "params.npz")
FORMS = ("link_to_victim_dir", "link_to_victim_file", "directory", "file")


def _swap(path, form, victim):
  """Moves `path` aside (if there) and puts `form` in its place; returns how to undo."""
  aside = path.with_name(path.name + ".aside")
  moved = os.path.lexists(path)
  if moved:
    os.rename(path, aside)
  if form == "link_to_victim_dir":
    os.symlink(victim, path)
  elif form == "link_to_victim_file":
    os.symlink(victim / "metrics.jsonl", path)
  elif form == "directory":
    path.mkdir()
  else:
    path.write_bytes(b"planted")

  def undo():
    if os.path.islink(path) or path.is_file():
      path.unlink()
    elif path.is_dir():
      shutil.rmtree(path)
    if moved:
      os.rename(aside, path)
  return undo


SWAPS = 100   # swaps in all, over as many runs as they stop (each stops in one line)


def test_races_swapping_every_path_the_run_touches_reach_no_victim(tiny_npz, tmp_path):
  victim = tmp_path / "victim"
  before = _victim(victim)
  rng, swaps, runs = random.Random(0), 0, 0
  while swaps < SWAPS and runs < 30:
    runs += 1
    work = tmp_path / f"w{runs}"
    process = subprocess.Popen(
        runner_command(tiny_npz, work, "--epochs=400", "--checkpoint_seconds=0", "--plots"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epochs(work, process, 2)
    while process.poll() is None and swaps < SWAPS:
      undo = _swap(work / rng.choice(TOUCHED), rng.choice(FORMS), victim)
      time.sleep(rng.uniform(0, 0.02))
      try:
        undo()
      except OSError:
        pass   # the run removed or replaced it meanwhile: the next swap goes on
      swaps += 1
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert _listing(victim) == before, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, stderr
  assert swaps == SWAPS, (swaps, runs)


# The attacker's Python: the system's, which another uid may run (this one may be under
# root's home).
ATTACKER_PYTHON = "/usr/bin/python3"


def _as_attacker(code, *args):
  """Runs Python `code` as ATTACKER (util-linux's setpriv: no fork of this process,
  which runs JAX's threads); returns its stdout."""
  return subprocess.run(["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}",
                         "--clear-groups", ATTACKER_PYTHON, "-I", "-c", code,
                         *map(str, args)],
                        capture_output=True, text=True, timeout=120, check=True).stdout


# The attacker's moves on a directory D of the path: each must fail (EACCES or EPERM).
ATTACK = """
import os, sys, time
targets, stop = sys.argv[1:-1], sys.argv[-1]
tried = done = 0
while not os.path.exists(stop):
  for d in targets:
    for move in (lambda: os.rename(d, d + ".stolen"),
                 lambda: os.symlink("/tmp", os.path.join(d, "planted")),
                 lambda: os.mkdir(os.path.join(d, "planted_dir")),
                 lambda: os.chmod(d, 0o777),
                 lambda: open(os.path.join(d, "metrics.jsonl"), "a").close(),
                 lambda: os.unlink(os.path.join(d, "params.npz")),
                 lambda: os.rename(os.path.join(d, "checkpoints"), d + "/gone")):
      tried += 1
      try:
        move()
        done += 1
      except OSError:
        pass
  time.sleep(0.001)
print(tried, done)
"""


@pytest.fixture
def shared_tmp():
  """A directory under /tmp that every user can reach (pytest's tmp_path is 0700)."""
  path = pathlib.Path(tempfile.mkdtemp(prefix="mlp_jax_races_"))
  os.chmod(path, 0o755)
  yield path
  shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(ATTACKER_PYTHON)
                    or not shutil.which("setpriv"),
                    reason="running as another uid needs root, setpriv and a Python it may run")
def test_a_second_user_moving_along_a_trusted_path_reaches_nothing(tiny_npz, shared_tmp):
  """The run's workdir under a trusted path (this user's, readable by all): the
  attacker's plants, swaps and chmods on every directory of it, for the whole run, all
  fail; the run finishes, and the attacker's own files beside it are untouched."""
  tmp_path = shared_tmp
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  before = _victim(theirs)
  for path in [theirs, *theirs.rglob("*")]:
    os.chown(path, ATTACKER, ATTACKER)
  work = tmp_path / "run" / "w"
  stop = tmp_path / "stop"
  targets = [tmp_path, tmp_path / "run", work, work / "checkpoints", work / "tensorboard"]
  attacker = threading.Thread(target=lambda: result.append(
      _as_attacker(ATTACK, *targets, stop)))
  result = []
  process = subprocess.Popen(runner_command(tiny_npz, work, "--epochs=60",
                                            "--checkpoint_seconds=0"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  attacker.start()
  _, stderr = process.communicate(timeout=300)
  stop.write_text("")
  attacker.join(timeout=120)
  tried, done = map(int, result[0].split())
  assert process.returncode == 0, stderr
  assert tried > 100 and done == 0, (tried, done)
  assert _listing(theirs) == {k: v for k, v in before.items()}


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
@pytest.mark.parametrize("fault", ["owns_a_parent", "parent_writable_by_all",
                                   "their_entry_in_a_sticky_directory"])
def test_a_second_users_hold_on_the_path_refuses_the_run_before_it_touches_anything(
    tiny_npz, tmp_path, fault):
  """Where the attacker could move a directory of the path, the run is refused in one
  line at its start: nothing made there, the attacker's files as they were."""
  shared = tmp_path / "shared"
  shared.mkdir()
  theirs = shared / "theirs"
  theirs.mkdir()
  before = _victim(theirs)
  work = shared / "w"
  if fault == "owns_a_parent":
    os.chown(shared, ATTACKER, ATTACKER)
  elif fault == "parent_writable_by_all":
    os.chmod(shared, 0o777)
  else:
    os.chmod(shared, 0o1777)
    os.chown(theirs, ATTACKER, ATTACKER)
    work = theirs / "w"
  result = subprocess.run(runner_command(tiny_npz, work, "--epochs=2"),
                          capture_output=True, text=True, timeout=120)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0 and len(lines) == 1, result.stderr
  assert str(shared) in lines[0] and not os.path.exists(work)
  assert _listing(theirs) == before
