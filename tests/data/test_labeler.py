"""The negation-aware report labeler: hand-checked phrases, real IU X-Ray reports, SynthCXR agreement."""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import pytest

from medunifier.data.findings import FINDINGS
from medunifier.data.labeler import label_mentions, label_report, label_reports
from medunifier.data.reports import report_text, write_report
from medunifier.data.synthcxr import _rngs, sample_case


def _on(labels: dict[str, int]) -> dict[str, int]:
    return {name: value for name, value in labels.items() if value != 0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pneumothorax.", {"no_finding": 1}),
        ("No pleural effusion or pneumothorax. Heart size is normal.", {"no_finding": 1}),
        ("Small left pneumothorax.", {"pneumothorax": 1}),
        ("The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.", {"no_finding": 1}),
        ("Negative for focal consolidation, effusion or edema.", {"no_finding": 1}),
        ("Free of pneumothorax.", {"no_finding": 1}),
        ("Pneumothorax is not seen.", {"no_finding": 1}),
        ("The left pleural effusion has resolved.", {"no_finding": 1}),
        ("Resolved right pleural effusion.", {"no_finding": 1}),
        ("No evidence of pulmonary edema.", {"no_finding": 1}),
        ("The heart is not enlarged.", {"no_finding": 1}),
        ("Enlarged cardiac silhouette.", {"cardiomegaly": 1}),
        ("The cardiac silhouette remains markedly enlarged.", {"cardiomegaly": 1}),
        ("Pulmonary vascular congestion.", {"edema": 1}),
        ("Mild interstitial edema.", {"edema": 1}),
        ("Blunting of the right costophrenic angle.", {"pleural_effusion": 1}),
        ("Pericardial effusion.", {"no_finding": 1}),
        ("ET tube terminates 4 cm above the carina.", {"support_devices": 1}),
        ("Right PICC with tip in the SVC.", {"support_devices": 1}),
        ("Left chest wall pacemaker.", {"support_devices": 1}),
        ("Bibasilar subsegmental atelectasis.", {"atelectasis": 1}),
        ("8 mm nodule in the right upper lobe.", {"nodule": 1}),
        ("Left lower lobe pneumonia.", {"consolidation": 1}),
        # termination: "but" ends the negation's scope
        ("No effusion, but there is a small right pneumothorax.", {"pneumothorax": 1}),
        # order: the negation governs only what follows it
        ("Small left pleural effusion without pneumothorax.", {"pleural_effusion": 1}),
        ("Cardiomegaly without edema.", {"cardiomegaly": 1}),
        # pseudo-negation: "no change" does not negate
        ("No change in the moderate left pneumothorax.", {"pneumothorax": 1}),
        # hedges are uncertain, and "cannot be excluded" is not a negation
        ("Possible right lower lobe pneumonia.", {"consolidation": -1}),
        ("A small effusion cannot be excluded.", {"pleural_effusion": -1}),
        ("Borderline cardiomegaly.", {"cardiomegaly": -1}),
        ("Opacity at the left base, likely atelectasis. No pneumothorax.", {"atelectasis": -1}),
        # decimals do not end a sentence
        ("ET tube 4.5 cm above the carina. No pneumothorax.", {"support_devices": 1}),
    ],
)
def test_hand_checked_phrases(text: str, expected: dict[str, int]) -> None:
    assert _on(label_report(text)) == expected


def test_uncertain_policy_and_batch() -> None:
    text = "Possible small left pleural effusion. No pneumothorax."
    assert label_report(text)["pleural_effusion"] == -1
    assert label_report(text)["no_finding"] == 0  # an uncertain finding is not a normal study
    assert label_report(text, uncertain=1)["pleural_effusion"] == 1
    zeros = label_report(text, uncertain=0)
    assert zeros["pleural_effusion"] == 0 and set(zeros.values()) <= {0, 1}
    with pytest.raises(ValueError):
        label_report(text, uncertain=2)
    batch = label_reports(["No pneumothorax.", "Large right pneumothorax."])
    assert [b["pneumothorax"] for b in batch] == [0, 1]
    assert all(list(b) == list(FINDINGS) for b in batch)
    assert label_report("") == {**{name: 0 for name in FINDINGS}, "no_finding": 1}
    mention = label_mentions("There is no pneumothorax.")[0]
    assert (mention.finding, mention.value) == ("pneumothorax", 0)


