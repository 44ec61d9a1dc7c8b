"""Fused training (packing.py): a member of a fused group follows the same path as the
same configuration trained alone, ends on its own, and `run --pack` records trials like
the sequential path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import OPTIMIZER_PARAMS
from typer.testing import CliRunner

from automl.cli import app
from automl.data import DeviceData, load_dataset, to_device
from automl.models import ACTIVATIONS, build_model
from automl.packing import FUSED_OPTIMIZERS, group_configs, group_key, train_packed
from automl.spaces import DataSpec, TrialConfig
from automl.training import TrialDiverged, train

RTOL = 1e-4  # float32 rounding differences (bmm vs addmm, padded sums) over 2 epochs


@pytest.fixture(scope="module")
def digits() -> DeviceData:
    torch.set_num_threads(1)
    return to_device(load_dataset(DataSpec(dataset="digits", validation=0.2), seed=0), "cpu")


@pytest.fixture(scope="module")
def diabetes() -> DeviceData:
    return to_device(load_dataset(DataSpec(dataset="diabetes", validation=0.2), seed=0), "cpu")


def _members(optimizer: str, loss: str, **extra: Any) -> list[TrialConfig]:
    """Three members that differ in width (one not a multiple of 4, so dropout masks end
    mid-word), lr, dropout, noise, L1 and schedule."""
    params = OPTIMIZER_PARAMS[optimizer]
    base: dict[str, Any] = dict(
        optimizer=optimizer, loss=loss, batch_size=128, epochs=2, n_layers=2, **extra
    )
    return [
        TrialConfig(optimizer_params=params, hidden_units=33, dropout=0.2, seed=7, l1=1e-5, **base),
        TrialConfig(
            optimizer_params={**params, "lr": params["lr"] / 3}, hidden_units=16, seed=3, **base
        ),
        TrialConfig(
            optimizer_params=params,
            hidden_units=24,
            dropout=0.1,
            noise_std=0.1,
            lr_schedule="cosine",
            seed=11,
            **base,
        ),
    ]


def _assert_same_curves(configs: list[TrialConfig], data: DeviceData) -> None:
    packed = train_packed(configs, data, objective="val_loss")
    for config, member in zip(configs, packed, strict=True):
        assert not isinstance(member, Exception), member
        alone = train(config, data, objective="val_loss")
        assert len(member.history) == len(alone.history) == config.epochs
        for a, p in zip(alone.history, member.history, strict=True):
            for key in ("train_loss", "val_loss"):
                assert p[key] == pytest.approx(a[key], rel=RTOL), (config.optimizer, key)
        assert member.n_params == alone.n_params


@pytest.mark.parametrize("optimizer", FUSED_OPTIMIZERS)
def test_fused_member_matches_alone_for_every_optimizer(optimizer: str, digits: DeviceData) -> None:
    _assert_same_curves(_members(optimizer, "cross_entropy"), digits)


@pytest.mark.parametrize("loss", ["nll", "mse", "huber", "l1", "smooth_l1", "bce"])
def test_fused_member_matches_alone_for_every_classification_loss(
    loss: str, digits: DeviceData
) -> None:
    _assert_same_curves(_members("adam", loss), digits)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_member_matches_alone_for_every_activation(
    activation: str, digits: DeviceData
) -> None:
    """The fused backward pass is written out per activation; each must give autograd's
    gradients (with dropout, noise and L1 in the group)."""
    _assert_same_curves(_members("adam", "cross_entropy", activation=activation), digits)


@pytest.mark.parametrize(
    ("activation", "loss", "task", "loss_params"),
    [(a, "cross_entropy", "classification", {}) for a in sorted(ACTIVATIONS)]
    + [
        ("relu", "cross_entropy", "classification", {"label_smoothing": 0.1}),
        ("relu", "nll", "classification", {}),
        ("tanh", "mse", "classification", {}),
        ("gelu", "huber", "classification", {"delta": 0.05}),
        ("silu", "l1", "classification", {}),
        ("elu", "smooth_l1", "classification", {"beta": 0.05}),
        ("leaky_relu", "bce", "classification", {}),
        ("relu", "mse", "regression", {}),
        ("tanh", "huber", "regression", {"delta": 0.5}),
        ("gelu", "l1", "regression", {}),
        ("silu", "smooth_l1", "regression", {"beta": 0.5}),
    ],
)
def test_fused_gradients_are_autograds(
    activation: str, loss: str, task: str, loss_params: dict[str, float]
) -> None:
    """One step's gradients of the written-out backward pass, member by member, against
    autograd through the member's own model and the sequential path's loss (with L1)."""
    from automl.packing import (
        FUSED_CLASSIFICATION_LOSSES,
        FUSED_REGRESSION_LOSSES,
        FusedMLP,
    )
    from automl.training import loss_function

    torch.manual_seed(0)
    k, b, n_features = 3, 16, 12
    n_outputs = 5 if task == "classification" else 1
    configs = [
        TrialConfig(
            n_layers=2, hidden_units=w, activation=activation, loss=loss, seed=s, l1=1e-3 * s
        )
        for w, s in ((7, 1), (16, 2), (11, 3))
    ]
    model = FusedMLP(configs, (n_features,), n_outputs, torch.device("cpu"))
    x = torch.randn(k, b, n_features)
    y = torch.randint(0, n_outputs, (k, b)) if task == "classification" else torch.randn(k, b)
    table = FUSED_CLASSIFICATION_LOSSES if task == "classification" else FUSED_REGRESSION_LOSSES
    out, saved = model.forward_train(x, [])
    losses, grad_out = table[loss](out, y, loss_params)
    l1 = torch.tensor([c.l1 for c in configs])
    model.backward(saved, grad_out, l1)
    for m, config in enumerate(configs):
        alone = build_model(config, (n_features,), n_outputs)
        alone.load_state_dict(model.member_state(m))
        value = loss_function(loss, task)(alone(x[m]), y[m], loss_params)
        assert float(losses[m]) == pytest.approx(value.item(), rel=1e-5)
        penalty = sum(p.abs().sum() for name, p in alone.named_parameters() if "weight" in name)
        (value + config.l1 * penalty).backward()
        grads = {name: p.grad for name, p in alone.named_parameters()}
        state = model.row_state(model.flat_grad[m], model.keys[m], config.hidden_units)
        for name, grad in grads.items():
            assert grad is not None
            torch.testing.assert_close(state[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_label_smoothing_matches_alone(digits: DeviceData) -> None:
    configs = _members("sgd", "cross_entropy")
    configs = [
        TrialConfig.from_dict({**c.to_dict(), "loss_params": {"label_smoothing": 0.1}})
        for c in configs
    ]
    _assert_same_curves(configs, digits)


@pytest.mark.parametrize("loss", ["mse", "huber", "l1", "smooth_l1"])
def test_fused_member_matches_alone_for_every_regression_loss(
    loss: str, diabetes: DeviceData
) -> None:
    _assert_same_curves(_members("adam", loss), diabetes)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_members_with_their_own_betas_match_alone(optimizer: str, digits: DeviceData) -> None:
    """Members that share betas and eps are updated by torch's fused kernel (one pass for
    the group, each member's rate applied after); members that do not, by the tensor
    formulas. Both follow the path alone."""
    from automl.packing import FusedOptimizer

    shared = _members(optimizer, "cross_entropy")
    own = [
        TrialConfig.from_dict(
            {**c.to_dict(), "optimizer_params": {**c.optimizer_params, "beta2": beta2}}
        )
        for c, beta2 in zip(shared, [0.99, 0.999, 0.95], strict=True)
    ]
    flat = [torch.zeros(3, 4)]
    assert FusedOptimizer(optimizer, shared, flat).kernel is not None
    assert FusedOptimizer(optimizer, own, flat).kernel is None
    _assert_same_curves(own, digits)


def test_rmsprop_members_sharing_alpha_run_the_fused_kernel_and_match_alone(
    digits: DeviceData,
) -> None:
    """RMSprop members that share alpha and eps are updated by torch's fused Adam kernel
    (beta1 = 0, bias corrections of 1), with or without their own momentum; members whose
    alpha differs, by the tensor formulas. Both follow the path alone."""
    from automl.packing import FusedOptimizer

    momenta = [0.0, 0.9, 0.5]
    shared = [
        TrialConfig.from_dict(
            {**c.to_dict(), "optimizer_params": {**c.optimizer_params, "momentum": m}}
        )
        for c, m in zip(_members("rmsprop", "cross_entropy"), momenta, strict=True)
    ]
    flat = [torch.zeros(3, 4)]
    alpha = shared[0].optimizer_params["alpha"]  # the test's settings: 0.95
    assert FusedOptimizer("rmsprop", shared, flat).kernel == {
        "beta1": 0.0,
        "beta2": alpha,
        "eps": 1e-8,
    }
    assert FusedOptimizer("rmsprop", shared[:1], flat).kernel is not None  # no momentum
    own_alpha = [
        TrialConfig.from_dict(
            {**c.to_dict(), "optimizer_params": {**c.optimizer_params, "alpha": 0.9}}
        )
        for c in shared[:1]
    ]
    assert FusedOptimizer("rmsprop", shared[1:] + own_alpha, flat).kernel is None
    _assert_same_curves(shared, digits)
    _assert_same_curves(shared[:1] + shared[:1], digits)  # every member without momentum


# Per optimizer, three members' own settings: where members differ, their coefficients
# are per-member tensors; where they agree, Python floats (FusedOptimizer.Coefficient).
OWN_SETTINGS: dict[str, list[dict[str, Any]]] = {
    "sgd": [
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"lr": 0.02},
        {"lr": 0.03, "momentum": 0.5, "dampening": 0.1, "weight_decay": 1e-3},
    ],
    "rmsprop": [
        {"lr": 1e-3, "momentum": 0.5},
        {"lr": 2e-3, "alpha": 0.9},
        {"lr": 5e-4, "eps": 1e-6, "weight_decay": 1e-4},
    ],
    "adagrad": [{"lr": 2e-2, "lr_decay": 0.01}, {"lr": 1e-2}, {"lr": 3e-2, "eps": 1e-8}],
    "adadelta": [{"lr": 1.0, "rho": 0.85}, {"lr": 0.5}, {"lr": 1.0, "eps": 1e-5}],
    "adabound": [{"lr": 1e-3, "final_lr": 0.05}, {"lr": 2e-3}, {"lr": 1e-3, "gamma": 1e-2}],
    "adamw": [{"lr": 2e-3, "weight_decay": 0.1}, {"lr": 1e-3}, {"lr": 1e-3, "eps": 1e-6}],
}


@pytest.mark.parametrize("optimizer", sorted(OWN_SETTINGS))
def test_members_with_their_own_optimizer_settings_match_alone(
    optimizer: str, digits: DeviceData
) -> None:
    configs = [
        TrialConfig.from_dict({**c.to_dict(), "optimizer_params": params})
        for c, params in zip(
            _members(optimizer, "cross_entropy"), OWN_SETTINGS[optimizer], strict=True
        )
    ]
    _assert_same_curves(configs, digits)


def test_square_roots_of_zero_and_denormal_moments_are_floored_not_changed() -> None:
    from automl.packing import SQRT_FLOOR, _sqrt

    values = torch.tensor([0.0, 1e-40, 1e-30, 1e-20, 2.0, 1e6])
    roots = _sqrt(values)
    assert roots[:3].tolist() == [pytest.approx(SQRT_FLOOR**0.5)] * 3
    assert torch.equal(roots[3:], values[3:].sqrt())
    assert values[0] == 0.0  # the moments themselves are left as they are


def test_members_with_different_optimizers_match_alone(digits: DeviceData) -> None:
    configs = [
        TrialConfig.from_dict(
            {
                **c.to_dict(),
                "seed": i,
                "optimizer": name,
                "optimizer_params": OPTIMIZER_PARAMS[name],
            }
        )
        for i, (c, name) in enumerate(
            zip(
                _members("adam", "cross_entropy") * 2,
                ["sgd", "adam", "rmsprop", "adam", "sgd", "adabound"],
                strict=True,
            )
        )
    ]
    _assert_same_curves(configs, digits)
    # A member that ends early leaves the others (of every optimizer) on their paths.
    configs = [TrialConfig.from_dict({**c.to_dict(), "epochs": 3}) for c in configs]

    def prune(epoch: int, metrics: dict[str, float]) -> None:
        raise optuna.TrialPruned("pruned")

    packed = train_packed(configs, digits, on_epoch=[None, prune, None, None, prune, None])
    assert isinstance(packed[1], optuna.TrialPruned) and isinstance(packed[4], optuna.TrialPruned)
    for i in (0, 2, 3, 5):
        member = packed[i]
        assert not isinstance(member, Exception)
        alone = train(configs[i], digits)
        assert [h["val_loss"] for h in member.history] == pytest.approx(
            [h["val_loss"] for h in alone.history], rel=RTOL
        )


def test_pruned_and_diverged_members_end_alone_without_disturbing_the_rest(
    digits: DeviceData,
) -> None:
    configs = _members("sgd", "cross_entropy")
    configs[2] = TrialConfig.from_dict(
        {**configs[2].to_dict(), "optimizer_params": {"lr": 1e4}, "epochs": 2}
    )
    configs = [TrialConfig.from_dict({**c.to_dict(), "epochs": 3}) for c in configs]

    def prune_at_first(epoch: int, metrics: dict[str, float]) -> None:
        raise optuna.TrialPruned(f"pruned at epoch {epoch + 1}")

    seen: list[int] = []
    packed = train_packed(
        configs,
        digits,
        objective="val_loss",
        on_epoch=[prune_at_first, lambda epoch, m: seen.append(epoch), None],
    )
    assert isinstance(packed[0], optuna.TrialPruned)
    assert isinstance(packed[2], TrialDiverged)
    survivor = packed[1]
    assert not isinstance(survivor, Exception)
    assert seen == [0, 1, 2]
    alone = train(configs[1], digits, objective="val_loss")
    assert [h["train_loss"] for h in survivor.history] == pytest.approx(
        [h["train_loss"] for h in alone.history], rel=RTOL
    )


def test_patience_stops_members_individually(digits: DeviceData) -> None:
    configs = [
        TrialConfig(optimizer="sgd", optimizer_params={"lr": 1e-6}, epochs=6, seed=1),
        TrialConfig(optimizer="sgd", optimizer_params={"lr": 0.05}, epochs=6, seed=2),
    ]
    packed = train_packed(configs, digits, objective="val_accuracy", patience=2)
    for config, member in zip(configs, packed, strict=True):
        assert not isinstance(member, Exception)
        alone = train(config, digits, objective="val_accuracy", patience=2)
        assert member.epochs_run == alone.epochs_run
        assert member.stopped_early == alone.stopped_early
        assert member.best_epoch == alone.best_epoch
        assert member.metrics["val_accuracy"] == pytest.approx(alone.metrics["val_accuracy"])


def test_best_state_loads_into_the_sequential_model(digits: DeviceData) -> None:
    configs = _members("adam", "cross_entropy")
    packed = train_packed(configs, digits, objective="val_loss")
    for config, member in zip(configs, packed, strict=True):
        assert not isinstance(member, Exception) and member.best_state is not None
        model = build_model(config, digits.input_shape, digits.n_outputs)
        model.load_state_dict(member.best_state)
        model.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.cross_entropy(model(digits.X_val), digits.y_val)
        assert float(val_loss) == pytest.approx(member.metrics["val_loss"], rel=RTOL)


def test_grouping_sends_incompatible_and_lonely_configs_alone() -> None:
    adam = TrialConfig(optimizer="adam", optimizer_params={"lr": 1e-3})
    configs = [
        adam,
        TrialConfig(optimizer="adam", optimizer_params={"lr": 1e-2}, hidden_units=7),
        TrialConfig(model="cnn"),
        TrialConfig(batch_norm=True),
        TrialConfig(mixup_alpha=0.2),
        TrialConfig(optimizer="adam", optimizer_params={"lr": 1e-3, "amsgrad": True}),
        TrialConfig(optimizer="adam", optimizer_params={"lr": 1e-3}, batch_size=32),
        TrialConfig(optimizer="sgd", optimizer_params={"lr": 1e-2}),
        TrialConfig(optimizer="sgd", optimizer_params={"lr": 1e-1}, dropout=0.3),
        TrialConfig(optimizer="adam", optimizer_params={"lr": 1e-4}, n_layers=3),
    ]
    assert group_key(configs[2]) is None and group_key(configs[3]) is None
    groups, alone = group_configs(configs)
    assert groups == [[0, 1, 7, 8]]  # optimizers may differ inside a group
    assert alone == [2, 3, 4, 5, 6, 9]
    groups, alone = group_configs([adam] * 5, max_size=2)
    assert groups == [[0, 1], [2, 3]] and alone == [4]


def test_train_packed_refuses_incompatible_configs(digits: DeviceData) -> None:
    with pytest.raises(ValueError, match="group_key"):
        train_packed([TrialConfig(), TrialConfig(batch_size=32)], digits)


def _trials(storage_url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage_url).get_trials()


def test_run_pack_records_trials_like_the_sequential_path(tiny_space: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    packed_url = f"sqlite:///{tmp_path / 'packed.db'}"
    serial_url = f"sqlite:///{tmp_path / 'serial.db'}"
    args = ["run", str(tiny_space), "--n-trials", "6", "--json", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--pack", "4", "--storage", packed_url])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["n_complete"] + doc["n_pruned"] == 6
    result = runner.invoke(app, [*args, "--storage", serial_url])
    assert result.exit_code == 0, result.output
    packed, serial = _trials(packed_url, "tiny"), _trials(serial_url, "tiny")
    assert len(packed) == 6
    optional = {"weights_path"}  # only on trials that were the best when they ended
    serial_keys = set(serial[0].user_attrs) - optional
    for trial in packed:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert set(trial.user_attrs) - optional == serial_keys
        assert sorted(trial.intermediate_values) == [0, 1, 2]
        assert trial.value == pytest.approx(
            trial.intermediate_values[trial.user_attrs["best_epoch"] - 1]
        )
    # A pack shares its first trial's structure, so its members fuse.
    by_number = {t.number: t for t in packed}
    for number in (1, 2, 3):
        for name in ("n_layers", "batch_size", "loss"):
            assert by_number[number].params[name] == by_number[0].params[name]
        # Drawn with the structure fixed, not enqueued (a waiting trial another worker
        # could take, and a re-read of the study for each).
        assert "fixed_params" not in by_number[number].system_attrs
    assert len({by_number[n].params["hidden_units"] for n in range(4)}) > 1
    # The best trial keeps its weights (a beaten best gave its file up).
    best = max(t.value for t in packed)
    kept = [t for t in packed if Path(t.user_attrs.get("weights_path", "-")).is_file()]
    assert kept and all(t.value == best for t in kept)
    # The first pack trains the same configurations as the first serial trials would
    # (same sampler seed, nothing finished yet): a trial both ran scored the same.
    by_params = {json.dumps(t.params, sort_keys=True): t for t in serial}
    same = [t for t in packed if json.dumps(t.params, sort_keys=True) in by_params]
    assert same, "the first asked trial is the same in both runs"
    for trial in same:
        twin = by_params[json.dumps(trial.params, sort_keys=True)]
        assert trial.value == pytest.approx(twin.value, abs=1e-6)


def test_configure_threads_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl.training import configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("AUTOML_NUM_THREADS", "2")
        assert configure_threads("cpu") == 2
        monkeypatch.delenv("AUTOML_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads("cpu") == 1  # the default for a search's small models
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_every_asked_trial_of_a_pack_beats_before_any_trains(
    tiny_space: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack's trials are RUNNING from the ask: each needs a heartbeat from then on, or
    one waiting for its group's turn stays RUNNING forever when the process is killed."""
    import time

    import sqlalchemy

    from automl import packing

    url = f"sqlite:///{tmp_path / 'beats.db'}"
    seen: list[tuple[set[int], set[int]]] = []
    original = packing._train_pack

    def inspect(run: Any, trials: list[optuna.Trial], history: Any) -> None:
        asked = {t._trial_id for t in trials}
        engine = sqlalchemy.create_engine(url)
        beaten: set[int] = set()
        deadline = time.monotonic() + 10
        while beaten != asked and time.monotonic() < deadline:
            with engine.connect() as conn:
                rows = conn.execute(sqlalchemy.text("select trial_id from trial_heartbeats"))
                beaten = {r[0] for r in rows} & asked
            time.sleep(0.01)
        engine.dispose()
        seen.append((asked, beaten))
        original(run, trials, history)

    monkeypatch.setattr(packing, "_train_pack", inspect)
    args = ["run", str(tiny_space), "--n-trials", "8", "--pack", "4", "--storage", url]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(seen) == 2 and all(asked == beaten for asked, beaten in seen)


