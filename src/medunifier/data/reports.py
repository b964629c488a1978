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


def _location_adj(side: str | None, zone: str | None, rng: np.random.Generator) -> str:
    """An adjective phrase: 'right lower lobe', 'left basilar', 'bibasilar', 'right apical'."""
    zone = zone or "lower"
    if side == "bilateral":
        options = {
            "lower": ("bibasilar", "bilateral lower lobe", "bilateral basilar"),
            "middle": ("bilateral mid lung", "bilateral perihilar", "bilateral mid lung zone"),
            "upper": ("bilateral upper lobe", "bilateral apical", "bilateral upper lung zone"),
        }[zone]
        return _pick(rng, options)
    side = side or "right"
    options = {
        "lower": (f"{side} lower lobe", f"{side} basilar", f"{side} lower lung zone", f"{side} base"),
        "middle": ((f"{side} mid lung", f"{side} middle lobe", f"{side} midlung zone") if side == "right"
                   else (f"{side} mid lung", f"{side} midlung zone", "lingular")),
        "upper": (f"{side} upper lobe", f"{side} apical", f"{side} upper lung zone"),
    }[zone]
    return _pick(rng, options)


def _location_noun(side: str | None, zone: str | None, rng: np.random.Generator) -> str:
    """A noun phrase: 'the right lower lobe', 'the left lung base', 'both lung bases'."""
    zone = zone or "lower"
    if side == "bilateral":
        options = {
            "lower": ("both lung bases", "the lung bases bilaterally", "both lower lobes"),
            "middle": ("both mid lung zones", "the perihilar regions bilaterally", "both mid lungs"),
            "upper": ("both upper lobes", "both lung apices", "the upper lung zones bilaterally"),
        }[zone]
        return _pick(rng, options)
    side = side or "right"
    options = {
        "lower": (f"the {side} lower lobe", f"the {side} lung base", f"the {side} lower lung zone"),
        "middle": ((f"the {side} middle lobe", f"the {side} mid lung zone", f"the {side} perihilar region")
                   if side == "right" else ("the lingula", f"the {side} mid lung zone",
                                            f"the {side} perihilar region")),
        "upper": (f"the {side} upper lobe", f"the {side} lung apex", f"the {side} upper lung zone"),
    }[zone]
    return _pick(rng, options)


SIZE_WORDS = {"mild": ("small",), "moderate": ("moderate", "moderate-sized"), "severe": ("large",)}
DEGREE_WORDS = {"mild": ("mild",), "moderate": ("moderate",), "severe": ("marked", "severe")}
DEGREE_ADVERBS = {"mild": ("mildly",), "moderate": ("moderately",), "severe": ("markedly", "severely")}


# ------------------------------------------------------------------------------ positive statements


def _effusion(f: FindingSpec, rng: np.random.Generator) -> str:
    size = _pick(rng, SIZE_WORDS[f.severity] + (("trace", "tiny") if f.subtle else ()))
    if f.laterality == "bilateral":
        options = (
            f"{size} bilateral pleural effusions.",
            f"there are {size} bilateral pleural effusions.",
            f"bilateral {size} pleural effusions with blunting of both costophrenic angles.",
            f"{size} pleural effusions are present bilaterally.",
            f"blunting of both costophrenic angles, consistent with {size} bilateral pleural effusions.",
            f"{size} layering pleural effusions are seen on both sides.",
        )
    else:
        side = f.laterality
        options = (
            f"{size} {side} pleural effusion.",
            f"there is a {size} {side} pleural effusion.",
            f"a {size} {side}-sided pleural effusion is present.",
            f"{size} {side} pleural effusion with blunting of the costophrenic angle.",
            f"blunting of the {side} costophrenic angle, consistent with a {size} pleural effusion.",
            f"{side} pleural effusion, {size} in size.",
            f"a {size} amount of {side} pleural fluid is noted.",
        )
    return _pick(rng, options)


