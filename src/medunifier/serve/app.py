"""The REST service and the co-pilot page: `create_app(copilot, settings)` returns a FastAPI app.

    POST /v1/report      multipart: image (PNG/JPEG/DICOM, repeatable), num_beams, max_length, preview
    POST /v1/classify    multipart: image (repeatable), labels ("a,b,c"; default: the shipped findings), ensemble
    POST /v1/ask         multipart: image, question, candidates ("yes,no"; optional), max_length, num_beams
    POST /v1/retrieve    multipart: image or text, k, mode                       (needs an index)
    POST /v1/synthesize  JSON: {text, n, guidance, steps, seed}                  (needs a trained prior)
    POST /v1/edit        multipart: image, text, strength, guidance, steps, seed (needs a trained prior)
    GET  /v1/health, /v1/model, /openapi.json; GET / is the page (static/index.html, app.js, style.css)

Every rejection is a 4xx whose JSON body is {"error": {"status", "code", "message"[, "details"]}}; a
capability the server lacks (no index, no generator) is a 501 of the same shape. Inputs are uploaded bytes
only (never a path on the server); uploads are sniffed (PNG, JPEG or DICOM magic), bounded in bytes and
in decoded pixels. With a token configured, every /v1 route but health needs `Authorization: Bearer
<token>` (compared in constant time). Every request must name an allowed host in its Host header (by
default, when bound to loopback: localhost names and loopback addresses), so that a web page cannot reach
the loopback server through DNS rebinding; another host gets 400 `bad_host`. JSON bodies with unknown
fields and a second image where one is expected are 422. The model itself is behind the Copilot's lock.
"""

import hmac
import io
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medunifier import __version__
from medunifier.data.images import ImageLoadError, load_image, load_image_bytes
from medunifier.serve.api import (
    SYNTHETIC_NOTICE,
    Copilot,
    GenerationUnavailable,
    ImageToImageUnavailable,
    IndexUnavailable,
    data_url,
    png_bytes,
)
from medunifier.serve.settings import ServeSettings

log = logging.getLogger("medunifier.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the service refuses: HTTP status, a short machine code and a message for a person."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"status": status, "code": code, "message": message}}
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request"}


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "malformed request or unreadable image", 401: "missing or wrong bearer token",
            413: "request, file or image too large", 415: "not a PNG, JPEG or DICOM file",
            422: "a field is missing or out of range", 501: "capability not available on this server"}
    return {s: {"model": ErrorBody, "description": text[s]} for s in statuses}


# ------------------------------------------------------------------------------------- body size limit


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 413 before the app parses them.

    Checks Content-Length when present, and counts streamed bytes otherwise (chunked uploads); the body
    is buffered (bounded by max_bytes) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, "request_too_large", f"request body exceeds {self.max_bytes} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await too_large(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


# ---------------------------------------------------------------------------------------- response models


class ReportItem(BaseModel):
    filename: str | None
    report: str
    preview: str | None = Field(None, description="PNG data URL of the uploaded image, when asked for")


class ReportResponse(BaseModel):
    reports: list[ReportItem]
    model: str | None = Field(description="checksum of the model's weights")
    draft: bool = Field(True, description="machine-generated draft: a radiologist must review it")


class ClassifyItem(BaseModel):
    filename: str | None
    probabilities: dict[str, float]
    similarities: dict[str, float]
    top: str


class ClassifyResponse(BaseModel):
    labels: list[str]
    ensemble: str
    results: list[ClassifyItem]


class CandidateItem(BaseModel):
    answer: str
    log_likelihood: float = Field(description="total log-likelihood of the answer tokens after the question")
    probability: float = Field(description="softmax of the log-likelihoods over the candidates given")


class AskResponse(BaseModel):
    filename: str | None
    question: str
    answer: str
    candidates: list[CandidateItem] | None = Field(None, description="every candidate's score, when given")
    model: str | None = Field(description="checksum of the model's weights")
    draft: bool = Field(True, description="machine-generated answer: a radiologist must review it")


class HitItem(BaseModel):
    rank: int
    id: str
    score: float
    text: str
    image: str | None
    labels: dict[str, int]
    thumbnail: str | None = None


class RetrieveResponse(BaseModel):
    query: Literal["image", "text"]
    mode: str
    k: int
    hits: list[HitItem]


class SyntheticImageItem(BaseModel):
    image: str = Field(description="PNG data URL; the PNG's tEXt chunks say Synthetic: true")
    seed: int | None
    synthetic: bool = True


