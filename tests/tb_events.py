"""Reads the scalars that tensorboardX wrote (tests only)."""
import glob
import os
import struct


def read_scalars(event_dir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the TFRecord event files in event_dir; later files win."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 12 + length > len(data):
        break  # a record cut short by a kill
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out