def _pneumothorax(f: FindingSpec, rng: np.random.Generator) -> str:
    size, side = _pick(rng, SIZE_WORDS[f.severity]), f.laterality
    where = "apex" if f.zone == "upper" else "hemithorax"
    apical = " apical" if f.zone == "upper" else ""
    options = (
        f"there is a {size} {side}{apical} pneumothorax.",
        f"{size} {side}{apical} pneumothorax.",
        f"a {size} {side}-sided pneumothorax is present.",
        f"{side} pneumothorax, {size} in size, with a visible visceral pleural line.",
        f"a visceral pleural line is seen in the {side} {where}, consistent with a {size} pneumothorax.",
        f"{size} {side} pneumothorax without mediastinal shift.",
    )
    return _pick(rng, options)


def _cardiomegaly(f: FindingSpec, rng: np.random.Generator) -> str:
    degree, adverb = _pick(rng, DEGREE_WORDS[f.severity]), _pick(rng, DEGREE_ADVERBS[f.severity])
    options = (
        f"the heart is {adverb} enlarged.",
        f"{degree} cardiomegaly.",
        f"there is {degree} enlargement of the cardiac silhouette.",
        f"the cardiac silhouette is {adverb} enlarged.",
        f"{degree} cardiomegaly is present.",
        f"heart size is {adverb} enlarged.",
        f"enlarged cardiac silhouette, consistent with {degree} cardiomegaly.",
    )
    return _pick(rng, options)


def _edema(f: FindingSpec, rng: np.random.Generator) -> str:
    degree = _pick(rng, DEGREE_WORDS[f.severity])
    options = [
        f"{degree} pulmonary edema.",
        f"{degree} bilateral perihilar opacities consistent with pulmonary edema.",
        f"findings are consistent with {degree} pulmonary edema.",
        f"pulmonary vascular congestion with {degree} interstitial edema.",
        f"cephalization of the pulmonary vasculature with {degree} edema.",
    ]
    if f.severity != "severe":
        options += [f"there is {degree} interstitial pulmonary edema.",
                    f"kerley B lines and peribronchial cuffing, compatible with {degree} interstitial edema."]
    else:
        options += [f"{degree} alveolar edema in a perihilar distribution.",
                    f"diffuse bilateral perihilar opacities in a batwing pattern, consistent with {degree} "
                    "pulmonary edema."]
    return _pick(rng, options)


def _consolidation(f: FindingSpec, rng: np.random.Generator) -> str:
    quality = _pick(rng, {"mild": ("patchy", "faint", "small"), "moderate": ("focal", "moderate"),
                          "severe": ("dense", "extensive", "confluent")}[f.severity])
    adj, noun = _location_adj(f.laterality, f.zone, rng), _location_noun(f.laterality, f.zone, rng)
    bronchograms = " with air bronchograms" if f.params.get("air_bronchograms") else ""
    options = (
        f"there is {quality} consolidation in {noun}{bronchograms}.",
        f"{quality} {adj} consolidation{bronchograms}.",
        f"{quality} airspace consolidation in {noun}.",
        f"{quality} airspace opacity in {noun}, consistent with consolidation.",
        f"consolidation is present in {noun}{bronchograms}.",
        f"{quality} opacification of {noun} compatible with consolidation.",
        f"{quality} {adj} consolidation, consistent with pneumonia.",
    )
    return _pick(rng, options)


