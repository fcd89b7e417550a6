"""TensorBoard event files of scalars, written directly: no TensorFlow, torch or protobuf.

An event file is a sequence of TFRecords, each an `Event` protocol buffer. A scalar needs
five of its fields, so this module encodes them by hand (tensorboard/compat/proto):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
              Summary summary = 5; }
    Summary { repeated Value value = 1; }     Value { string tag = 1; float simple_value = 2; }

    TFRecord: uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

The first event of a file names its version, "brain.Event:2", as TensorFlow's own writer does.
"""

import os
import socket
import struct
import time
from typing import Optional

from mlp_jax.base import files


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)   # Castagnoli, reflected
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, the checksum TFRecords use."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotated right by 15 bits, plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord holding `data`."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _bytes_field(number: int, value: bytes) -> bytes:
  return _field(number, 2) + _varint(len(value)) + value


def event(wall_time: float, step: int = 0, scalars: Optional[dict[str, float]] = None,
          file_version: Optional[str] = None) -> bytes:
  """An Event, serialized: at `step`, the `scalars` {tag: value} (stored as float32)."""
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5)
                     + struct.pack("<f", value)) for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


class EventFile:
  """A new event file in `logdir` (created if absent); `add(step, scalars)` appends one
  event, written through to the file at once."""

  def __init__(self, logdir: str):
    files.make_dirs(logdir)
    now = time.time()
    self.path = os.path.join(
        logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        f".{time.monotonic_ns()}")
    self._fd = files.open_for_update(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                     | os.O_EXCL)
    self._write(event(now, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    os.write(self._fd, tfrecord(data))

  def add(self, step: int, scalars: dict[str, float]) -> None:
    """Appends the `scalars` {tag: value} of `step`."""
    self._write(event(time.time(), step, scalars))

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1
