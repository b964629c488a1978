"""What the REST service accepts from a client: uploaded images (sniffed, bounded in bytes and in decoded
pixels), comma-separated lists and text fields, each refused with an `ApiError` that says what is wrong."""

from __future__ import annotations

import io

import numpy as np
from fastapi import UploadFile
from PIL import Image

from medunifier.data.images import ImageLoadError, load_image_bytes
from medunifier.serve.api import data_url
from medunifier.serve.http import ApiError
from medunifier.serve.settings import ServeSettings

__all__ = [
    "JPEG_MAGIC", "PNG_MAGIC", "clean_text", "comma_list", "preview_png", "read_image", "sniff_image",
    "upload_name",
]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_image(data: bytes) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from the first bytes (DICOM: 'DICM' after the 128-byte preamble)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def upload_name(upload: UploadFile) -> str | None:
    """The uploaded file's name as the client gave it (at most 200 characters), or None."""
    return (upload.filename or "")[:200] or None


def read_image(upload: UploadFile, settings: ServeSettings) -> np.ndarray:
    """An uploaded file -> float [0, 1] array, or an ApiError saying what is wrong with it."""
    name = upload_name(upload) or "upload"
    data = upload.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "file_too_large", f"{name}: larger than {settings.max_upload_bytes} bytes")
    if not data:
        raise ApiError(400, "empty_file", f"{name}: the file is empty")
    if sniff_image(data) is None:
        raise ApiError(415, "unsupported_media_type", f"{name}: not a PNG, JPEG or DICOM (Part 10) file")
    try:
        arr = load_image_bytes(data, name=name, max_pixels=settings.max_pixels)
    except ImageLoadError as err:
        if err.reason.startswith("refused"):
            raise ApiError(413, "image_too_large", f"{name}: {err.reason}") from None
        raise ApiError(400, "invalid_image", f"{name}: {err.reason}") from None
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ApiError(400, "invalid_image", f"{name}: unsupported image layout {tuple(arr.shape)}")
    return arr


def preview_png(arr: np.ndarray, side: int = 256) -> str:
    """A display copy of an upload (at most side x side) as a PNG data URL."""
    img = Image.fromarray((np.clip(arr[..., :3] if arr.ndim == 3 else arr, 0, 1) * 255 + 0.5).astype(np.uint8))
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return data_url(buf.getvalue())


def comma_list(text: str, field: str, noun: str, s: ServeSettings) -> list[str]:
    """A comma-separated form field -> its non-empty items; 422 when empty, too many, repeated or too long."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ApiError(422, "invalid_request", f"{field}: no {noun} given")
    if len(items) > s.max_labels:
        raise ApiError(422, "invalid_request", f"{field}: {len(items)} {noun}s; at most {s.max_labels}")
    if len(set(items)) != len(items):
        raise ApiError(422, "invalid_request", f"{field}: a{'n' if noun[0] in 'aeiou' else ''} {noun} is repeated")
    long = [x[:40] for x in items if len(x) > s.max_label_chars]
    if long:
        raise ApiError(422, "invalid_request", f"{field}: longer than {s.max_label_chars} characters: {long}")
    return items


def clean_text(text: str, what: str) -> str:
    """A text field stripped of surrounding space; 422 when nothing is left."""
    text = text.strip()
    if not text:
        raise ApiError(422, "invalid_request", f"{what} is empty")
    return text
