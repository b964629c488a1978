"""Radiology report text for SynthCXR cases: FINDINGS and IMPRESSION with real phrasing.

Every statement has at least five phrasings: positive statements carry laterality, zone and
severity ("Moderate left pleural effusion.", "Patchy consolidation in the right lower lobe."),
and absent findings are stated as explicit negations ("No pneumothorax.", "No pleural effusion
or pneumothorax.", "Heart size is normal."). Sentence order is random and only some absences are
mentioned in each report, as in real reports. The text never hedges ("possible", "may
represent"): a SynthCXR label is always certain, and the negation-aware labeler
(`medunifier.data.labeler`) must recover the generator's labels from the text.

`write_report(findings, rng)` is pure given the generator state, so a report is reproducible
from the per-image seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medunifier.data.findings import FINDINGS

SEVERITIES = ("mild", "moderate", "severe")
DEVICE_KINDS = ("ett", "central_line", "picc", "pacemaker", "enteric_tube")


@dataclass
class FindingSpec:
    """One positive finding of a case: what the image shows and the report says.

    laterality is the patient's side ("right" is the image's left on a PA film), "bilateral" or
    None (cardiomegaly, edema); zone is "upper" | "middle" | "lower" | None; `subtle` marks a
    low-contrast rendering; `params` holds what the text needs (nodule size in mm, device kinds).
    """

    name: str
    laterality: str | None = None
    zone: str | None = None
    severity: str = "moderate"
    subtle: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _phrase(rng: np.random.Generator, options: Sequence[str], **words: str | int) -> str:
    """One of `options` (one draw), its `{name}` fields filled from `words`."""
    return _pick(rng, options).format(**words)


def _cap(sentence: str) -> str:
    sentence = " ".join(sentence.split())
    return sentence[:1].upper() + sentence[1:]


def _join_list(items: Sequence[str], rng: np.random.Generator) -> str:
    """'a', 'a or b', 'a, b, or c' / 'a, b or c' (negated lists read naturally with 'or')."""
    if len(items) == 1:
        return items[0]
    conj = "or"
    comma = "," if rng.random() < 0.5 and len(items) > 2 else ""
    return ", ".join(items[:-1]) + f"{comma} {conj} {items[-1]}"


# ------------------------------------------------------------------------------ locations and sizes


# Location phrasings by form ("adj": "right lower lobe", "noun": "the right lower lobe") and zone: both sides,
# one side ("{side}" is filled in), and the left mid zone, which has the lingula instead of a middle lobe.
BILATERAL_LOCATIONS = {
    "adj": {
        "lower": ("bibasilar", "bilateral lower lobe", "bilateral basilar"),
        "middle": ("bilateral mid lung", "bilateral perihilar", "bilateral mid lung zone"),
        "upper": ("bilateral upper lobe", "bilateral apical", "bilateral upper lung zone"),
    },
    "noun": {
        "lower": ("both lung bases", "the lung bases bilaterally", "both lower lobes"),
        "middle": ("both mid lung zones", "the perihilar regions bilaterally", "both mid lungs"),
        "upper": ("both upper lobes", "both lung apices", "the upper lung zones bilaterally"),
    },
}
ONE_SIDE_LOCATIONS = {
    "adj": {
        "lower": ("{side} lower lobe", "{side} basilar", "{side} lower lung zone", "{side} base"),
        "middle": ("{side} mid lung", "{side} middle lobe", "{side} midlung zone"),
        "upper": ("{side} upper lobe", "{side} apical", "{side} upper lung zone"),
    },
    "noun": {
        "lower": ("the {side} lower lobe", "the {side} lung base", "the {side} lower lung zone"),
        "middle": ("the {side} middle lobe", "the {side} mid lung zone", "the {side} perihilar region"),
        "upper": ("the {side} upper lobe", "the {side} lung apex", "the {side} upper lung zone"),
    },
}
LEFT_MIDDLE_LOCATIONS = {
    "adj": ("{side} mid lung", "{side} midlung zone", "lingular"),
    "noun": ("the lingula", "the {side} mid lung zone", "the {side} perihilar region"),
}


def _location(form: str, side: str | None, zone: str | None, rng: np.random.Generator) -> str:
    """A location phrase for a finding's side and zone (lower and right when not given).

    Args:
        form: "adj" for an adjective phrase ('right lower lobe', 'left basilar', 'bibasilar') or "noun"
            for a noun phrase ('the right lower lobe', 'the left lung base', 'both lung bases').
        side: "right", "left", "bilateral" or None.
        zone: "upper", "middle", "lower" or None.
        rng: the report's generator (one draw).
    """
    zone = zone or "lower"
    if side == "bilateral":
        return _pick(rng, BILATERAL_LOCATIONS[form][zone])
    side = side or "right"
    options = LEFT_MIDDLE_LOCATIONS[form] if (side, zone) == ("left", "middle") else ONE_SIDE_LOCATIONS[form][zone]
    return _phrase(rng, options, side=side)


SIZE_WORDS = {"mild": ("small",), "moderate": ("moderate", "moderate-sized"), "severe": ("large",)}
DEGREE_WORDS = {"mild": ("mild",), "moderate": ("moderate",), "severe": ("marked", "severe")}
DEGREE_ADVERBS = {"mild": ("mildly",), "moderate": ("moderately",), "severe": ("markedly", "severely")}


# ------------------------------------------------------------------------------ positive statements

# Each positive statement's phrasings: `str.format` templates over the words its finding's function chooses
# (size, side, degree, location, ...). Some findings have variants ("pleural_effusion/bilateral"); edema
# adds its interstitial or alveolar phrasings to the common ones.
POSITIVE_PHRASES: dict[str, tuple[str, ...]] = {
    "pleural_effusion/bilateral": (
        "{size} bilateral pleural effusions.",
        "there are {size} bilateral pleural effusions.",
        "bilateral {size} pleural effusions with blunting of both costophrenic angles.",
        "{size} pleural effusions are present bilaterally.",
        "blunting of both costophrenic angles, consistent with {size} bilateral pleural effusions.",
        "{size} layering pleural effusions are seen on both sides.",
    ),
    "pleural_effusion": (
        "{size} {side} pleural effusion.",
        "there is a {size} {side} pleural effusion.",
        "a {size} {side}-sided pleural effusion is present.",
        "{size} {side} pleural effusion with blunting of the costophrenic angle.",
        "blunting of the {side} costophrenic angle, consistent with a {size} pleural effusion.",
        "{side} pleural effusion, {size} in size.",
        "a {size} amount of {side} pleural fluid is noted.",
    ),
    "pneumothorax": (
        "there is a {size} {side}{apical} pneumothorax.",
        "{size} {side}{apical} pneumothorax.",
        "a {size} {side}-sided pneumothorax is present.",
        "{side} pneumothorax, {size} in size, with a visible visceral pleural line.",
        "a visceral pleural line is seen in the {side} {where}, consistent with a {size} pneumothorax.",
        "{size} {side} pneumothorax without mediastinal shift.",
    ),
    "cardiomegaly": (
        "the heart is {adverb} enlarged.",
        "{degree} cardiomegaly.",
        "there is {degree} enlargement of the cardiac silhouette.",
        "the cardiac silhouette is {adverb} enlarged.",
        "{degree} cardiomegaly is present.",
        "heart size is {adverb} enlarged.",
        "enlarged cardiac silhouette, consistent with {degree} cardiomegaly.",
    ),
    "edema": (
        "{degree} pulmonary edema.",
        "{degree} bilateral perihilar opacities consistent with pulmonary edema.",
        "findings are consistent with {degree} pulmonary edema.",
        "pulmonary vascular congestion with {degree} interstitial edema.",
        "cephalization of the pulmonary vasculature with {degree} edema.",
    ),
    "edema/interstitial": (
        "there is {degree} interstitial pulmonary edema.",
        "kerley B lines and peribronchial cuffing, compatible with {degree} interstitial edema.",
    ),
    "edema/alveolar": (
        "{degree} alveolar edema in a perihilar distribution.",
        "diffuse bilateral perihilar opacities in a batwing pattern, consistent with {degree} pulmonary edema.",
    ),
    "consolidation": (
        "there is {quality} consolidation in {noun}{bronchograms}.",
        "{quality} {adj} consolidation{bronchograms}.",
        "{quality} airspace consolidation in {noun}.",
        "{quality} airspace opacity in {noun}, consistent with consolidation.",
        "consolidation is present in {noun}{bronchograms}.",
        "{quality} opacification of {noun} compatible with consolidation.",
        "{quality} {adj} consolidation, consistent with pneumonia.",
    ),
    "atelectasis/collapse": (
        "collapse of the {side} {lobe} lobe with volume loss.",
        "{side} {lobe} lobe collapse with elevation of the {side} hemidiaphragm.",
        "atelectasis of the {side} {lobe} lobe with associated volume loss.",
        "dense {side} {lobe} lobe atelectasis.",
        "complete atelectasis of the {side} {lobe} lobe.",
    ),
    "atelectasis": (
        "{quality} {adj} atelectasis.",
        "there is {quality} atelectasis in {noun}.",
        "linear opacity in {noun}, consistent with {quality} atelectasis.",
        "{adj} opacity compatible with {quality} atelectasis.",
        "{quality} atelectatic changes at {noun}.",
        "streaky {adj} atelectasis.",
    ),
    "nodule": (
        "there is a {mm} mm nodule in {noun}.",
        "{adj} {mm} mm pulmonary nodule.",
        "a {mm} mm nodular opacity projects over {noun}.",
        "rounded {mm} mm nodule in {noun}.",
        "solitary pulmonary nodule measuring {mm} mm in {noun}.",
        "a well-circumscribed {adj} nodule measuring {mm} mm.",
    ),
}
# support devices by kind: templates over the device's side and the tube tip's height ({cm})
DEVICE_PHRASES: dict[str, tuple[str, ...]] = {
    "ett": (
        "endotracheal tube terminates {cm} cm above the carina.",
        "ET tube tip is {cm} cm above the carina.",
        "the endotracheal tube is in standard position, {cm} cm above the carina.",
        "an endotracheal tube is present with tip at the level of the clavicles.",
        "endotracheal tube in satisfactory position.",
        "ETT tip projects {cm} cm above the carina.",
    ),
    "central_line": (
        "{side} internal jugular central venous catheter terminates in the SVC.",
        "{side} subclavian central line with tip in the superior vena cava.",
        "a {side}-sided central venous catheter is in place, tip projecting over the cavoatrial junction.",
        "central line via the {side} internal jugular vein with tip in the lower SVC.",
        "{side} IJ line terminates in the mid SVC.",
    ),
    "picc": (
        "{side} PICC line terminates in the SVC.",
        "{side} upper extremity PICC with tip in the distal superior vena cava.",
        "a {side}-sided peripherally inserted central catheter is present, tip at the cavoatrial junction.",
        "{side} arm PICC tip projects over the SVC.",
        "PICC line from the {side} is in good position.",
    ),
    "pacemaker": (
        "{side}-sided pacemaker with leads in the right atrium and right ventricle.",
        "dual-lead pacemaker generator over the {side} chest.",
        "a {side} chest wall pacemaker is present with intact leads.",
        "cardiac pacemaker with leads terminating in the right atrium and ventricle.",
        "pacer device overlies the {side} chest with leads in expected position.",
    ),
    "enteric_tube": (
        "enteric tube courses below the diaphragm with tip in the stomach.",
        "nasogastric tube tip is in the stomach.",
        "an NG tube is in place, terminating in the gastric fundus.",
        "feeding tube extends below the left hemidiaphragm.",
        "the orogastric tube terminates within the stomach.",
    ),
}


def _effusion(f: FindingSpec, rng: np.random.Generator) -> str:
    size = _pick(rng, SIZE_WORDS[f.severity] + (("trace", "tiny") if f.subtle else ()))
    key = "pleural_effusion/bilateral" if f.laterality == "bilateral" else "pleural_effusion"
    return _phrase(rng, POSITIVE_PHRASES[key], size=size, side=str(f.laterality))


def _pneumothorax(f: FindingSpec, rng: np.random.Generator) -> str:
    size, upper = _pick(rng, SIZE_WORDS[f.severity]), f.zone == "upper"
    return _phrase(rng, POSITIVE_PHRASES["pneumothorax"], size=size, side=str(f.laterality),
                   where="apex" if upper else "hemithorax", apical=" apical" if upper else "")


def _cardiomegaly(f: FindingSpec, rng: np.random.Generator) -> str:
    degree, adverb = _pick(rng, DEGREE_WORDS[f.severity]), _pick(rng, DEGREE_ADVERBS[f.severity])
    return _phrase(rng, POSITIVE_PHRASES["cardiomegaly"], degree=degree, adverb=adverb)


def _edema(f: FindingSpec, rng: np.random.Generator) -> str:
    degree = _pick(rng, DEGREE_WORDS[f.severity])
    variant = "edema/alveolar" if f.severity == "severe" else "edema/interstitial"
    return _phrase(rng, POSITIVE_PHRASES["edema"] + POSITIVE_PHRASES[variant], degree=degree)


def _consolidation(f: FindingSpec, rng: np.random.Generator) -> str:
    quality = _pick(rng, {"mild": ("patchy", "faint", "small"), "moderate": ("focal", "moderate"),
                          "severe": ("dense", "extensive", "confluent")}[f.severity])
    adj, noun = _location("adj", f.laterality, f.zone, rng), _location("noun", f.laterality, f.zone, rng)
    bronchograms = " with air bronchograms" if f.params.get("air_bronchograms") else ""
    return _phrase(rng, POSITIVE_PHRASES["consolidation"], quality=quality, adj=adj, noun=noun,
                   bronchograms=bronchograms)


def _atelectasis(f: FindingSpec, rng: np.random.Generator) -> str:
    adj, noun = _location("adj", f.laterality, f.zone, rng), _location("noun", f.laterality, f.zone, rng)
    if f.severity == "severe" and f.laterality != "bilateral":
        side = str(f.laterality)
        lobe = {"upper": "upper", "middle": "middle" if side == "right" else "upper", "lower": "lower"}[f.zone or "lower"]
        return _phrase(rng, POSITIVE_PHRASES["atelectasis/collapse"], side=side, lobe=lobe)
    quality = _pick(rng, {"mild": ("subsegmental", "minimal", "mild", "linear"),
                          "moderate": ("plate-like", "moderate", "discoid"),
                          "severe": ("extensive", "marked")}[f.severity])
    return _phrase(rng, POSITIVE_PHRASES["atelectasis"], quality=quality, adj=adj, noun=noun)


def _nodule(f: FindingSpec, rng: np.random.Generator) -> str:
    mm = int(f.params.get("diameter_mm", 10))
    adj, noun = _location("adj", f.laterality, f.zone, rng), _location("noun", f.laterality, f.zone, rng)
    return _phrase(rng, POSITIVE_PHRASES["nodule"], mm=mm, adj=adj, noun=noun)


def _device(kind: str, side: str, rng: np.random.Generator) -> str:
    cm = int(rng.integers(3, 7))
    return _phrase(rng, DEVICE_PHRASES[kind], side=side, cm=cm)


def _devices(f: FindingSpec, rng: np.random.Generator) -> list[str]:
    sides = f.params.get("device_sides", {})
    return [_cap(_device(kind, sides.get(kind, "right"), rng)) for kind in f.params.get("devices", ["ett"])]


POSITIVE = {
    "pleural_effusion": _effusion,
    "pneumothorax": _pneumothorax,
    "cardiomegaly": _cardiomegaly,
    "edema": _edema,
    "consolidation": _consolidation,
    "atelectasis": _atelectasis,
    "nodule": _nodule,
}


# ------------------------------------------------------------------------------ negative statements

NEGATIVE_SINGLE = {
    "atelectasis": ("No atelectasis.", "There is no atelectasis.", "No evidence of atelectasis.",
                    "No focal atelectasis is seen.", "The lungs are well expanded without atelectasis."),
    "cardiomegaly": ("Heart size is normal.", "The heart is normal in size.", "Normal cardiac silhouette.",
                     "The cardiac silhouette is within normal limits.", "No cardiomegaly.",
                     "The heart is not enlarged.", "Cardiomediastinal silhouette is normal in size and contour."),
    "consolidation": ("No focal consolidation.", "There is no focal airspace consolidation.",
                      "No consolidation is seen.", "No evidence of focal consolidation.",
                      "Negative for focal airspace disease.", "The lungs are clear without focal consolidation."),
    "edema": ("No pulmonary edema.", "There is no pulmonary edema.", "No evidence of pulmonary edema.",
              "Pulmonary vascularity is within normal limits without edema.", "No interstitial or alveolar edema.",
              "No signs of pulmonary vascular congestion or edema."),
    "pleural_effusion": ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusions.",
                         "The costophrenic angles are sharp.", "No evidence of pleural effusion.",
                         "No pleural fluid is seen."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax.",
                     "No pneumothorax is identified.", "Pneumothorax is not seen.", "Negative for pneumothorax."),
    "nodule": ("No suspicious pulmonary nodules.", "No pulmonary nodules or masses.",
               "There is no nodule or mass.", "No focal nodular opacity.", "No discrete pulmonary nodule is seen."),
    "support_devices": ("No lines or tubes.", "No support devices are present.", "No indwelling lines or tubes.",
                        "No medical devices are seen.", "There are no lines or tubes."),
}

# noun phrases for combined negations ("No pleural effusion or pneumothorax.")
NEGATION_NOUNS = {
    "atelectasis": ("atelectasis",),
    "cardiomegaly": ("cardiomegaly",),
    "consolidation": ("focal consolidation", "consolidation", "focal airspace disease"),
    "edema": ("pulmonary edema", "edema"),
    "pleural_effusion": ("pleural effusion", "pleural effusions", "effusion"),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("pulmonary nodules", "suspicious nodules"),
}
NEGATION_LISTS = ("No {}.", "No radiographic evidence of {}.", "No evidence of {}.", "Negative for {}.",
                  "There is no evidence of {}.")
WITHOUT_TAILS = (", without {}.", " without evidence of {}.", "; no {}.")

NORMAL_STATEMENTS = {
    "lungs": ("The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear.",
              "Clear lungs.", "The lungs are clear and well inflated."),
    "vascularity": ("Pulmonary vascularity is normal.", "Normal pulmonary vasculature.",
                    "The pulmonary vasculature is within normal limits.", "Pulmonary vascularity is unremarkable.",
                    "The pulmonary vessels are normal in caliber."),
    "mediastinum": ("The mediastinal contours are normal.", "Mediastinal contours are within normal limits.",
                    "Normal mediastinal silhouette.", "The mediastinum is unremarkable.",
                    "Hilar and mediastinal contours are unremarkable."),
    "bones": ("No acute osseous abnormality.", "Visualized osseous structures are intact.",
              "The bony structures are unremarkable.", "No acute bony abnormality.",
              "The osseous structures are grossly intact."),
}
PARENCHYMAL = ("atelectasis", "consolidation", "edema", "nodule")

NORMAL_IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                      "Normal chest radiograph.", "No acute intrathoracic abnormality.",
                      "No radiographic evidence of acute cardiopulmonary disease.")
DEVICE_IMPRESSIONS = ("Support devices in satisfactory position.", "Lines and tubes as described.",
                      "Tubes and lines in appropriate position.", "Medical devices as above.",
                      "Support devices as described above.")


def _impression_phrase(f: FindingSpec, rng: np.random.Generator) -> str:
    if f.name == "support_devices":
        return _pick(rng, DEVICE_IMPRESSIONS)
    if f.name == "cardiomegaly":
        return _cap(_pick(rng, (f"{_pick(rng, DEGREE_WORDS[f.severity])} cardiomegaly.", "Cardiomegaly.",
                                "Enlarged cardiac silhouette.")))
    if f.name == "nodule":
        mm = int(f.params.get("diameter_mm", 10))
        return _cap(_pick(rng, (f"{mm} mm {_location('adj', f.laterality, f.zone, rng)} pulmonary nodule.",
                                f"{_location('adj', f.laterality, f.zone, rng)} nodule; CT is recommended for "
                                "further characterization.", "Solitary pulmonary nodule as described.")))
    return _cap(POSITIVE[f.name](f, rng))


def write_report(findings: Sequence[FindingSpec], rng: np.random.Generator,
                 mention_absent: float = 0.6) -> tuple[str, str]:
    """FINDINGS and IMPRESSION text for a case whose positive findings are `findings`.

    Each absent finding is stated (negated) with probability `mention_absent`, alone or in a
    combined list; support devices' absence is stated rarely. Returns (findings, impression).
    """
    present = {f.name: f for f in findings}
    sentences: list[str] = []
    positives = [f for f in findings if f.name in POSITIVE]
    absent = [name for name in FINDINGS if name not in present and name not in ("no_finding", "support_devices")]
    mentioned = [name for name in absent if rng.random() < mention_absent]
    rng.shuffle(mentioned)

    # a positive statement may carry a trailing negation list: "Small left pleural effusion, without pneumothorax."
    tail_for: dict[int, list[str]] = {}
    if positives and mentioned and rng.random() < 0.25:
        take = int(rng.integers(1, min(2, len(mentioned)) + 1))
        tail = [m for m in mentioned[:take] if m != "cardiomegaly"]
        if tail:
            tail_for[int(rng.integers(len(positives)))] = tail
            mentioned = [m for m in mentioned if m not in tail]
    for i, f in enumerate(positives):
        text = POSITIVE[f.name](f, rng)
        if i in tail_for:
            nouns = [_pick(rng, NEGATION_NOUNS[m]) for m in tail_for[i]]
            text = text.rstrip(".") + _pick(rng, WITHOUT_TAILS).format(_join_list(nouns, rng))
        sentences.append(_cap(text))
    if "support_devices" in present:
        sentences.extend(_devices(present["support_devices"], rng))
    elif rng.random() < 0.08:
        sentences.append(_pick(rng, NEGATIVE_SINGLE["support_devices"]))

    # negations: cardiomegaly always alone (its negation is a statement about heart size), others grouped
    while mentioned:
        name = mentioned.pop()
        if name == "cardiomegaly" or rng.random() < 0.45 or not mentioned:
            sentences.append(_pick(rng, NEGATIVE_SINGLE[name]))
            continue
        group = [name]
        while mentioned and len(group) < 4 and mentioned[-1] != "cardiomegaly" and rng.random() < 0.7:
            group.append(mentioned.pop())
        nouns = [_pick(rng, NEGATION_NOUNS[m]) for m in group]
        sentences.append(_cap(_pick(rng, NEGATION_LISTS).format(_join_list(nouns, rng))))

    # normal statements that do not contradict a positive finding
    normals = ["mediastinum", "bones"]
    if not any(name in present for name in PARENCHYMAL):
        normals.append("lungs")
    if "edema" not in present:
        normals.append("vascularity")
    for key in rng.permutation(normals)[: int(rng.integers(0, 3))]:
        sentences.append(_pick(rng, NORMAL_STATEMENTS[str(key)]))
    rng.shuffle(sentences)
    findings_text = " ".join(sentences)

    # impression: the positive findings (cardiomegaly + edema merged), or a normal impression
    if not findings:
        impression = _pick(rng, NORMAL_IMPRESSIONS)
    else:
        ordered = sorted(findings, key=lambda f: (f.name == "support_devices", rng.random()))
        if "support_devices" in present and len(ordered) > 1 and rng.random() < 0.5:
            ordered = [f for f in ordered if f.name != "support_devices"]
        parts: list[str] = []
        if "cardiomegaly" in present and "edema" in present and rng.random() < 0.5:
            edema = present["edema"]
            parts.append(_pick(rng, (f"Cardiomegaly with {_pick(rng, DEGREE_WORDS[edema.severity])} pulmonary edema.",
                                     f"Cardiomegaly and {_pick(rng, DEGREE_WORDS[edema.severity])} edema, "
                                     "consistent with congestive heart failure.")))
            ordered = [f for f in ordered if f.name not in ("cardiomegaly", "edema")]
        parts.extend(_impression_phrase(f, rng) for f in ordered)
        if "pneumothorax" not in present and rng.random() < 0.3:
            parts.append("No pneumothorax.")
        if len(parts) > 1 and rng.random() < 0.4:
            parts = [f"{i}. {p}" for i, p in enumerate(parts, start=1)]
        impression = " ".join(parts)
    return findings_text, impression


def report_text(findings: str, impression: str) -> str:
    """The manifest's `text`: 'FINDINGS: ... IMPRESSION: ...'."""
    return f"FINDINGS: {findings} IMPRESSION: {impression}"
