"""The space-file schema: valid spaces parse to the right distributions, invalid ones say why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from automl.errors import SpaceError
from automl.spaces import (
    Categorical,
    Fixed,
    Range,
    TrialConfig,
    distributions,
    load_space,
    merge_flags,
    parse_space,
    parse_spec,
    study_name_for,
    suggest,
)

DESIGN_EXAMPLE = """
name: digits-mlp
data:
  dataset: digits
  task: auto
  validation: 0.2
  test: 0.0
model: mlp
train:
  epochs: 30
  patience: 5
objective: val_accuracy
study:
  sampler: tpe
  pruner: median
  seed: 0
space:
  optimizer:
    sgd:
      lr: {low: 1.0e-3, high: 1.0, log: true}
      momentum: {low: 0.0, high: 0.99}
      nesterov: [false, true]
    adam:
      lr: {low: 1.0e-5, high: 1.0e-1, log: true}
    rmsprop:
      lr: {low: 1.0e-5, high: 1.0e-1, log: true}
  loss: [cross_entropy, mse, huber]
  batch_size: [16, 32, 64, 128]
  hidden_units: {low: 16, high: 512, log: true}
  n_layers: {low: 1, high: 4}
  dropout: {low: 0.0, high: 0.5}
  weight_decay: {low: 1.0e-6, high: 1.0e-2, log: true}
  activation: relu
  lr_schedule: [none, step, exponential, inverse_time, cosine]
