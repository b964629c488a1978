"""The response bodies of the REST service (pydantic models, which also make its OpenAPI schema)."""

from typing import Literal

from pydantic import BaseModel, Field

__all__ = [
    "AskResponse", "CandidateItem", "ClassifyItem", "ClassifyResponse", "EditResponse", "HealthResponse",
    "HitItem", "ImageToImageResponse", "MaskFinding", "ReportItem", "ReportResponse", "RetrieveResponse",
    "SynthesizeResponse", "SyntheticImageItem", "TranslationKind",
]


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
