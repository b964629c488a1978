"""ManifestDataset items, the Collator's batch contract, and the mixture / resumable samplers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from medunifier.data.dataset import (
    Collator,
    ManifestDataset,
    MixtureSampler,
    ResumableRandomSampler,
    labels_vector,
    make_mixture_sampler,
)
from medunifier.data.findings import FINDINGS
from medunifier.data.manifest import Record, read_manifest
from medunifier.data.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def test_items(tiny_manifest: Path):
    ds = ManifestDataset(tiny_manifest, image_size=16, channels=3, mean=0.5, std=0.5)
    records, _ = read_manifest(tiny_manifest)
    assert len(ds) == 12
    item = ds[3]
    assert item["id"] == records[3].id and item["task"] == "vqa" and item["question"] and item["answer"]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    labels = item["labels"]
    assert labels.shape == (len(FINDINGS),)
    for i, name in enumerate(FINDINGS):
        assert labels[i] == records[3].labels.get(name, -1)  # findings absent from the record are -1
    assert ManifestDataset(tiny_manifest, image_size=8, channels=1)[0]["pixel_values"].shape == (1, 8, 8)


def test_split_and_task_filters(tiny_manifest: Path):
    assert len(ManifestDataset(tiny_manifest, splits=["train"])) == 8
    assert len(ManifestDataset(tiny_manifest, splits=["val", "test"])) == 4
    vqa = ManifestDataset(tiny_manifest, tasks=["vqa"])
    assert len(vqa) == 3 and all(r.task == "vqa" for r in vqa.records)
    records, _ = read_manifest(tiny_manifest)
    from_records = ManifestDataset(records[:5], root=tiny_manifest.parent, image_size=8)
    assert len(from_records) == 5 and from_records[4]["id"] == records[4].id


def test_labels_vector_uncertain_is_unknown():
    vec = labels_vector({"edema": 1, "cardiomegaly": 0, "nodule": -1, "not_a_finding": 1})
    expected = torch.full((len(FINDINGS),), -1.0)
    expected[FINDINGS.index("edema")] = 1.0
    expected[FINDINGS.index("cardiomegaly")] = 0.0
    assert torch.equal(vec, expected)


def test_unreadable_image_is_skipped_once(tiny_manifest: Path, tokenizer, capfd):
    (tiny_manifest.parent / "images" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tiny_manifest.parent / "images" / "0005.png").unlink()
    ds = ManifestDataset(tiny_manifest, image_size=16)
    assert ds[2] is None and ds[2] is None and ds[5] is None
    err = capfd.readouterr().err
    assert err.count("warning: skipped") == 2 and "0002.png" in err and "file not found" in err
    assert ds.skipped == 2 and ds.skipped_ids == ["tiny-02", "tiny-05"]
    loader = DataLoader(ds, batch_size=4, collate_fn=Collator(tokenizer, max_length=32))
    seen = [i for batch in loader for i in batch["ids"]]
    assert sorted(seen) == sorted(f"tiny-{i:02d}" for i in range(12) if i not in (2, 5))
    assert Collator(tokenizer)([None, None]) is None


def test_batch_contract(tiny_manifest: Path, tokenizer):
    ds = ManifestDataset(tiny_manifest, image_size=16, channels=3)
    collate = Collator(tokenizer, max_length=64)
    batch = collate([ds[i] for i in range(6)])  # items 0-5: reports and one vqa (3)
    ids = special_ids(tokenizer)
    B = 6
    assert set(batch) == {"ids", "pixel_values", "input_ids", "attention_mask", "prefix_lengths", "labels",
                          "tasks", "modalities"}
    assert batch["pixel_values"].shape == (B, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == B
    assert batch["labels"].shape == (B, len(FINDINGS)) and batch["labels"].dtype == torch.float32
    assert batch["tasks"] == [ds[i]["task"] for i in range(6)] and batch["modalities"] == ["cxr"] * B
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1]  # padded to the longest, not to max_length
    for row in range(B):
        n = int(lengths[row])
        seq = batch["input_ids"][row]
        assert seq[0] == ids["cls"] and seq[n - 1] == ids["sep"]
        assert (seq[n:] == ids["pad"]).all() and (batch["attention_mask"][row, :n] == 1).all()
        item = ds[row]
        if item["task"] == "vqa":
            question = tokenizer(item["question"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(item["answer"], add_special_tokens=False)["input_ids"]
            p = int(batch["prefix_lengths"][row])
            assert p == len(question) + 2 and seq[p - 1] == ids["sep"]
            assert seq[1 : p - 1].tolist() == question and seq[p : n - 1].tolist() == answer
        else:
            assert batch["prefix_lengths"][row] == 0
            assert seq[1 : n - 1].tolist() == tokenizer(item["text"], add_special_tokens=False)["input_ids"]
    assert (batch["prefix_lengths"] > 0).sum() == 1
    fixed = Collator(tokenizer, max_length=64, pad_to_max_length=True)([ds[0]])
    assert fixed["input_ids"].shape == (1, 64)


def _qa_item(question: str, answer: str) -> dict:
    return {"id": "q", "pixel_values": torch.zeros(1, 4, 4), "text": "", "task": "vqa", "question": question,
            "answer": answer, "labels": torch.full((len(FINDINGS),), -1.0), "modality": "cxr"}


def test_truncation_keeps_sep_and_answer(tokenizer):
    ids = special_ids(tokenizer)
    collate = Collator(tokenizer, max_length=12)
    long_report = {**_qa_item("", ""), "task": "report", "text": "word " * 50}
    seq = collate([long_report])["input_ids"][0]
    assert len(seq) == 12 and seq[0] == ids["cls"] and seq[-1] == ids["sep"]

    long_question = "is there any sign of " + "very " * 30 + "large effusion?"
    batch = collate([_qa_item(long_question, "yes")])
    seq, p = batch["input_ids"][0], int(batch["prefix_lengths"][0])
    yes = tokenizer.convert_tokens_to_ids("yes")
    assert len(seq) == 12 and seq[p - 1] == ids["sep"] and seq[-1] == ids["sep"]
    assert seq[p:-1].tolist() == [yes]  # the question was cut, the answer kept whole

    both_long = collate([_qa_item(long_question, "left " * 40)])
    seq, p = both_long["input_ids"][0], int(both_long["prefix_lengths"][0])
    assert len(seq) == 12 and p >= 3 and len(seq) - 1 - p >= 1  # some question and some answer survive

    long_answer = collate([_qa_item("where?", "left " * 40)])
    seq, p = long_answer["input_ids"][0], int(long_answer["prefix_lengths"][0])
    where = tokenizer("where?", add_special_tokens=False)["input_ids"]
    assert seq[1 : p - 1].tolist() == where  # a short question is never cut for the answer


# ----------------------------------------------------------------------------------------- samplers


def _records() -> list[Record]:
    out = [Record(id=f"r{i}", task="report", source="synthcxr") for i in range(300)]
    out += [Record(id=f"v{i}", task="vqa", source="vqa-rad") for i in range(40)]
    out += [Record(id=f"c{i}", task="caption", source="pneumoniamnist") for i in range(7)]
    return out


def test_mixture_proportions_follow_weights():
    records = _records()
    mixture = {"report": 0.2, "vqa": 0.5, "pneumoniamnist": 0.3}  # a task key and a source key
    sampler = make_mixture_sampler(records, mixture, seed=3, num_samples=10_000)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 10_000
    counts = Counter(records[i].task for i in draws)
    assert abs(counts["report"] / 10_000 - 0.2) < 0.02
    assert abs(counts["vqa"] / 10_000 - 0.5) < 0.02
    assert abs(counts["caption"] / 10_000 - 0.3) < 0.02
    # within a group every record comes once before any repeats
    captions = [i for i in draws if records[i].task == "caption"]
    assert sorted(captions[:7]) == list(range(340, 347))
    assert draws == list(make_mixture_sampler(records, mixture, seed=3, num_samples=10_000))
    assert draws != list(make_mixture_sampler(records, mixture, seed=4, num_samples=10_000))
    assert list(sampler) != draws  # the next epoch draws a new order


def test_mixture_errors():
    with pytest.raises(ValueError, match="match no record"):
        MixtureSampler(_records(), {"report": 1.0, "slake": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        MixtureSampler(_records(), {"report": -1.0})
    with pytest.raises(TypeError):
        len(MixtureSampler(_records(), {"report": 1.0}))


def test_mixture_ranks_and_resume():
    records, mixture = _records(), {"report": 1.0, "vqa": 1.0}
    whole = list(MixtureSampler(records, mixture, seed=1, num_samples=200))
    ranks = [list(MixtureSampler(records, mixture, seed=1, num_samples=100, num_replicas=2, rank=r)) for r in (0, 1)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]

    endless = iter(MixtureSampler(records, mixture, seed=1))
    assert [next(endless) for _ in range(200)] == whole

    first = MixtureSampler(records, mixture, seed=1, num_samples=200)
    it = iter(first)
    head = [next(it) for _ in range(37)]
    resumed = MixtureSampler(records, mixture, seed=1, num_samples=200)
    resumed.load_state_dict(first.state_dict())
    assert head + list(resumed) == whole


def test_resumable_sampler_matches_distributed_sampler():
    for n, replicas in ((10, 2), (11, 2), (7, 3)):
        for rank in range(replicas):
            ours = ResumableRandomSampler(n, seed=5, num_replicas=replicas, rank=rank)
            ref = DistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=True, seed=5)
            for epoch in (0, 1):
                ours.set_epoch(epoch)
                ref.set_epoch(epoch)
                assert list(ours) == list(ref)
        union = [i for r in range(replicas) for i in ResumableRandomSampler(n, seed=5, num_replicas=replicas, rank=r)]
        assert set(union) == set(range(n)) and len(union) == -(-n // replicas) * replicas


def test_resumable_sampler_resumes_at_the_next_sample():
    sampler = ResumableRandomSampler(23, seed=9)
    epoch0, epoch1 = list(sampler), list(sampler)  # iterating again advances the epoch
    assert sorted(epoch0) == list(range(23)) and epoch0 != epoch1

    interrupted = ResumableRandomSampler(23, seed=9)
    it = iter(interrupted)
    head = [next(it) for _ in range(10)]
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["position"] == 10
    restored = ResumableRandomSampler(23, seed=9)
    restored.load_state_dict(state)
    restored.set_epoch(0)  # a training loop's usual call must not lose the restored position
    assert head + list(restored) == epoch0
    assert list(restored) == epoch1  # and the following epoch is the uninterrupted one

    with pytest.raises(ValueError, match="23 samples"):
        ResumableRandomSampler(24, seed=9).load_state_dict(state)


def test_resumable_sampler_with_read_ahead_workers():
    n, batch = 40, 4
    dataset = list(range(n))
    sampler = ResumableRandomSampler(n, seed=2)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    consumed = [int(x) for _ in range(3) for x in next(it)]
    assert sampler.position > len(consumed)  # the workers read ahead
    state = sampler.state_dict(samples_consumed=len(consumed))
    del it
    restored = ResumableRandomSampler(n, seed=2)
    restored.load_state_dict(state)
    rest = [int(x) for b in DataLoader(dataset, batch_size=batch, sampler=restored) for x in b]
    assert consumed + rest == ResumableRandomSampler(n, seed=2).global_order(0).tolist()


def test_resume_with_other_world_size():
    two = ResumableRandomSampler(20, seed=4, num_replicas=2, rank=0)
    it = iter(two)
    for _ in range(3):
        next(it)
    one = ResumableRandomSampler(20, seed=4)
    one.load_state_dict(two.state_dict())
    assert list(one) == one.global_order(0)[6:].tolist()


def test_real_vqa_rad_batch(shared_data: Path, tokenizer):
    import json

    folder = shared_data / "vqa_rad"
    if not (folder / "trainset.json").is_file():
        pytest.skip(f"{folder / 'trainset.json'} is absent")
    questions = json.loads((folder / "trainset.json").read_text())[:6]
    records = [Record(id=str(q["qid"]), image=f"images/{q['image_name']}", task="vqa", question=q["question"],
                      answer=str(q["answer"]), modality=q["image_organ"].lower(), source="vqa-rad") for q in questions]
    ds = ManifestDataset(records, root=folder, image_size=32, channels=3)
    batch = Collator(tokenizer, max_length=40)([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].std() > 0.1
    assert ds.skipped == 0 and batch["ids"] == [r.id for r in records]
    for row, record in enumerate(records):
        p, n = int(batch["prefix_lengths"][row]), int(batch["attention_mask"][row].sum())
        answer = tokenizer.decode(batch["input_ids"][row, p : n - 1])
        question = tokenizer.decode(batch["input_ids"][row, 1 : p - 1])
        assert answer.replace(" ", "") == record.answer.lower().replace(" ", "")
        assert question.replace(" ", "") == record.question.lower().replace(" ", "")
