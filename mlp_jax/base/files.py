"""Every file mlp_jax writes or reads, through a few functions that hold the guarantees.

Writing (the workdir, predict.py's --output):
    created, never followed   a file is opened with O_NOFOLLOW and, where it is new,
                              O_EXCL: a symlink (or any other non-file) where a file is
                              expected is refused in one line, never written through
    atomic                    a finished file is written to a fresh temporary twin
                              (.NAME.mlp_jax-partial-XXXXXXXX, created exclusively)
                              and renamed into place; a signal that stops the process
                              removes the twins being written (`remove_own_partials`),
                              and those a kill -9 leaves are removed at the next start
                              (`remove_stale_temporaries`: only twins of the names the
                              run writes, of this user; nothing else, whatever its name)
Reading (datasets, params.npz, predict.py's inputs):
    bounded                   only regular files are read (no /dev/zero, no pipe); an
                              .npz member is read by its exact name, its header's shape
                              checked against the member's real size and the memory
                              budget before anything is allocated

Both:
    trusted                   every path is checked before it is opened, written or
                              made: UnsafePath where another user could change a
                              component of it (check_trusted, base/trusted.py)

Permissions are the user's: new files get 0o666 and new directories 0o777, less the
umask, as `open` and `mkdir` would give them.
"""

import contextlib
import errno
import io
import os
import re
import stat
import tempfile
import zipfile
import zlib
from typing import IO, Any, Iterable, Iterator, NamedTuple, Optional, cast

import numpy as np

from mlp_jax.base import trusted
from mlp_jax.base.errors import escaped

# A temporary twin of NAME is .NAME.mlp_jax-partial-XXXXXXXX: this project's own mark.
TEMPORARY_MARK = ".mlp_jax-partial-"

# The temporary twins this process is writing now: removed by `remove_own_partials` when
# a signal ends the process at once (no `finally` runs then).
_PARTIALS: set[str] = set()


class UnsafePath(OSError):
  """A path that is not the plain file or directory it should be (a symlink, a device, a
  pipe); the message is one line naming it and the fix."""


def check_trusted(path: str) -> None:
  """UnsafePath, naming the component and who can write it, unless no other user can
  change what `path` names (base/trusted.py): every file this module reads or writes is
  checked so, each time."""
  why = trusted.why_untrusted(path)
  if why:
    raise UnsafePath(errno.EACCES, f"{escaped(path)}: {escaped(why)}, so another user "
                     f"could swap what mlp_jax reads or writes there; {trusted.FIX}", path)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def refuse_link(path: str) -> None:
  """UnsafePath if `path` is a symlink (dangling or not)."""
  if os.path.islink(path):
    raise UnsafePath(errno.ELOOP, f"{path} is a symbolic link, where mlp_jax writes a file "
                     "of its own; it never writes through a link: remove the link, or use "
                     "another --workdir", path)


def refuse_non_file(path: str) -> None:
  """UnsafePath unless `path` is absent or a regular file (checked without following a
  link there)."""
  refuse_link(path)
  try:
    mode = os.lstat(path).st_mode
  except FileNotFoundError:
    return
  if not stat.S_ISREG(mode):
    kind = "a directory" if stat.S_ISDIR(mode) else "a device, a pipe or a socket"
    raise UnsafePath(errno.EINVAL, f"{path} is {kind}, not a file: mlp_jax replaces only "
                     "a regular file; give another path", path)


def refuse_links_below(directory: str) -> None:
  """UnsafePath naming the first symlink, or anything but a directory or a regular file
  (a FIFO, a device, a socket), at any depth under `directory` (absent: nothing to
  check); links are listed, never followed."""
  for root, dirs, names in os.walk(directory):
    for name in sorted(dirs + names):
      path = os.path.join(root, name)
      refuse_link(path)
      if not stat.S_ISDIR(os.lstat(path).st_mode):
        refuse_non_file(path)


