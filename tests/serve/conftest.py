"""Fixtures of the serving tests: one small saved model, a case manifest and its index, per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from serve_helpers import FakeGenerator, build_model_dir, write_cases

from medunifier.serve.api import Copilot
from medunifier.serve.index import EmbeddingIndex, build_index
from medunifier.serve.settings import ServeSettings


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The serving tests run tiny models: one intra-op thread avoids OpenMP oversubscription, which makes a
    40 ms report take seconds on a 2-core machine busy with other work. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serve_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="session")
def run_dir(serve_root: Path) -> Path:
    """A run folder holding a random-init small model in `model/`."""
    return build_model_dir(serve_root)


@pytest.fixture(scope="session")
def case_manifest(serve_root: Path) -> Path:
    return write_cases(serve_root / "cases")


@pytest.fixture(scope="session")
def base_copilot(run_dir: Path) -> Copilot:
    """The loaded model with neither index nor generator (shared; build variants with `make_copilot`)."""
    return Copilot.from_pretrained(run_dir, device="cpu", generator=None)


@pytest.fixture(scope="session")
def index_dir(base_copilot: Copilot, case_manifest: Path, serve_root: Path) -> Path:
    out = serve_root / "index"
    build_index(base_copilot.model, case_manifest, out,
                model_meta={"dir": str(base_copilot.model_dir), "checksum": base_copilot.checksum})
    return out


@pytest.fixture(scope="session")
def case_index(index_dir: Path) -> EmbeddingIndex:
    return EmbeddingIndex.load(index_dir)


@pytest.fixture
def make_copilot(base_copilot: Copilot, case_index: EmbeddingIndex) -> Callable[..., Copilot]:
    """Copilot over the shared model: make_copilot(index=True, generator=True)."""

    def make(index: bool = True, generator: bool = True, **kwargs) -> Copilot:
        c = base_copilot.image_config
        return Copilot(base_copilot.model, model_dir=base_copilot.model_dir, checksum=base_copilot.checksum,
                       index=case_index if index else None,
                       generator=FakeGenerator(c.channels, c.size) if generator else None, **kwargs)

    return make


@pytest.fixture
def make_client(make_copilot: Callable[..., Copilot]) -> Callable[..., object]:
    """TestClient of create_app: make_client(index=True, generator=True, **settings)."""
    from fastapi.testclient import TestClient

    from medunifier.serve.app import create_app

    def make(index: bool = True, generator: bool = True, **settings) -> TestClient:
        return TestClient(create_app(make_copilot(index=index, generator=generator), ServeSettings(**settings)),
                          base_url="http://localhost")

    return make


@pytest.fixture(scope="module")
def make_client_module(base_copilot: Copilot, case_index: EmbeddingIndex) -> Callable[..., object]:
    """Like make_client, for module-scoped fixtures."""
    from fastapi.testclient import TestClient

    from medunifier.serve.app import create_app

    def make(**settings) -> TestClient:
        c = base_copilot.image_config
        copilot = Copilot(base_copilot.model, model_dir=base_copilot.model_dir, checksum=base_copilot.checksum,
                          index=case_index, generator=FakeGenerator(c.channels, c.size))
        return TestClient(create_app(copilot, ServeSettings(**settings)), base_url="http://localhost")

    return make