class SynthesizeResponse(BaseModel):
    synthetic: bool = True
    notice: str
    text: str
    images: list[SyntheticImageItem]


class EditResponse(BaseModel):
    synthetic: bool = True
    notice: str
    text: str
    strength: float
    seed: int | None
    source: str = Field(description="PNG data URL of the source as the model sees it")
    edited: str = Field(description="PNG data URL of the edited (synthetic) image")
    reconstruction: str = Field(description="PNG data URL of the source's own reconstruction (nothing re-sampled)")
    difference: str = Field(description="PNG data URL: |edited - reconstruction| as a heat map scaled to its maximum")
    mean_abs_difference: float
    max_abs_difference: float


TranslationKind = Literal["soft_tissue", "bone", "t1", "t2", "pd"]  # generate.i2i.translation_kinds()
MaskFinding = Literal["heart", "cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation", "nodule"]


class ImageToImageResponse(BaseModel):
    synthetic: bool = True
    notice: str
    task: str = Field(description="translate, upscale or segment")
    instruction: str = Field(description="the instruction the model was given")
    source: str = Field(description="PNG data URL of the source as the model sees it")
    image: str | None = Field(None, description="PNG data URL of the output image (translate, upscale)")
    mask: str | None = Field(None, description="PNG data URL of the mask, 255 inside (segment)")
    area_fraction: float | None = Field(None, description="share of the image inside the mask (segment)")


class HealthResponse(BaseModel):
    status: str
    version: str
    index_size: int | None
    generation: bool


# ------------------------------------------------------------------------------------------- uploads


def sniff_image(data: bytes) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from the first bytes (DICOM: 'DICM' after the 128-byte preamble)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def _name(upload: UploadFile) -> str | None:
    return (upload.filename or "")[:200] or None


def read_image(upload: UploadFile, settings: ServeSettings) -> np.ndarray:
    """An uploaded file -> float [0, 1] array, or an ApiError saying what is wrong with it."""
    name = _name(upload) or "upload"
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


def _mark_binary(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("contentMediaType") == "application/octet-stream" and node.get("type") == "string":
            node.setdefault("format", "binary")
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)


def _comma_list(text: str, field: str, noun: str, s: ServeSettings) -> list[str]:
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


def _clean_text(text: str, what: str) -> str:
    text = text.strip()
    if not text:
        raise ApiError(422, "invalid_request", f"{what} is empty")
    return text


# ------------------------------------------------------------------------------------------- the app