def open_for_update(path: str, flags: int, mode: int = 0o666) -> int:
  """os.open of `path` with O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC added (a file
  descriptor; a FIFO there never blocks the open) for a write in place; a symlink at
  `path` is UnsafePath, anything but a regular file there too, and so is a file with
  other hard links (the write would change it under its other names)."""
  check_trusted(path)
  try:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
  except OSError as e:
    if e.errno == errno.ELOOP:
      refuse_link(path)
    raise
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode):
    os.close(fd)
    raise UnsafePath(errno.EINVAL, f"{path} is not a regular file; remove it, or use "
                     "another --workdir", path)
  if info.st_nlink > 1:   # a write in place would change the file under its other names
    os.close(fd)
    raise UnsafePath(errno.EMLINK, f"{path} has other hard links, where mlp_jax writes a "
                     "file of its own; remove it, or use another --workdir", path)
  return fd


def append(path: str, text: str) -> None:
  """Appends `text` to the file at `path` (created if absent), never through a link."""
  fd = open_for_update(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  with os.fdopen(fd, "w") as f:
    f.write(text)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
  """A file object on a new temporary twin of `path` (created exclusively, in the same
  directory), renamed to `path` once the block has written it completely and flushed it
  to disk: a crash or a full disk never leaves a truncated `path` behind (the twin is
  removed). Only a regular file is replaced: a symlink at `path` is refused (UnsafePath;
  the rename would replace the link, not what it points to, but a link there is not
  this project's file), and so is a device, a FIFO, a socket or a directory."""
  check_trusted(path)
  refuse_non_file(path)
  directory, name = os.path.split(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}{TEMPORARY_MARK}", dir=directory or ".")
  _PARTIALS.add(tmp)
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    refuse_non_file(path)   # again: what is there now is what the rename replaces
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)
    _PARTIALS.discard(tmp)


def remove_own_partials() -> None:
  """Removes the temporary twins this process is writing (a signal's stop at once)."""
  for tmp in list(_PARTIALS):
    try:
      os.remove(tmp)
    except OSError:
      pass


def make_dirs(path: str, mode: int = 0o777) -> None:
  """os.makedirs(path, mode) where missing; UnsafePath unless `path` is then a
  directory; both where another user could change it (check_trusted: before, and again
  once made, as another user may make a missing one first in a shared directory)."""
  check_trusted(path)
  os.makedirs(path, mode, exist_ok=True)
  if not os.path.isdir(path):
    raise UnsafePath(errno.ENOTDIR, f"{path} is not a directory; remove it, or use "
                     "another path", path)
  check_trusted(path)


def move(source: str, target: str) -> None:
  """Renames `source` to `target` in the same file system, never over anything that is
  there (UnsafePath), never a copy."""
  if os.path.lexists(target):
    raise UnsafePath(errno.EEXIST, f"{target} exists; mlp_jax moves a file only to a "
                     "free name", target)
  os.rename(source, target)


def remove_stale_temporaries(directory: str, names: Iterable[str]) -> list[str]:
  """Removes the temporary twins a killed write left in `directory` of the files
  `names` (.NAME.mlp_jax-partial-XXXXXXXX, regular files of this user); only while this
  process holds the directory (the workdir's lock). Nothing else is touched, whatever
  its name. Returns their names."""
  twin = re.compile(rf"\.({'|'.join(map(re.escape, names))}){re.escape(TEMPORARY_MARK)}"
                    r"[a-z0-9_]{8}")   # mkstemp's 8 random characters
  stale = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if twin.fullmatch(name):
      info = os.lstat(path)
      if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
        os.remove(path)
        stale.append(name)
  return stale


# ----------------------------------------------------------------------------- reading


def open_regular(path: str, follow: bool = True) -> IO[bytes]:
  """The regular file at `path` for reading (binary), opened without blocking (a FIFO
  never hangs the open) and, with follow=False, without following a link there; what
  was opened is checked on its descriptor: UnsafePath unless a regular file, and where
  another user could change what `path` names (check_trusted)."""
  flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
  check_trusted(path)
  try:
    fd = os.open(path, flags)
  except OSError as e:
    if e.errno == errno.ELOOP and not follow:
      refuse_link(path)
    raise
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device or a pipe?)"
    raise UnsafePath(errno.EINVAL, f"{path} is {kind}; give a file", path)
  os.set_blocking(fd, True)
  return os.fdopen(fd, "rb")


