"""The Processor: the tokenizer, the question/answer prompt layout the Collator trains with, image preprocessing,
and loading it back from a saved model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medunifier
from medunifier.config import ImageConfig, load_config
from medunifier.data.dataset import Collator
from medunifier.data.images import save_png
from medunifier.data.processor import Processor
from medunifier.tokens import load_tokenizer


@pytest.fixture(scope="module")
def processor() -> Processor:
    return Processor(load_tokenizer("minilm"), max_length=12, image=ImageConfig(size=16, channels=1))


def test_the_public_name_resolves_from_the_root_and_the_data_package() -> None:
    assert medunifier.Processor is Processor and medunifier.data.Processor is Processor
    assert "Processor" in medunifier.__all__


def test_question_prefixes_are_the_collators_training_prefix_left_padded(processor: Processor) -> None:
    questions = ["Is there a pleural effusion in the left lower lobe of the lung?", "Normal?"]
    ids, mask = processor.question_prefixes(questions)
    sp = processor.special
    collator = Collator(processor.tokenizer, max_length=12)
    for row, question in enumerate(collator._tokenize(questions)):
        training, prefix_length = collator.encode_qa(question, [])
        expected = [sp["dec"], *training[1:prefix_length]]  # "[DEC] question [SEP]" as trained (cut included)
        assert ids[row][mask[row] == 1].tolist() == expected
        assert (ids[row][mask[row] == 0] == sp["pad"]).all()
    assert mask[:, -1].all() and not mask[1, 0]  # left-padded: the short question starts later
    assert ids.shape[1] == 12 - 1  # the long question is cut to leave room for the closing [SEP]


def test_the_collator_lays_out_qa_batches_with_the_processor(processor: Processor) -> None:
    items = [{"id": "a", "task": "vqa", "question": "Is the heart enlarged?", "answer": "no", "text": "",
              "pixel_values": torch.zeros(1, 4, 4), "labels": torch.zeros(2), "modality": "cxr"},
             {"id": "b", "task": "report", "text": "The lungs are clear.", "pixel_values": torch.zeros(1, 4, 4),
              "labels": torch.zeros(2), "modality": "cxr"}]
    batch = Collator(processor.tokenizer, max_length=12)(items)
    question, answer = processor.token_ids(["Is the heart enlarged?", "no"])
    sequence, prefix = processor.encode_qa(question, answer)
    assert batch["input_ids"][0, :len(sequence)].tolist() == sequence and int(batch["prefix_lengths"][0]) == prefix
    text = processor.encode_text(processor.token_ids(["The lungs are clear."])[0])
    assert batch["input_ids"][1, :len(text)].tolist() == text
    assert processor.tokenize(["The lungs are clear."])["input_ids"][0].tolist() == text


def test_call_gives_every_input_and_decode_drops_special_tokens(processor: Processor) -> None:
    out = processor(images=[np.zeros((8, 8), np.float32)], text=["clear lungs"], questions=["normal?"])
    assert set(out) == {"pixel_values", "input_ids", "attention_mask", "prefix_ids", "prefix_mask"}
    assert processor.decode(out["input_ids"]) == ["clear lungs"]
    with pytest.raises(ValueError, match="give images"):
        processor()
    with pytest.raises(ValueError, match="max_length"):
        Processor(processor.tokenizer, max_length=3)


def test_images_are_resized_and_normalised_and_come_back(processor: Processor, tmp_path: Path) -> None:
    grey = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    save_png(grey, tmp_path / "a.png")
    colour = np.full((20, 20, 3), 255, np.uint8)  # white RGB, any size
    pixels = processor.preprocess([tmp_path / "a.png", colour])
    assert pixels.shape == (2, 1, 16, 16)
    assert torch.allclose(pixels[1], torch.ones(1, 16, 16))  # (1 - 0.5) / 0.5
    assert pixels[0].min() >= -1 and pixels[0].max() <= 1 and pixels[0, 0, 0, 0] < pixels[0, 0, -1, -1]
    back = processor.postprocess(pixels)
    assert back[1].shape == (16, 16) and (back[1] == 255).all()


def test_from_pretrained_reads_the_saved_models_tokenizer_and_image_section(tmp_path: Path) -> None:
    from medunifier.model.medunifier import MedUnifier
    from shrunk_config import SMALL_MODEL

    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny", [*SMALL_MODEL, "image.mean=0.4", "image.std=0.3"]))
    model.save_pretrained(tmp_path / "run" / "model")
    processor = Processor.from_pretrained(tmp_path / "run")
    assert processor.image == model.config.image and processor.max_length == model.config.text.max_length
    texts = ["Small left pleural effusion.", "No acute process."]
    tokens = processor.tokenize(texts)
    for key, value in model.tokenize(texts).items():
        assert torch.equal(tokens[key], value.cpu())
    with pytest.raises(FileNotFoundError, match="not a saved MedUnifier model"):
        Processor.from_pretrained(tmp_path)
