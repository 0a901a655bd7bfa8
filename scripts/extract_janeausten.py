"""Extracts Jane Austen's six novels from the r-cran-janeaustenr package's R data file.

Rdata.rdb is a sequence of records: a big-endian u32 (uncompressed length) followed by a
zlib stream of R's XDR serialization. Each novel is one character vector (STRSXP, one
element per printed line) whose elements are CHARSXPs: a flags word with type 9, a length
(-1 = NA) and the UTF-8 bytes. The .rdx index gives the record names (object order).
"""
import struct
import sys
import zlib
from pathlib import Path

NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
STRSXP, CHARSXP = 16, 9


def records(blob):
    pos = 0
    while pos < len(blob):
        pos += 4  # uncompressed length, implied by the stream
        inflater = zlib.decompressobj()
        data = inflater.decompress(blob[pos:])
        yield data
        pos = len(blob) - len(inflater.unused_data)


def character_vector(data):
    if data[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    pos = 2 + 12  # format version, R version, minimal R version
    (nelen,) = struct.unpack(">i", data[pos:pos + 4])
    pos += 4 + nelen  # native encoding name
    (flags, length) = struct.unpack(">Ii", data[pos:pos + 8])
    if flags & 0xFF != STRSXP:
        raise ValueError(f"expected a character vector, found R type {flags & 0xFF}")
    pos += 8
    lines = []
    for _ in range(length):
        (flags, n) = struct.unpack(">Ii", data[pos:pos + 8])
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"expected a string, found R type {flags & 0xFF}")
        pos += 8
        if n < 0:
            lines.append("")
            continue
        lines.append(data[pos:pos + n].decode("utf-8"))
        pos += n
    return lines


def main(rdb, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vectors = list(records(Path(rdb).read_bytes()))
    if len(vectors) != len(NOVELS):
        raise SystemExit(f"{rdb}: expected {len(NOVELS)} novels, found {len(vectors)} records")
    for name, data in zip(NOVELS, vectors):
        text = "\n".join(character_vector(data)) + "\n"
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"  {name}.txt: {len(text.split())} words")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
