"""The Python API (Copilot): image forms, zero-shot labels, retrieval, the generation seam, thread safety."""

from __future__ import annotations

import io
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import CASES, FakeGenerator, dicom_dataset, encode, picture

import medunifier.generate
from medunifier.data.images import ImageLoadError
from medunifier.serve.api import Copilot, GenerationUnavailable, IndexUnavailable, load_generator


def test_every_image_form_gives_the_same_pixels_and_report(base_copilot, tmp_path) -> None:
    arr = picture(5)
    u8 = (arr * 255 + 0.5).astype(np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode(arr))
    forms = [path, str(path), encode(arr), Image.fromarray(u8), u8, u8.astype(np.float32) / 255,
             np.repeat(u8[..., None], 3, axis=-1)]
    pixels = base_copilot.preprocess(forms)
    assert pixels.shape == (len(forms), 1, 32, 32)
    for i in range(1, len(forms)):
        torch.testing.assert_close(pixels[i], pixels[0], atol=2e-3, rtol=0)
    reports = base_copilot.report(forms[:3])
    assert len(reports) == 3 and reports[0] == reports[1] == reports[2]


def test_dicom_dataset_and_file_are_accepted(base_copilot, tmp_path) -> None:
    ds = dicom_dataset(picture(6))
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    pixels = base_copilot.preprocess([ds, path])
    torch.testing.assert_close(pixels[0], pixels[1])
    assert pixels.std() > 0.05  # windowed to the full range, not a flat image
    assert len(base_copilot.report(ds)) == 1


def test_bad_images_are_refused_with_the_reason(base_copilot, tmp_path) -> None:
    with pytest.raises(ValueError, match="shape"):
        base_copilot.to_array(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="not found"):
        base_copilot.to_array(tmp_path / "missing.png")
    small = Copilot(base_copilot.model, checksum="x", generator=None, max_pixels=100)
    with pytest.raises(ImageLoadError, match="refused"):
        small.to_array(encode(picture(0, (20, 20))))
    with pytest.raises(ValueError, match="pixels"):
        small.to_array(np.zeros((20, 20)))
    with pytest.raises(TypeError):
        base_copilot.to_array(12)


def test_report_length_is_capped_at_the_model_text_length(base_copilot, monkeypatch) -> None:
    # the decoding budget itself is checked: re-tokenising a random model's decoded text does not give
    # back the generated token count (word pieces merge and split)
    asked = []
    original = base_copilot.model.generate_report

    def recording(pixels, **kwargs):
        asked.append(kwargs["max_length"])
        return original(pixels, **kwargs)

    monkeypatch.setattr(base_copilot.model, "generate_report", recording)
    limit = base_copilot.model.config.text.max_length
    base_copilot.report(picture(1), num_beams=1, max_length=10_000)
    base_copilot.report(picture(1), num_beams=1, max_length=5)
    base_copilot.report(picture(1), num_beams=1)
    assert asked == [limit, 5, limit]


def test_classify_labels_use_prompt_ensembles_for_known_findings(base_copilot) -> None:
    prompts = base_copilot.label_prompts(["Pleural effusion", "a dog"])
    assert prompts["a dog"] == ["a dog"]
    assert len(prompts["Pleural effusion"]) > 1 and prompts["Pleural effusion"] == base_copilot.prompt_sets()[
        "pleural_effusion"]
    result = base_copilot.classify([picture(1), picture(2)], ["Pleural effusion", "a dog"])
    assert len(result) == 2 and result[0].labels == ["Pleural effusion", "a dog"]
    assert sum(result[0].probabilities) == pytest.approx(1.0, abs=1e-5)
    mean = base_copilot.classify(picture(1), {"x": ["one", "two"]}, ensemble="mean")[0].similarities[0]
    top = base_copilot.classify(picture(1), {"x": ["one", "two"]}, ensemble="max")[0].similarities[0]
    assert top >= mean
    with pytest.raises(ValueError):
        base_copilot.classify(picture(1), {"x": []})


def test_retrieve_text_and_image_queries(make_copilot, case_index) -> None:
    copilot = make_copilot(generator=False)
    hits = copilot.retrieve(CASES[1][1], k=2, mode="text")
    assert [h.rank for h in hits] == [1, 2] and hits[0].id == "case-1" and hits[0].labels == CASES[1][2]
    image_path = case_index.root / hits[0].image
    assert image_path.is_file()  # stored relative to the manifest folder
    hits = copilot.retrieve(image_path, k=len(CASES) + 10, mode="image")
    assert hits[0].id == "case-1" and len(hits) == len(CASES)
    with pytest.raises(IndexUnavailable):
        make_copilot(index=False).retrieve("x")
    with pytest.raises(ValueError):
        copilot.retrieve("   ")


def test_an_index_from_other_weights_is_refused(make_copilot, index_dir) -> None:
    copilot = make_copilot(index=False)
    copilot.set_index(index_dir)
    other = Copilot(copilot.model, checksum="sha256:" + "0" * 64, generator=None)
    with pytest.raises(ValueError, match="another model"):
        other.set_index(index_dir)
    other.set_index(index_dir, allow_other_model=True)
    assert len(other.index) == len(CASES)


def test_generation_is_off_with_a_reason_until_the_generate_module_provides_it(base_copilot) -> None:
    assert base_copilot.generator is None
    generator, reason = load_generator(base_copilot.model, base_copilot.model_dir)
    if generator is None:
        assert reason
    copilot = Copilot(base_copilot.model, checksum="x", generator=None)
    with pytest.raises(GenerationUnavailable):
        copilot.synthesize("cardiomegaly")
    with pytest.raises(GenerationUnavailable):
        copilot.edit(picture(0), "cardiomegaly")


