"""Samplers and pruners by name with options, and multi-objective studies."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from automl.cli import app
from automl.errors import SpaceError, UsageError
from automl.spaces import parse_space
from automl.studies import (
    RunOptions,
    _LogNdtr,
    create_pruner,
    create_sampler,
    create_study,
    load_study,
    open_storage,
    run_study,
)

SPACE: dict[str, Any] = {
    "data": {"dataset": "iris", "validation": 0.3},
    "train": {"epochs": 3, "patience": 0},
    "objective": "val_accuracy",
    "space": {
        "optimizer": {"adam": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}},
        "hidden_units": {"low": 4, "high": 16, "step": 4},
        "batch_size": [16, 32],
    },
}


def _space(sampler: Any = "tpe", pruner: Any = "none") -> Any:
    raw = {**SPACE, "study": {"sampler": sampler, "pruner": pruner, "seed": 0}}
    return parse_space(raw)


def _run(space: Any, tmp_path: Path, n: int = 2, name: str = "s") -> optuna.Study:
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_study(space, RunOptions(study_name=name, storage_url=url, n_trials=n, device="cpu"))
    return load_study(name, url)


@pytest.mark.parametrize(
    ("sampler", "cls", "attr", "value"),
    [
        (
            {"name": "tpe", "n_startup_trials": 1},
            optuna.samplers.TPESampler,
            "_n_startup_trials",
            1,
        ),
        ({"name": "random"}, optuna.samplers.RandomSampler, None, None),
        (
            {"name": "cmaes", "n_startup_trials": 1},
            optuna.samplers.CmaEsSampler,
            "_n_startup_trials",
            1,
        ),
        ({"name": "gp", "n_startup_trials": 1}, optuna.samplers.GPSampler, "_n_startup_trials", 1),
        ({"name": "qmc", "qmc_type": "halton"}, optuna.samplers.QMCSampler, "_qmc_type", "halton"),
        (
            {"name": "nsga2", "population_size": 4},
            optuna.samplers.NSGAIISampler,
            "_population_size",
            4,
        ),
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else None,
)
def test_each_sampler_runs_a_study_with_its_options(
    tmp_path: Path, sampler: dict[str, Any], cls: type, attr: str | None, value: Any
) -> None:
    space = _space(sampler)
    built = create_sampler(space, seed=0)
    assert isinstance(built, cls)
    if attr is not None:
        assert getattr(built, attr) == value
    study = _run(space, tmp_path)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    assert all(0 <= t.value <= 1 for t in complete)
    assert all({"adam_lr", "hidden_units", "batch_size"} <= set(t.params) for t in complete)


def test_grid_runs_every_point_once_then_stops(tmp_path: Path) -> None:
    raw = {**SPACE, "study": {"sampler": "grid", "pruner": "none", "seed": 0}}
    raw["space"] = {**SPACE["space"], "optimizer": {"adam": {"lr": [0.01, 0.05]}}}
    raw["space"]["hidden_units"] = {"low": 4, "high": 8, "step": 4}
    space = parse_space(raw)
    study = _run(space, tmp_path, n=20)
    points = {
        (t.params["adam_lr"], t.params["hidden_units"], t.params["batch_size"])
        for t in study.trials
    }
    assert len(study.trials) == 8 and len(points) == 8  # 2 x 2 x 2, no repeats


@pytest.mark.parametrize(
    "dist",
    [{"low": 1e-3, "high": 1e-1, "log": True}, {"low": 0.001, "high": 0.1}],
)
def test_grid_with_a_continuous_parameter_is_a_load_error(dist: dict[str, Any]) -> None:
    raw = {**SPACE, "study": {"sampler": "grid"}}
    raw["space"] = {**SPACE["space"], "dropout": dist, "optimizer": "adam"}
    with pytest.raises(SpaceError, match=r"space.dropout: the grid sampler needs categorical"):
        parse_space(raw)


@pytest.mark.parametrize(
    ("pruner", "cls", "attr", "value"),
    [
        (
            {"name": "median", "n_warmup_steps": 3},
            optuna.pruners.MedianPruner,
            "_n_warmup_steps",
            3,
        ),
        (
            {"name": "percentile", "percentile": 40.0},
            optuna.pruners.PercentilePruner,
            "_percentile",
            40.0,
        ),
        (
            {"name": "halving", "min_resource": 1},
            optuna.pruners.SuccessiveHalvingPruner,
            "_min_resource",
            1,
        ),
        (
            {"name": "hyperband", "reduction_factor": 2},
            optuna.pruners.HyperbandPruner,
            "_reduction_factor",
            2,
        ),
        ({"name": "threshold", "lower": 0.0}, optuna.pruners.ThresholdPruner, "_lower", 0.0),
        (
            {"name": "wilcoxon", "p_threshold": 0.2},
            optuna.pruners.WilcoxonPruner,
            "_p_threshold",
            0.2,
        ),
        ("none", optuna.pruners.NopPruner, None, None),
    ],
    ids=lambda v: (v["name"] if isinstance(v, dict) else v) if not isinstance(v, type) else None,
)
def test_each_pruner_runs_a_study_with_its_options(
    tmp_path: Path, pruner: Any, cls: type, attr: str | None, value: Any
) -> None:
    space = _space("random", pruner)
    built = create_pruner(space)
    assert isinstance(built, cls)
    if attr is not None:
        assert getattr(built, attr) == value
    study = _run(space, tmp_path)
    assert len(study.trials) == 2
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert all(len(t.intermediate_values) >= 1 for t in study.trials)


def test_hyperband_max_resource_defaults_to_the_epochs() -> None:
    pruner = create_pruner(_space("tpe", "hyperband"))
    assert pruner._max_resource == 3  # type: ignore[attr-defined]


def test_a_threshold_pruner_prunes_at_the_threshold(tmp_path: Path) -> None:
    space = _space("random", {"name": "threshold", "lower": 0.999})
    study = _run(space, tmp_path, n=3)
    # Three epochs of a tiny MLP never reach 99.9% on iris: every trial stops at epoch 1.
    assert [t.state.name for t in study.trials] == ["PRUNED"] * 3
    assert all(list(t.intermediate_values) == [0] for t in study.trials)
    assert "pruned at epoch 1" in study.trials[0].user_attrs["prune_reason"]


def test_a_median_pruner_prunes_a_trial_worse_than_the_median(tmp_path: Path) -> None:
    raw = {**SPACE, "study": {"sampler": "random", "seed": 0}}
    raw["study"]["pruner"] = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}
    raw["space"] = {"optimizer": {"adam": {"lr": [0.05, 1.0e-7]}}, "hidden_units": 16}
    space = parse_space(raw)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_study(space, "m", open_storage(url), seed=0)
    for lr in (0.05, 1.0e-7):  # the second cannot learn: it keeps its initial accuracy
        study.enqueue_trial({"adam_lr": lr})
    run_study(space, RunOptions(study_name="m", storage_url=url, n_trials=2, device="cpu"))
    learner, frozen = load_study("m", url).trials
    assert learner.state.name == "COMPLETE" and len(learner.intermediate_values) == 3
    assert frozen.params["adam_lr"] == 1.0e-7
    assert frozen.state.name == "PRUNED"
    assert frozen.intermediate_values[0] < learner.intermediate_values[0]
    assert list(frozen.intermediate_values) == [0]  # stopped after its first epoch
    # It records what it reached, as a finished trial does (show's epochs, export).
    assert frozen.user_attrs["epochs_run"] == 1
    assert frozen.user_attrs["val_loss"] > 0 and "val_accuracy" in frozen.user_attrs
    assert frozen.user_attrs["prune_reason"].startswith("pruned at epoch 1")


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"sampler": {"name": "tpe", "n_startup": 3}}, "did you mean 'n_startup_trials'"),
        ({"sampler": {"name": "random", "population_size": 3}}, "'random' has no option"),
        ({"sampler": {"name": "gp", "constraints_func": "f"}}, "has no option 'constraints"),
        ({"pruner": {"name": "median", "warmup": 3}}, "pruner 'median' has no option 'warmup'"),
        ({"pruner": {"name": "threshold"}}, "'threshold' needs 'lower' or 'upper'"),
    ],
)
def test_an_unknown_sampler_or_pruner_option_is_a_load_error(
    study: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpaceError, match=message):
        parse_space({**SPACE, "study": study})


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"sampler": {"name": "qmc", "qmc_type": "bogus"}}, "bad option for 'qmc'"),
        (
            {"sampler": {"name": "nsga2", "population_size": 1}},
            "population_size: must be at least 2",
        ),
        (
            {"pruner": {"name": "median", "n_warmup_steps": -1}},
            "n_warmup_steps: must be at least 0",
        ),
        ({"sampler": {"name": "tpe", "n_startup_trials": 1.5}}, "must be a whole number for 'tpe'"),
        ({"pruner": {"name": "halving", "min_resource": 0}}, "min_resource: must be at least 1"),
    ],
)
def test_a_bad_option_value_is_a_usage_error(study: dict[str, Any], message: str) -> None:
    space = parse_space({**SPACE, "study": study})
    with pytest.raises(UsageError, match=message):
        if "sampler" in study:
            create_sampler(space, 0)
        else:
            create_pruner(space)


def test_the_option_tables_are_optunas_keyword_arguments() -> None:
    import inspect

    from automl.spaces import PRUNER_OPTIONS, PRUNERS, SAMPLER_OPTIONS, SAMPLERS
    from automl.studies import optuna_classes

    classes = {**optuna_classes(), "none": optuna.pruners.NopPruner}
    assert set(classes) == set(SAMPLERS) | set(PRUNERS)
    assert set(SAMPLER_OPTIONS) == set(SAMPLERS) and set(PRUNER_OPTIONS) == set(PRUNERS)
    for name, options in {**SAMPLER_OPTIONS, **PRUNER_OPTIONS}.items():
        accepted = set(inspect.signature(classes[name]).parameters)
        assert set(options) <= accepted - {"seed"}, name


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"sampler": "bayes"}, "unknown sampler 'bayes'"),
        ({"pruner": "medain"}, "did you mean 'median'"),
    ],
)
def test_an_unknown_sampler_or_pruner_is_a_load_error(study: dict[str, Any], message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        parse_space({**SPACE, "study": study})


def test_multi_objective_best_gives_the_pareto_front(tmp_path: Path) -> None:
    (tmp_path / "mo.yaml").write_text(
        "name: mo\n"
        "data: {dataset: iris, validation: 0.3}\n"
        "train: {epochs: 3, patience: 0}\n"
        "objective: [val_accuracy, n_params]\n"
        "study: {sampler: {name: nsga2, population_size: 4}, pruner: median, seed: 0}\n"
        "space:\n"
        "  hidden_units: {low: 2, high: 64, log: true}\n"
        "  n_layers: {low: 1, high: 2}\n"
    )
    url = f"sqlite:///{tmp_path / 's.db'}"
    runner = CliRunner()
    res = runner.invoke(app, ["run", "mo.yaml", "--n-trials", "6", "--storage", url, "--json"])
    assert res.exit_code == 0, res.output
    assert "study.pruner is off: Optuna cannot prune trials of several objectives" in res.stderr
    table = runner.invoke(app, ["run", "mo.yaml", "--n-trials", "1", "--storage", url])
    assert "Pareto front of 'mo'" in table.stdout and "best trials of" not in table.stdout
    res = runner.invoke(app, ["best", "mo", "--storage", url, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["directions"] == ["maximize", "minimize"]
    front = doc["best_trials"]
    assert front
    study = load_study("mo", url)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 7  # never pruned
    values = {t.number: t.values for t in study.trials}
    for entry in front:
        assert set(entry["params"]) == {"hidden_units", "n_layers"}
        acc, n_params = entry["values"]
        assert entry["values"] == values[entry["number"]]
        assert n_params == entry["user_attrs"]["n_params"]
        # Nothing in the study dominates a front member.
        for other in values.values():
            assert not (other[0] >= acc and other[1] <= n_params and other != [acc, n_params])
    # And every trial off the front is dominated by one on it.
    on_front = {e["number"] for e in front}
    for number, (acc, n_params) in values.items():
        if number not in on_front:
            assert any(e["values"][0] >= acc and e["values"][1] <= n_params for e in front), number


def test_incremental_group_space_matches_optunas_rebuilt_one() -> None:
    from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace
    from optuna.trial import TrialState

    from automl.studies import _IncrementalGroupSpace

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    full = _GroupDecomposedSearchSpace(True)
    incremental = _IncrementalGroupSpace(_GroupDecomposedSearchSpace(True))

    def groups(space: object) -> list[list[str]]:
        return sorted(sorted(g) for g in space.search_spaces)  # type: ignore[attr-defined]

    for i in range(24):
        trial = study.ask()
        optimizer = trial.suggest_categorical("optimizer", ["adam", "sgd", "rmsprop"])
        trial.suggest_float(f"{optimizer}_lr", 1e-4, 1e-1, log=True)
        if optimizer == "sgd":
            trial.suggest_float("sgd_momentum", 0.0, 0.9)
        if i % 4 == 0:
            trial.suggest_int("n_layers", 1, 3)
        state = TrialState.PRUNED if i % 5 == 0 else TrialState.COMPLETE
        study.tell(trial, None if state == TrialState.PRUNED else float(i), state=state)
        assert groups(incremental.calculate(study)) == groups(full.calculate(study))
    assert ["sgd_lr", "sgd_momentum"] in groups(full.calculate(study))


def test_the_lean_tpe_searches_like_optunas_own(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from optuna.samplers._tpe import _truncnorm

    from automl.studies import _lean_tpe

    def best_of(sampler: optuna.samplers.BaseSampler) -> tuple[float, float]:
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: (t.suggest_float("x", -5, 5) - 1.2) ** 2, n_trials=40)
        return study.best_value, study.best_params["x"]

    def optunas_log_ndtr(a: Any) -> Any:  # Optuna's own per-element implementation
        return np.frompyfunc(_truncnorm._log_ndtr_single, 1, 1)(a).astype(float)

    monkeypatch.setattr(_truncnorm, "_log_ndtr", optunas_log_ndtr)
    monkeypatch.setattr(_LogNdtr, "BUDGET", 0)  # SciPy's from the first call
    plain = best_of(optuna.samplers.TPESampler(seed=3, multivariate=True, group=True))
    lean = best_of(_lean_tpe(optuna.samplers.TPESampler(seed=3, multivariate=True, group=True)))
    assert isinstance(_truncnorm._log_ndtr, _LogNdtr)  # SciPy's is in place
    assert lean == pytest.approx(plain, abs=1e-6)  # the same search, to float rounding


def test_log_ndtr_is_optunas_until_its_budget_is_spent_then_scipys() -> None:
    import numpy as np
    from optuna.samplers._tpe import _truncnorm
    from scipy.special import log_ndtr

    def optunas(a: Any) -> Any:  # Optuna's own, one element at a time
        return np.frompyfunc(_truncnorm._log_ndtr_single, 1, 1)(a).astype(float)

    lean = _LogNdtr()
    lean._left = 2000  # a small budget for the test
    values = np.linspace(-40, 8, 1000)
    assert np.array_equal(lean(values), optunas(values))
    assert np.array_equal(lean(values), optunas(values))  # 2,000 elements: the budget
    np.testing.assert_allclose(lean(values), optunas(values), rtol=1e-7)
    assert lean._scipys is log_ndtr  # SciPy's from the third call on
    assert np.array_equal(lean(values[:3]), log_ndtr(values[:3]))  # and for short ones


def test_the_array_log_ndtr_gives_optunas_values_bit_for_bit() -> None:
    import numpy as np
    from optuna.samplers._tpe import _truncnorm

    from automl.studies import _exact_log_ndtr

    rng = np.random.default_rng(0)
    edges = [6.0, np.nextafter(6.0, 7), -20.0, np.nextafter(-20.0, 0), -1.0, 1.0, 0.0]
    for values in (
        rng.normal(0, 1, 5000),
        rng.normal(0, 12, (40, 125)),  # both tails, past 6 and -20
        np.array([*edges, 40.0, -40.0, np.inf, -np.inf, np.nan]),
        np.array([]),
    ):
        _truncnorm._log_ndtr_single.cache_clear()
        with np.errstate(invalid="ignore"):  # (NaN in, NaN out)
            expected = np.frompyfunc(_truncnorm._log_ndtr_single, 1, 1)(values).astype(float)
            got = _exact_log_ndtr(values)
        assert got.shape == values.shape
        assert np.array_equal(got, expected, equal_nan=True)


@pytest.mark.parametrize("options", [{}, {"multivariate": True, "group": True}])
def test_the_lean_tpe_samples_exactly_what_optunas_does(options: dict[str, Any]) -> None:
    """Its caches (the group space, each finished trial's internal parameters) change no
    sample: the same seed gives the same trials as Optuna's own TPE, with categorical,
    integer, log and conditional parameters, and pruned trials."""
    from automl.studies import _lean_tpe

    def objective(trial: optuna.Trial) -> float:
        kind = trial.suggest_categorical("kind", ["a", "b", "c"])
        x = trial.suggest_float("x", -3, 3)
        n = trial.suggest_int("n", 1, 64, log=True)
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        extra = trial.suggest_float("momentum", 0.0, 0.9) if kind == "a" else 0.0
        value = (x - 1) ** 2 + abs(n - 8) / 8 + abs(math.log10(lr) + 3) + extra
        trial.report(value, 0)
        if trial.number % 7 == 3:
            raise optuna.TrialPruned()
        return value

    def params(sampler: optuna.samplers.BaseSampler) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=sampler)
        study.optimize(objective, n_trials=40)
        return [t.params for t in study.trials]

    lean = params(_lean_tpe(optuna.samplers.TPESampler(seed=5, **options)))
    plain = params(optuna.samplers.TPESampler(seed=5, **options))  # SciPy's log_ndtr too
    assert lean == plain


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_seeded_runs_started_together_propose_different_points(
    sampler: str, storage_url: str
) -> None:
    """Runs of one seeded study started at the same moment read the same trial count:
    they drew the same points (whole packs repeated). The one whose first trial is the
    study's next keeps the seeded stream, so a lone run stays reproducible."""
    space = parse_space(
        {
            "data": {"dataset": "iris"},
            "study": {"sampler": sampler, "seed": 5},
            "space": {
                "hidden_units": {"low": 1, "high": 10_000},
                "dropout": {"low": 0, "high": 0.5},
            },
        }
    )

    def draw(study: optuna.Study) -> tuple[int, float]:
        trial = study.ask()
        return trial.suggest_int("hidden_units", 1, 10_000), trial.suggest_float("dropout", 0, 0.5)

    first = create_study(space, "s", open_storage(storage_url), seed=5)
    second = create_study(space, "s", open_storage(storage_url), seed=5)  # at the same moment
    a, b = draw(first), draw(second)
    assert a != b
    lone = create_study(space, "lone", open_storage(storage_url), seed=5)
    assert draw(lone) == a  # the seeded stream, as the first run drew it