def test_agrees_with_synthcxr_generator_labels() -> None:
    """>= 99% agreement over (report, finding) pairs on 2,000 SynthCXR reports."""
    agree = total = 0
    disagreements = []
    for i in range(2000):
        case_rng, _, text_rng = _rngs(11, 0, i)
        case = sample_case(case_rng)
        text = report_text(*write_report(case.findings, text_rng))
        truth, labels = case.labels(), label_report(text)
        for name in FINDINGS:
            total += 1
            agree += truth[name] == labels[name]
            if truth[name] != labels[name]:
                disagreements.append((name, truth[name], labels[name], text))
    assert total == 2000 * len(FINDINGS)
    assert agree / total >= 0.99, disagreements[:5]


# ---------------------------------------------------------------------------- real reports (IU X-Ray)


def _shared_data() -> Path:
    env = os.environ.get("MEDUNIFIER_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def iu_reports() -> dict[int, str]:
    archive = _shared_data() / "iu_xray_reports" / "NLMCXR_reports.tgz"
    if not archive.is_file():
        pytest.skip(f"IU X-Ray reports not found at {archive} (shared data is absent in a user checkout)")
    wanted = {1, 2, 48, 64, 88, 105, 124, 153, 174, 202, 253, 723, 784, 2158, 3631, 3819}
    reports = {}
    with tarfile.open(archive) as tar:
        for n in wanted:
            xml = tar.extractfile(f"ecgen-radiology/{n}.xml").read().decode("utf-8")
            sections = dict(re.findall(r'<AbstractText Label="(\w+)">(.*?)</AbstractText>', xml, flags=re.S))
            reports[n] = f"FINDINGS: {sections.get('FINDINGS', '')} IMPRESSION: {sections.get('IMPRESSION', '')}"
    return reports


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        # "no pulmonary edema ... no focal consolidation ... no XXXX of a pleural effusion ... no evidence of pneumothorax"
        (1, {"no_finding": 1}),
        (2, {"cardiomegaly": -1}),  # "Borderline cardiomegaly."
        (48, {"nodule": 1}),  # "8mm nodule in the left lower lobe ... no pneumothorax or effusion"
        (64, {"pneumothorax": 1}),  # "small to moderate sized right apical pneumothorax"
        (88, {"cardiomegaly": 1, "edema": 1}),  # "mildly heart enlarged", "congestive heart failure"
        (105, {"pleural_effusion": 1, "support_devices": 1}),  # subclavian central venous catheter, blunting
        (124, {"pleural_effusion": 1, "consolidation": -1, "edema": -1}),  # "may be secondary to ... infiltrates or edema"
        (153, {"pleural_effusion": 1, "support_devices": 1}),  # right IJ catheter; small right effusion
        (174, {"support_devices": 1}),  # PICC; "No pleural effusion or pneumothorax is seen."
        (202, {"cardiomegaly": 1, "edema": 1, "pleural_effusion": 1}),  # "No visible pneumothorax."
        (253, {"pneumothorax": 1, "support_devices": 1}),  # "No change in moderate left pneumothorax"
        (723, {"atelectasis": 1}),  # "Bibasilar atelectasis." with "no pleural effusion or pneumothorax"
        (784, {"pleural_effusion": -1, "atelectasis": -1}),  # "Probable ... effusions"; "No lobar pneumonia."
        (2158, {"no_finding": 1}),  # fibrosis is not one of the nine; "Negative for pneumothorax, pleural effusion"
        (3631, {"support_devices": 1}),  # "All lines and tubes"; "No ... acute findings/pneumothorax noted."
        (3819, {"cardiomegaly": 1}),  # "pericardial effusion" is not a pleural effusion
    ],
)
def test_real_iu_xray_reports(iu_reports: dict[int, str], number: int, expected: dict[str, int]) -> None:
    assert _on(label_report(iu_reports[number])) == expected, iu_reports[number]
