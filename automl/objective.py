"""The Optuna objective: config -> train -> report/prune -> metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from automl.spaces import Space, TrialConfig, suggest

if TYPE_CHECKING:
    import optuna

    from automl.checkpoints import Checkpointer
    from automl.data import Dataset, DeviceData
    from automl.training import TrainResult

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, int, int, dict[str, float]], None]  # number, epoch, epochs, m


def trial_seed(base_seed: int | None, number: int) -> int:
    """Each trial's own seed, derived from the study seed and the trial number."""
    return ((base_seed or 0) * 1_000_003 + number) % (2**31 - 1)


@dataclass
class TrialOutcome:
    """What a finished trial produced, ready for ``study.tell``."""

    values: list[float]
    user_attrs: dict[str, Any]


class Objective:
    """Trains one trial's configuration on data that is already on the device."""

    def __init__(
        self,
        space: Space,
        dataset: Dataset,
        data: DeviceData,
        *,
        device: str,
        seed: int | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        self.space = space
        self.dataset = dataset
        self.data = data
        self.device = device
        self.seed = seed
        self.on_epoch = on_epoch

    def config_for(
        self, trial: optuna.Trial | optuna.trial.FixedTrial, number: int, *, flush: bool = True
    ) -> TrialConfig:
        """The trial's configuration, its parameters drawn now. They are stored before
        training starts (a killed trial is retried with them): in one transaction where
        the storage buffers them (storage_cache); ``flush=False`` leaves that to the
        caller (a pack writes all its trials' at once: storage_cache.flush_trials)."""
        config = suggest(trial, self.space, seed=trial_seed(self.seed, number))
        write = getattr(getattr(trial, "storage", None), "flush_params", None)
        if flush and write is not None:
            write(getattr(trial, "_trial_id", None))
        return config

    def __call__(self, trial: optuna.Trial, checkpoint: Checkpointer | None = None) -> list[float]:
        """Train; report the first objective each epoch (single objective only), prune,
        and return the objective values. Raises TrialPruned or TrialDiverged.

        With ``checkpoint`` training resumes from, and saves, per-epoch checkpoints."""
        from automl.lifecycle import original_number
        from automl.training import train

        # A retry (Optuna's ``failed_trial``) trains with the seed of the trial it retries.
        config = self.config_for(trial, original_number(trial))
        result = train(
            config,
            self.data,
            objective=self.space.objectives[0],
            patience=self.space.train.patience,
            on_epoch=self.epoch_hook(trial, config),
            checkpoint=checkpoint,
        )
        return self.finish(trial, config, result)

    def epoch_hook(
        self, trial: optuna.Trial, config: TrialConfig
    ) -> Callable[[int, dict[str, float]], None]:
        """The per-epoch hook of one trial: tell the observer, report the first objective
        (single objective only) and raise TrialPruned when the pruner says so."""
        import optuna

        metric = self.space.objectives[0]
        single = not self.space.is_multi_objective
        epochs = config.epochs
        inherited = _inherited_steps(trial)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if self.on_epoch is not None:
                self.on_epoch(trial.number, epoch, epochs, metrics)
            if single and metric in metrics:
                if epoch in inherited:
                    # Reported (and judged, not pruned) before the trial was retried; the
                    # pruner would read the latest inherited step, not this epoch's.
                    return
                trial.report(metrics[metric], epoch)
                if trial.should_prune():
                    # What it reached, as a finished trial records it (show, export).
                    attrs = trial_attrs(config, metrics, device=self.device)
                    if "n_params" not in metrics:
                        attrs.pop("n_params")
                    set_user_attrs(trial, {**attrs, "epochs_run": epoch + 1})
                    raise optuna.TrialPruned(
                        f"pruned at epoch {epoch + 1} with {metric}={metrics[metric]:.4g}"
                    )

        return on_epoch

    def finish(self, trial: optuna.Trial, config: TrialConfig, result: TrainResult) -> list[float]:
        """Write the trial's user attributes (in one storage transaction when the storage
        can) and return its objective values."""
        attrs = trial_attrs(config, result.metrics, device=self.device)
        attrs["epochs_run"] = result.epochs_run
        attrs["best_epoch"] = result.best_epoch + 1
        attrs["stopped_early"] = result.stopped_early
        set_user_attrs(trial, attrs)
        return [float(result.metrics[m]) for m in self.space.objectives]


def _inherited_steps(trial: optuna.Trial) -> set[int]:
    """The epochs a retried trial already holds values for. A copy queued after a signal
    holds those its checkpoint covers (lifecycle.retry_later); one made by Optuna's
    heartbeat retry (a killed process) holds every value its predecessor reported, also
    after the checkpoint it resumes from, which it trains (identically) again."""
    from automl.lifecycle import retry_history

    if not hasattr(trial, "storage") or not retry_history(trial):
        return set()
    return set(trial.storage.get_trial(trial._trial_id).intermediate_values)


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Set several user attributes: one write through the storage's
    ``set_trial_user_attrs`` when it has one (storage_cache.RunStorage), else one each."""
    write_all = getattr(trial.storage, "set_trial_user_attrs", None)  # storage_cache.py
    if write_all is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    write_all(trial._trial_id, attrs)
    cached = getattr(trial, "_cached_frozen_trial", None)
    if cached is not None:
        cached.user_attrs.update(attrs)


def trial_attrs(config: TrialConfig, metrics: dict[str, float], *, device: str) -> dict[str, Any]:
    """The user attributes every finished trial carries."""
    attrs: dict[str, Any] = {
        # Seven significant digits, not six decimals: a target measured in 1e-9 units
        # has metrics of that order, which six decimals would round to 0.
        k: (float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v)
        for k, v in metrics.items()
        if k != "lr"
    }
    attrs["n_params"] = int(metrics.get("n_params", 0))
    attrs["device"] = device
    attrs["seed"] = config.seed
    return attrs
