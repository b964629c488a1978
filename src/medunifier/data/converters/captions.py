"""Templated captions for label-only datasets (UniMedVL's "observation" step).

A label dict becomes a short radiology-style sentence, drawn from several phrasings with a seeded
`random.Random` so the same seed gives the same manifest: positives ("Chest X-ray showing
cardiomegaly and pleural effusion."), uncertain findings ("Possible edema."), explicit negatives
("No pneumothorax.") and a normal study ("No acute cardiopulmonary abnormality.").
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

# How a label name reads inside a sentence (default: underscores become spaces).
PHRASES = {
    "enlarged_cardiomediastinum": "an enlarged cardiomediastinum",
    "lung_opacity": "lung opacity",
    "lung_lesion": "a lung lesion",
    "pleural_other": "another pleural abnormality",
    "fracture": "a fracture",
    "support_devices": "support devices",
    "nodule": "a nodule",
    "mass": "a mass",
    "covid19": "COVID-19 pneumonia",
}

POSITIVE = (
    "{Image} showing {findings}.",
    "Findings consistent with {findings}.",
    "The {image} demonstrates {findings}.",
    "There is evidence of {findings}.",
    "{Findings} seen on this {image}.",
)
UNCERTAIN = ("Possible {findings}.", "{Findings} cannot be excluded.", "Findings may represent {findings}.")
NEGATIVE = ("No {finding}.", "No evidence of {finding}.", "There is no {finding}.")
NORMAL_CHEST = (
    "No acute cardiopulmonary abnormality.",
    "Normal {image}.",
    "The {image} shows no abnormal findings.",
    "Clear lungs. No acute findings.",
    "Heart size is normal and the lungs are clear.",
)
PLAIN = ("{Image}.", "A {image}.")


def phrase(name: str) -> str:
    return PHRASES.get(name, name.replace("_", " "))


def join_phrases(items: Sequence[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _negation(name: str) -> str:
    """'No a nodule' reads badly: drop the article for negations."""
    text = phrase(name)
    for article in ("a ", "an ", "another "):
        if text.startswith(article):
            return text[len(article):]
    return text


def caption_from_labels(labels: Mapping[str, int], rng: random.Random, image: str = "chest X-ray",
                        mention_negatives: int = 2, normal: Sequence[str] = NORMAL_CHEST) -> str:
    """One caption for a label dict (1 present, 0 absent, -1 uncertain).

    Positives make the first sentence; with none, a `normal` phrasing when `no_finding` is 1.
    Uncertain findings follow, then up to `mention_negatives` explicit negatives.
    """
    positives = [phrase(n) for n, v in labels.items() if v == 1 and n != "no_finding"]
    uncertain = [phrase(n) for n, v in labels.items() if v == -1 and n != "no_finding"]
    negatives = [_negation(n) for n, v in labels.items() if v == 0 and n != "no_finding"]
    fill = {"image": image, "Image": _capital(image)}
    sentences = []
    if positives:
        findings = join_phrases(positives)
        sentences.append(rng.choice(POSITIVE).format(findings=findings, Findings=_capital(findings), **fill))
    elif labels.get("no_finding") == 1:
        sentences.append(rng.choice(normal).format(**fill))
    if uncertain:
        findings = join_phrases(uncertain)
        sentences.append(rng.choice(UNCERTAIN).format(findings=findings, Findings=_capital(findings)))
    if mention_negatives and not positives and labels.get("no_finding") != 1:
        chosen = negatives if len(negatives) <= mention_negatives else rng.sample(negatives, mention_negatives)
        sentences += [rng.choice(NEGATIVE).format(finding=name) for name in chosen]
    if not sentences:
        sentences.append(rng.choice(PLAIN).format(**fill))
    return " ".join(sentences)
