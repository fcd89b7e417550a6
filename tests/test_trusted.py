"""Trusted paths (mlp_jax/base/trusted.py): every component × every fault another user
could use is named, and the layouts no one else can change pass."""

import os
import shutil

import pytest

from mlp_jax.base import trusted

from conftest import run_cli

OTHER = 65534   # "nobody"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's files "
                                "needs root")

# What each fault does to a component, and the words that name it.
FAULTS = {
    "other_owner": (lambda p: os.chown(p, OTHER, -1), "belongs to nobody (uid 65534)"),
    "group_writable": (lambda p: os.chmod(p, 0o775), "other users can write"),
    "world_writable": (lambda p: os.chmod(p, 0o757), "other users can write"),
}


def _chain(tmp_path):
  """tmp_path/a/b/c/file, each made by this user (0755, the file 0644)."""
  c = tmp_path / "a" / "b" / "c"
  c.mkdir(parents=True)
  (c / "file").write_text("x")
  for p in (tmp_path / "a", tmp_path / "a" / "b", c):
    os.chmod(p, 0o755)
  os.chmod(c / "file", 0o644)
  return [tmp_path / "a", tmp_path / "a" / "b", c, c / "file"]


@needs_root
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("index", range(4))
def test_every_component_with_every_fault_is_named(tmp_path, index, fault):
  chain = _chain(tmp_path)
  make, words = FAULTS[fault]
  make(chain[index])
  for target in (chain[-1], chain[-1].parent / "not_yet" / "made"):
    if index == 3 and target != chain[-1]:
      continue    # the file is not on the second path
    why = trusted.why_untrusted(str(target))
    assert why is not None and str(chain[index]) in why and words in why, why


def test_a_path_of_this_users_own_is_trusted(tmp_path):
  chain = _chain(tmp_path)
  assert trusted.why_untrusted(str(chain[-1])) is None
  assert trusted.why_untrusted(str(chain[2] / "new" / "deeper")) is None
  assert trusted.why_untrusted(str(chain[2] / ".." / "c" / "." / "file")) is None


@needs_root
def test_a_sticky_directory_counts_only_for_what_this_user_owns_in_it(tmp_path):
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o1777)
  mine, theirs = shared / "mine", shared / "theirs"
  mine.mkdir(mode=0o700)
  theirs.mkdir(mode=0o700)
  os.chown(theirs, OTHER, OTHER)
  assert trusted.why_untrusted(str(mine / "w")) is None
  assert trusted.why_untrusted(str(shared / "not_yet")) is None   # made by this user
  why = trusted.why_untrusted(str(theirs / "w"))
  assert why and str(shared) in why and "belongs to nobody" in why
  os.chmod(shared, 0o777)   # not sticky: anyone may rename `mine` away
  why = trusted.why_untrusted(str(mine / "w"))
  assert why and f"other users can write {shared}" in why


@needs_root
def test_a_link_is_followed_and_its_target_checked_too(tmp_path):
  chain = _chain(tmp_path)
  link = tmp_path / "link"
  link.symlink_to(chain[2])
  assert trusted.why_untrusted(str(link / "file")) is None
  os.chmod(chain[1], 0o777)           # the target's parent, not on the link's own path
  why = trusted.why_untrusted(str(link / "file"))
  assert why and str(chain[1]) in why
  os.chmod(chain[1], 0o755)
  os.lchown(link, OTHER, OTHER)       # the link itself: its owner may point it elsewhere
  why = trusted.why_untrusted(str(link / "file"))
  assert why and f"{link} belongs to nobody" in why
  relative = tmp_path / "relative"
  relative.symlink_to("a/b/../b/c")   # a relative target, with '..', from the link's place
  assert trusted.why_untrusted(str(relative / "file")) is None


def test_a_loop_of_links_is_a_reason_not_a_crash(tmp_path):
  (tmp_path / "x").symlink_to(tmp_path / "y")
  (tmp_path / "y").symlink_to(tmp_path / "x")
  assert "symbolic links" in trusted.why_untrusted(str(tmp_path / "x" / "f"))


# Every path a run takes × every fault of the directory holding it: one line naming that
# directory, before anything is read or made there.
PARENT_FAULTS = {
    "other_owner": lambda p: os.chown(p, OTHER, OTHER),
    "group_writable": lambda p: os.chmod(p, 0o775),
    "world_writable": lambda p: os.chmod(p, 0o777),
}


def _entry_flags(entry, shared, npz_path):
  """The flags that give the run a path in `shared` for `entry` (files made there)."""
  if entry == "flagfile":
    (shared / "run.flags").write_text("--epochs=1\n")
    return [f"--flagfile={shared / 'run.flags'}"]
  if entry == "dataset":
    shutil.copy(npz_path, shared / "d.npz")
    return [f"--dataset=npz:{shared / 'd.npz'}"]
  if entry == "data_dir":
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
      (shared / name).write_bytes(b"")
    return ["--dataset=mnist", f"--data_dir={shared}"]
  return [f"--{entry}={shared / 'new'}"]   # workdir, profile_dir, compilation_cache


@pytest.mark.parametrize("fault", sorted(PARENT_FAULTS))
@pytest.mark.parametrize("entry", ["workdir", "flagfile", "dataset", "data_dir",
                                   "profile_dir", "compilation_cache"])
def test_every_path_of_a_run_under_another_users_reach_is_one_line(entry, fault, tmp_path,
                                                                    tiny_npz):
  if fault == "other_owner" and os.geteuid() != 0:
    pytest.skip("only root can give a directory to another user")
  shared = tmp_path / "shared"
  shared.mkdir()
  flags = _entry_flags(entry, shared, tiny_npz.partition(":")[2])
  before = sorted(os.listdir(shared))
  PARENT_FAULTS[fault](shared)
  code, stderr = run_cli("--epochs=1", "--noprogress", "--noplots",
                         f"--workdir={tmp_path / 'run'}", *flags)
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code != 0 and len(lines) == 1, stderr
  assert str(shared) in lines[0] and ("nobody (uid 65534)" in lines[0] or
                                      "other users can write" in lines[0]), lines[0]
  assert sorted(os.listdir(shared)) == before
