"""Read the plugin records a serialized TensorRT plan carries, for tests only.

A CPU cannot deserialize a plan, so the records are read from its bytes. TensorRT's layout is
undocumented, so this reads only what is unambiguous: how often each `name\\0` of our plugins
occurs, and every serialized field, found as `u32 name length, name\\0, u32 type, u32 byte
length, bytes` for our field names. Two plans carry the same plugin records when both agree.
"""
from __future__ import annotations

import re
import struct
from collections import Counter

from tda_export.ops.contract import PLUGIN_FIELDS


def plugin_records(plan: bytes, names=("SparseGatedMLP", "SelectActive"),
                   fields=PLUGIN_FIELDS["SparseGatedMLP"]) -> dict:
    counts = Counter(m.group(1).decode() for m in re.finditer(
        b"(" + b"|".join(n.encode() for n in names) + b")\\x00", plan))
    found = []
    for f in fields:
        key = struct.pack("<I", len(f) + 1) + f.encode() + b"\0"
        for m in re.finditer(re.escape(key), plan):
            ftype, flen = struct.unpack_from("<II", plan, m.end())
            found.append((f, ftype, plan[m.end() + 8:m.end() + 8 + flen]))
    return {"names": dict(counts), "fields": dict(Counter(found))}
