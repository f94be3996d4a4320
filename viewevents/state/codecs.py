"""Fixed-width number codecs for RocksDB keys and values, named by byte order and width.

Keys use big-endian numbers so that RocksDB's byte order is numeric order. Values that numpy
reads in bulk are little-endian. The framework's own values (offsets, watermarks, de-duplication
days) are big-endian, as they have always been on disk.
"""

from __future__ import annotations

import struct

BIG_U16 = struct.Struct(">H")
BIG_U32 = struct.Struct(">I")
BIG_U64 = struct.Struct(">Q")
BIG_I64 = struct.Struct(">q")
LITTLE_I64 = struct.Struct("<q")
