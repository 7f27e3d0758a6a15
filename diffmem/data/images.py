"""Image data sets as the memorizing denoisers store them: (N, D) tensors of uint8 codes with
the affine map value = scale * code + offset onto [-1, 1] (never a float copy of the set), or
float values used as they are.

- ``load_digits_set()``: scikit-learn's bundled 8x8 digits (codes 0..16, shape (8, 8, 1)).
- ``load_array_set(path, key=None)``: a .npy or .npz array (N, D), (N, H, W) or (N, H, W, C)
  (channels last) of uint8 codes (to [-1, 1]) or floats (float16 kept, float64 rounded to
  float32; values used as they are). A .npy file is memory-mapped, so only the rows asked for
  are read; a .npz member is read whole. A .npz file with several arrays needs ``key``.
- ``load_folder_set(path)``: the PNG/JPEG files of a folder (sorted by name; other files are
  ignored), read with Pillow as uint8 (N, H, W, C): C = 1 when every image is grayscale, else 3
  (RGB; alpha dropped).
- ``quantize_uint8(values)``: float values -> uint8 codes with one affine map for the whole set.

Every loader takes ``rows``, a function of the set's size N giving the [start, stop) rows to
load (one process's shard), and raises ImageSetError, one line naming the file, for what it
cannot use: an unreadable or corrupt file, an empty folder, images of different sizes, NaN or
infinite values, a wrong number of dimensions or dtype, fewer than two points.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

Rows = Callable[[int], tuple[int, int]]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHUNK = 4096  # rows per pass when scanning or converting


class ImageSetError(ValueError):
    """A data set that cannot be used; the message is one line naming the file."""


@dataclass
class ImageSet:
    """codes: (n, D) rows start .. start + n of a set of `total` points, stored as uint8 codes
    (values scale * code + offset) or floats (scale = offset = None); shape: (H, W, C) of one
    image, or None for data that are not images."""

    codes: torch.Tensor
    total: int
    start: int
    shape: tuple | None
    scale: float | None
    offset: float | None
    source: str

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    def values(self, rows=slice(None)) -> torch.Tensor:
        """Float64 values of some local rows (a slice or an index tensor; a copy of those rows
        only)."""
        v = self.codes[rows].double()
        return v if self.scale is None else v * self.scale + self.offset


def _all_rows(n: int) -> tuple[int, int]:
    return 0, n


def _check_total(n: int, where: str) -> None:
    if n < 2:
        raise ImageSetError(f"{where}: the data set needs at least 2 points, got {n}")


def _image_shape(shape: tuple) -> tuple | None:
    """(H, W, C) of one item of an array of shape (N, *shape), or None for flat data."""
    if len(shape) == 1:
        return None
    return (*shape, 1) if len(shape) == 2 else tuple(shape)


def load_digits_set(rows: Rows = _all_rows) -> ImageSet:
    """scikit-learn's bundled digits (1797 images, 8x8, codes 0..16) mapped to [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImageSetError("--data digits needs scikit-learn: pip install scikit-learn") from None
    images = load_digits().images
    start, stop = rows(images.shape[0])
    codes = torch.from_numpy(images[start:stop].astype(np.uint8).reshape(stop - start, -1))
    return ImageSet(codes, images.shape[0], start, (8, 8, 1), 2 / 16, -1.0, "digits")


def _finite_rows(array, where: str, start: int) -> None:
    """ImageSetError naming the first row (global index: start + local) with NaN or inf."""
    for i in range(0, array.shape[0], _CHUNK):
        ok = np.isfinite(array[i:i + _CHUNK]).reshape(min(_CHUNK, array.shape[0] - i), -1)
        if not ok.all():
            row = start + i + int(np.argmin(ok.all(axis=1)))
            raise ImageSetError(f"{where}: holds NaN or infinite values (first in row {row})")


def _open_array(path: Path, key: str | None):
    """The array of a .npy (memory-mapped) or .npz file."""
    where = str(path)
    if path.suffix.lower() == ".npy":
        if key is not None:
            raise ImageSetError(f"{where}: --array names a member of a .npz file, not of a .npy")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ImageSetError(f"{where}: cannot be read as a .npy array ({e})") from None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if key is None and len(names) != 1:
                raise ImageSetError(f"{where}: holds {len(names)} arrays ({', '.join(names)}); "
                                    f"name one with --array")
            name = names[0] if key is None else key
            if name not in names:
                raise ImageSetError(f"{where}: has no array {name!r} (it holds "
                                    f"{', '.join(names) or 'none'})")
            return z[name]
    except ImageSetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ImageSetError(f"{where}: cannot be read as a .npz file ({e})") from None


