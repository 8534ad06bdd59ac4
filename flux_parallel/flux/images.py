"""Images out of the pipeline: PNG files written with the standard library alone (no Pillow needed)."""

import ctypes
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor


def write_png(path: str, image: torch.Tensor) -> None:
    Path(path).write_bytes(encode_png(image))


def encode_png(image: torch.Tensor, level: int = 6) -> bytes:
    """image [3, H, W] in [0, 1] -> an 8-bit RGB PNG (zlib from the standard library; no Pillow needed).
    level: zlib's, 0 (stored: ~50x faster, ~1.4x the bytes of a generated image) to 9."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
    height, width = pixels.shape[:2]
    filtered = torch.cat((torch.zeros(height, 1, dtype=torch.uint8), pixels.view(height, -1)), dim=1)
    # each row: filter type 0 (none), then its RGB bytes; read straight from the tensor's memory
    rows = ctypes.string_at(filtered.data_ptr(), filtered.numel())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(rows, level)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def write_grid(path: str, images: Tensor, columns: int = 4, scale: int = 2) -> None:
    """The images side by side, `columns` per row, each enlarged `scale` times, 4 px apart on white."""
    rows = -(-len(images) // columns)
    side, gap = images.shape[-1] * scale, 4
    grid = torch.ones(3, rows * (side + gap) + gap, columns * (side + gap) + gap)
    for i, image in enumerate(images):
        top, left = gap + (i // columns) * (side + gap), gap + (i % columns) * (side + gap)
        grid[:, top : top + side, left : left + side] = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    write_png(path, grid)
