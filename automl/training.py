"""Optimisers, losses, schedules, the epoch loop, early stopping and the NaN guard."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as _optim_module

from automl.data import DeviceData
from automl.models import build_model, count_parameters, weight_l1
from automl.spaces import METRICS, TrialConfig

if TYPE_CHECKING:
    from automl.checkpoints import Checkpointer

# --------------------------------------------------------------------------- optimizers


class AdaBound(torch.optim.Optimizer):
    """AdaBound (Luo et al., ICLR 2019): Adam whose per-parameter step sizes are clipped
    between bounds that start wide and converge to ``final_lr``, so training moves from
    Adam-like to SGD-like."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or final_lr <= 0 or not 0 < gamma < 1:
            raise ValueError("AdaBound needs lr > 0, final_lr > 0 and 0 < gamma < 1")
        defaults = dict(
            lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        self.base_lrs = [group["lr"] for group in self.param_groups]

    @staticmethod
    def bounds(final_lr: float, gamma: float, step: int) -> tuple[float, float]:
        """The clip interval at ``step`` (1-based): it closes in on ``final_lr``."""
        return final_lr * (1 - 1 / (gamma * step + 1)), final_lr * (1 + 1 / (gamma * step))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, base_lr in zip(self.param_groups, self.base_lrs, strict=True):
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                # A schedule that scales lr scales the final learning rate with it.
                final_lr = group["final_lr"] * group["lr"] / base_lr
                lower, upper = self.bounds(final_lr, group["gamma"], t)
                step = (step_size / (exp_avg_sq.sqrt() + group["eps"])).clamp_(lower, upper)
                state["last_step_size"] = step
                p.add_(-step * exp_avg)
        return loss


def _betas(params: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in params.items() if k not in ("beta1", "beta2")}
    if "beta1" in params or "beta2" in params:
        out["betas"] = (float(params.get("beta1", 0.9)), float(params.get("beta2", 0.999)))
    return out


OptimizerFactory = Callable[[Iterable[Any], dict[str, Any]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda ps, kw: torch.optim.SGD(ps, **kw),
    "adam": lambda ps, kw: torch.optim.Adam(ps, **_betas(kw)),
    "adamw": lambda ps, kw: torch.optim.AdamW(ps, **_betas(kw)),
    "rmsprop": lambda ps, kw: torch.optim.RMSprop(ps, **kw),
    "adagrad": lambda ps, kw: torch.optim.Adagrad(ps, **kw),
    "adadelta": lambda ps, kw: torch.optim.Adadelta(ps, **kw),
    "adabound": lambda ps, kw: AdaBound(ps, **_betas(kw)),
}


def build_optimizer(config: TrialConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    _skip_dynamo_import()
    kwargs = dict(config.optimizer_params)
    if config.optimizer == "sgd" and kwargs.get("nesterov") and not kwargs.get("momentum"):
        kwargs["nesterov"] = False  # torch refuses nesterov without momentum
    if config.optimizer == "sgd" and kwargs.get("nesterov") and kwargs.get("dampening"):
        kwargs["dampening"] = 0.0  # and nesterov with dampening
    params = list(params)
    devices = {p.device.type for p in params if isinstance(p, torch.Tensor)}
    if len(devices) == 1 and devices <= FUSED_KERNELS.get(config.optimizer, set()):
        # One kernel for every parameter instead of ~8 ops each: a fifth of a small
        # MLP's step on CPU (BENCHMARKS.md). Same update rule.
        kwargs.setdefault("fused", True)
    return OPTIMIZERS[config.optimizer](params, kwargs)


# torch.optim wraps an optimizer's constructor helpers, ``state_dict`` and ``step`` in
# functions that import ``torch._dynamo`` on first use, only to tell torch.compile not to
# trace them: about 1 s of every process's start, and more at exit. automl never compiles
# an optimizer, so it marks those helpers as already disabled (the marker torch itself
# caches) and calls ``step`` without its wrappers (``optimizer_step``). Should a torch
# release change these internals, the marking finds nothing and torch works as usual.
_DYNAMO_SKIPPED = False


def _skip_dynamo_import() -> None:
    global _DYNAMO_SKIPPED
    if _DYNAMO_SKIPPED:
        return
    _DYNAMO_SKIPPED = True
    import sys

    if "torch._dynamo" in sys.modules:
        return
    try:
        import torch._compile as compile_module

        wrapper_file = compile_module.__file__
        modules = [m for n, m in list(sys.modules.items()) if n.startswith("torch.optim")]
        for module in modules:
            candidates = list(vars(module).values())
            for obj in list(candidates):
                if isinstance(obj, type):
                    candidates.extend(vars(obj).values())
            for obj in candidates:
                inner = getattr(obj, "__wrapped__", None)
                code = getattr(obj, "__code__", None)
                if inner is not None and code is not None and code.co_filename == wrapper_file:
                    inner.__dynamo_disable = inner
    except Exception:  # internals moved: torch imports dynamo as it always did
        return


_RAW_STEPS: dict[type, Callable[[Any], Any] | None] = {}


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``: the same update, without the wrappers that import dynamo and
    run the (here never registered) step hooks; with hooks, the ordinary call."""
    cls = type(optimizer)
    if cls not in _RAW_STEPS:
        raw: Any = cls.step
        while hasattr(raw, "__wrapped__"):
            raw = raw.__wrapped__
        _RAW_STEPS[cls] = raw if raw is not cls.step else None
    raw = _RAW_STEPS[cls]
    hooked = (
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or getattr(_optim_module, "_global_optimizer_pre_hooks", None)
        or getattr(_optim_module, "_global_optimizer_post_hooks", None)
    )
    if raw is None or hooked or optimizer.defaults.get("differentiable"):
        optimizer.step()
        return
    with torch.no_grad():
        raw(optimizer)


# torch's fused optimizer kernels by device type (torch >= 2.4).
FUSED_KERNELS: dict[str, set[str]] = {
    "adam": {"cpu", "cuda"},
    "adamw": {"cpu", "cuda"},
    "sgd": {"cpu", "cuda"},
    "adagrad": {"cpu"},
}


# --------------------------------------------------------------------------- losses

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


def _probs_vs_onehot(fn: Callable[..., torch.Tensor]) -> LossFn:
    """A regression loss used for classes: softmax probabilities against one-hot targets."""

    def loss(logits: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        target = y if y.dtype.is_floating_point else F.one_hot(y, logits.shape[1]).float()
        return fn(logits.softmax(dim=1), target, **kw)

    return loss


def _soft_ce(logits: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    # y may be soft (mixup) or hard labels; cross_entropy accepts both.
    return F.cross_entropy(logits, y, label_smoothing=float(kw.get("label_smoothing", 0.0)))


def _nll(logits: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    logp = logits.log_softmax(dim=1)
    if y.dtype.is_floating_point:
        return -(y * logp).sum(dim=1).mean()
    return F.nll_loss(logp, y)


def _bce(logits: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    target = y if y.dtype.is_floating_point else F.one_hot(y, logits.shape[1]).float()
    return F.binary_cross_entropy_with_logits(logits, target)


CLASSIFICATION_LOSSES: dict[str, LossFn] = {
    "cross_entropy": _soft_ce,
    "nll": _nll,
    "mse": _probs_vs_onehot(F.mse_loss),
    "huber": _probs_vs_onehot(F.huber_loss),
    "l1": _probs_vs_onehot(F.l1_loss),
    "smooth_l1": _probs_vs_onehot(F.smooth_l1_loss),
    "bce": _bce,
}
REGRESSION_LOSSES: dict[str, LossFn] = {
    "mse": lambda out, y, kw: F.mse_loss(out.squeeze(-1), y),
    "huber": lambda out, y, kw: F.huber_loss(out.squeeze(-1), y, **kw),
    "l1": lambda out, y, kw: F.l1_loss(out.squeeze(-1), y),
    "smooth_l1": lambda out, y, kw: F.smooth_l1_loss(out.squeeze(-1), y, **kw),
}


def loss_function(name: str, task: str) -> LossFn:
    table = CLASSIFICATION_LOSSES if task == "classification" else REGRESSION_LOSSES
    return table[name]


# --------------------------------------------------------------------------- schedules


def scheduled_lr(
    config: TrialConfig, epoch: int, base_lr: float, history: Sequence[float] = ()
) -> float:
    """The learning rate of ``epoch`` (0-based) under the trial's schedule, as a pure function.

    ``history`` is the objective per finished epoch (lower is better), used by ``plateau``.
    """
    s = config.lr_schedule
    if s == "step":
        return base_lr * config.lr_gamma ** (epoch // config.lr_step)
    if s == "exponential":
        return base_lr * config.lr_gamma**epoch
    if s == "inverse_time":
        return base_lr / (1 + config.lr_decay * epoch)
    if s == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / max(config.epochs, 1)))
    if s == "plateau":
        return base_lr * config.lr_gamma ** plateau_count(history, patience=2)
    return base_lr


def plateau_count(history: Sequence[float], *, patience: int) -> int:
    """How many times the objective went ``patience`` epochs without a new best."""
    count, best, waited = 0, math.inf, 0
    for value in history:
        if value < best:
            best, waited = value, 0
        else:
            waited += 1
            if waited > patience:
                count, waited = count + 1, 0
    return count


# --------------------------------------------------------------------------- metrics


def compute_metrics(
    out: torch.Tensor, y: torch.Tensor, task: str, n_outputs: int, y_std: float = 1.0
) -> dict[str, float]:
    """Validation metrics. ``val_loss`` is canonical so losses compare: cross-entropy for
    classes, mean squared error in the target's own units for regression."""
    return compute_metrics_stacked(out.unsqueeze(0), y, task, n_outputs, y_std)[0]


def compute_metrics_stacked(
    out: torch.Tensor,
    y: torch.Tensor,
    task: str,
    n_outputs: int,
    y_std: float = 1.0,
    *,
    turned: bool = False,
) -> list[dict[str, float]]:
    """``compute_metrics`` of K models at once: ``out`` is (K, N, C) for the same ``y``
    (with ``turned``, (K, C, N), as a fused group computes it). One read-back for all K
    (a fused group's epoch), not one per model.

    Classes are reduced over the middle dimension of (K, C, N): with a handful of classes
    a log-softmax and a max over the last dimension of (K, N, C) ran 5x slower (a fused
    group's validation was a sixth of its epoch; BENCHMARKS.md)."""
    k, n = out.shape[0], y.shape[0]
    if task == "classification":
        c = n_outputs
        by_class = out if turned else out.transpose(1, 2)  # (K, C, N)
        logp = by_class.log_softmax(dim=1)
        ce = -logp.gather(1, y.view(1, 1, n).expand(k, 1, n)).squeeze(1)
        pred = by_class.max(dim=1).indices  # the first of equal maxima, as argmax
        model = torch.arange(k, device=out.device).view(k, 1)
        flat = (model * (c * c) + y * c + pred).flatten()
        conf = torch.bincount(flat, minlength=k * c * c).view(k, c, c).double()
        tp = conf.diagonal(dim1=1, dim2=2)
        support, predicted = conf.sum(dim=2), conf.sum(dim=1)
        present = support > 0
        recall = torch.where(present, tp / support.clamp(min=1), 0).sum(1) / present.sum(1)
        # Macro F1 over the labels seen in either truth or prediction, as scikit-learn does.
        both = support + predicted
        seen = both > 0
        f1 = torch.where(seen, 2 * tp / both.clamp(min=1), 0).sum(1) / seen.sum(1)
        accuracy = tp.sum(dim=1) / n
        stats = torch.stack([ce.mean(dim=1).double(), accuracy, recall, f1], dim=1).tolist()
        return [
            {
                "val_loss": row[0],
                "val_accuracy": row[1],
                "val_balanced_accuracy": row[2],
                "val_f1": row[3],
            }
            for row in stats
        ]
    pred = out.reshape(k, n).double()
    target = y.double()
    err = pred - target
    mse = (err**2).mean(dim=1)
    var = ((target - target.mean()) ** 2).mean()
    stats = torch.stack([mse, err.abs().mean(dim=1), 1 - mse / var.clamp(min=1e-12)], 1).tolist()
    return [
        {
            "val_loss": row[0] * y_std**2,
            "val_rmse": math.sqrt(row[0]) * y_std,
            "val_mae": row[1] * y_std,
            "val_r2": row[2],
        }
        for row in stats
    ]


# --------------------------------------------------------------------------- the loop


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite, or exploded: the trial cannot go on."""


@dataclass
class TrainResult:
    """What one training run produced."""

    metrics: dict[str, float]  # at the best epoch (by the objective), plus costs
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch
    epochs_run: int = 0
    best_epoch: int = 0
    n_params: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    model: nn.Module | None = None


EpochHook = Callable[[int, dict[str, float]], None]


def objective_value(metrics: dict[str, float], metric: str) -> float:
    """The metric as a quantity to minimise (for early stopping and plateaus)."""
    value = metrics[metric]
    return -value if METRICS[metric][0] == "maximize" else value


def configure_threads(device: str) -> int:
    """Torch's intra-op threads for a run: ``AUTOML_NUM_THREADS`` (set per worker by
    ``--workers``), else ``OMP_NUM_THREADS`` (torch reads it itself), else 1 on CPU.

    The models of a search are small: their matrix products are too short to gain from
    several threads, and spinning OpenMP threads lose badly to any other load on the
    cores (measured 12x slower with 2 threads on a busy 2-core machine; BENCHMARKS.md).
    Cores are better spent on parallel workers or on ``--pack``."""
    import os

    raw = os.environ.get("AUTOML_NUM_THREADS") or (
        None if os.environ.get("OMP_NUM_THREADS") else "1"
    )
    if raw is not None and raw.isdigit() and int(raw) >= 1 and device == "cpu":
        torch.set_num_threads(int(raw))
    return torch.get_num_threads()


def seed_torch(seed: int, device_type: str = "cpu") -> None:
    """``torch.manual_seed`` for what a trial on ``device_type`` draws from: the CPU
    generator, and the accelerator's where it runs on one. torch.manual_seed seeds every
    backend torch knows and records a stack trace for each one not yet initialised,
    2.4 ms a call on the build machine, more than a narrow trial's model costs to build."""
    torch.default_generator.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed_all(seed)
    elif device_type == "mps":
        torch.mps.manual_seed(seed)


def set_seed(seed: int, device_type: str = "cpu") -> torch.Generator:
    seed_torch(seed, device_type)
    return torch.Generator().manual_seed(seed)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``; for the plain Sequential models of models.py, each layer's forward
    called directly: the module-call machinery (hooks, none registered here) costs about
    as much as a small layer's arithmetic."""
    if type(model) is not nn.Sequential or model._forward_hooks or model._forward_pre_hooks:
        return model(x)
    for layer in model:
        x = layer.forward(x)
    return x


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrialConfig,
    task: str,
    n_outputs: int,
) -> torch.Tensor:
    """One optimisation step on a batch; returns the (detached) loss."""
    if config.noise_std > 0:
        x = x + config.noise_std * torch.randn_like(x)
    if config.mixup_alpha > 0 and x.shape[0] > 1:
        lam = float(torch.distributions.Beta(config.mixup_alpha, config.mixup_alpha).sample())
        perm = torch.randperm(x.shape[0], device=x.device)
        x = lam * x + (1 - lam) * x[perm]
        if task == "classification":
            onehot = F.one_hot(y, n_outputs).float()
            y = lam * onehot + (1 - lam) * onehot[perm]
        else:
            y = lam * y + (1 - lam) * y[perm]
    loss = loss_fn(_forward(model, x), y, config.loss_params)
    if config.l1 > 0:
        loss = loss + config.l1 * weight_l1(model)
    # What zero_grad(set_to_none=True) does, without its dispatch and profiler wrappers
    # (7% of a small MLP's step).
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    loss.backward()
    optimizer_step(optimizer)
    return loss.detach()


def run_single_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    data: DeviceData,
    config: TrialConfig,
    generator: torch.Generator,
) -> float:
    """Train one epoch over a fresh permutation sliced into batches; mean loss."""
    model.train()
    n = data.X_train.shape[0]
    perm = torch.randperm(n, generator=generator).to(data.X_train.device)
    total = torch.zeros((), device=data.X_train.device)
    bs = config.batch_size
    n_batches = 0
    for start in range(0, n, bs):
        idx = perm[start : start + bs]
        if idx.numel() < 2 and config.batch_norm:
            continue  # batch norm cannot train on a single sample
        total += train_step(
            model,
            optimizer,
            loss_fn,
            data.X_train[idx],
            data.y_train[idx],
            config,
            data.task,
            data.n_outputs,
        )
        n_batches += 1
    return float(total) / max(n_batches, 1)


