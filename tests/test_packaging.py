"""A plain (non-editable) install ships every preset and prompt set and resolves them by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter on the installed copy: every preset and prompt set by name, and a user's own
# YAML file by a relative path. Prints one JSON line.
PROBE = """
import json, sys
from medunifier.config import CONFIG_DIR, load_config
from medunifier.eval.zeroshot import load_prompts
presets, prompts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
names = [load_config(p).name for p in presets]
classes = {p: sorted(load_prompts(p)) for p in prompts}
user = load_config("mine.yaml", ["train.lr=3e-4"])
print(json.dumps({"config_dir": str(CONFIG_DIR), "names": names, "classes": classes,
                  "user": [user.name, user.train.lr]}))
"""


@pytest.mark.timeout(300)
def test_wheel_ships_presets_and_prompts(tmp_path: Path) -> None:
    from medunifier.config import CONFIG_DIR

    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    prompts = sorted(p.stem for p in (CONFIG_DIR / "prompts").glob("*.yaml"))
    assert {"tiny", "tiny_frozen", "paper"} <= set(presets) and {"chexpert5", "pneumonia"} <= set(prompts)

    # build from a copy of what the wheel is made of: the build leaves build/ and *.egg-info behind
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("medunifier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"medunifier/configs/{p}.yaml" for p in presets if f"medunifier/configs/{p}.yaml" not in names]
    missing += [f"medunifier/configs/prompts/{p}.yaml" for p in prompts
                if f"medunifier/configs/prompts/{p}.yaml" not in names]
    assert not missing, f"the wheel lacks {missing}: see [tool.setuptools.package-data] in pyproject.toml"

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr[-2000:]

    work = tmp_path / "work"  # the current directory: no configs/ folder or source tree beside it
    work.mkdir()
    (work / "mine.yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text().replace("name: tiny", "name: mine"))
    # -S: no .pth files, so the development checkout's editable install cannot shadow the installed copy;
    # the dependencies come from this interpreter's site-packages, after the target
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    run = subprocess.run([sys.executable, "-S", "-c", PROBE, json.dumps(presets), json.dumps(prompts)],
                         capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["config_dir"]).is_relative_to(target), result["config_dir"]
    assert result["names"] == presets
    assert result["classes"]["chexpert5"] == ["atelectasis", "cardiomegaly", "consolidation", "edema",
                                              "pleural_effusion"]
    assert result["classes"]["pneumonia"] == ["normal", "pneumonia"]
    assert result["user"] == ["mine", 3e-4]
