"""GGUF container parsing: metadata, tensor table and per-tensor dequantization over one mmap."""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

# gguf.GGUFReader parses every vocabulary string into its own numpy view, slow for a large
# vocabulary. This reader walks the same layout with struct and skips string arrays
# (docs/benchmarks.md, "Loading").

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 used 32-bit counts; llama.cpp has not written it since 2023
_MAX_COUNT = 1 << 24  # more keys or tensors than this is a corrupt header, not a model
_DEFAULT_ALIGNMENT = 32
_ROW_BLOCKS = 1024  # blocks per row handed to gguf's dequantize (read_tensor)

# GGUF metadata value types (gguf.GGUFValueType): scalars by struct format, then string and array.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9

_T = gguf.GGMLQuantizationType
# Types gguf.quants.dequantize handles (F32 and F16 are special-cased there, the rest registered).
_DEQUANTIZABLE = {int(_T.F32), int(_T.F16)} | {
    int(t) for t in getattr(gguf.quants, "_type_traits", {})
}


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF; the message says why."""


@dataclass(frozen=True, slots=True)
class StringArray:
    """A metadata array of strings, left unread: vocabularies and merge lists are large."""

    count: int


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    shape: tuple[int, ...]  # torch order; ggml lists the fastest-moving dimension first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    num_bytes: int

    @property
    def type_name(self) -> str:
        """ggml's name for the storage type, e.g. "Q4_K", or "type 99" when gguf does not know it."""
        try:
            return _T(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"

    @property
    def is_dequantizable(self) -> bool:
        return self.ggml_type in _DEQUANTIZABLE


class _Cursor:
    """Bounds-checked little-endian reads from a buffer, advancing a position."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def _need(self, num_bytes: int) -> None:
        if num_bytes < 0 or self.pos + num_bytes > len(self.buf):
            raise GGUFFormatError(
                f"truncated: header runs past the end of the file at byte {self.pos}"
            )

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        self._need(length)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"invalid UTF-8 in a header string at byte {self.pos}") from exc

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            value = self.scalar(_SCALAR_FORMATS[value_type])
            # f32 metadata (eps, rope base) read as the shortest decimal, e.g. 1e-05 not 9.99e-06
            return float(str(np.float32(value))) if value_type == _FLOAT32 else value
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise GGUFFormatError(f"unknown metadata value type {value_type} at byte {self.pos}")

    def array(self) -> np.ndarray | StringArray:
        element_type, count = self.scalar("<I"), self.scalar("<Q")
        if element_type == _STRING:
            for _ in range(count):  # variable-length: walk the length prefixes only
                self._need(8)
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            self._need(0)
            return StringArray(count)
        if element_type not in _SCALAR_FORMATS:
            raise GGUFFormatError(f"unsupported metadata array element type {element_type}")
        dtype = np.dtype(_SCALAR_FORMATS[element_type])
        self._need(count * dtype.itemsize)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return values


class GGUFFile:
    """An open GGUF file: metadata and tensor table parsed; tensor data stays in the mmap."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            try:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # an empty file cannot be mapped
                raise GGUFFormatError("the file is empty") from exc
        cursor = _Cursor(self._buf)
        num_tensors, num_keys = self._read_preamble(cursor)
        self.metadata: dict[str, Any] = {}
        for _ in range(num_keys):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.scalar("<I"))
        self.metadata_end = cursor.pos  # [0, metadata_end) identifies the tokenizer and config
        self.tensors = self._read_tensor_table(cursor, num_tensors)

    @staticmethod
    def _read_preamble(cursor: _Cursor) -> tuple[int, int]:
        if len(cursor.buf) < 24 or cursor.buf[:4] != _MAGIC:
            raise GGUFFormatError("not a GGUF file (missing the 'GGUF' magic bytes)")
        cursor.pos = 4
        version = cursor.scalar("<I")
        if version not in _VERSIONS:
            raise GGUFFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")
        num_tensors, num_keys = cursor.scalar("<Q"), cursor.scalar("<Q")
        if num_tensors > _MAX_COUNT or num_keys > _MAX_COUNT:
            raise GGUFFormatError(f"corrupt header ({num_tensors} tensors, {num_keys} keys)")
        return num_tensors, num_keys

    def _read_tensor_table(self, cursor: _Cursor, num_tensors: int) -> dict[str, GGUFTensorInfo]:
        entries = []
        for _ in range(num_tensors):
            name = cursor.string()
            num_dims = cursor.scalar("<I")
            if num_dims > 8:
                raise GGUFFormatError(f"tensor '{name}' has {num_dims} dimensions")
            dims = [cursor.scalar("<Q") for _ in range(num_dims)]
            ggml_type, offset = cursor.scalar("<I"), cursor.scalar("<Q")
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-cursor.pos // alignment) * alignment
        tensors = {}
        for name, shape, ggml_type, offset in entries:
            info = _sized(GGUFTensorInfo(name, shape, ggml_type, data_start + offset, 0))
            if info.offset + info.num_bytes > len(self._buf):
                raise GGUFFormatError(
                    f"truncated: tensor '{name}' ends at byte {info.offset + info.num_bytes} "
                    f"but the file has {len(self._buf)} bytes"
                )
            tensors[name] = info
        return tensors

    def metadata_bytes(self) -> bytes:
        """The raw header up to the tensor table: everything but tensor names and data."""
        return self._buf[: self.metadata_end]

    def read_tensor(self, info: GGUFTensorInfo) -> torch.Tensor:
        """The tensor dequantized to a fresh float32 CPU tensor of shape `info.shape`."""
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        block_size, type_size = gguf.GGML_QUANT_SIZES[_T(info.ggml_type)]
        row_blocks = info.shape[-1] // block_size
        # gguf dequantizes 16 rows a pass: rows of k of the tensor's rows each make the
        # passes fewer and larger (twice the speed on the bundled model). Blocks are
        # independent, so the values are the same.
        k = math.gcd(math.prod(info.shape[:-1]), max(1, _ROW_BLOCKS // row_blocks))
        rows = raw.reshape(-1, k * row_blocks * type_size)
        values = gguf.quants.dequantize(rows, _T(info.ggml_type))
        if not values.flags.writeable:  # F32 comes back as a view of the read-only mmap
            values = values.copy()
        return torch.from_numpy(values).reshape(info.shape)

    def read_blocks(self, info: GGUFTensorInfo) -> torch.Tensor:
        """A 2-D tensor's stored bytes, one row per output row: [rows, row_bytes] uint8 (a copy)."""
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        return torch.from_numpy(raw.copy()).view(info.shape[0], -1)


def _sized(info: GGUFTensorInfo) -> GGUFTensorInfo:
    """`info` with its byte size filled in (0 for a type gguf does not know: never read)."""
    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[_T(info.ggml_type)]
    except (ValueError, KeyError):
        return info
    if info.shape and info.shape[-1] % block_size:
        raise GGUFFormatError(
            f"tensor '{info.name}' has rows of {info.shape[-1]} values, "
            f"not a multiple of the {info.type_name} block size {block_size}"
        )
    num_bytes = math.prod(info.shape) // block_size * type_size
    return GGUFTensorInfo(info.name, info.shape, info.ggml_type, info.offset, num_bytes)