def test_the_generation_seam_picks_up_a_synthesizer(base_copilot, monkeypatch) -> None:
    seen = {}

    class Synthesizer(FakeGenerator):
        @classmethod
        def from_pretrained(cls, model_dir, model):
            seen["dir"], seen["model"] = model_dir, model
            if model_dir is None:
                raise FileNotFoundError("no prior")
            return cls()

    monkeypatch.setattr(medunifier.generate, "Synthesizer", Synthesizer, raising=False)
    copilot = Copilot(base_copilot.model, model_dir=base_copilot.model_dir, checksum="x")
    assert isinstance(copilot.generator, Synthesizer) and seen["model"] is base_copilot.model
    images = copilot.synthesize("Small right pleural effusion.", n=2, seed=4)
    assert len(images) == 2 and all(im.synthetic for im in images)
    assert Image.open(io.BytesIO(images[0].png())).text["Synthetic"] == "true"

    monkeypatch.setattr(medunifier.generate, "Synthesizer", types.SimpleNamespace(from_pretrained=lambda d, model: 1))
    copilot = Copilot(base_copilot.model, model_dir=base_copilot.model_dir, checksum="x")
    assert copilot.generator is None and "lacks" in copilot.generation_reason


def test_edit_strength_and_difference(make_copilot) -> None:
    copilot = make_copilot(index=False)
    result = copilot.edit(picture(3), "cardiomegaly", strength=0.5, seed=1)
    assert result.synthetic and result.edited.synthetic and result.edited.kind == "edit"
    assert result.source.shape == result.edited.image.shape == (32, 32) and result.difference.shape == (32, 32, 3)
    assert result.max_abs_difference > result.mean_abs_difference > 0
    unchanged = copilot.edit(picture(3), "cardiomegaly", strength=0.0)
    assert unchanged.max_abs_difference == 0
    with pytest.raises(ValueError, match="strength"):
        copilot.edit(picture(3), "x", strength=2)


def test_one_copilot_shared_by_threads_matches_serial_results(make_copilot) -> None:
    copilot = make_copilot()
    images = [picture(20 + i) for i in range(3)]
    serial = [(copilot.report(im, num_beams=1)[0], copilot.classify(im)[0].probabilities,
               [h.id for h in copilot.retrieve(im, k=3)]) for im in images]
    results: dict[int, tuple] = {}

    def worker(i: int) -> None:
        im = images[i % 3]
        results[i] = (copilot.report(im, num_beams=1)[0], copilot.classify(im)[0].probabilities,
                      [h.id for h in copilot.retrieve(im, k=3)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        report, probs, ids = results[i]
        assert report == serial[i % 3][0] and ids == serial[i % 3][2]
        np.testing.assert_allclose(probs, serial[i % 3][1], atol=1e-6)


def test_info_describes_the_model(make_copilot) -> None:
    info = make_copilot().info()
    assert info["parameters"] > 0 and info["image"] == {"size": 32, "channels": 1}
    assert info["index"]["count"] == len(CASES) and info["generation"]["available"] is True


@pytest.mark.parametrize("kind", ["masked", "autoregressive"])
def test_a_run_with_a_trained_prior_serves_the_real_synthesizer(run_dir, tmp_path, kind) -> None:
    """The seam end to end: a prior saved in RUN/prior is found, and synthesize / edit go through it."""
    import shutil

    from fastapi.testclient import TestClient

    from medunifier.generate.priors import HierarchicalPrior
    from medunifier.generate.train_prior import prior_config, prior_settings, save_prior
    from medunifier.serve.api import model_checksum
    from medunifier.serve.app import create_app

    run = tmp_path / "run"
    shutil.copytree(run_dir / "model", run / "model")
    copilot = Copilot.from_pretrained(run, device="cpu")
    assert copilot.generator is None and "prior" in copilot.generation_reason
    settings = prior_settings(copilot.model.config, [f"kind={kind}", "width=32", "layers=1", "heads=2", "steps=2"])
    torch.manual_seed(0)
    prior = HierarchicalPrior(prior_config(copilot.model.config, settings))
    save_prior(prior, run / "prior", {"model_checksum": model_checksum(run).split(":")[1],
                                      "settings": settings.model_dump()})
    copilot = Copilot.from_pretrained(run, device="cpu")
    assert type(copilot.generator).__name__ == "Synthesizer", copilot.generation_reason
    images = copilot.synthesize("Small left pleural effusion.", n=2, steps=2, seed=3)
    assert [im.image.shape for im in images] == [(32, 32), (32, 32)]
    again = copilot.synthesize("Small left pleural effusion.", n=2, steps=2, seed=3)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(images, again))
    result = copilot.edit(picture(4), "Large right pleural effusion.", strength=0.0, steps=2, seed=1)
    assert result.max_abs_difference == 0  # nothing re-sampled: the edit is the reconstruction
    result = copilot.edit(picture(4), "Large right pleural effusion.", strength=1.0, steps=2, seed=1)
    assert result.max_abs_difference > 0
    client = TestClient(create_app(copilot), base_url="http://localhost")
    assert client.get("/v1/model").json()["generation"]["available"] is True
    body = client.post("/v1/synthesize", json={"text": "Cardiomegaly.", "n": 1, "steps": 2, "seed": 0}).json()
    assert body["synthetic"] is True and len(body["images"]) == 1