def open_directory(path: str) -> int:
  """A descriptor of the directory at `path`, opened without following a link there and
  without blocking; OSError if it is not a directory."""
  return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC)


class NpyHeader(NamedTuple):
  """What an .npy member's header declares."""

  shape: tuple[int, ...]
  dtype: np.dtype
  fortran: bool

  @property
  def nbytes(self) -> int:
    """The bytes its shape and dtype declare (shape (N, ...) × itemsize)."""
    return int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize


def read_npy_header(f: IO[bytes]) -> NpyHeader:
  """The header of the .npy stream `f`, leaving `f` at the first data byte."""
  version = np.lib.format.read_magic(f)
  read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
          else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = read(f)
  return NpyHeader(tuple(int(s) for s in shape), dtype, bool(fortran))


def npy_problem(header: NpyHeader, stored: int, available: int, max_bytes: int
                ) -> Optional[str]:
  """What is wrong with an array whose .npy header is `header`, `stored` bytes of data
  behind it and `available` of the memory budget `max_bytes` left (None: nothing)."""
  if header.dtype.hasobject:
    return ("holds Python objects; only plain numeric arrays are loaded (pickles are "
            "never unpickled)")
  if header.nbytes > stored:
    return (f"declares shape {header.shape} ({header.nbytes:,} bytes) but holds "
            f"{stored:,} bytes: the file is truncated or corrupt")
  if header.nbytes > available:
    return (f"declares shape {header.shape} ({header.nbytes:,} bytes), more than the "
            f"{available:,} bytes of memory this reader may still use ({max_bytes:,} in "
            "all: the memory budget; raise it with --memory_budget=GiB or "
            "$MLP_JAX_MEMORY_BUDGET)")
  return None


def _open_to_read(path: str, kind: str, error: type) -> IO[bytes]:
  """open_regular(path), its problems one line of `error` naming the file's `kind`."""
  try:
    return open_regular(path)
  except UnsafePath as e:
    raise error(f"{e.strerror}.") from None
  except OSError as e:
    raise error(f"{path} is not a readable {kind} ({_reason(e)}).") from None


def read_npy(path: str, max_bytes: int, error: type = ValueError) -> np.ndarray:
  """The array of the .npy file at `path`, checked as an .npz member is (NpzArchive):
  no objects, a shape its file holds, within `max_bytes`. `error`, one line."""
  with _open_to_read(path, ".npy", error) as f:
    try:
      header = read_npy_header(f)
    except Exception as e:  # pylint: disable=broad-except
      raise error(f"{path} is not a readable .npy ({_reason(e)}).") from None
    stored = os.fstat(f.fileno()).st_size - f.tell()
    problem = npy_problem(header, stored, max_bytes, max_bytes)
    if problem:
      raise error(f"{path} {problem}.")
    data = f.read(header.nbytes)
  return np.frombuffer(data, header.dtype).reshape(header.shape,
                                                   order="F" if header.fortran else "C")


