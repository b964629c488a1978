"""Image input: PNG/JPEG through Pillow, DICOM through pydicom, into the model's tensor layout.

Every reader returns a float32 array in [0, 1], shape (H, W) for grey or (H, W, 3) for colour.
A file that cannot be read raises `ImageLoadError` naming the path and the reason, so a caller
can report it and skip it. Images above `max_pixels` are refused (decompression bombs).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medunifier.utils import ChannelStat, denormalise, normalise

DEFAULT_MAX_PIXELS = 64_000_000
DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageLoadError(RuntimeError):
    """An image that cannot be used; the message says which file and why."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def dicom_to_array(ds: Any, window: tuple[float, float] | None = None) -> np.ndarray:
    """Pixel data of a pydicom dataset to float32 [0, 1].

    Applies rescale slope/intercept (Modality LUT), then the VOI LUT or window (the dataset's own
    unless `window` = (center, width) is given), and inverts MONOCHROME1 so that air is dark.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[arr.shape[0] // 2]  # multi-frame: the middle frame
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        arr = apply_modality_lut(arr, ds).astype(np.float64)
        if window is not None:
            center, width = window
            low, high = center - width / 2.0, center + width / 2.0
            arr = np.clip((arr - low) / max(high - low, 1e-6), 0.0, 1.0)
        else:
            if "VOILUTSequence" in ds or "WindowCenter" in ds:
                arr = apply_voi_lut(arr, ds).astype(np.float64)
            low, high = float(arr.min()), float(arr.max())
            arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
        if photometric == "MONOCHROME1":
            arr = 1.0 - arr
        return arr.astype(np.float32)
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    arr = arr.astype(np.float64)
    maxval = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
    return np.clip(arr / maxval, 0.0, 1.0).astype(np.float32)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        high = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / high, 0, 1).astype(np.float32)
    if img.mode in ("L", "1", "P", "LA"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _read_pil(source: Any, path: str | Path, max_pixels: int) -> np.ndarray:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > max_pixels:
                    raise ImageLoadError(path, f"refused: {img.width}x{img.height} exceeds {max_pixels} pixels")
                img.load()
                return _pil_to_array(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own message names its internal limit (twice max_pixels): state the configured one
        raise ImageLoadError(path, f"refused as a decompression bomb: more than {max_pixels} pixels") from None
    except Exception as err:  # Pillow raises many types for truncated/corrupt files
        raise ImageLoadError(path, f"not a readable image ({type(err).__name__}: {err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _read_dicom(source: Any, path: str | Path, max_pixels: int) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(source)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > max_pixels:
            raise ImageLoadError(path, f"refused: {cols}x{rows} exceeds {max_pixels} pixels")
        return dicom_to_array(ds)
    except ImageLoadError:
        raise
    except Exception as err:
        raise ImageLoadError(path, f"not a readable DICOM ({type(err).__name__}: {err})") from None


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG/JPEG/DICOM file (DICOM recognised by suffix or by its 'DICM' preamble)."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "file not found")
    with path.open("rb") as fh:
        head = fh.read(132)
    if path.suffix.lower() in DICOM_SUFFIXES or _is_dicom_bytes(head):
        return _read_dicom(str(path), path, max_pixels)
    return _read_pil(str(path), path, max_pixels)


def load_image_bytes(data: bytes, name: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image from memory (uploads); same rules as `load_image`."""
    if _is_dicom_bytes(data[:132]):
        return _read_dicom(io.BytesIO(data), name, max_pixels)
    return _read_pil(io.BytesIO(data), name, max_pixels)


def as_array(image: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Accept a path, bytes, PIL image, numpy array or pydicom Dataset."""
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels)
    if isinstance(image, (bytes, bytearray)):
        return load_image_bytes(bytes(image), max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return _pil_to_array(image)
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        if image.dtype == np.uint8:
            arr /= 255.0
        elif image.dtype == np.uint16:
            arr /= 65535.0
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.moveaxis(arr, 0, -1)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return np.clip(arr, 0.0, 1.0)
    if hasattr(image, "pixel_array") or type(image).__name__ in ("Dataset", "FileDataset"):
        return dicom_to_array(image)
    raise TypeError(f"unsupported image type {type(image).__name__}")


def resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size (bicubic on a float image, antialiased by Pillow)."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    if arr.ndim == 2:
        img = Image.fromarray(arr.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC)
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    channels = [resize_array(arr[..., c], size) for c in range(arr.shape[-1])]
    return np.stack(channels, axis=-1)


def to_tensor(arr: np.ndarray, size: int, channels: int = 1, mean: ChannelStat = 0.5,
              std: ChannelStat = 0.5) -> torch.Tensor:
    """[0, 1] array -> normalised float tensor of shape (channels, size, size); mean and std are one value or one
    per channel."""
    arr = resize_array(arr, size)
    if arr.ndim == 3 and channels == 1:
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tensor.shape[0] != channels:
        tensor = tensor.expand(channels, -1, -1).contiguous()
    return normalise(tensor, mean, std)


def to_uint8(tensor: torch.Tensor, mean: ChannelStat = 0.5, std: ChannelStat = 0.5) -> np.ndarray:
    """Inverse of `to_tensor` for display: (C, H, W) normalised -> (H, W) or (H, W, 3) uint8."""
    arr = denormalise(tensor.detach().float().cpu(), mean, std).clamp(0, 1).numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    return (arr * 255.0 + 0.5).astype(np.uint8)


def save_png(arr: np.ndarray, path: str | Path) -> None:
    """Write a float [0, 1] or uint8 array as PNG."""
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False)