"""


def _parse(text: str) -> Any:
    return parse_space(yaml.safe_load(text), file="s.yaml", source=text)


def _with(space: dict[str, Any], **sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"data": {"dataset": "iris"}}
    base.update(sections)
    if space:
        base["space"] = space
    return base


def test_design_example_parses_with_every_distribution_kind() -> None:
    space = _parse(DESIGN_EXAMPLE)
    dists = distributions(space)
    assert space.name == "digits-mlp"
    assert space.objectives == ("val_accuracy",)
    assert space.directions == ["maximize"]
    assert dists["optimizer"] == Categorical(("sgd", "adam", "rmsprop"))
    assert dists["sgd_lr"] == Range(1e-3, 1.0, "float", log=True)
    assert dists["sgd_nesterov"] == Categorical((False, True))
    assert dists["batch_size"] == Categorical((16, 32, 64, 128))
    # Both bounds are YAML integers: an int range.
    assert dists["hidden_units"] == Range(16, 512, "int", log=True)
    assert dists["n_layers"] == Range(1, 4, "int")
    # 0.0 and 0.5 are floats.
    assert dists["dropout"] == Range(0.0, 0.5, "float")
    assert dists["activation"] == Fixed("relu")
    assert space.train.epochs == 30 and space.train.patience == 5


def test_int_range_needs_both_bounds_integers_unless_type_says() -> None:
    space = parse_space(_with({"dropout": {"low": 0, "high": 0.5}}))
    assert distributions(space)["dropout"] == Range(0.0, 0.5, "float")
    space = parse_space(_with({"lr_step": {"low": 2, "high": 8, "step": 2}}))
    assert distributions(space)["lr_step"] == Range(2, 8, "int", step=2)
    space = parse_space(_with({"mixup_alpha": {"low": 0, "high": 2, "type": "float"}}))
    assert distributions(space)["mixup_alpha"].kind == "float"  # type: ignore[union-attr]


def test_whole_number_floats_of_integer_names_are_integers() -> None:
    """``batch_size: 32.0`` passed the check and then failed every trial in torch."""
    space = parse_space(
        _with({"batch_size": 32.0, "n_layers": [1, 2.0], "hidden_units": [16, 1e2]})
    )
    dists = distributions(space)
    assert dists["batch_size"] == Fixed(32) and type(dists["batch_size"].value) is int  # type: ignore[union-attr]
    assert dists["n_layers"] == Categorical((1, 2))
    assert [type(c) for c in dists["hidden_units"].choices] == [int, int]  # type: ignore[union-attr]
    with pytest.raises(SpaceError, match=r"choices repeat a value, got \[16, 16\]"):
        parse_space(_with({"batch_size": [16, 16.0]}))
    with pytest.raises(SpaceError, match=r"batch_size: must be an integer"):
        parse_space(_with({"batch_size": 16.5}))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"space": {"dropout": {"low": 0.6, "high": 0.5}}},
            r"s\.yaml: space\.dropout: low must be <= high, got low=0\.6 high=0\.5",
        ),
        (
            {"space": {"optimizer": {"adam": {"lr": {"low": 0, "high": 1, "log": True}}}}},
            r"space\.optimizer\.adam\.lr: log: true needs low > 0, got low=0",
        ),
        (
            {"space": {"batch_size": [16, 0]}},
            r"space\.batch_size: must be an integer in \[1, inf\], got 0",
        ),
        ({"space": {"batch_size": []}}, r"space\.batch_size: an empty choice list"),
        ({"space": {"optimizer": {"adamm": {}}}}, r"unknown optimizer 'adamm'.*did you mean 'adam"),
        (
            {"space": {"optimizer": {"adam": {"momentum": 0.9}}}},
            r"optimizer 'adam' does not take 'momentum'.*momentum belongs to sgd, rmsprop",
        ),
        (
            {"space": {"loss": ["cross_entropyy"]}},
            r"unknown loss 'cross_entropyy'.*did you mean 'cross_entropy'",
        ),
        (
            {"space": {"activation": "rellu"}},
            r"space\.activation: must be one of relu.*did you mean 'relu'",
        ),
        (
            {"space": {"hiden_units": 32}},
            r"space\.hiden_units: unknown name.*did you mean 'hidden_units'",
        ),
        ({"spaces": {}}, r"s\.yaml: spaces: unknown section.*did you mean 'space'"),
        ({"data": {"dataset": "digitz"}}, r"unknown dataset 'digitz'.*did you mean 'digits'"),
        (
            {"data": {"dataset": "iris", "validation": 1.5}},
            r"data\.validation: Input should be less than 1",
        ),
        (
            {"data": {"dataset": "iris", "validation": 0.6, "test": 0.5}},
            r"validation \+ test must be < 1",
        ),
        (
            {"data": {"dataset": "iris", "valdation": 0.2}},
            r"data\.valdation: unknown key.*did you mean 'validation'",
        ),
        ({"train": {"epochs": 0}}, r"train\.epochs: Input should be greater than 0, got 0"),
        ({"train": {"epochs": "many"}}, r"train\.epochs: Input should be a valid integer"),
        ({"objective": "val_acc"}, r"unknown metric 'val_acc'.*did you mean 'val_accuracy'"),
        ({"study": {"sampler": "tpee"}}, r"unknown sampler 'tpee'.*did you mean 'tpe'"),
        ({"study": {"pruner": "medain"}}, r"unknown pruner 'medain'.*did you mean 'median'"),
        (
            {"data": {"dataset": "diabetes"}, "space": {"loss": ["cross_entropy"]}},
            r"'cross_entropy' does not fit a regression task",
        ),
        (
            {"data": {"dataset": "diabetes"}, "objective": "val_accuracy"},
            r"'val_accuracy' is a classification metric but the task is regression",
        ),
        (
            {"data": {"dataset": "wine"}, "model": "cnn"},
            r"cnn needs image-shaped input, but dataset 'wine' is tabular",
        ),
        (
            {"study": {"sampler": "grid"}, "space": {"dropout": {"low": 0.0, "high": 0.5}}},
            r"space\.dropout: the grid sampler needs categorical or stepped parameters",
        ),
        (
            {"space": {"dropout": {"low": 0.0, "hihg": 0.5}}},
            r"space\.dropout\.hihg: unknown key.*did you mean 'high'",
        ),
        (
            {"space": {"momentum": 0.9}},
            r"space\.momentum: no chosen optimizer \(adam\) takes 'momentum'",
        ),
        ({"space": {"nesterov": {"low": 0, "high": 1}}}, r"must be true or false, not a range"),
    ],
)
def test_invalid_spaces_name_file_key_rule_and_value(raw: dict[str, Any], message: str) -> None:
    doc = {"data": {"dataset": "iris"}, **raw}
    with pytest.raises(SpaceError, match=message):
        parse_space(doc, file="s.yaml")


def test_every_problem_is_listed() -> None:
    doc = {"data": {"dataset": "iris"}, "space": {"dropout": 2.0, "batch_size": -1, "nope": 1}}
    with pytest.raises(SpaceError) as info:
        parse_space(doc, file="s.yaml")
    assert len(info.value.errors) == 3
    assert all(line.startswith("s.yaml: space.") for line in info.value.errors)


def test_load_space_reports_yaml_errors_with_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  dataset: [iris\n")
    with pytest.raises(SpaceError, match=r"bad\.yaml: line \d+, column \d+: invalid YAML"):
        load_space(path)
    path.write_text("data:\n\tdataset: iris\n")
    with pytest.raises(SpaceError, match="tabs are not allowed"):
        load_space(path)
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "missing.yaml")


def test_exponents_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-5 as text (1.0e-5 is a number); a space file means a number."""
    path = tmp_path / "sci.yaml"
    path.write_text(
        "data: {dataset: iris}\nspace:\n  lr: {low: 1e-5, high: 1E-1, log: true}\n"
        "  weight_decay: [0, 5e-4, +1e-3]\n  name_like: {type: categorical, choices: [1e5x]}\n"
    )
    with pytest.raises(SpaceError) as info:  # name_like is not a parameter: text stays text
        load_space(path)
    assert "space.name_like: unknown name" in str(info.value)
    path.write_text(
        path.read_text().replace("  name_like: {type: categorical, choices: [1e5x]}\n", "")
    )
    space = load_space(path)
    lr = space.params["lr"]
    assert isinstance(lr, Range) and (lr.low, lr.high, lr.log) == (1e-5, 0.1, True)
    decay = space.params["weight_decay"]
    assert isinstance(decay, Categorical) and list(decay.choices) == [0, 5e-4, 1e-3]