class NpzArchive:
  """An .npz opened for bounded reading: members by their exact name NAME.npy.

      with NpzArchive(path, budget.memory_budget(), error=ValueError) as npz:
        npz.names                 # the arrays it holds ("x_train", ...)
        header = npz.header("x")  # shape, dtype: checked, nothing read yet
        x = npz.read("x")         # the whole array, after the checks
        for rows in npz.read_rows("x", 4096): ...   # or in slices of rows

  Every member's header is checked when it is opened: no object arrays (nothing is
  unpickled), a declared size that its member's real size can hold, and, with what
  `read` has already read from the archive, at most `max_bytes` (one budget for the
  whole read: base/budget.py's, or less). Only the members asked for are read, each once, straight into its
  array. Problems raise `error` with one line.
  """

  def __init__(self, path: str, max_bytes: int, error: type = ValueError):
    self.path, self.error = path, error
    self.max_bytes = max_bytes
    self.used = 0     # bytes `read` has allocated so far
    self._file: Optional[IO[bytes]] = None
    self._zip: Optional[zipfile.ZipFile] = None

  def __enter__(self) -> "NpzArchive":
    self._file = _open_to_read(self.path, ".npz", self.error)
    try:
      self._zip = zipfile.ZipFile(self._file)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
      self._file.close()
      raise self.error(f"{self.path} is not a readable .npz ({_reason(e)}).") from None
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._zip is not None:
      self._zip.close()
    if self._file is not None:
      self._file.close()

  @property
  def names(self) -> list[str]:
    """The arrays it holds: its members NAME.npy, as NAME."""
    assert self._zip is not None
    return [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]

  def _open(self, name: str) -> tuple[IO[bytes], NpyHeader]:
    assert self._zip is not None
    if name not in self.names:
      raise self.error(f"{self.path} holds no array {name}; it holds "
                       f"{', '.join(self.names) or 'no arrays'}.")
    info = self._zip.getinfo(name + ".npy")
    try:   # zipfile raises RuntimeError on an encrypted member, numpy several kinds
      f = self._zip.open(info)
    except Exception as e:  # pylint: disable=broad-except
      raise self.error(f"{self.path}: {name} cannot be read ({_reason(e)}).") from None
    try:
      header = read_npy_header(f)
    except Exception as e:  # pylint: disable=broad-except
      f.close()
      raise self.error(f"{self.path}: {name} is not a readable .npy ({_reason(e)}).") from None
    problem = npy_problem(header, info.file_size, self.max_bytes - self.used,
                          self.max_bytes)
    if problem:
      f.close()
      raise self.error(f"{self.path}: {name} {problem}.")
    return f, header

  def header(self, name: str) -> NpyHeader:
    """`name`'s checked header (the member is opened, nothing of its data read)."""
    f, header = self._open(name)
    f.close()
    return header

  def read_rows(self, name: str, rows: int) -> Iterator[np.ndarray]:
    """`name` in slices of at most `rows` rows along its first axis (one slice for a
    0-d array); only a slice is ever in memory."""
    f, header = self._open(name)
    with f:
      if header.fortran and len(header.shape) > 1:
        raise self.error(f"{self.path}: {name} is stored in Fortran order; save it with "
                         "np.savez from a C-ordered array (np.ascontiguousarray).")
      shape = header.shape or (1,)
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * header.dtype.itemsize
      for start in range(0, shape[0], max(rows, 1)):
        count = min(rows, shape[0] - start)
        buffer = self._read_exactly(f, count * row_bytes, name)
        chunk = np.frombuffer(buffer, header.dtype).reshape((count, *shape[1:]))
        yield chunk.reshape(header.shape) if not header.shape else chunk
      if not shape[0]:
        yield np.zeros(header.shape, header.dtype)

  def _read_exactly(self, f: IO[bytes], size: int, name: str) -> bytes:
    try:
      buffer = f.read(size)
    except (OSError, zlib.error, EOFError, zipfile.BadZipFile) as e:
      raise self.error(f"{self.path}: {name} cannot be read ({_reason(e)}).") from None
    if len(buffer) != size:
      raise self.error(f"{self.path}: {name} is truncated ({len(buffer):,} of {size:,} "
                       "bytes).")
    return buffer

  def read(self, name: str) -> np.ndarray:
    """The whole array `name`, read after its header's checks straight into its array
    (no second copy), counted against the archive's budget."""
    f, header = self._open(name)
    with f:
      array = np.empty(header.shape, header.dtype, order="F" if header.fortran else "C")
      view = array.reshape(-1, order="A").view(np.uint8).data   # its bytes, no copy
      reader = cast(io.BufferedIOBase, f)   # a zip member or a file: both read into
      done = 0
      try:
        while done < header.nbytes and (count := reader.readinto(view[done:])):
          done += count
      except (OSError, zlib.error, EOFError, zipfile.BadZipFile) as e:
        raise self.error(f"{self.path}: {name} cannot be read ({_reason(e)}).") from None
      if done != header.nbytes:
        raise self.error(f"{self.path}: {name} is truncated ({done:,} of "
                         f"{header.nbytes:,} bytes).")
    self.used += header.nbytes
    return array


def _reason(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:120]}" if text else type(e).__name__
