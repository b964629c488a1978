"""The REST service and the co-pilot page: `create_app(copilot, settings)` returns a FastAPI app.

    POST /v1/report      multipart: image (PNG/JPEG/DICOM, repeatable), num_beams, max_length, preview,
                         candidates, seed
    POST /v1/classify    multipart: image (repeatable), labels ("a,b,c"; default: the shipped findings), ensemble
    POST /v1/ask         multipart: image, question, candidates ("yes,no"; optional), max_length, num_beams
    POST /v1/retrieve    multipart: image or text, k, mode                       (needs an index)
    POST /v1/synthesize  JSON: {text, n, guidance, steps, seed}                  (needs a trained prior)
    POST /v1/edit        multipart: image, text, strength, guidance, steps, seed (needs a trained prior)
    POST /v1/translate, /v1/upscale, /v1/segment  multipart: image and the task's options (needs an
                         image-to-image head)
    GET  /v1/health, /v1/model, /openapi.json; GET / is the page (static/index.html, app.js, style.css)

Every rejection is a 4xx whose JSON body is {"error": {"status", "code", "message"[, "details"]}}; a
capability the server lacks (no index, no generator) is a 501 of the same shape. Inputs are uploaded bytes
only (never a path on the server); uploads are sniffed (PNG, JPEG or DICOM magic), bounded in bytes and
in decoded pixels. With a token configured, every /v1 route but health needs `Authorization: Bearer
<token>` (compared in constant time). Every request must name an allowed host in its Host header (by
default, when bound to loopback: localhost names and loopback addresses), so that a web page cannot reach
the loopback server through DNS rebinding; another host gets 400 `bad_host`. JSON bodies with unknown
fields and a second image where one is expected are 422. The model itself is behind the Copilot's lock.

This module holds the routes; the error shape, body limit, security headers and Host check are in
`serve.http`, the response bodies in `serve.schemas` and the upload checks in `serve.uploads`.
"""

import hmac
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
from pydantic import ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from medunifier import __version__
from medunifier.data.images import ImageLoadError, load_image
from medunifier.serve.api import (
    SYNTHETIC_NOTICE,
    Copilot,
    GenerationUnavailable,
    ImageToImageUnavailable,
    IndexUnavailable,
    data_url,
    png_bytes,
)
from medunifier.serve.http import (
    SECURITY_HEADERS,
    STATUS_CODES,
    ApiError,
    BodyLimitMiddleware,
    error_response,
    error_responses,
    host_name,
)
from medunifier.serve.schemas import (
    AskResponse,
    CandidateItem,
    ClassifyItem,
    ClassifyResponse,
    EditResponse,
    HealthResponse,
    HitItem,
    ImageToImageResponse,
    MaskFinding,
    ReportItem,
    ReportResponse,
    RetrieveResponse,
    SynthesizeResponse,
    SyntheticImageItem,
    TranslationKind,
)
from medunifier.serve.settings import ServeSettings
from medunifier.serve.uploads import clean_text, comma_list, preview_png, read_image, upload_name

log = logging.getLogger("medunifier.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _mark_binary(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("contentMediaType") == "application/octet-stream" and node.get("type") == "string":
            node.setdefault("format", "binary")
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)


