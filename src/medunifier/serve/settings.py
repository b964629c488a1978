"""Limits and options of the REST service, validated by pydantic.

Every limit that protects the server from a request (bytes, pixels, text length, counts, sampling steps)
lives here, so one object configures the app, the OpenAPI schema (request models are built from these
numbers) and the checks. Load them from a YAML/JSON file and/or `key=value` overrides with
`load_settings`; the bearer token is read from a file so it never appears on a command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

LOOPBACK_HOSTS = ("localhost", "localhost.localdomain", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address or name is loopback-only."""
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SettingsError(ValueError):
    """A settings file or override that cannot be used; the message names the key."""


class ServeSettings(BaseModel):
    """What the service accepts. Defaults suit a workstation serving one model on loopback."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # request size
    max_request_bytes: int = Field(32 * 2**20, ge=1024, description="whole request body, all parts together")
    max_upload_bytes: int = Field(20 * 2**20, ge=64, description="one uploaded image file")
    max_pixels: int = Field(40_000_000, ge=64, description="width x height of one decoded image (decompression bombs)")
    max_images: int = Field(8, ge=1, le=256, description="images in one report/classify request")
    # text and counts
    max_text_chars: int = Field(2000, ge=1, description="characters of a text query or generation prompt")
    max_labels: int = Field(32, ge=1, description="labels (classes) in one classify request")
    max_label_chars: int = Field(200, ge=1, description="characters of one label or prompt")
    max_k: int = Field(50, ge=1, description="retrieved cases per query")
    max_n: int = Field(8, ge=1, description="images synthesised per request")
    max_steps: int = Field(64, ge=1, description="sampling steps of synthesis and editing")
    max_guidance: float = Field(20.0, ge=0.0, description="classifier-free guidance scale")
    max_beams: int = Field(5, ge=1, description="beam width of report generation")
    max_report_tokens: int = Field(128, ge=1, description="generated report length in tokens")
    max_candidates: int = Field(16, ge=1, description="report drafts per image among which the model's own "
                                "matching chooses")
    # defaults used when a request does not say
    default_num_beams: int = Field(3, ge=1, description="beam width of report generation")
    default_candidates: int = Field(1, ge=1, description="report drafts per image (1: beam search alone; the demo "
                                    "evaluates the best of 8, at about 8x the time)")
    default_k: int = Field(5, ge=1, description="retrieved cases per query")
    default_steps: int = Field(8, ge=1, description="sampling steps of synthesis and editing")
    default_guidance: float = Field(3.0, ge=0.0, description="classifier-free guidance scale")
    # security
    token: SecretStr | None = Field(None, description="bearer token required on /v1/* (health excepted)")
    allowed_hosts: list[str] | None = Field(
        None, description="Host header names accepted (a request naming another host gets 400, which stops DNS "
        "rebinding); '*' accepts any. Default: localhost names and loopback addresses when bound to loopback, "
        "any host otherwise")
    thumbnails: bool = Field(True, description="include small PNG previews of retrieved cases")

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.max_upload_bytes > self.max_request_bytes:
            raise ValueError("max_upload_bytes cannot exceed max_request_bytes")
        for default, limit in (("default_num_beams", "max_beams"), ("default_candidates", "max_candidates"),
                               ("default_k", "max_k"),
                               ("default_steps", "max_steps"), ("default_guidance", "max_guidance")):
            if getattr(self, default) > getattr(self, limit):
                raise ValueError(f"{default} ({getattr(self, default)}) exceeds {limit} ({getattr(self, limit)})")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("token is empty")
        if self.allowed_hosts is not None and not all(h.strip() for h in self.allowed_hosts):
            raise ValueError("allowed_hosts has an empty name")
        return self

    def hosts_for(self, bind_host: str) -> set[str] | None:
        """The Host names accepted when serving on `bind_host` (lower case, no port); None accepts any."""
        if self.allowed_hosts is not None:
            names = {h.strip().lower().strip("[]") for h in self.allowed_hosts}
            return None if "*" in names else names
        return set(LOOPBACK_HOSTS) if is_loopback(bind_host) else None

    @property
    def token_value(self) -> str | None:
        return None if self.token is None else self.token.get_secret_value()


def read_token_file(path: str | Path) -> str:
    """The bearer token: the file's first line, stripped. The file should be readable by its owner only."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"token file {path} not found")
    lines = path.read_text().strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 8:
        raise SettingsError(f"token file {path}: the token must have at least 8 characters")
    return token


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_settings(
    path: str | Path | None = None, overrides: list[str] | None = None, token_file: str | Path | None = None
) -> ServeSettings:
    """Settings from an optional YAML/JSON file, then `key=value` overrides, then the token file."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"settings file {path} not found")
        text = path.read_text()
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of setting names to values")
        data.update(loaded or {})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"override '{item}' is not key=value")
        data[key.strip()] = _parse_value(value)
    if "token" in data:
        raise SettingsError("put the token in a file and pass --token-file, not in settings")
    if token_file is not None:
        data["token"] = read_token_file(token_file)
    try:
        return ServeSettings(**data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in err.errors())
        raise SettingsError(problems) from None