def host_name(header: str) -> str:
    """The host of a Host header, lower case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(copilot: Copilot, settings: ServeSettings | None = None, bind_host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app serving `copilot` under the limits of `settings`.

    Args:
        copilot: the loaded model (and index, generator).
        settings: limits and options (default: `ServeSettings()`).
        bind_host: the address the server listens on; it decides the default Host allow-list.
    """
    settings = settings or ServeSettings()
    allowed_hosts = settings.hosts_for(bind_host)
    app = FastAPI(
        title="medunifier co-pilot",
        version=__version__,
        description="Draft reports, zero-shot findings, similar cases, text-to-image synthesis and "
        "counterfactual edits from one MedUnifier model. Research software, not a medical device.",
        docs_url=None,  # the Swagger/ReDoc pages load scripts from a CDN; the machine may be offline
        redoc_url=None,
    )
    app.state.copilot = copilot
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)

    @app.middleware("http")
    async def check_host(request: Request, call_next: Any) -> Any:
        # runs before the body is read; the security-header middleware below wraps its answer too
        if allowed_hosts is not None:
            host = host_name(request.headers.get("host", ""))
            if host not in allowed_hosts:
                shown = host[:100] or "(none)"
                return error_response(400, "bad_host", f"Host '{shown}' is not served here: use one of "
                                      f"{sorted(allowed_hosts)}, or add it to the server's allowed_hosts setting")
        return await call_next(request)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    # ------------------------------------------------------------------ error handlers: always JSON

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.code, err.message, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        details = [{"loc": [str(p) for p in e.get("loc", ())], "message": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))} for e in err.errors()]
        message = "; ".join(f"{'.'.join(d['loc'][1:] or d['loc'])}: {d['message']}" for d in details[:5])
        return error_response(422, "invalid_request", message or "invalid request", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(err.status_code, "error")
        return error_response(err.status_code, code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(GenerationUnavailable)
    async def _no_generator(request: Request, err: GenerationUnavailable) -> JSONResponse:
        return error_response(501, "generation_unavailable", str(err))

    @app.exception_handler(ImageToImageUnavailable)
    async def _no_i2i(request: Request, err: ImageToImageUnavailable) -> JSONResponse:
        return error_response(501, "image_to_image_unavailable", str(err))

    @app.exception_handler(IndexUnavailable)
    async def _no_index(request: Request, err: IndexUnavailable) -> JSONResponse:
        return error_response(501, "index_unavailable", "this server has no case index "
                              "(start it with --index INDEX, built by `medunifier index build`)")

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, err: ValueError) -> JSONResponse:
        return error_response(422, "invalid_request", str(err))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(err).__name__}); see the server log")

    # ------------------------------------------------------------------------------------ auth

    bearer = HTTPBearer(auto_error=False, description="the token from the server's --token-file")

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        expected = settings.token_value
        if expected is None:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(401, "unauthorized", "this server needs 'Authorization: Bearer <token>'", challenge)
        if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected.encode("utf-8")):
            raise ApiError(401, "unauthorized", "wrong bearer token", challenge)

    auth = [Depends(require_token)]

    # ---------------------------------------------------------------------------- the endpoints

    s = settings
    Images = Annotated[list[UploadFile], File(min_length=1, max_length=s.max_images,
                                              description="PNG, JPEG or DICOM files (repeat the field for several)")]
    OneImage = Annotated[UploadFile, File(description="a PNG, JPEG or DICOM file")]

    async def one_image(request: Request) -> None:
        """A second file under 'image' where the endpoint takes one would be silently ignored: refuse it."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            count = len((await request.form()).getlist("image"))
            if count > 1:
                raise ApiError(422, "too_many_images", f"{count} images; this endpoint takes one 'image'")

    single = [*auth, Depends(one_image)]  # the endpoints that take at most one image

    def read_images(uploads: list[UploadFile]) -> list[np.ndarray]:
        if len(uploads) > s.max_images:
            raise ApiError(422, "too_many_images", f"{len(uploads)} images; at most {s.max_images} per request")
        return [read_image(u, s) for u in uploads]

    @app.get("/v1/health", response_model=HealthResponse, tags=["service"])
    def health() -> HealthResponse:
        """Liveness: no auth, no model call."""
        return HealthResponse(status="ok", version=__version__,
                              index_size=len(copilot.index) if copilot.index is not None else None,
                              generation=copilot.can_generate)

    @app.get("/v1/model", dependencies=auth, tags=["service"], responses=_error_responses(401))
    def model_info() -> dict[str, Any]:
        """The model's version, weights checksum, config and capabilities."""
        return copilot.info()

    @app.post("/v1/report", response_model=ReportResponse, dependencies=auth, tags=["understand"],
              responses=_error_responses(400, 401, 413, 415, 422))
    def report(
        image: Images,
        num_beams: Annotated[int, Form(ge=1, le=s.max_beams)] = s.default_num_beams,
        max_length: Annotated[int, Form(ge=1, le=s.max_report_tokens, description="maximum tokens (the model's "
                                        "own text length caps it)")] = s.max_report_tokens,
        preview: Annotated[bool, Form()] = False,
    ) -> ReportResponse:
        """A draft report for each uploaded image."""
        arrays = read_images(image)
        texts = copilot.report(arrays, num_beams=num_beams, max_length=max_length)
        items = [ReportItem(filename=_name(u), report=t, preview=preview_png(a) if preview else None)
                 for u, t, a in zip(image, texts, arrays)]
        return ReportResponse(reports=items, model=copilot.checksum)

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=auth, tags=["understand"],
              responses=_error_responses(400, 401, 413, 415, 422))
    def classify(
        image: Images,
        labels: Annotated[str | None, Form(max_length=s.max_labels * (s.max_label_chars + 1),
                                           description="comma-separated labels (default: the shipped findings)")] = None,
        ensemble: Annotated[Literal["mean", "max", "embedding"], Form()] = "mean",
    ) -> ClassifyResponse:
        """Zero-shot probabilities of each label (prompt ensembles for known findings)."""
        names = None if labels is None else _comma_list(labels, "labels", "label", s)
        arrays = read_images(image)
        results = copilot.classify(arrays, names, ensemble=ensemble)
        items = [ClassifyItem(filename=_name(u), probabilities=r.as_dict(),
                              similarities=dict(zip(r.labels, r.similarities)), top=r.top()[0])
                 for u, r in zip(image, results)]
        return ClassifyResponse(labels=results[0].labels, ensemble=ensemble, results=items)

    @app.post("/v1/ask", response_model=AskResponse, dependencies=single, tags=["understand"],
              responses=_error_responses(400, 401, 413, 415, 422))
    def ask(
        image: OneImage,
        question: Annotated[str, Form(min_length=1, max_length=s.max_text_chars, description="the question")],
        candidates: Annotated[str | None, Form(max_length=s.max_labels * (s.max_label_chars + 1),
                                               description="comma-separated answers to choose from, e.g. "
                                               "'yes,no' (default: a generated answer)")] = None,
        max_length: Annotated[int, Form(ge=1, le=s.max_report_tokens, description="maximum generated answer "
                                        "tokens (the model's own text length caps it)")] = min(16, s.max_report_tokens),
        num_beams: Annotated[int, Form(ge=1, le=s.max_beams)] = 1,
    ) -> AskResponse:
        """Answer a question about the image: generated, or the best-scoring of the given candidates."""
        text = _clean_text(question, "question")
        options = None if candidates is None else _comma_list(candidates, "candidates", "answer", s)
        arr = read_image(image, s)
        result = copilot.ask(arr, text, candidates=options, max_length=max_length, num_beams=num_beams)
        items = None if result.candidates is None else [CandidateItem(**vars(c)) for c in result.candidates]
        return AskResponse(filename=_name(image), question=text, answer=result.answer, candidates=items,
                           model=copilot.checksum)

    thumbnails: OrderedDict[int, str | None] = OrderedDict()

    def thumbnail(i: int) -> str | None:
        if i in thumbnails:
            return thumbnails[i]
        path = copilot.index.image_path(i) if copilot.index is not None else None
        url = None
        if path is not None:
            try:
                url = preview_png(load_image(path, max_pixels=s.max_pixels), side=96)
            except ImageLoadError:
                url = None
        thumbnails[i] = url
        while len(thumbnails) > 2048:
            thumbnails.popitem(last=False)
        return url

    @app.post("/v1/retrieve", response_model=RetrieveResponse, dependencies=single, tags=["understand"],
              responses=_error_responses(400, 401, 413, 415, 422, 501))
    def retrieve(
        image: Annotated[UploadFile | None, File(description="a query image (or give text)")] = None,
        text: Annotated[str | None, Form(min_length=1, max_length=s.max_text_chars,
                                         description="a query text (or give image)")] = None,
        k: Annotated[int, Form(ge=1, le=s.max_k)] = s.default_k,
        mode: Annotated[Literal["auto", "text", "image"], Form(description="compare with the indexed reports "
                        "(text) or images (image); auto: the other modality")] = "auto",
    ) -> RetrieveResponse:
        """The k most similar indexed cases to an image or a text."""
        if (image is None) == (text is None):
            raise ApiError(422, "invalid_request", "give exactly one of 'image' and 'text'")
        if copilot.index is None:
            raise IndexUnavailable("no index")
        query: Any = read_image(image, s) if image is not None else _clean_text(text, "text")
        hits = copilot.retrieve(query, k=k, mode=mode)
        kind = "text" if isinstance(query, str) else "image"
        used = mode if mode != "auto" else ("image" if kind == "text" else "text")
        items = [HitItem(rank=h.rank, id=h.id, score=h.score, text=h.text, image=h.image, labels=h.labels,
                         thumbnail=thumbnail(h.index) if s.thumbnails else None) for h in hits]
        return RetrieveResponse(query=kind, mode=used, k=k, hits=items)

    SynthesizeRequest = create_model(
        "SynthesizeRequest",
        __config__=ConfigDict(extra="forbid"),  # a misspelt field is an error, not silently the default
        text=(str, Field(min_length=1, max_length=s.max_text_chars, description="a report or finding description")),
        n=(int, Field(1, ge=1, le=s.max_n, description="number of images")),
        guidance=(float, Field(s.default_guidance, ge=0.0, le=s.max_guidance, allow_inf_nan=False)),
        steps=(int, Field(s.default_steps, ge=1, le=s.max_steps)),
        seed=(int | None, Field(None, ge=0, le=2**31 - 1, description="random seed (default: a fresh one)")),
    )

    @app.post("/v1/synthesize", response_model=SynthesizeResponse, dependencies=auth, tags=["generate"],
              responses=_error_responses(400, 401, 413, 422, 501))
    def synthesize(request: SynthesizeRequest) -> SynthesizeResponse:  # type: ignore[valid-type]
        """Synthetic images for a text, labelled synthetic in the response and inside each PNG."""
        text = _clean_text(request.text, "text")
        images = copilot.synthesize(text, n=request.n, guidance=request.guidance, steps=request.steps,
                                    seed=request.seed)
        return SynthesizeResponse(notice=SYNTHETIC_NOTICE, text=text,
                                  images=[SyntheticImageItem(image=data_url(im.png()), seed=im.seed) for im in images])

    @app.post("/v1/edit", response_model=EditResponse, dependencies=single, tags=["generate"],
              responses=_error_responses(400, 401, 413, 415, 422, 501))
    def edit(
        image: OneImage,
        text: Annotated[str, Form(min_length=1, max_length=s.max_text_chars,
                                  description="the finding or report to edit toward")],
        strength: Annotated[float, Form(ge=0.0, le=1.0, allow_inf_nan=False,
                                        description="share of the image's codes re-sampled")] = 0.5,
        guidance: Annotated[float, Form(ge=0.0, le=s.max_guidance, allow_inf_nan=False)] = s.default_guidance,
        steps: Annotated[int, Form(ge=1, le=s.max_steps)] = s.default_steps,
        seed: Annotated[int | None, Form(ge=0, le=2**31 - 1)] = None,
    ) -> EditResponse:
        """A counterfactual edit of the image toward the text, with the difference map."""
        text = _clean_text(text, "text")
        if not copilot.can_generate:
            raise GenerationUnavailable(copilot.generation_reason or "no image generator")
        arr = read_image(image, s)
        result = copilot.edit(arr, text, strength=strength, guidance=guidance, steps=steps, seed=seed)
        return EditResponse(
            notice=SYNTHETIC_NOTICE, text=text, strength=strength, seed=result.edited.seed,
            source=data_url(png_bytes(result.source)), edited=data_url(result.edited.png()),
            reconstruction=data_url(png_bytes(result.reconstruction)),
            difference=data_url(png_bytes(result.difference)),
            mean_abs_difference=result.mean_abs_difference, max_abs_difference=result.max_abs_difference,
        )

    def i2i_response(image: UploadFile, task: str, **options: Any) -> ImageToImageResponse:
        if not copilot.can_image_to_image:
            raise ImageToImageUnavailable("this model has no image-to-image head (train it with i2i.enabled=true)")
        result = copilot.image_to_image(read_image(image, s), task, **options)
        if result.mask is not None:
            return ImageToImageResponse(
                notice=SYNTHETIC_NOTICE, task=task, instruction=result.instruction,
                source=data_url(png_bytes(result.source)),
                mask=data_url(png_bytes(result.mask.astype(np.uint8) * 255)), area_fraction=float(result.mask.mean()))
        return ImageToImageResponse(notice=SYNTHETIC_NOTICE, task=task, instruction=result.instruction,
                                    source=data_url(png_bytes(result.source)), image=data_url(png_bytes(result.image)))

    @app.post("/v1/translate", response_model=ImageToImageResponse, dependencies=single, tags=["generate"],
              responses=_error_responses(400, 401, 413, 415, 422, 501))
    def translate(
        image: OneImage,
        to: Annotated[TranslationKind, Form(description="target kind: bone-suppressed soft tissue, dual-energy "
                                            "bone image, or an MRI contrast")],
    ) -> ImageToImageResponse:
        """The image as another image type of the same patient (bone-suppressed, bone, an MRI contrast)."""
        return i2i_response(image, "translate", to=to)

    @app.post("/v1/upscale", response_model=ImageToImageResponse, dependencies=single, tags=["generate"],
              responses=_error_responses(400, 401, 413, 415, 422, 501))
    def upscale(
        image: OneImage,
        scale: Annotated[Literal["2", "4"], Form(description="the factor; the image must be (model size / scale) "
                                                 "pixels")] = "4",
    ) -> ImageToImageResponse:
        """Super-resolution of a low-resolution image to the model's size."""
        return i2i_response(image, "upscale", scale=int(scale))

    @app.post("/v1/segment", response_model=ImageToImageResponse, dependencies=single, tags=["generate"],
              responses=_error_responses(400, 401, 413, 415, 422, 501))
    def segment(
        image: OneImage,
        finding: Annotated[MaskFinding, Form(description="what to outline (cardiomegaly: the heart)")],
    ) -> ImageToImageResponse:
        """The mask of a finding (or the heart) in the image."""
        return i2i_response(image, "segment", finding=finding)

    # ------------------------------------------------------------------------------- the spec

    def openapi() -> dict[str, Any]:
        """FastAPI's spec, with uploads also marked `format: binary` (OpenAPI 3.0 style), which client
        generators and fuzzers read as 'a file'."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _mark_binary(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # ------------------------------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
