"""Tar shards: layout, streaming across ranks x DataLoader workers (each sample once), robustness, CLI."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.data.dataset import ManifestDataset
from medunifier.data.manifest import read_manifest, write_manifest
from medunifier.data.shards import StreamingShardDataset, iter_shard_samples, read_index, write_shards

ALL_IDS = {f"tiny-{i:02d}" for i in range(12)}


def _ids(items) -> list[str]:
    return [item["id"] for item in items]


def test_layout_and_index(tiny_manifest: Path, tmp_path: Path):
    paths = write_shards(tiny_manifest, tmp_path / "shards", shard_size=5)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    index = read_index(tmp_path / "shards")
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["total"] == 12
    records, _ = read_manifest(tiny_manifest)
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["000000000.png", "000000000.json", "000000001.png", "000000001.json"]
        image = tar.extractfile("000000001.png").read()
        record = json.loads(tar.extractfile("000000001.json").read())
    assert image == (tiny_manifest.parent / records[1].image).read_bytes()  # bytes as stored
    assert record["id"] == records[1].id and record["labels"] == records[1].labels
    assert not list((tmp_path / "shards").glob(".*"))  # no temp files left behind


def test_stream_matches_manifest_dataset(tiny_manifest: Path, tmp_path: Path):
    write_shards(tiny_manifest, tmp_path / "shards", shard_size=4)
    stream = list(StreamingShardDataset(tmp_path / "shards", image_size=16, channels=3, rank=0, world_size=1))
    reference = {item["id"]: item for item in ManifestDataset(tiny_manifest, image_size=16, channels=3)}
    assert _ids(stream) == sorted(reference)  # unshuffled: manifest order
    for item in stream:
        ref = reference[item["id"]]
        assert torch.equal(item["pixel_values"], ref["pixel_values"]) and torch.equal(item["labels"], ref["labels"])
        assert {k: item[k] for k in ("text", "task", "question", "answer", "modality")} == {
            k: ref[k] for k in ("text", "task", "question", "answer", "modality")}
    train = list(StreamingShardDataset(tmp_path / "shards", image_size=8, splits=["train"], tasks=["report"]))
    assert len(train) == 6  # 8 train records, 2 of them vqa


@pytest.mark.parametrize("shard_size", [3, 5, 2])  # 4 shards (even), 3 shards (< 4 consumers), 6 shards (mixed)
def test_two_ranks_two_workers_read_each_sample_once(tiny_manifest: Path, tmp_path: Path, shard_size: int):
    write_shards(tiny_manifest, tmp_path / "shards", shard_size=shard_size)
    seen: list[str] = []
    per_rank = []
    for rank in range(2):
        ds = StreamingShardDataset(tmp_path / "shards", image_size=8, rank=rank, world_size=2, shuffle_buffer=3, seed=1)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        ids = _ids(loader)
        per_rank.append(len(ids))
        seen += ids
    assert len(seen) == len(set(seen)) == 12 and set(seen) == ALL_IDS
    assert min(per_rank) >= 4  # neither rank is starved


def test_shuffle_is_seeded_per_epoch(tiny_manifest: Path, tmp_path: Path):
    write_shards(tiny_manifest, tmp_path / "shards", shard_size=3)
    ds = StreamingShardDataset(tmp_path / "shards", image_size=8, seed=7, shuffle_buffer=5, rank=0, world_size=1)
    epoch0, epoch1 = _ids(ds), _ids(ds)  # each pass is the next epoch
    assert sorted(epoch0) == sorted(epoch1) == sorted(ALL_IDS)
    assert epoch0 != epoch1 and epoch0 != sorted(ALL_IDS)
    ds.set_epoch(1)
    assert _ids(ds) == epoch1
    ds.set_epoch(0)
    assert _ids(ds) == epoch0
    # persistent workers keep their copy of the dataset: the epoch still advances inside them
    loader = DataLoader(StreamingShardDataset(tmp_path / "shards", image_size=8, seed=7, shuffle_buffer=5, rank=0,
                                              world_size=1), batch_size=None, num_workers=1, persistent_workers=True)
    assert _ids(loader) == epoch0 and _ids(loader) == epoch1


def test_missing_and_corrupt_images(tiny_manifest: Path, tmp_path: Path, capfd):
    records, _ = read_manifest(tiny_manifest)
    records[4] = records[4].model_copy(update={"image": "images/absent.png"})
    records[6] = records[6].model_copy(update={"image": None})
    write_manifest(records, tiny_manifest)
    (tiny_manifest.parent / "images" / "0009.png").write_bytes(b"not a png at all")
    write_shards(tiny_manifest, tmp_path / "shards", shard_size=5)
    index = read_index(tmp_path / "shards")
    assert index["total"] == 10 and len(index["skipped"]) == 2
    assert any("tiny-04" in s for s in index["skipped"]) and any("tiny-06" in s for s in index["skipped"])
    ds = StreamingShardDataset(tmp_path / "shards", image_size=8, rank=0, world_size=1)
    ids = _ids(ds)
    assert set(ids) == ALL_IDS - {"tiny-04", "tiny-06", "tiny-09"} and ds.skipped == 1
    assert "tiny-09" in capfd.readouterr().err


def test_truncated_shard_keeps_what_it_can(tiny_manifest: Path, tmp_path: Path, capfd):
    paths = write_shards(tiny_manifest, tmp_path / "shards", shard_size=12)
    data = paths[0].read_bytes()
    with tarfile.open(paths[0]) as tar:
        members = tar.getmembers()  # png, json, png, json, ...
    # a cut between two samples (tarfile itself ends silently there), between a sample's png and
    # json, and inside a member's data
    for cut, complete in ((members[4].offset, 2), (members[3].offset, 1), (members[2].offset_data + 100, 1)):
        paths[0].write_bytes(data[:cut])
        samples = list(iter_shard_samples(paths[0], expected=12))
        assert [k for k, parts in samples if {"json", "png"} <= set(parts)] == [f"{i:09d}" for i in range(complete)]
        assert "shard unreadable" in capfd.readouterr().err
    items = list(StreamingShardDataset(tmp_path / "shards", image_size=8, rank=0, world_size=1))
    assert 1 <= len(items) < 12


def test_webdataset_reads_our_shards(tiny_manifest: Path, tmp_path: Path):
    wds = pytest.importorskip("webdataset")
    paths = write_shards(tiny_manifest, tmp_path / "shards", shard_size=6)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert len(samples) == 12 and all({"png", "json"} <= set(s) for s in samples)
    assert {json.loads(s["json"])["id"] for s in samples} == ALL_IDS


def test_cli_data_shards(tiny_manifest: Path, tmp_path: Path):
    out = tmp_path / "cli_shards"
    result = CliRunner().invoke(app, ["data", "shards", str(tiny_manifest), "--out", str(out), "--shard-size", "4"])
    assert result.exit_code == 0, result.output
    assert "12 samples in 3 shards" in result.output
    assert read_index(out)["total"] == 12
    only_val = CliRunner().invoke(app, ["data", "shards", str(tiny_manifest), "--out", str(tmp_path / "val"),
                                        "--shard-size", "4", "--split", "val"])
    assert only_val.exit_code == 0 and read_index(tmp_path / "val")["total"] == 2
    bad = CliRunner().invoke(app, ["data", "shards", str(tmp_path / "absent.jsonl"), "--out", str(out)])
    assert bad.exit_code != 0 and "absent.jsonl" in bad.output
