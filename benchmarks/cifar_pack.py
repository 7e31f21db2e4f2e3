"""CIFAR-10's JPEG files in one file, to take them to a machine that has no copy (benchmarks/gpu_session.sh).

The device machine gets the checkout and the paths named in `carry`, at most 64 MiB in all; the 60,000
ImageFolder JPEGs of ../shared/data/cifar10 are about 55 MB of bytes but 60,000 files. Packed, they are one
file of about that size, under the ignored data/ folder; unpacked there, they are the same files again (the
same bytes, so the same data fingerprint in MLflow).

    python benchmarks/cifar_pack.py pack ../shared/data/cifar10 data/cifar10.pack     # here
    python benchmarks/cifar_pack.py unpack data/cifar10.pack data/cifar10             # there

Format: the line ``CIFARPACK1``, an 8-byte little-endian length, that many bytes of JSON ({"files":
[[relative path, size], ...], "sha256": digest of all the bytes}), then the files' bytes one after another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

MAGIC = b"CIFARPACK1\n"


def pack(source: Path, dest: Path) -> int:
    files = sorted(p for split in ("train", "test") for p in (source / split).rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"no files under {source}/train or {source}/test")
    blobs = [p.read_bytes() for p in files]
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(blob)
    index = json.dumps(
        {
            "files": [[p.relative_to(source).as_posix(), len(b)] for p, b in zip(files, blobs, strict=True)],
            "sha256": digest.hexdigest(),
        }  # fmt: skip
    ).encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        out.write(MAGIC + struct.pack("<Q", len(index)) + index)
        for blob in blobs:
            out.write(blob)
    return len(files)


def unpack(source: Path, dest: Path) -> int:
    data = source.read_bytes()
    if not data.startswith(MAGIC):
        raise SystemExit(f"{source} is not a CIFARPACK1 file")
    (length,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    index = json.loads(data[start : start + length])
    offset, digest = start + length, hashlib.sha256()
    for name, size in index["files"]:
        blob = data[offset : offset + size]
        offset += size
        digest.update(blob)
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    if offset != len(data) or digest.hexdigest() != index["sha256"]:
        raise SystemExit(f"{source} is damaged: its bytes do not match its index")
    return len(index["files"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    count = (pack if args.action == "pack" else unpack)(args.source, args.dest)
    print(f"{args.action}ed {count} files: {args.source} -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
