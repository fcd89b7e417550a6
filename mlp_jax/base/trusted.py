"""Trusted paths: a path mlp_jax writes, reads its settings from, or runs programs from is
used only when no other user can change what it names (as sshd's StrictModes and sudo
check a path).

    owner      every existing component of the path (each ancestor, the path itself, and
               each symbolic link on the way, with the chain of what it points to) is
               owned by root or by this user
    writers    none of them is writable by the group or others; a sticky directory (like
               /tmp) counts only where the next component is root's or this user's own,
               which no one else may then rename or delete

Once a path passes, another user cannot swap any of its directories for a link or move
another directory in its place, so resolving the path again later (orbax's saves and
deletes, JAX's cache, TensorBoard's writer) reaches the same files: what remains to
watch is this user's own processes (checked by the workdir's identity, run/workdir.py).
"""

import os
import pwd
import stat
from typing import Optional

FIX = ("make it yours and writable by you alone (chown, chmod go-w), or use a path under "
       "a directory only you can change")


def _user(uid: int) -> str:
  try:
    return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
  except KeyError:
    return f"uid {uid}"


def _trusted_owner(uid: int) -> bool:
  return uid in (0, os.geteuid())


LAST = -1   # `_who_else_changes`'s child_uid for the path's own last component


def _who_else_changes(path: str, st: os.stat_result, child_uid: Optional[int]
                      ) -> Optional[str]:
  """Why another user can change `path` (its lstat `st`; child_uid: the owner of the
  next component inside it, None where this user is to make it, LAST where `path` is
  the last component)."""
  if not _trusted_owner(st.st_uid):
    return f"{path} belongs to {_user(st.st_uid)}"
  if stat.S_ISLNK(st.st_mode) or not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return None
  mode = f"mode {stat.S_IMODE(st.st_mode):o}"
  if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and child_uid != LAST:
    if child_uid is None or _trusted_owner(child_uid):
      return None
    return (f"{path} is a shared directory ({mode}) and what it holds there belongs to "
            f"{_user(child_uid)}")
  return f"other users can write {path} ({mode})"


def why_untrusted(path: str, _depth: int = 0) -> Optional[str]:
  """Why another user could change what `path` names (the component and who can write
  it), or None where no one but root and this user can. Components that do not exist
  yet are this user's to make; the check stops there (check again once they are made:
  under a sticky directory another user may make one first)."""
  if _depth > 40:
    return f"{path} has too many levels of symbolic links"
  parts = [p for p in os.path.join(os.getcwd(), path).split(os.sep) if p not in ("", ".")]
  current, st = os.sep, os.lstat(os.sep)
  for part in parts:
    if part == "..":   # `current` holds no link (each is resolved), so its parent is exact
      current = os.path.dirname(current)
      st = os.lstat(current)
      continue
    following = os.path.join(current, part)
    try:
      child: os.stat_result = os.lstat(following)
    except (FileNotFoundError, NotADirectoryError):
      return _who_else_changes(current, st, None)
    why = _who_else_changes(current, st, child.st_uid)
    if why:
      return why
    if stat.S_ISLNK(child.st_mode):
      if not _trusted_owner(child.st_uid):
        return f"{following} belongs to {_user(child.st_uid)}"
      target = os.path.join(current, os.readlink(following))
      why = why_untrusted(target, _depth + 1)
      if why:
        return why
      following = os.path.realpath(target)
      try:
        child = os.stat(following)
      except (FileNotFoundError, NotADirectoryError):
        return None
    current, st = following, child
  return _who_else_changes(current, st, LAST)
