"""The finding vocabulary shared by SynthCXR, the report labeler and the evaluators."""

COMPETITION_FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion")
FINDINGS = (*COMPETITION_FINDINGS, "pneumothorax", "nodule", "support_devices", "no_finding")

DISPLAY_NAMES = {name: name.replace("_", " ") for name in FINDINGS}