def _atelectasis(f: FindingSpec, rng: np.random.Generator) -> str:
    adj, noun = _location_adj(f.laterality, f.zone, rng), _location_noun(f.laterality, f.zone, rng)
    if f.severity == "severe" and f.laterality != "bilateral":
        side = f.laterality
        lobe = {"upper": "upper", "middle": "middle" if side == "right" else "upper", "lower": "lower"}[f.zone or "lower"]
        options = (
            f"collapse of the {side} {lobe} lobe with volume loss.",
            f"{side} {lobe} lobe collapse with elevation of the {side} hemidiaphragm.",
            f"atelectasis of the {side} {lobe} lobe with associated volume loss.",
            f"dense {side} {lobe} lobe atelectasis.",
            f"complete atelectasis of the {side} {lobe} lobe.",
        )
        return _pick(rng, options)
    quality = _pick(rng, {"mild": ("subsegmental", "minimal", "mild", "linear"),
                          "moderate": ("plate-like", "moderate", "discoid"),
                          "severe": ("extensive", "marked")}[f.severity])
    options = (
        f"{quality} {adj} atelectasis.",
        f"there is {quality} atelectasis in {noun}.",
        f"linear opacity in {noun}, consistent with {quality} atelectasis.",
        f"{adj} opacity compatible with {quality} atelectasis.",
        f"{quality} atelectatic changes at {noun}.",
        f"streaky {adj} atelectasis.",
    )
    return _pick(rng, options)


def _nodule(f: FindingSpec, rng: np.random.Generator) -> str:
    mm = int(f.params.get("diameter_mm", 10))
    adj, noun = _location_adj(f.laterality, f.zone, rng), _location_noun(f.laterality, f.zone, rng)
    options = (
        f"there is a {mm} mm nodule in {noun}.",
        f"{adj} {mm} mm pulmonary nodule.",
        f"a {mm} mm nodular opacity projects over {noun}.",
        f"rounded {mm} mm nodule in {noun}.",
        f"solitary pulmonary nodule measuring {mm} mm in {noun}.",
        f"a well-circumscribed {adj} nodule measuring {mm} mm.",
    )
    return _pick(rng, options)


def _device(kind: str, side: str, rng: np.random.Generator) -> str:
    cm = int(rng.integers(3, 7))
    options = {
        "ett": (
            f"endotracheal tube terminates {cm} cm above the carina.",
            f"ET tube tip is {cm} cm above the carina.",
            f"the endotracheal tube is in standard position, {cm} cm above the carina.",
            "an endotracheal tube is present with tip at the level of the clavicles.",
            "endotracheal tube in satisfactory position.",
            f"ETT tip projects {cm} cm above the carina.",
        ),
        "central_line": (
            f"{side} internal jugular central venous catheter terminates in the SVC.",
            f"{side} subclavian central line with tip in the superior vena cava.",
            f"a {side}-sided central venous catheter is in place, tip projecting over the cavoatrial junction.",
            f"central line via the {side} internal jugular vein with tip in the lower SVC.",
            f"{side} IJ line terminates in the mid SVC.",
        ),
        "picc": (
            f"{side} PICC line terminates in the SVC.",
            f"{side} upper extremity PICC with tip in the distal superior vena cava.",
            f"a {side}-sided peripherally inserted central catheter is present, tip at the cavoatrial junction.",
            f"{side} arm PICC tip projects over the SVC.",
            f"PICC line from the {side} is in good position.",
        ),
        "pacemaker": (
            f"{side}-sided pacemaker with leads in the right atrium and right ventricle.",
            f"dual-lead pacemaker generator over the {side} chest.",
            f"a {side} chest wall pacemaker is present with intact leads.",
            "cardiac pacemaker with leads terminating in the right atrium and ventricle.",
            f"pacer device overlies the {side} chest with leads in expected position.",
        ),
        "enteric_tube": (
            "enteric tube courses below the diaphragm with tip in the stomach.",
            "nasogastric tube tip is in the stomach.",
            "an NG tube is in place, terminating in the gastric fundus.",
            "feeding tube extends below the left hemidiaphragm.",
            "the orogastric tube terminates within the stomach.",
        ),
    }[kind]
    return _pick(rng, options)


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
        return _cap(_pick(rng, (f"{mm} mm {_location_adj(f.laterality, f.zone, rng)} pulmonary nodule.",
                                f"{_location_adj(f.laterality, f.zone, rng)} nodule; CT is recommended for "
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
