"""TensorBoard scalar and hparams events without TensorFlow.

An events file is a TFRecord stream of ``Event`` protocol buffers. Scalars need
only four fields and the hparams plugin's session start a few more, so this
module encodes them by hand rather than importing TensorFlow (tens of seconds of
start-up) into every run.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from rigl_jax import paths


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


SESSION_START = 1  # SessionLog.SessionStatus.START
_WRITERS = itertools.count()


def _event(step: int, *, file_version: str | None = None, scalars=None,
           session_status: int | None = None) -> bytes:
  # Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5, session_log=7.
  out = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if session_status is not None:  # SessionLog: status=1 (enum)
    out += _length_delimited(7, _field(1, 0, _varint(session_status)))
  if scalars:
    # Summary.value=1 -> Value: tag=1 (string), simple_value=2 (float).
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) +
                          _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    out += _length_delimited(5, values)
  return out


def _double(number: int, value: float) -> bytes:
  return _field(number, 1, struct.pack("<d", float(value)))


def _hparams_summary(hparams: dict, group_name: str) -> bytes:
  """A Summary holding the hparams plugin's SessionStartInfo (what TensorBoard's
  HParams tab reads; its metrics are inferred from the run's scalars)."""
  entries = b""
  for name in sorted(hparams):
    value = hparams[name]
    # google.protobuf.Value: number_value=2 (double), string_value=3, bool_value=4.
    if isinstance(value, bool):
      encoded = _field(4, 0, _varint(int(value)))
    elif isinstance(value, (int, float)):
      encoded = _double(2, value)
    else:
      encoded = _length_delimited(3, str(value).encode())
    # map<string, Value> entry: key=1, value=2.
    entries += _length_delimited(1, _length_delimited(1, name.encode()) +
                                 _length_delimited(2, encoded))
  # SessionStartInfo: hparams=1, group_name=4, start_time_secs=5.
  start_info = entries + _length_delimited(4, group_name.encode()) + _double(5, time.time())
  content = _length_delimited(3, start_info)  # HParamsPluginData.session_start_info=3
  # SummaryMetadata.plugin_data=1 -> PluginData: plugin_name=1, content=2.
  metadata = _length_delimited(1, _length_delimited(1, b"hparams") +
                               _length_delimited(2, content))
  # The plugin's placeholder tensor: TensorProto dtype=1 (DT_FLOAT), shape=2 with one
  # dim of size 0.
  tensor = _field(1, 0, _varint(1)) + _length_delimited(2, _length_delimited(2, b""))
  value = (_length_delimited(1, b"_hparams_/session_start_info") +
           _length_delimited(8, tensor) + _length_delimited(9, metadata))
  return _length_delimited(1, value)


def _record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data +
          struct.pack("<I", _masked_crc(data)))


class ScalarWriter:
  """Appends scalar summaries to ``logdir/events.out.tfevents.*``.

  A writer started at ``start_step > 0`` (a resumed run) first writes a SessionLog
  START at that step: TensorBoard then drops the points at or after it that an
  earlier, interrupted process wrote, so a resumed run shows no stale points.
  """

  def __init__(self, logdir: str, start_step: int = 0):
    paths.makedirs(logdir)
    # Unique per writer, even for two writers of one process in the same second.
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_WRITERS)}")
    self.path = paths.join(logdir, name)
    header = _record(_event(0, file_version="brain.Event:2"))
    if start_step > 0:
      header += _record(_event(int(start_step), session_status=SESSION_START))
    paths.append(self.path, header)

  def write_hparams(self, hparams: dict, group_name: str = "") -> None:
    """The run's hyperparameters for TensorBoard's HParams tab: numbers, bools and
    strings (anything else is written as its ``str``)."""
    event = (_field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(0)) +
             _length_delimited(5, _hparams_summary(hparams, group_name)))
    paths.append(self.path, _record(event))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    paths.append(self.path, _record(_event(int(step), scalars=scalars)))