def test_sigint_during_a_pack_leaves_no_trial_running(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path / 'int.db'}"
    # Packs long enough (500 epochs, no early stopping) that the signal lands while the
    # first one trains, however fast training is.
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: digits\ndata: {dataset: digits}\ntrain: {epochs: 500, patience: 0}\n"
        "space:\n  optimizer: {adam: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}\n"
        "  hidden_units: {low: 8, high: 32}\n"
    )
    cmd = [sys.executable, "-c", "from automl.cli import entry; entry()", "run", str(space)]
    args = ["--n-trials", "200", "--pack", "4"]
    proc = subprocess.Popen(
        [*cmd, *args, "--storage", url, "--device", "cpu", "--json"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    running = 0
    while time.monotonic() < deadline and running == 0:  # wait until a pack trains
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="digits", storage=url).get_trials()
        except Exception:  # the study or its file does not exist yet
            continue
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    assert running, "no trial started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    states = [t.state for t in optuna.load_study(study_name="digits", storage=url).trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING in states  # interrupted members queued again


def test_split_by_width_fuses_similar_widths_and_sends_a_lone_wide_member_alone() -> None:
    from automl.packing import split_by_width

    widths = [128, 4, 6, 5, 8, 7, 6, 5]
    configs = [TrialConfig(hidden_units=w, n_layers=2, batch_size=64) for w in widths]
    groups = split_by_width(configs, n_features=64, n_outputs=10)
    # The seven narrow members share one group; the 128-unit one would make each of them
    # do the work of a 128-unit model, so it trains alone.
    assert sorted(map(sorted, groups)) == [[0], [1, 2, 3, 4, 5, 6, 7]]
    # Equal widths waste nothing on padding: one group. On a GPU padding is nearly free.
    same = [TrialConfig(hidden_units=32) for _ in range(6)]
    assert split_by_width(same, n_features=64, n_outputs=10) == [[0, 1, 2, 3, 4, 5]]
    assert len(split_by_width(configs, n_features=64, n_outputs=10, device="cuda")) == 1


def test_group_streams_draw_each_members_rate_and_width(
    digits: DeviceData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where members do not keep their own streams (CUDA; forced here on the CPU), the
    group draws all masks at once: each member still drops at its own rate, keeps its
    padded units at zero, and scales what it keeps by 1/(1-p)."""
    from automl.packing import FusedMLP, _EpochMasks

    monkeypatch.setattr("automl.packing.EXACT_STREAMS", ())
    configs = [
        _members("adam", "cross_entropy")[0],
        TrialConfig(n_layers=2, hidden_units=20, dropout=0.5, seed=1),
        TrialConfig(n_layers=2, hidden_units=40, dropout=0.0, seed=2),
    ]
    model = FusedMLP(configs, digits.input_shape, digits.n_outputs, torch.device("cpu"))
    ahead = _EpochMasks(model, [c.dropout for c in configs], [0.0] * 3, n=1024, bs=128)
    assert ahead.shared
    masks = torch.stack([torch.stack(ahead.masks(step, 128)) for step in range(8)])
    assert masks.shape == (8, 2, 3, 128, 40)
    for m, config in enumerate(configs):
        member = masks[:, :, m, :, : config.hidden_units]
        assert (masks[:, :, m, :, config.hidden_units :] == 0).all()
        kept = member[member != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - config.dropout)))
        dropped = (member == 0).double().mean().item()
        assert dropped == pytest.approx(config.dropout, abs=0.02), m


def test_group_streams_train_members_as_well_as_alone(
    digits: DeviceData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("automl.packing.EXACT_STREAMS", ())
    configs = [
        TrialConfig.from_dict({**c.to_dict(), "epochs": 6, "batch_size": 64})
        for c in _members("adam", "cross_entropy")
    ]
    first = train_packed(configs, digits, objective="val_accuracy")
    again = train_packed(configs, digits, objective="val_accuracy")
    for config, member, repeat in zip(configs, first, again, strict=True):
        assert not isinstance(member, Exception) and not isinstance(repeat, Exception)
        assert repeat.history == member.history  # the group's generator is seeded
        alone = train(config, digits, objective="val_accuracy")
        assert member.metrics["val_accuracy"] == pytest.approx(
            alone.metrics["val_accuracy"], abs=0.03
        )


def test_run_pack_with_a_grid_runs_every_point_once(tmp_path: Path) -> None:
    """A grid search gives every trial its own point: a pack fixes no structure there
    (enqueued companions made Optuna's GridSampler fail; fixed ones repeated points)."""
    space = tmp_path / "grid.yaml"
    space.write_text(
        "name: gridpack\n"
        "data: {dataset: iris, validation: 0.3}\n"
        "model: mlp\n"
        "train: {epochs: 2, patience: 0}\n"
        "objective: val_accuracy\n"
        "study: {sampler: grid, pruner: none, seed: 0}\n"
        "space:\n"
        "  optimizer: {adam: {lr: [0.001, 0.01]}}\n"
        "  batch_size: [16, 32]\n"
        "  hidden_units: [8, 16]\n"
    )
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    result = CliRunner().invoke(app, ["run", str(space), "--pack", "4", "--storage", url])
    assert result.exit_code == 0, result.output
    trials = _trials(url, "gridpack")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 8
    points = {json.dumps(t.params, sort_keys=True) for t in trials}
    assert len(points) == 8


def test_each_members_kept_state_is_its_own_with_mixed_optimizers(diabetes: DeviceData) -> None:
    """Members are regrouped by optimizer for training; where every live member improved
    in an epoch, the states were handed out in the caller's order, not the rows': a
    trial kept another's weights (and retrain --reuse saved the wrong model)."""
    from automl.training import compute_metrics

    configs = [
        TrialConfig(
            optimizer=opt,
            optimizer_params={"lr": lr},
            loss="mse",
            batch_size=32,
            epochs=5,
            hidden_units=16,
            n_layers=1,
            seed=i,
        )
        for i, (opt, lr) in enumerate(
            [("adam", 0.003), ("sgd", 0.03), ("adam", 0.008), ("sgd", 0.012)]
        )
    ]
    results = train_packed(configs, diabetes, objective="val_r2", patience=0)
    x = diabetes.X_val.reshape(len(diabetes.X_val), -1)
    for config, result in zip(configs, results, strict=True):
        assert not isinstance(result, Exception)
        model = build_model(config, diabetes.input_shape, diabetes.n_outputs)
        model.load_state_dict(result.best_state)
        model.eval()
        with torch.no_grad():
            again = compute_metrics(model(x), diabetes.y_val, "regression", 1, diabetes.y_std)
        assert again["val_r2"] == pytest.approx(result.metrics["val_r2"], abs=1e-5)


def test_a_packs_share_of_until_counts_other_workers_running_trials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each worker sized its pack from the finished trials alone: --until 20 --pack 8
    --workers 2 ended with 25-28 trials."""
    from types import SimpleNamespace

    from automl.packing import _room

    study = optuna.create_study()
    for _ in range(10):
        study.add_trial(optuna.trial.create_trial(value=1.0))
    for _ in range(4):
        study.ask()  # another worker's trials, still training
    run = SimpleNamespace(
        options=SimpleNamespace(n_trials=None, until=20, pack=8),
        summary=SimpleNamespace(n_run=0),
        target=20,
        study=study,
    )
    monkeypatch.delenv("AUTOML_WORKERS", raising=False)
    assert _room(run) == 6  # 20 - 10 finished - 4 running
    monkeypatch.setenv("AUTOML_WORKERS", "2")
    assert _room(run) == 3  # this worker's half
    for _ in range(6):
        study.ask()
    assert _room(run) == 1  # nothing left to share: one, so that a worker still moves


def test_a_large_validation_set_is_evaluated_in_blocks_with_the_same_outputs(
    digits: DeviceData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass over a whole validation set held every member's activations at once
    (gigabytes for a large set); blocks of rows give the same outputs."""
    from automl import packing, training
    from automl.packing import FusedMLP, _validate

    configs = [TrialConfig(hidden_units=w, n_layers=2, seed=i) for i, w in enumerate((16, 40))]
    model = FusedMLP(configs, digits.input_shape, digits.n_outputs, torch.device("cpu"))
    whole = _validate(model, digits)
    monkeypatch.setattr(packing, "EVAL_ACTIVATIONS", 2 * model.width * 300)  # 300 rows a block
    blocks = _validate(model, digits)
    assert blocks.shape == whole.shape == (2, 10, len(digits.X_val))
    assert torch.allclose(blocks, whole, atol=1e-5)

    net = build_model(configs[1], digits.input_shape, digits.n_outputs).eval()
    x = digits.X_val
    with torch.no_grad():
        one = training.forward_in_chunks(net, x)
        monkeypatch.setattr(training, "EVAL_VALUES", 64 * 256)  # 256 rows a block
        calls = []
        counted = lambda rows: calls.append(len(rows)) or net(rows)  # noqa: E731
        chunked = training.forward_in_chunks(counted, x)
    assert calls == [256, len(x) - 256] and torch.allclose(chunked, one, atol=1e-5)