# ------------------------------------------------------------------------------------------- the app


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
        code = STATUS_CODES.get(err.status_code, "error")
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

    @app.get("/v1/model", dependencies=auth, tags=["service"], responses=error_responses(401))
    def model_info() -> dict[str, Any]:
        """The model's version, weights checksum, config and capabilities."""
        return copilot.info()

    @app.post("/v1/report", response_model=ReportResponse, dependencies=auth, tags=["understand"],
              responses=error_responses(400, 401, 413, 415, 422))
    def report(
        image: Images,
        num_beams: Annotated[int, Form(ge=1, le=s.max_beams)] = s.default_num_beams,
        max_length: Annotated[int, Form(ge=1, le=s.max_report_tokens, description="maximum tokens (the model's "
                                        "own text length caps it)")] = s.max_report_tokens,
        preview: Annotated[bool, Form()] = False,
        candidates: Annotated[int, Form(ge=1, le=s.max_candidates, description="drafts per image; the model's own "
                                        "matching keeps the best (1: beam search alone)")] = s.default_candidates,
        seed: Annotated[int, Form(ge=0, le=2**31 - 1, description="seed of the drafts' sampling")] = 0,
    ) -> ReportResponse:
        """A draft report for each uploaded image."""
        arrays = read_images(image)
        texts = copilot.report(arrays, num_beams=num_beams, max_length=max_length, candidates=candidates, seed=seed)
        items = [ReportItem(filename=upload_name(u), report=t, preview=preview_png(a) if preview else None)
                 for u, t, a in zip(image, texts, arrays)]
        return ReportResponse(reports=items, model=copilot.checksum)

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=auth, tags=["understand"],
              responses=error_responses(400, 401, 413, 415, 422))
    def classify(
        image: Images,
        labels: Annotated[str | None, Form(max_length=s.max_labels * (s.max_label_chars + 1),
                                           description="comma-separated labels (default: the shipped findings)")] = None,
        ensemble: Annotated[Literal["mean", "max", "embedding"], Form()] = "mean",
    ) -> ClassifyResponse:
        """Zero-shot probabilities of each label (prompt ensembles for known findings)."""
        names = None if labels is None else comma_list(labels, "labels", "label", s)
        arrays = read_images(image)
        results = copilot.classify(arrays, names, ensemble=ensemble)
        items = [ClassifyItem(filename=upload_name(u), probabilities=r.as_dict(),
                              similarities=dict(zip(r.labels, r.similarities)), top=r.top()[0])
                 for u, r in zip(image, results)]
        return ClassifyResponse(labels=results[0].labels, ensemble=ensemble, results=items)

    @app.post("/v1/ask", response_model=AskResponse, dependencies=single, tags=["understand"],
              responses=error_responses(400, 401, 413, 415, 422))
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
        text = clean_text(question, "question")
        options = None if candidates is None else comma_list(candidates, "candidates", "answer", s)
        arr = read_image(image, s)
        result = copilot.ask(arr, text, candidates=options, max_length=max_length, num_beams=num_beams)
        items = None if result.candidates is None else [CandidateItem(**vars(c)) for c in result.candidates]
        return AskResponse(filename=upload_name(image), question=text, answer=result.answer, candidates=items,
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
              responses=error_responses(400, 401, 413, 415, 422, 501))
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
        query: Any = read_image(image, s) if image is not None else clean_text(text, "text")
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
              responses=error_responses(400, 401, 413, 422, 501))
    def synthesize(request: SynthesizeRequest) -> SynthesizeResponse:  # type: ignore[valid-type]
        """Synthetic images for a text, labelled synthetic in the response and inside each PNG."""
        text = clean_text(request.text, "text")
        images = copilot.synthesize(text, n=request.n, guidance=request.guidance, steps=request.steps,
                                    seed=request.seed)
        return SynthesizeResponse(notice=SYNTHETIC_NOTICE, text=text,
                                  images=[SyntheticImageItem(image=data_url(im.png()), seed=im.seed) for im in images])

    @app.post("/v1/edit", response_model=EditResponse, dependencies=single, tags=["generate"],
              responses=error_responses(400, 401, 413, 415, 422, 501))
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
        text = clean_text(text, "text")
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
              responses=error_responses(400, 401, 413, 415, 422, 501))
    def translate(
        image: OneImage,
        to: Annotated[TranslationKind, Form(description="target kind: bone-suppressed soft tissue, dual-energy "
                                            "bone image, or an MRI contrast")],
    ) -> ImageToImageResponse:
        """The image as another image type of the same patient (bone-suppressed, bone, an MRI contrast)."""
        return i2i_response(image, "translate", to=to)

    @app.post("/v1/upscale", response_model=ImageToImageResponse, dependencies=single, tags=["generate"],
              responses=error_responses(400, 401, 413, 415, 422, 501))
    def upscale(
        image: OneImage,
        scale: Annotated[Literal["2", "4"], Form(description="the factor; the image must be (model size / scale) "
                                                 "pixels")] = "4",
    ) -> ImageToImageResponse:
        """Super-resolution of a low-resolution image to the model's size."""
        return i2i_response(image, "upscale", scale=int(scale))

    @app.post("/v1/segment", response_model=ImageToImageResponse, dependencies=single, tags=["generate"],
              responses=error_responses(400, 401, 413, 415, 422, 501))
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
