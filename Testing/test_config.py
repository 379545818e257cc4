"""Configuration files into typed dataclasses: defaults, nesting, JSON/YAML, clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from DiffusionCore.config import config_help, config_to_dict, load_config, save_config
from DiffusionCore.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas."})


@dataclass
class DataConfig:
    patch: tuple[int, int, int] = field(default=(16, 32, 32), metadata={"help": "Patch shape (z, y, x)."})
    folders: list[str] = field(default_factory=list, metadata={"help": "Training data folders."})
    cache: Path | None = field(default=None, metadata={"help": "Optional cache folder."})


@dataclass
class TrainConfig:
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "Where to train."})
    amp: bool = field(default=False, metadata={"help": "Mixed precision."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer settings."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data settings."})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def test_dict_with_nested_dataclass_and_defaults():
    cfg = load_config({"steps": 5, "optim": {"lr": 1}, "data": {"patch": [8, 16, 16]}}, TrainConfig)
    assert cfg.steps == 5
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for float
    assert cfg.optim.betas == (0.9, 0.999)  # nested default kept
    assert cfg.data.patch == (8, 16, 16)
    assert cfg.device == "auto" and cfg.amp is False
    assert load_config(None, TrainConfig) == TrainConfig()


def test_json_and_yaml_files_give_the_same_config(tmp_path):
    data = {
        "steps": 7,
        "device": "cpu",
        "optim": {"betas": [0.5, 0.9]},
        "data": {"cache": "c", "folders": ["a"]},
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text(
        "steps: 7\ndevice: cpu\noptim:\n  betas: [0.5, 0.9]\ndata:\n  cache: c\n  folders:\n    - a\n"
    )
    a = load_config(tmp_path / "c.json", TrainConfig)
    b = load_config(str(tmp_path / "c.yaml"), TrainConfig)
    assert a == b
    assert a.optim.betas == (0.5, 0.9) and a.data.cache == Path("c") and a.data.folders == ["a"]


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config({"optim": {"lrr": 0.1}}, TrainConfig)
    msg = str(info.value)
    assert "optim.lrr" in msg and "lr, betas" in msg and "did you mean 'lr'" in msg


def test_wrong_type_names_field_expected_and_got():
    with pytest.raises(ConfigError) as info:
        load_config({"steps": "ten"}, TrainConfig)
    msg = str(info.value)
    assert "'steps'" in msg and "expected int" in msg and "str 'ten'" in msg
    with pytest.raises(ConfigError, match="expected bool"):
        load_config({"amp": "yes"}, TrainConfig)
    with pytest.raises(ConfigError, match="expected int"):
        load_config({"steps": True}, TrainConfig)  # a bool is not an int here
    with pytest.raises(ConfigError, match=r"data\.patch.*3 values"):
        load_config({"data": {"patch": [8, 8]}}, TrainConfig)
    with pytest.raises(ConfigError, match=r"data\.folders\[1\].*expected str"):
        load_config({"data": {"folders": ["a", 3]}}, TrainConfig)
    with pytest.raises(ConfigError, match="one of 'auto', 'cpu', 'cuda'"):
        load_config({"device": "gpu"}, TrainConfig)
    with pytest.raises(ConfigError, match="'optim'.*mapping"):
        load_config({"optim": 3}, TrainConfig)


def test_post_init_rejection_becomes_config_error():
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        load_config({"steps": 0}, TrainConfig)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", TrainConfig)
    bad = tmp_path / "bad.json"
    bad.write_text("{steps: 1")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad, TrainConfig)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top, TrainConfig)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, TrainConfig) == TrainConfig()


def test_round_trip_through_dict_and_files(tmp_path):
    cfg = load_config({"steps": 3, "data": {"cache": "/tmp/x", "patch": [4, 8, 8]}}, TrainConfig)
    d = config_to_dict(cfg)
    assert d["data"]["patch"] == [4, 8, 8] and d["data"]["cache"] == "/tmp/x"
    json.dumps(d)  # JSON-ready
    assert load_config(d, TrainConfig) == cfg
    for name in ("saved.json", "saved.yaml"):
        save_config(cfg, tmp_path / name)
        assert load_config(tmp_path / name, TrainConfig) == cfg


def test_help_lists_every_field_with_type_default_and_sentence():
    text = config_help(TrainConfig)
    assert "steps (int, default 100): Optimizer steps." in text
    assert "optim.lr (float, default 0.0001): AdamW learning rate." in text
    assert "data.patch" in text and "[16, 32, 32]" in text
    assert "optim: Optimizer settings." in text
