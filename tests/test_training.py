"""Optimizers, losses, schedules, regularisers, metrics and the epoch loop."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automl.data import DeviceData, load_dataset, to_device
from automl.errors import SpaceError
from automl.models import weight_l1
from automl.spaces import DataSpec, TrialConfig, parse_space
from automl.training import (
    OPTIMIZERS,
    AdaBound,
    build_optimizer,
    compute_metrics,
    loss_function,
    plateau_count,
    scheduled_lr,
    train,
    train_step,
    validation_step,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def iris() -> DeviceData:
    return to_device(load_dataset(DataSpec(dataset="iris", validation=0.3)), "cpu")


@pytest.fixture(scope="module")
def diabetes() -> DeviceData:
    return to_device(load_dataset(DataSpec(dataset="diabetes", validation=0.2)), "cpu")


def _config(**kw: Any) -> TrialConfig:
    base: dict[str, Any] = {
        "optimizer": "adam",
        "optimizer_params": {"lr": 0.01},
        "epochs": 3,
        "hidden_units": 16,
        "n_layers": 1,
        "batch_size": 16,
        "seed": 0,
    }
    base.update(kw)
    return TrialConfig(**base)


def _space(space: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"data": {"dataset": "iris"}, "space": space}
    doc.update(top)
    return doc


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    ("optimizer", "param", "owner"),
    [
        ("adam", "momentum", "sgd"),
        ("sgd", "beta1", "adam"),
        ("adagrad", "rho", "adadelta"),
        ("adadelta", "final_lr", "adabound"),
        ("rmsprop", "nesterov", "sgd"),
        ("adamw", "centered", "rmsprop"),
        ("adabound", "lr_decay", "adagrad"),
    ],
)
def test_a_parameter_of_another_optimizer_is_a_load_error_naming_both(
    optimizer: str, param: str, owner: str
) -> None:
    raw = _space({"optimizer": {optimizer: {"lr": 0.01, param: 0.5}}})
    with pytest.raises(SpaceError, match=rf"'{optimizer}' does not take '{param}'.*{owner}"):
        parse_space(raw)


@pytest.mark.parametrize(
    ("name", "params", "torch_class", "expected"),
    [
        (
            "sgd",
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": True},
            torch.optim.SGD,
            {"momentum": 0.9, "nesterov": True},
        ),
        (
            "adam",
            {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "amsgrad": True},
            torch.optim.Adam,
            {"betas": (0.8, 0.95), "eps": 1e-6, "amsgrad": True},
        ),
        ("adamw", {"lr": 0.01, "weight_decay": 0.05}, torch.optim.AdamW, {"weight_decay": 0.05}),
        (
            "rmsprop",
            {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True},
            torch.optim.RMSprop,
            {"alpha": 0.9, "momentum": 0.5, "centered": True},
        ),
        ("adagrad", {"lr": 0.1, "lr_decay": 0.01}, torch.optim.Adagrad, {"lr_decay": 0.01}),
        ("adadelta", {"lr": 1.0, "rho": 0.8}, torch.optim.Adadelta, {"rho": 0.8}),
        (
            "adabound",
            {"lr": 0.01, "final_lr": 0.05, "gamma": 0.01, "beta1": 0.8},
            AdaBound,
            {"final_lr": 0.05, "gamma": 0.01, "betas": (0.8, 0.999)},
        ),
    ],
)
def test_each_optimizer_gets_its_own_parameters(
    name: str, params: dict[str, Any], torch_class: type, expected: dict[str, Any]
) -> None:
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "adabound"}
    # Through the space file: the suggested config carries exactly these parameters.
    space = parse_space(_space({"optimizer": {name: params}}))
    from optuna.trial import FixedTrial

    from automl.spaces import suggest

    config = suggest(FixedTrial({}), space)
    assert config.optimizer == name and config.optimizer_params == params
    optimizer = build_optimizer(config, nn.Linear(3, 2).parameters())
    assert type(optimizer) is torch_class
    group = optimizer.param_groups[0]
    assert group["lr"] == params["lr"]
    for key, value in expected.items():
        assert group[key] == value, key


def test_each_optimizer_trains_iris(iris: DeviceData) -> None:
    lrs = {"sgd": 0.1, "adadelta": 1.0, "adagrad": 0.1}
    for name in OPTIMIZERS:
        config = _config(optimizer=name, optimizer_params={"lr": lrs.get(name, 0.01)}, epochs=8)
        result = train(config, iris, objective="val_accuracy")
        first = result.history[0]["train_loss"]
        assert result.history[-1]["train_loss"] < first, name
        assert result.metrics["val_accuracy"] > 0.6, name


def test_adabound_bounds_close_in_on_final_lr() -> None:
    final_lr, gamma = 0.1, 1e-3
    widths = []
    for step in (1, 10, 100, 1000, 100_000):
        lower, upper = AdaBound.bounds(final_lr, gamma, step)
        assert 0 <= lower < final_lr < upper
        widths.append(upper - lower)
    assert widths == sorted(widths, reverse=True)
    lower, upper = AdaBound.bounds(final_lr, gamma, 10**9)
    assert lower == pytest.approx(final_lr, rel=1e-5) and upper == pytest.approx(final_lr, rel=1e-5)


def test_adabound_clips_per_parameter_step_sizes_between_the_bounds() -> None:
    torch.manual_seed(0)
    # Gradients over six orders of magnitude give Adam step sizes over six orders too.
    scales = torch.logspace(-4, 2, 50)
    weight = nn.Parameter(torch.zeros(50))
    final_lr, gamma = 0.01, 0.05
    opt = AdaBound([weight], lr=0.001, final_lr=final_lr, gamma=gamma)
    for step in range(1, 401):
        opt.zero_grad()
        (scales * weight).sum().backward()
        weight.grad.add_(torch.randn(50) * scales * 0.1)  # type: ignore[union-attr]
        opt.step()
        sizes = opt.state[weight]["last_step_size"]
        lower, upper = AdaBound.bounds(final_lr, gamma, step)
        assert torch.all(sizes >= lower * (1 - 1e-6)) and torch.all(sizes <= upper * (1 + 1e-6))
        if step == 1:
            # Early on the interval is wide: the step sizes still differ per parameter,
            # the tiny-gradient ones clipped at the upper bound, like Adam's.
            assert sizes.max() / sizes.min() > 10
            assert sizes.max() == pytest.approx(upper, rel=1e-5)
    # Late, every parameter moves with nearly the same rate: final_lr, like SGD.
    lower, upper = AdaBound.bounds(final_lr, gamma, 400)
    assert upper / lower < 1.2
    assert torch.allclose(sizes, torch.full_like(sizes, final_lr), rtol=0.1)


def test_adabound_first_step_matches_the_paper() -> None:
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdaBound([weight], lr=0.01, final_lr=0.1, gamma=1e-3, betas=(0.9, 0.999), eps=1e-8)
    weight.grad = torch.tensor([0.5, -4.0])
    opt.step()
    g = torch.tensor([0.5, -4.0])
    m, v = 0.1 * g, 0.001 * g * g
    step_size = 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9)
    lower, upper = AdaBound.bounds(0.1, 1e-3, 1)
    eta = (step_size / (v.sqrt() + 1e-8)).clamp(lower, upper)
    assert torch.allclose(weight.detach(), torch.tensor([1.0, -2.0]) - eta * m)


# --------------------------------------------------------------------------- losses

_LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-1.0, 2.5, 0.0]])
_LABELS = torch.tensor([0, 2, 0])


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        ("mse", {}, lambda p, t: F.mse_loss(p, t)),
        ("l1", {}, lambda p, t: (p - t).abs().mean()),
        ("huber", {"delta": 0.3}, lambda p, t: F.huber_loss(p, t, delta=0.3)),
        ("smooth_l1", {"beta": 0.2}, lambda p, t: F.smooth_l1_loss(p, t, beta=0.2)),
    ],
)
def test_classification_regression_losses_compare_softmax_with_one_hot(
    name: str, params: dict[str, Any], reference: Any
) -> None:
    probs = _LOGITS.softmax(dim=1)
    onehot = F.one_hot(_LABELS, 3).float()
    got = loss_function(name, "classification")(_LOGITS, _LABELS, params)
    assert got.item() == pytest.approx(reference(probs, onehot).item(), rel=1e-6)
    # ... and not the raw logits.
    assert got.item() != pytest.approx(reference(_LOGITS, onehot).item(), rel=1e-3)


def test_huber_delta_changes_the_loss_as_defined() -> None:
    pred = torch.tensor([[0.0], [0.0], [0.0]])
    y = torch.tensor([0.5, 2.0, -3.0])
    fn = loss_function("huber", "regression")
    for delta in (1.0, 2.5):
        err = y.abs()
        by_hand = torch.where(err <= delta, 0.5 * err**2, delta * (err - 0.5 * delta)).mean()
        assert fn(pred, y, {"delta": delta}).item() == pytest.approx(by_hand.item())
    assert fn(pred, y, {"delta": 1.0}).item() != fn(pred, y, {"delta": 2.5}).item()


def test_cross_entropy_nll_and_bce() -> None:
    ce = loss_function("cross_entropy", "classification")(_LOGITS, _LABELS, {})
    nll = loss_function("nll", "classification")(_LOGITS, _LABELS, {})
    assert ce.item() == pytest.approx(F.cross_entropy(_LOGITS, _LABELS).item())
    assert nll.item() == pytest.approx(-_LOGITS.log_softmax(1)[[0, 1, 2], _LABELS].mean().item())
    smoothed = loss_function("cross_entropy", "classification")(
        _LOGITS, _LABELS, {"label_smoothing": 0.2}
    )
    assert smoothed.item() > ce.item()
    logits2 = _LOGITS[:, :2]
    labels2 = torch.tensor([0, 1, 1])
    bce = loss_function("bce", "classification")(logits2, labels2, {})
    expected = F.binary_cross_entropy_with_logits(logits2, F.one_hot(labels2, 2).float())
    assert bce.item() == pytest.approx(expected.item())


def test_regression_losses_on_a_single_output() -> None:
    out = torch.tensor([[1.0], [2.0], [4.0]])
    y = torch.tensor([1.5, 2.0, 1.0])
    assert loss_function("mse", "regression")(out, y, {}).item() == pytest.approx(
        (0.25 + 0 + 9) / 3
    )
    assert loss_function("l1", "regression")(out, y, {}).item() == pytest.approx(3.5 / 3)


@pytest.mark.parametrize(
    ("data", "loss", "objective", "message"),
    [
        ({"dataset": "diabetes"}, "cross_entropy", "val_r2", "'cross_entropy' does not fit"),
        ({"dataset": "diabetes"}, "bce", "val_r2", "'bce' does not fit a regression"),
        ({"dataset": "diabetes"}, "nll", "val_loss", "'nll' does not fit"),
        ({"dataset": "iris"}, "bce", "val_accuracy", "'bce' needs exactly 2 classes"),
        ({"dataset": "digits"}, "bce", "val_accuracy", "the data has 10"),
        ({"dataset": "iris"}, "mse", "val_r2", "'val_r2' is a regression metric"),
        ({"dataset": "diabetes"}, "mse", "val_f1", "'val_f1' is a classification metric"),
        (
            {"path": "x.csv", "target": "y", "task": "regression"},
            "cross_entropy",
            "val_loss",
            "does not fit a regression task",
        ),
    ],
)
def test_a_loss_or_metric_that_does_not_fit_the_task_is_a_load_error(
    data: dict[str, Any], loss: str, objective: str, message: str
) -> None:
    with pytest.raises(SpaceError, match=message):
        parse_space({"data": data, "objective": objective, "space": {"loss": loss}})


def test_bce_fits_a_binary_dataset() -> None:
    space = parse_space(
        {"data": {"dataset": "breast_cancer"}, "space": {"loss": ["bce", "huber", "l1"]}}
    )
    assert space.loss.names == ("bce", "huber", "l1")


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("epoch", [0, 1, 2, 5, 9, 10, 19])
def test_each_schedule_follows_its_formula(epoch: int) -> None:
    lr = 0.1
    cfg = _config(epochs=20, lr_step=4, lr_gamma=0.5, lr_decay=0.3)
    cases = {
        "none": lr,
        "step": lr * 0.5 ** (epoch // 4),
        "exponential": lr * 0.5**epoch,
        "inverse_time": lr / (1 + 0.3 * epoch),
        "cosine": lr * (1 + math.cos(math.pi * epoch / 20)) / 2,
    }
    for schedule, expected in cases.items():
        got = scheduled_lr(replace(cfg, lr_schedule=schedule), epoch, lr)
        assert got == pytest.approx(expected), schedule


def test_plateau_multiplies_by_gamma_after_two_epochs_without_improvement() -> None:
    cfg = _config(lr_schedule="plateau", lr_gamma=0.1)
    history = [1.0, 0.9, 0.95, 0.92, 0.91, 0.8, 0.85, 0.85, 0.85]
    # After 0.9 (index 1): 0.95, 0.92 wait, 0.91 is the third epoch without a new best.
    assert plateau_count(history[:4], patience=2) == 0
    assert plateau_count(history[:5], patience=2) == 1
    assert plateau_count(history, patience=2) == 2
    assert scheduled_lr(cfg, 9, 1.0, history) == pytest.approx(0.01)
    assert scheduled_lr(cfg, 3, 1.0, history[:3]) == pytest.approx(1.0)


def test_train_uses_the_schedule_each_epoch(iris: DeviceData) -> None:
    cfg = _config(lr_schedule="step", lr_step=2, lr_gamma=0.5, epochs=5)
    result = train(cfg, iris, objective="val_accuracy")
    assert [h["lr"] for h in result.history] == pytest.approx(
        [scheduled_lr(cfg, e, 0.01) for e in range(5)]
    )
    assert [h["lr"] for h in result.history] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])


# --------------------------------------------------------------------------- regularisers


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.Linear)]
    )


def test_larger_l1_gives_a_smaller_weight_l1_norm(iris: DeviceData) -> None:
    norms = []
    for l1 in (0.0, 1e-3, 1e-2):
        result = train(_config(l1=l1, epochs=10), iris, keep_model=True)
        assert result.model is not None
        norms.append(float(weight_l1(result.model).detach()))
    assert norms[0] > norms[1] > norms[2]


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_weight_decay_gives_a_smaller_weight_norm(iris: DeviceData, optimizer: str) -> None:
    norms = []
    for wd in (0.0, 0.1):
        params = {"lr": 0.05, "weight_decay": wd}
        if optimizer == "sgd":
            params["momentum"] = 0.9
        result = train(
            _config(optimizer=optimizer, optimizer_params=params, epochs=10),
            iris,
            keep_model=True,
        )
        assert result.model is not None
        norms.append(float(_weights(result.model).norm()))
    assert norms[1] < 0.9 * norms[0]


def test_adamw_decouples_weight_decay() -> None:
    # With a zero gradient Adam's L2 term is rescaled by its own second moment, while
    # AdamW shrinks the weight by exactly lr * weight_decay.
    for name, expected in (("adamw", 1.0 - 0.1 * 0.5),):
        w = nn.Parameter(torch.tensor([1.0]))
        cfg = _config(optimizer=name, optimizer_params={"lr": 0.1, "weight_decay": 0.5})
        opt = build_optimizer(cfg, [w])
        w.grad = torch.zeros(1)
        opt.step()
        assert w.item() == pytest.approx(expected)
    w = nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer(
        _config(optimizer="adam", optimizer_params={"lr": 0.1, "weight_decay": 0.5}), [w]
    )
    w.grad = torch.zeros(1)
    opt.step()
    assert w.item() == pytest.approx(1.0 - 0.1, rel=1e-4)  # Adam: a full normalised step


@pytest.mark.parametrize("setting", [{"dropout": 0.4}, {"noise_std": 0.5}, {"mixup_alpha": 0.4}])
def test_training_only_regularisers_change_the_loss_curve_not_evaluation(
    iris: DeviceData, setting: dict[str, Any]
) -> None:
    off = train(_config(epochs=3), iris, keep_model=True)
    on = train(_config(epochs=3, **setting), iris, keep_model=True)
    off_again = train(_config(epochs=3), iris)
    curve_off = [h["train_loss"] for h in off.history]
    curve_on = [h["train_loss"] for h in on.history]
    assert curve_off == [h["train_loss"] for h in off_again.history]  # same seed, same curve
    assert curve_on != pytest.approx(curve_off, rel=1e-3)
    # Evaluation is deterministic: no dropout, noise or mixup outside training.
    assert on.model is not None
    first = validation_step(on.model, iris)
    second = validation_step(on.model, iris)
    assert first == second
    on.model.eval()
    with torch.no_grad():
        assert torch.equal(on.model(iris.X_val), on.model(iris.X_val))


def test_noise_is_added_to_the_training_inputs_only(iris: DeviceData) -> None:
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return x

    cfg = _config(noise_std=1.0)
    model = nn.Sequential(Spy(), nn.Linear(4, 3))
    x, y = iris.X_train[:64], iris.y_train[:64]
    model.train()
    optimizer = build_optimizer(cfg, model.parameters())
    train_step(
        model,
        optimizer,
        loss_function("cross_entropy", "classification"),
        x,
        y,
        cfg,
        "classification",
        3,
    )
    noise = seen[-1] - x
    assert 0.8 < float(noise.std()) < 1.2 and abs(float(noise.mean())) < 0.2
    validation_step(model, iris)
    assert torch.equal(seen[-1], iris.X_val)


def test_batch_norm_adds_batch_norm_layers(iris: DeviceData) -> None:
    result = train(_config(epochs=1, batch_norm=True, n_layers=2), iris, keep_model=True)
    assert result.model is not None
    norms = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2
    assert all(float(m.running_mean.abs().sum()) > 0 for m in norms)  # they trained


def test_early_stopping_stops_after_patience_epochs_without_improvement(
    iris: DeviceData,
) -> None:
    # A learning rate too small to change any prediction: epoch 1 stays the best.
    frozen = _config(optimizer="sgd", optimizer_params={"lr": 1e-12}, epochs=20)
    result = train(frozen, iris, objective="val_accuracy", patience=3)
    assert result.stopped_early
    assert result.epochs_run == 4  # the best epoch, then 3 without improvement
    assert result.best_epoch == 0
    without = train(frozen, iris, objective="val_accuracy", patience=0)
    assert without.epochs_run == 20 and not without.stopped_early


def test_on_epoch_hook_sees_every_epoch(iris: DeviceData) -> None:
    seen: list[int] = []
    train(_config(epochs=4), iris, on_epoch=lambda e, m: seen.append(e))
    assert seen == [0, 1, 2, 3]


# --------------------------------------------------------------------------- metrics


def test_classification_metrics_match_scikit_learn() -> None:
    from sklearn import metrics

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(60, 4, generator=gen)
    logits[:, 3] -= 1.5  # class 3 is predicted a few times but never true
    y = torch.randint(0, 3, (60,), generator=gen)
    pred = logits.argmax(1).numpy()
    assert 3 in pred and 3 not in y.numpy()
    got = compute_metrics(logits, y, "classification", 4)
    probs = logits.softmax(1).numpy()
    assert got["val_loss"] == pytest.approx(metrics.log_loss(y.numpy(), probs, labels=range(4)))
    assert got["val_accuracy"] == pytest.approx(metrics.accuracy_score(y, pred))
    with pytest.warns(UserWarning):
        balanced = metrics.balanced_accuracy_score(y, pred)
    assert got["val_balanced_accuracy"] == pytest.approx(balanced)
    assert got["val_f1"] == pytest.approx(metrics.f1_score(y, pred, average="macro"))


def test_regression_metrics_match_scikit_learn_in_the_targets_units() -> None:
    from sklearn import metrics

    gen = torch.Generator().manual_seed(4)
    y = torch.randn(50, generator=gen)
    out = (y + 0.5 * torch.randn(50, generator=gen)).unsqueeze(1)
    mean, std = 150.0, 77.0
    got = compute_metrics(out, y, "regression", 1, y_std=std)
    y_true = y.double().numpy() * std + mean
    y_pred = out.squeeze(1).double().numpy() * std + mean
    assert got["val_rmse"] == pytest.approx(math.sqrt(metrics.mean_squared_error(y_true, y_pred)))
    assert got["val_mae"] == pytest.approx(metrics.mean_absolute_error(y_true, y_pred))
    assert got["val_r2"] == pytest.approx(metrics.r2_score(y_true, y_pred))
    assert got["val_loss"] == pytest.approx(metrics.mean_squared_error(y_true, y_pred))


def test_costs_are_reported(iris: DeviceData, diabetes: DeviceData) -> None:
    result = train(_config(epochs=2, hidden_units=10, n_layers=1), iris)
    assert result.metrics["n_params"] == (4 * 10 + 10) + (10 * 3 + 3)
    assert result.metrics["train_seconds"] > 0
    reg = train(_config(loss="huber", loss_params={"delta": 0.5}, epochs=3), diabetes)
    assert set(reg.metrics) >= {"val_loss", "val_rmse", "val_mae", "val_r2", "n_params"}
    assert 20 < reg.metrics["val_rmse"] < 200  # in the target's own units (about 30..350)


def test_train_is_reproducible_with_a_seed(iris: DeviceData) -> None:
    cfg = _config(epochs=2, dropout=0.2, mixup_alpha=0.2, noise_std=0.1)
    a, b = train(cfg, iris), train(cfg, iris)
    c = train(replace(cfg, seed=1), iris)
    curve = [h["train_loss"] for h in a.history]
    assert curve == [h["train_loss"] for h in b.history]
    assert curve != [h["train_loss"] for h in c.history]
    assert a.metrics["val_loss"] == b.metrics["val_loss"]


@pytest.mark.parametrize(
    "name", ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "adabound"]
)
def test_optimizer_step_is_the_same_update_as_step(name: str) -> None:
    from automl.training import build_optimizer, optimizer_step

    def stepped(use_raw: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        params: dict[str, Any] = {"lr": 0.05}
        if name == "sgd":
            params.update(momentum=0.9, nesterov=True, weight_decay=1e-3)
        config = TrialConfig(optimizer=name, optimizer_params=params)
        optimizer = build_optimizer(config, model.parameters())
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        for _ in range(4):
            for p in model.parameters():
                p.grad = None
            F.cross_entropy(model(x), y).backward()
            optimizer_step(optimizer) if use_raw else optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for ours, torchs in zip(stepped(True), stepped(False), strict=True):
        assert torch.equal(ours, torchs)


def test_a_training_process_never_imports_torch_dynamo() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from automl.data import load_dataset, to_device\n"
        "from automl.spaces import DataSpec, TrialConfig\n"
        "from automl.training import train\n"
        "data = to_device(load_dataset(DataSpec(dataset='iris', validation=0.3)), 'cpu')\n"
        "for opt in ('adam', 'sgd', 'rmsprop'):\n"
        "    train(TrialConfig(optimizer=opt, optimizer_params={'lr': 0.01}, epochs=2), data)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"  # it costs about 1 s to import (BENCHMARKS.md)


def test_trial_attributes_keep_significant_digits_of_small_metrics() -> None:
    """A target measured in tiny units has tiny metrics: kept to 7 significant digits,
    not rounded to 0 by a fixed number of decimals."""
    from automl.objective import trial_attrs

    metrics = {"val_rmse": 1.234567891e-9, "val_loss": 123456.789, "val_r2": float("nan")}
    attrs = trial_attrs(TrialConfig(), metrics, device="cpu")
    assert attrs["val_rmse"] == 1.234568e-9
    assert attrs["val_loss"] == 123456.8
    assert math.isnan(attrs["val_r2"])