def load_array_set(path, key: str | None = None, rows: Rows = _all_rows) -> ImageSet:
    """A .npy / .npz array set (see the module docstring)."""
    path = Path(path)
    where = str(path)
    if path.suffix.lower() not in (".npy", ".npz"):
        raise ImageSetError(f"{where}: expected a .npy or .npz file or a folder of images")
    if not path.is_file():
        raise ImageSetError(f"{where}: no such file")
    array = _open_array(path, key)
    if not 2 <= array.ndim <= 4:
        raise ImageSetError(f"{where}: expected an array (N, D), (N, H, W) or (N, H, W, C), "
                            f"got shape {array.shape}")
    if array.dtype != np.uint8 and array.dtype not in (np.float16, np.float32, np.float64):
        raise ImageSetError(f"{where}: expected uint8 codes or float values, got {array.dtype}")
    total = array.shape[0]
    _check_total(total, where)
    if math.prod(array.shape[1:]) == 0:
        raise ImageSetError(f"{where}: its items are empty (shape {array.shape})")
    start, stop = rows(total)
    part = array[start:stop].reshape(stop - start, -1)
    if array.dtype == np.uint8:
        scale, offset = 2 / 255, -1.0
    else:
        _finite_rows(part, where, start)
        scale = offset = None
        if part.dtype == np.float64:
            part = part.astype(np.float32)
    with warnings.catch_warnings():  # a read-only memory map: diffmem only reads it
        warnings.simplefilter("ignore", UserWarning)
        codes = torch.from_numpy(part)
    return ImageSet(codes, total, start, _image_shape(array.shape[1:]), scale, offset, where)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ImageSetError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageSetError(f"{folder}: holds no PNG or JPEG images (*.png, *.jpg, *.jpeg)")
    return files


def load_folder_set(path, rows: Rows = _all_rows) -> ImageSet:
    """A folder of PNG/JPEG images as uint8 codes (see the module docstring). Every file's
    header is read (sizes and modes must agree); only the rows asked for are decoded."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(path)
    files = _image_files(folder)
    _check_total(len(files), str(folder))
    sizes, modes = {}, set()
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
                modes.add(im.mode)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ImageSetError(f"{f}: cannot be read as an image ({e})") from None
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = list(sizes)
            raise ImageSetError(f"{f}: is {w1}x{h1}, but {sizes[(w0, h0)].name} is {w0}x{h0}; "
                                f"every image of {folder} must have the same size")
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ImageSetError(f"{f}: is a {im.mode} image; expected 8-bit grayscale or color")
    gray = modes <= {"L", "1"}
    (w, h), = sizes
    shape = (h, w, 1 if gray else 3)
    start, stop = rows(len(files))
    codes = torch.empty(stop - start, math.prod(shape), dtype=torch.uint8)
    for i, f in enumerate(files[start:stop]):
        try:
            with Image.open(f) as im:
                pixels = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ImageSetError(f"{f}: cannot be decoded ({e})") from None
        codes.numpy()[i] = pixels.reshape(-1)
    return ImageSet(codes, len(files), start, shape, 2 / 255, -1.0, str(folder))


def quantize_uint8(values: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """uint8 codes (N, D) of float values with one affine map for the whole set:
    value ~ scale * code + offset, offset = min, scale = (max - min) / 255 (error <= scale/2).
    Converted chunk by chunk (no float64 copy of the set)."""
    lo, hi = float(values.min()), float(values.max())
    scale = (hi - lo) / 255 if hi > lo else 1.0
    codes = torch.empty(values.shape, dtype=torch.uint8)
    for i in range(0, values.shape[0], _CHUNK):
        chunk = ((values[i:i + _CHUNK].double() - lo) / scale).round_().clamp_(0, 255)
        codes[i:i + _CHUNK] = chunk.to(torch.uint8)
    return codes, scale, lo


__all__ = ["IMAGE_SUFFIXES", "ImageSet", "ImageSetError", "load_array_set", "load_digits_set",
           "load_folder_set", "quantize_uint8"]
