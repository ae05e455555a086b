"""One config system: `load_config` (file, then options, then --set overrides) and every command's --config/--set."""

import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.config import load_config, parse_overrides
from hetlm.experiment import ExperimentConfig
from hetlm.single import SingleConfig
from hetlm.train import TrainConfig

runner = CliRunner()


def test_overrides_are_json_where_they_parse_and_text_elsewhere():
    assert parse_overrides(["train.lr=3e-4", "model.preset=small", "train.max_steps=null", "a.b.c=[1, 2]",
                            "flag=true", "name=a=b"]) == {
        "train": {"lr": 3e-4, "max_steps": None}, "model": {"preset": "small"}, "a": {"b": {"c": [1, 2]}},
        "flag": True, "name": "a=b"}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_overrides(["lr"])


def test_later_sources_win_and_nested_defaults_stay(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"lr": 0.1, "batch_size": 8}}))
    config = load_config(SingleConfig, path, {"train": {"lr": 0.2, "seed": 4}}, ["train.lr=0.3", "model.preset=small"])
    assert (config.train.lr, config.train.batch_size, config.train.seed) == (0.3, 8, 4)
    assert config.model.preset == "small"
    # A nested model keeps its own defaults beside a changed field: `hetlm train` trains 3 epochs, not TrainConfig's 10.
    assert load_config(SingleConfig, overrides=["train.lr=0.3"]).train.epochs == 3
    assert load_config(SingleConfig) == SingleConfig()


def test_unknown_keys_and_bad_values_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'train.colour'; TrainConfig has: lr, "):
        load_config(SingleConfig, overrides=["train.colour=1"])
    with pytest.raises(ValueError, match="unknown setting 'pretrain.lr_max'"):
        load_config(ExperimentConfig, overrides=["pretrain.lr_max=1"])
    with pytest.raises(ValidationError, match="train.schedule\n  Input should be 'cosine', 'linear' or 'constant'"):
        load_config(SingleConfig, overrides=["train.schedule=cos"])
    with pytest.raises(ValidationError, match="kmeans.n_clusters\n  Input should be greater than or equal to 2"):
        load_config(ExperimentConfig, overrides=["kmeans.n_clusters=1"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": -1}))
    with pytest.raises(ValueError, match=f"^{path}: .*\nlr\n  Input should be greater than 0"):
        load_config(TrainConfig, path)


def test_every_train_config_field_reaches_hetlm_train(tmp_path, taobao_prepared):
    """`hetlm train --set train.<field>=...` for any TrainConfig field, checked before any data is read (a
    missing prepared folder is found first, before torch is imported; an --out that is a file stops
    whatever passes)."""
    prepared, out = str(taobao_prepared[0]), tmp_path / "a_file"
    out.write_text("")
    for field in TrainConfig.model_fields:
        result = runner.invoke(app, ["train", prepared, "--out", str(out), "--set", f"train.{field}=-7"])
        assert result.exit_code == 2 and "unknown setting" not in result.output, field
    result = runner.invoke(app, ["train", prepared, "--out", str(out), "--set", "train.warmup_ratio=2"])
    assert result.exit_code == 2 and "train.warmup_ratio" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", prepared, "--out", str(out), "--set", "train.lr_max=1"])
    assert result.exit_code == 2 and "unknown setting 'train.lr_max'" in result.output


@pytest.mark.parametrize("command", [
    ["prepare", "taobao", "log.csv", "--out", "o"],
    ["generate", "m", "p", "--out", "g.parquet"],
    ["score", "m", "log.csv", "--source", "taobao", "--out", "s.parquet"],
    ["serve", "m"],
    ["fit-hetlm", "p", "--base", "b", "--embeddings", "z.npz", "--out", "o"],
])
def test_every_command_takes_config_and_set(tmp_path, command, taobao_prepared):
    config = tmp_path / "c.json"
    config.write_text("{}")
    (tmp_path / "m").mkdir()  # paths are checked first, before the config (and the imports it needs)
    given = {"m": str(tmp_path / "m"), "p": str(taobao_prepared[0])}
    command = [given.get(word, word) for word in command]
    result = runner.invoke(app, [*command, "--config", str(config), "--set", "colour=1"])
    assert result.exit_code == 2 and "unknown setting 'colour'" in result.output, result.output