def test_yaml_python_tags_never_construct(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"data: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpaceError, match="invalid YAML"):
        load_space(path)
    assert not marker.exists()


def test_suggest_samples_conditional_optimizer_parameters() -> None:
    space = _parse(DESIGN_EXAMPLE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen: set[str] = set()
    for _ in range(40):
        trial = study.ask()
        config = suggest(trial, space, seed=7)
        seen.add(config.optimizer)
        assert set(config.optimizer_params) >= {"lr", "weight_decay"}
        if config.optimizer == "sgd":
            assert "sgd_momentum" in trial.params
            assert 0.0 <= config.optimizer_params["momentum"] <= 0.99
            assert 1e-3 <= config.lr <= 1.0
        else:
            assert "sgd_momentum" not in trial.params
            assert 1e-5 <= config.lr <= 1e-1
        assert config.batch_size in (16, 32, 64, 128)
        assert 16 <= config.hidden_units <= 512
        assert config.activation == "relu"
        assert config.seed == 7
        study.tell(trial, 0.5)
    assert seen == {"sgd", "adam", "rmsprop"}


def test_schedule_parameters_only_sampled_under_their_schedule() -> None:
    space = parse_space(
        _with(
            {
                "lr_schedule": ["none", "step"],
                "lr_step": {"low": 1, "high": 5},
                "lr_decay": {"low": 0.01, "high": 0.5},
            }
        )
    )
    for schedule, present in (("step", {"lr_step"}), ("none", set())):
        config = suggest(optuna.trial.FixedTrial({"lr_schedule": schedule, "lr_step": 3}), space)
        assert config.lr_schedule == schedule
        assert (config.lr_step == 3) == ("lr_step" in present)


def test_fixed_trial_rebuilds_the_same_config() -> None:
    space = _parse(DESIGN_EXAMPLE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    original = suggest(trial, space, seed=11)
    again = suggest(optuna.trial.FixedTrial(trial.params), space, seed=11)
    assert again == original
    assert TrialConfig.from_dict(original.to_dict()) == original


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("adam,sgd,rmsprop", ["adam", "sgd", "rmsprop"]),
        ("16,32,64", [16, 32, 64]),
        ("1e-5..1e-1:log", {"low": 1e-5, "high": 1e-1, "log": True}),
        ("16..512:log", {"low": 16, "high": 512, "log": True}),
        ("0..0.5", {"low": 0, "high": 0.5}),
        ("8..64:step=8", {"low": 8, "high": 64, "step": 8}),
        ("0.3", 0.3),
        ("true", True),
        ("relu", "relu"),
    ],
)
def test_flag_grammar(spec: str, expected: Any) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a..b", "needs numbers"),
        ("1..2:cubic", "unknown modifier"),
        ("1,2:log", "only apply to ranges"),
        ("", "empty value"),
        ("16,,32", "an empty item in the list '16,,32'"),
    ],
)
def test_flag_grammar_errors(spec: str, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        parse_spec(spec, where="--lr")


def test_flags_build_the_same_space_as_an_equivalent_file() -> None:
    file_doc = {
        "data": {"dataset": "digits"},
        "space": {
            "optimizer": {"adam": {}, "sgd": {}},
            "loss": {"cross_entropy": {}, "mse": {}},
            "lr": {"low": 1e-5, "high": 1e-1, "log": True},
            "batch_size": [16, 32],
            "sgd.momentum": None,
        },
    }
    del file_doc["space"]["sgd.momentum"]
    flags = {
        "data": {"dataset": "digits"},
        "space": {
            "optimizer": parse_spec("adam,sgd"),
            "loss": parse_spec("cross_entropy,mse"),
            "lr": parse_spec("1e-5..1e-1:log"),
            "batch_size": parse_spec("16,32"),
        },
    }
    from_flags = parse_space(merge_flags(None, flags))
    from_file = parse_space(file_doc)
    assert distributions(from_flags) == distributions(from_file)
    # lr given at the top level is one shared Optuna parameter named "lr".
    assert "lr" in distributions(from_flags)


def test_flags_override_a_file_and_keep_its_optimizer_parameters() -> None:
    raw = yaml.safe_load(DESIGN_EXAMPLE)
    merged = merge_flags(
        raw, {"space": {"optimizer": ["sgd", "adamw"], "sgd.momentum": 0.9}, "epochs": 3}
    )
    space = parse_space(merged)
    assert space.optimizer.names == ("sgd", "adamw")
    assert space.optimizer.options["sgd"]["momentum"] == Fixed(0.9)
    assert space.optimizer.options["sgd"]["lr"] == Range(1e-3, 1.0, "float", log=True)
    assert space.train.epochs == 3


def test_flags_for_all_optimizers_and_epochs_override_what_the_file_searched() -> None:
    """--lr over a file whose optimizers set their own lr was refused (blaming the
    file); --epochs was ignored where the file searched epochs."""
    raw = yaml.safe_load(DESIGN_EXAMPLE)
    raw["space"]["epochs"] = [5, 10]
    merged = merge_flags(raw, {"space": {"lr": parse_spec("0.01")}, "epochs": 3})
    space = parse_space(merged)
    dists = distributions(space)
    assert dists["lr"] == Fixed(0.01)
    assert not any(name.endswith("_lr") for name in dists)
    assert space.optimizer.options["sgd"]["momentum"] == Range(0.0, 0.99, "float")  # kept
    assert space.train.epochs == 3 and "epochs" not in dists


def test_study_name_precedence(tmp_path: Path) -> None:
    path = tmp_path / "my-space.yaml"
    path.write_text("data: {dataset: iris}\n")
    space = load_space(path)
    assert study_name_for(space) == "my-space"
    assert study_name_for(space, "given") == "given"
    path.write_text("name: named\ndata: {dataset: iris}\n")
    assert study_name_for(load_space(path)) == "named"


def test_every_example_space_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent / "search_spaces"
    files = sorted(root.glob("*.yaml"))
    assert files, "search_spaces/ has no examples"
    for path in files:
        space = load_space(path)
        assert distributions(space), path


def test_yaml_merge_keys_work_and_a_repeated_own_key_is_still_an_error(tmp_path: Path) -> None:
    text = """\
data: {dataset: iris}
space:
  optimizer:
    adam: &base
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      weight_decay: 0.0
    adamw:
      <<: *base
      weight_decay: {low: 1.0e-4, high: 1.0e-1, log: true}
"""
    (tmp_path / "m.yaml").write_text(text)
    dists = distributions(load_space(tmp_path / "m.yaml"))
    assert dists["adamw_lr"] == dists["adam_lr"] == Range(1e-4, 1e-2, "float", log=True)
    assert dists["adamw_weight_decay"] == Range(1e-4, 1e-1, "float", log=True)  # overridden
    (tmp_path / "twice.yaml").write_text(text + "      weight_decay: 0.1\n")
    with pytest.raises(SpaceError, match="'weight_decay' is given twice in one mapping"):
        load_space(tmp_path / "twice.yaml")


def test_a_repeated_optimizer_or_loss_is_an_error() -> None:
    with pytest.raises(
        SpaceError, match=r"space\.optimizer: choices repeat a value, got \[.sgd., .sgd.\]"
    ):
        parse_space(_with({"optimizer": ["sgd", "sgd"]}))
