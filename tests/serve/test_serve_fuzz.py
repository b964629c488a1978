"""Property-based fuzzing of the REST API from its own OpenAPI spec (schemathesis): no request may get a 5xx,
and every response must match the status codes, content types and schemas that the spec declares."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra (pip install -e .[dev])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serve_helpers import dicom_bytes, encode, picture  # noqa: E402

MAX_EXAMPLES = 30  # per operation and mode: 14 runs in well under a minute on 2 cores
OPERATIONS = [("GET", "/v1/health"), ("GET", "/v1/model"), ("POST", "/v1/report"), ("POST", "/v1/classify"),
              ("POST", "/v1/retrieve"), ("POST", "/v1/synthesize"), ("POST", "/v1/edit"), ("POST", "/v1/ask"),
              ("POST", "/v1/translate"), ("POST", "/v1/upscale"), ("POST", "/v1/segment")]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(make_client_module):
    """The spec of an app with an index and a (fake) generator, so that every operation is reachable.

    Uploads ("format: binary") are drawn from real PNG/JPEG/DICOM images as well as arbitrary bytes, so
    that valid images reach the model with fuzzed fields.
    """
    # 16 x 16 and 8 x 8: x2 and x4 upscale inputs for the 32-pixel test model
    images = [encode(picture(1)), encode(picture(2, (20, 70)), "JPEG"), dicom_bytes(picture(3)),
              encode(picture(4, (16, 16))), encode(picture(5, (8, 8)))]
    schemathesis.openapi.format("binary", st.one_of(st.sampled_from(images), st.binary()))
    # schemathesis's ASGI client sends Host: testserver
    client = make_client_module(max_images=2, max_n=2, max_steps=4, default_steps=4, max_beams=2,
                                default_num_beams=2, max_report_tokens=8, allowed_hosts=["testserver"])
    yield schemathesis.openapi.from_asgi("/openapi.json", client.app)
    from schemathesis.specs.openapi.formats import unregister_string_format

    unregister_string_format("binary")


def test_the_spec_has_exactly_these_operations(api_schema) -> None:
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors_and_responses_match_the_spec(api_schema, method, path, mode) -> None:
    if mode == GenerationMode.NEGATIVE and path == "/v1/health":
        pytest.skip("GET /v1/health takes no input: there is no invalid request to generate")
    operation = api_schema[path][method]
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call()
        seen.append(response.status_code)
        assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text[:300]}"
        case.validate_response(response, checks=CHECKS)

    run()
    assert seen  # hypothesis did run cases
    if mode == GenerationMode.POSITIVE:
        assert 200 in seen, f"no valid request reached the model: {sorted(set(seen))}"