@torch.no_grad()
def validation_step(model: nn.Module, data: DeviceData) -> dict[str, float]:
    model.eval()
    out = forward_in_chunks(model, data.X_val)
    return compute_metrics(out, data.y_val, data.task, data.n_outputs, data.y_std)


# The most input values evaluated in one forward pass: a CNN's feature maps for 15k
# validation images were 3.4 GB in one pass (and on a GPU, its memory).
EVAL_VALUES = 2**22


def forward_in_chunks(
    model: Any, x: torch.Tensor, *, dim: int = 0, rows: int | None = None
) -> torch.Tensor:
    """``model(x)`` in evaluation, ``rows`` rows at a time (by default as many as hold
    EVAL_VALUES inputs) where ``x`` is large (what fits in one block, as every small
    validation set, is one pass: the same numbers); the outputs joined along ``dim``."""
    if rows is None:
        rows = max(256, EVAL_VALUES // max(1, x[0].numel()))
    if len(x) <= rows:
        return model(x)
    return torch.cat([model(x[i : i + rows]) for i in range(0, len(x), rows)], dim=dim)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def train(
    config: TrialConfig,
    data: DeviceData,
    *,
    objective: str = "val_loss",
    patience: int = 0,
    on_epoch: EpochHook | None = None,
    keep_model: bool = False,
    restore_best: bool = True,
    checkpoint: Checkpointer | None = None,
) -> TrainResult:
    """Train ``config`` on ``data``; call ``on_epoch(epoch, metrics)`` after each epoch
    (it may raise to prune). Raises TrialDiverged on a NaN, infinite or exploding loss.

    With ``keep_model`` the result holds the model at its best epoch, or with
    ``restore_best=False`` at its last (retrain, whose validation split is in training).

    With ``checkpoint`` the loop resumes from its last saved epoch (model, optimizer, RNG,
    history, early-stopping state) and saves them again after every epoch."""
    generator = set_seed(config.seed, data.X_train.device.type)
    model = build_model(config, data.input_shape, data.n_outputs).to(data.X_train.device)
    optimizer = build_optimizer(config, model.parameters())
    loss_fn = loss_function(config.loss, data.task)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    n_params = count_parameters(model)
    history: list[dict[str, float]] = []
    tracked: list[float] = []
    best_value, best_epoch, best_state, waited = math.inf, 0, None, 0
    first_loss: float | None = None
    started = time.perf_counter()
    stopped_early = False
    # Early stopping and plateaus watch the objective when it is measured per epoch.
    watch = objective if objective.startswith("val_") else "val_loss"
    track_best = (keep_model and restore_best) or checkpoint is not None
    start_epoch = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"], generator)
        history, tracked = list(saved["history"]), list(saved["tracked"])
        best_value, best_epoch = float(saved["best_value"]), int(saved["best_epoch"])
        waited, first_loss = int(saved["waited"]), saved["first_loss"]
        best_state = saved.get("best_model") or copy.deepcopy(model.state_dict())
        started -= float(saved["seconds"])
        start_epoch = int(saved["epoch"]) + 1
        if patience and waited >= patience:
            start_epoch, stopped_early = config.epochs, True
    for epoch in range(start_epoch, config.epochs):
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = scheduled_lr(config, epoch, base, tracked)
        train_loss = run_single_epoch(model, optimizer, loss_fn, data, config, generator)
        if not math.isfinite(train_loss):
            raise TrialDiverged(f"training loss became {train_loss} at epoch {epoch + 1}")
        if first_loss is None:
            first_loss = train_loss
        elif train_loss > 1e4 * max(first_loss, 1e-3):
            raise TrialDiverged(
                f"training loss exploded to {train_loss:.3g} at epoch {epoch + 1} "
                f"(from {first_loss:.3g})"
            )
        metrics = validation_step(model, data)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise TrialDiverged(f"validation metrics became non-finite at epoch {epoch + 1}")
        metrics["train_loss"] = train_loss
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        history.append(metrics)
        value = objective_value(metrics, watch)
        tracked.append(value)
        if value < best_value:
            best_value, best_epoch, waited = value, epoch, 0
            if track_best:
                best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if checkpoint is not None:
            checkpoint.save(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(generator),
                    "history": history,
                    "tracked": tracked,
                    "best_value": best_value,
                    "best_epoch": best_epoch,
                    "best_model": best_state if best_epoch != epoch else None,
                    "waited": waited,
                    "first_loss": first_loss,
                    "seconds": time.perf_counter() - started,
                },
                # the last epoch always: a finished trial's weights come from it
                force=epoch + 1 == config.epochs or bool(patience and waited >= patience),
            )
        if patience and waited >= patience:
            stopped_early = True
            break
    seconds = time.perf_counter() - started
    best = dict(history[best_epoch])
    best["n_params"] = float(n_params)
    best["train_seconds"] = seconds
    if keep_model and restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(
        metrics=best,
        history=history,
        epochs_run=len(history),
        best_epoch=best_epoch,
        n_params=n_params,
        train_seconds=seconds,
        stopped_early=stopped_early,
        model=model if keep_model else None,
    )
