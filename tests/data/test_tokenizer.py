"""The tokenizer: packaged MiniLM vocabulary + task tokens, trained WordPiece vocabularies, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.data.manifest import read_manifest
from medunifier.data.tokenizer import (
    ALL_SPECIAL_TOKENS,
    ensure_special_tokens,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer("minilm")


def test_minilm_gets_task_tokens(minilm):
    assert len(minilm) == 30522 + 2
    ids = special_ids(minilm)
    assert ids["pad"] == 0 and ids["cls"] == 101 and ids["sep"] == 102 and ids["mask"] == 103
    assert {ids["dec"], ids["enc"]} == {30522, 30523}
    assert len(set(ids.values())) == len(ids)
    # task tokens are never split and are skipped when decoding
    encoded = minilm("[DEC] small left pleural effusion", add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids["dec"]
    assert minilm.decode(encoded, skip_special_tokens=True) == "small left pleural effusion"
    full = minilm("No pneumothorax.")["input_ids"]
    assert full[0] == ids["cls"] and full[-1] == ids["sep"]


def test_ensure_special_tokens_is_idempotent_and_survives_saving(minilm, tmp_path: Path):
    before = len(minilm)
    ensure_special_tokens(minilm)
    assert len(minilm) == before
    minilm.save_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert len(again) == before and special_ids(again) == special_ids(minilm)


def test_missing_or_hub_like_spec_is_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer("bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken"):
        load_tokenizer(str(tmp_path / "broken"))


def test_bert_folder_with_only_vocab_txt(tmp_path: Path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lung",
                                                 "##s", "are", "clear", "."]) + "\n")
    tok = load_tokenizer(str(folder))
    ids = special_ids(tok)
    assert len(tok) == 13 and {ids["dec"], ids["enc"]} == {11, 12}
    assert tok("The Lungs are clear.")["input_ids"] == [2, 5, 6, 7, 8, 9, 10, 3]


def _texts(manifest: Path) -> list[str]:
    records, _ = read_manifest(manifest)
    return [t for r in records for t in (r.text, r.question, r.answer) if t]


def test_train_tokenizer_roundtrip(tiny_manifest: Path, tmp_path: Path):
    texts = _texts(tiny_manifest) * 3
    tok = train_tokenizer(texts, tmp_path / "wp", vocab_size=300, min_frequency=1)
    assert (tmp_path / "wp" / "tokenizer.json").is_file()
    ids = special_ids(tok)
    assert sorted(ids.values()) == list(range(len(ALL_SPECIAL_TOKENS)))  # specials first, no growth
    assert len(tok) <= 300
    loaded = load_tokenizer(str(tmp_path / "wp"))
    assert len(loaded) == len(tok) and special_ids(loaded) == ids
    encoded = loaded("FINDINGS: The Lungs are CLEAR.")["input_ids"]
    assert encoded[0] == ids["cls"] and encoded[-1] == ids["sep"]
    assert ids["unk"] not in encoded  # every word was in the training text
    assert loaded.decode(encoded, skip_special_tokens=True) == "findings : the lungs are clear."
    pieces = loaded.tokenize("[ENC] the lungs")
    assert pieces[0] == "[ENC]" and "".join(pieces[1:]).replace("##", "") == "thelungs"


def test_cli_data_tokenizer(tiny_manifest: Path, tmp_path: Path):
    out = tmp_path / "cli_tok"
    result = CliRunner().invoke(app, ["data", "tokenizer", "--manifest", str(tiny_manifest),
                                      "--manifest", str(tiny_manifest), "--out", str(out), "--vocab-size", "250"])
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(str(out))
    assert 7 < len(tok) <= 250
    assert tok.tokenize("effusion") == ["effusion"]  # a word from the report texts
    bad = CliRunner().invoke(app, ["data", "tokenizer", "--manifest", str(tmp_path / "absent.jsonl"),
                                   "--out", str(out), "--vocab-size", "250"])
    assert bad.exit_code != 0 and "absent.jsonl" in bad.output


def _iu_reports(archive: Path, limit: int) -> list[str]:
    import tarfile
    import xml.etree.ElementTree as ET

    reports = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {el.get("Label"): (el.text or "").strip() for el in root.iter("AbstractText")}
            text = " ".join(s for s in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if s)
            if sections.get("FINDINGS"):
                reports.append(text)
            if len(reports) == limit:
                break
    return reports


def test_train_on_real_iu_xray_reports(shared_data: Path, tmp_path: Path, minilm):
    archive = shared_data / "iu_xray_reports" / "NLMCXR_reports.tgz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    reports = _iu_reports(archive, 800)
    train, held_out = reports[:600], reports[600:]
    tok = train_tokenizer(train, tmp_path / "iu", vocab_size=1500)
    ids = special_ids(tok)
    encoded = tok(held_out, add_special_tokens=False)["input_ids"]
    pieces = sum(len(e) for e in encoded)
    unknown = sum(e.count(ids["unk"]) for e in encoded)
    assert unknown / pieces < 0.005  # WordPiece falls back to characters, so unseen words still encode
    # domain words are whole tokens here, while the general MiniLM vocabulary splits them
    for word in ("pneumothorax", "cardiomediastinal", "effusion"):
        assert tok.tokenize(word) == [word]
    assert len(minilm.tokenize("pneumothorax")) > 1
    decoded = tok.decode(encoded[0])
    assert decoded.replace(" ", "") == held_out[0].lower().replace(" ", "")
