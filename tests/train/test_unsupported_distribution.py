"""FSDP, DeepSpeed and Megatron-LM are refused up front, with what works instead; DDP and one process run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.config import ConfigError, load_stage0_config
from medunifier.train import loop
from medunifier.train.distributed import UnsupportedDistributionError, check_accelerator, check_launch
from medunifier.train.loop import train
from medunifier.train.stage0 import pretrain_vision


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "build_model", lambda config: pytest.fail("the model was built before the refusal"))


@pytest.mark.parametrize(("flag", "name"), [("ACCELERATE_USE_FSDP", "FSDP"),
                                            ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                            ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])
def test_an_accelerate_launch_for_a_sharded_backend_is_refused_before_anything_is_built(
    flag: str, name: str, tiny_manifest: Path, tmp_path: Path, small, no_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(flag, "true")
    run = tmp_path / "run"
    with pytest.raises(UnsupportedDistributionError) as info:
        train("tiny", tiny_manifest, run, overrides=small())
    message = str(info.value)
    assert message.startswith(f"{name} is not supported")
    assert f"{flag}=true" in message and "torchrun --nproc_per_node N" in message and "DDP" in message
    assert isinstance(info.value, ConfigError)  # the CLI reports it as a bad setting (exit 2)
    assert not run.exists()


def test_an_accelerate_state_set_up_for_fsdp_is_refused(
    tiny_manifest: Path, tmp_path: Path, small, no_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType.FSDP)
    with pytest.raises(UnsupportedDistributionError, match=r"^FSDP is not supported \(this process's Accelerate "
                       r"state was set up for it\)"):
        train("tiny", tiny_manifest, tmp_path / "run", overrides=small())


def test_pretrain_cli_exits_with_the_message(tiny_manifest: Path, tmp_path: Path, small, no_model) -> None:
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_manifest), "--out", str(tmp_path / "run"),
                                      *small()], env={"ACCELERATE_USE_FSDP": "true"})
    assert result.exit_code == 2
    assert "FSDP is not supported" in result.output and "torchrun" in result.output


def test_stage0_refuses_deepspeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "1")
    with pytest.raises(UnsupportedDistributionError, match="DeepSpeed is not supported"):
        pretrain_vision(load_stage0_config(None, []), tmp_path / "missing.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_an_accelerator_of_a_sharded_type_is_refused(kind: str) -> None:
    with pytest.raises(UnsupportedDistributionError, match="Launch with DDP instead"):
        check_accelerator(SimpleNamespace(distributed_type=DistributedType[kind]))


@pytest.mark.parametrize("kind", ["NO", "MULTI_GPU", "MULTI_CPU"])
def test_one_process_and_ddp_pass(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_accelerator(SimpleNamespace(distributed_type=DistributedType[kind]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # what `accelerate launch` sets for a DDP config
    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType[kind])
    check_launch()
