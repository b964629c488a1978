"""The package root: its public names resolve, and importing it stays light."""

import subprocess
import sys

import medunifier


def test_every_public_name_resolves_to_its_definition() -> None:
    from medunifier.config import load_config
    from medunifier.eval.zeroshot import run_zeroshot
    from medunifier.generate.sampling import Synthesizer
    from medunifier.model.medunifier import MedUnifier

    for name in medunifier.__all__:
        assert getattr(medunifier, name) is not None, name
    assert medunifier.MedUnifier is MedUnifier and medunifier.load_config is load_config
    assert medunifier.Synthesizer is Synthesizer and medunifier.run_zeroshot is run_zeroshot
    assert {"MedUnifier", "load_config", "Synthesizer", "run_retrieval", "run_zeroshot", "run_finetune",
            "run_report", "run_vqa", "run_synthesis"} <= set(medunifier.__all__)
    assert set(medunifier.__all__) <= set(dir(medunifier))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        medunifier.NoSuchThing  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:
        raise AssertionError("medunifier.NoSuchThing resolved")


def test_importing_the_package_loads_no_model_code() -> None:
    code = "import sys, medunifier; print(sorted(m for m in sys.modules if m.startswith(('medunifier.', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
