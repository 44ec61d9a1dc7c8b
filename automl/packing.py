"""Training K compatible trials at once as one fused model (``automl run --pack K``).

Small models leave a device mostly idle: each step is a handful of tiny matrix products
and a lot of Python. Packing stacks the parameters of K trials along a leading "member"
axis and trains them as one model (batched matmuls, HFTA, MLSys 2021):

- every member keeps its own initial weights (built exactly as the sequential path builds
  them, from the trial's seed), its own batch order (its own permutation generator) and
  its own dropout/noise draws (its own generator, in the sequential path's order), so a
  member's loss curve matches the same configuration trained alone up to float rounding;
- hidden widths differ: narrower members are zero-padded to the widest (rounded up to
  whole AVX lanes); a padded unit has zero weights in and out, so its output and all its
  gradients stay exactly zero;
- all parameters of all members live in one (K, P) tensor, one row a member; the
  backward pass is written out with the kernels autograd calls for each layer,
  activation and loss (tested against autograd), so a step costs no autograd
  bookkeeping; each member's gradients are its own;
- the optimizers are written as tensor ops over that tensor with per-member
  hyperparameters as (K, 1) tensors where members differ and Python floats where they
  agree (SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta, AdaBound); on a CPU, Adam and
  AdamW run torch's fused kernel for the whole group; members with different optimizers
  are each updated by their own;
- members are reported, pruned, early-stopped or diverge on their own; a member that ends
  is dropped from the stacks at the end of the epoch.

Configurations that cannot be fused (CNNs, batch norm, mixup, amsgrad, centered RMSprop)
or that have no compatible partner are trained by the sequential path.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from torch import nn

from automl.models import (
    ACTIVATIONS,
    build_model,
    count_parameters,
    keep_threshold,
    random_bits,
)
from automl.spaces import TrialConfig
from automl.training import (
    FUSED_KERNELS,
    TrainResult,
    TrialDiverged,
    compute_metrics_stacked,
    forward_in_chunks,
    objective_value,
    scheduled_lr,
    seed_torch,
)

if TYPE_CHECKING:
    from automl.data import DeviceData
    from automl.pack_pool import MemberRecord
    from automl.training import EpochHook

log = logging.getLogger(__name__)

FUSED_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "adabound")

# Device types on which every member draws its dropout and noise from its own generator,
# in the order the sequential path draws them, so that it follows its path alone exactly.
# CPU generators are one stream however it is split; CUDA's counter-based ones are not,
# so there the whole group draws from one generator, a few operations a step whatever K.
EXACT_STREAMS = ("cpu",)

# --------------------------------------------------------------------------- grouping


def group_key(config: TrialConfig) -> tuple[Any, ...] | None:
    """What members of one fused group must share; None when ``config`` cannot be fused.

    Widths, optimizers and their hyperparameters, dropout, noise, L1, weight decay and
    schedules may differ inside a group."""
    params = config.optimizer_params
    if (
        config.model != "mlp"
        or config.batch_norm
        or config.mixup_alpha > 0
        or config.optimizer not in FUSED_OPTIMIZERS
        or params.get("amsgrad")
        or params.get("centered")
    ):
        return None
    return (
        config.n_layers,
        config.activation,
        config.loss,
        tuple(sorted(config.loss_params.items())),
        config.batch_size,
        config.epochs,
    )


def group_configs(
    configs: Sequence[TrialConfig], *, max_size: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """Split indices of ``configs`` into fused groups (two members or more, at most
    ``max_size``) and the ones left to train alone, both in ask order."""
    by_key: dict[tuple[Any, ...], list[int]] = {}
    alone: list[int] = []
    for i, config in enumerate(configs):
        key = group_key(config)
        if key is None:
            alone.append(i)
        else:
            by_key.setdefault(key, []).append(i)
    groups: list[list[int]] = []
    for members in by_key.values():
        size = max_size or len(members)
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            if len(chunk) > 1:
                groups.append(chunk)
            else:
                alone.extend(chunk)
    return groups, sorted(alone)


# Padded widths are a multiple of PAD_UNITS and at least MIN_WIDTH: a batched matrix
# product whose width is not a whole number of AVX lanes runs at a fraction of the speed
# (9 units: 2x slower than 16 on the build machine), and one 8 wide 2.5x slower than one
# 16 wide (oneDNN/MKL's small-matrix paths). A padded unit stays exactly zero.
PAD_UNITS = 8
MIN_WIDTH = 16


def padded_width(width: int) -> int:
    return max(MIN_WIDTH, -(-width // PAD_UNITS) * PAD_UNITS)


# Per training step on one CPU thread, in milliseconds (digits, batch 64, 2 layers, Adam,
# dropout; widths 8..128 and groups of 2..32, fitted on the 2-core build machine, whose
# speed wanders by a third from one minute to the next): a fused group costs a fixed
# GROUP_MS plus, per member, MEMBER_MS and MS_PER_MFLOP times its forward-and-backward
# work at the group's padded width. A group of one member is priced the same way. Only
# the ratios matter.
GROUP_MS = 0.3
MEMBER_MS = 0.02
MS_PER_MFLOP = 0.021


def split_by_width(
    configs: Sequence[TrialConfig], n_features: int, n_outputs: int, device: str = "cpu"
) -> list[list[int]]:
    """Split one fused group (indices into ``configs``, which share a ``group_key``) into
    sub-groups of similar widths, each padded to its own widest member, in the way the
    cost model above says is fastest (a sub-group may be a single member).

    On a CPU a padded unit costs as much as a real one: a 4-unit member padded to 128
    units does the work of a 128-unit model, and a batch of wide members gains nothing
    from fusing (their matrix products are already big enough). On a GPU the padding is
    nearly free and one launch for all members is what counts: one group."""
    order = sorted(range(len(configs)), key=lambda i: configs[i].hidden_units)
    if device != "cpu" or len(order) < 3:
        return [order]
    first = configs[order[0]]

    def cost(lo: int, hi: int) -> float:  # members order[lo..hi], padded to order[hi]
        padded = padded_width(configs[order[hi]].hidden_units)
        return _step_ms(first, hi - lo + 1, padded, n_features, n_outputs)

    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest split of the first j members
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            total = best[i] + cost(i, j - 1)
            if total < best[j]:
                best[j], cut[j] = total, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return sorted(groups, key=lambda g: min(g))


# --------------------------------------------------------------------------- the model


class FusedMLP:
    """K MLPs of the same depth, their parameters in one (K, P) tensor ``flat``: member m's
    weights and biases are row m, weights first. ``weights[i]`` is layer i's (K, in, out)
    view (the transpose of nn.Linear's) and ``biases[i]`` its (K, 1, out) view; their
    gradients are the same views of ``flat_grad``. So the optimizer updates every
    parameter of every member in a few operations on two tensors. The output layer alone
    keeps nn.Linear's (K, out, in) and is computed turned round, (K, out, B): with a
    handful of outputs (10 classes, 1 target) the product the other way ran 3x slower.

    The backward pass is written out (``backward``), with the kernels autograd itself
    calls for each layer, activation and loss: autograd's own bookkeeping cost more than
    half of a narrow group's step on the CPU (about 0.1 ms a backward call whatever its
    size, and several microseconds an operation)."""

    def __init__(
        self,
        configs: Sequence[TrialConfig],
        input_shape: Sequence[int],
        n_outputs: int,
        device: torch.device,
    ) -> None:
        first = configs[0]
        self.n_layers = first.n_layers
        self.activation_name = first.activation
        n_features = math.prod(int(s) for s in input_shape)
        self.width = padded_width(max(c.hidden_units for c in configs))
        dims = [n_features] + [self.width] * self.n_layers + [n_outputs]
        # Per layer, where its weights and bias lie in a member's row: weights first, as
        # (in, out) for hidden layers and (out, in) for the output layer.
        weight_parts: list[tuple[slice, tuple[int, int]]] = []
        start = 0
        for layer, (inp, out) in enumerate(itertools.pairwise(dims)):
            shape = (inp, out) if layer < self.n_layers else (out, inp)
            weight_parts.append((slice(start, start + inp * out), shape))
            start += inp * out
        self.layout: list[tuple[slice, tuple[int, int], slice]] = []
        for (columns, shape), out in zip(weight_parts, dims[1:], strict=True):
            self.layout.append((columns, shape, slice(start, start + out)))
            start += out
        self.flat = torch.zeros(len(configs), start)
        self._make_views()
        self.generators: list[torch.Generator] = []
        self.keys: list[list[tuple[str, str]]] = []  # per member: (weight, bias) state keys
        self.n_params: list[int] = []
        for m, config in enumerate(configs):
            # Exactly the sequential path's initialisation (training.train): seed, build.
            seed_torch(config.seed)  # the model is built on the CPU
            model = build_model(config, input_shape, n_outputs)
            self.generators.append(_member_generator(config.seed, device))
            self.n_params.append(count_parameters(model))
            names = []
            linears = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
            with torch.no_grad():
                for layer, (name, linear) in enumerate(linears):
                    out, inp = linear.weight.shape
                    if layer < self.n_layers:
                        self.weights[layer][m, :inp, :out] = linear.weight.detach().T
                    else:
                        self.weights[layer][m, :out, :inp] = linear.weight.detach()
                    self.biases[layer][m, 0, :out] = linear.bias.detach()
                    names.append((f"{name}.weight", f"{name}.bias"))
            self.keys.append(names)
        self.widths = [c.hidden_units for c in configs]
        # Blocks kept from one epoch to the next (_reused): masks, gathered rows, validation.
        self.buffers: dict[str, torch.Tensor] = {}
        # The group's generator where members do not keep their own streams (EXACT_STREAMS).
        self.group_generator = torch.Generator(device=device).manual_seed(first.seed)
        self.flat = self.flat.to(device)
        self._make_views()

    def _make_views(self) -> None:
        k = self.flat.shape[0]
        self.flat_grad = torch.zeros_like(self.flat)
        self.weights, self.biases, self.weight_grads, self.bias_grads = [], [], [], []
        for weight_columns, shape, bias_columns in self.layout:
            self.weights.append(self.flat[:, weight_columns].view(k, *shape))
            self.weight_grads.append(self.flat_grad[:, weight_columns].view(k, *shape))
            self.biases.append(self.flat[:, bias_columns].view(k, 1, -1))
            self.bias_grads.append(self.flat_grad[:, bias_columns].view(k, 1, -1))
        # Views a step uses, made once (each view is a dispatched operation of its own):
        # the weights turned for the backward pass, the output bias as a column, the
        # output bias's gradient as rows.
        self.weights_t = [w.transpose(1, 2) for w in self.weights]
        self.out_bias_t = self.biases[-1].transpose(1, 2)
        self.out_bias_grad = self.bias_grads[-1].view(k, -1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation of (B, F) inputs shared by every member: the output turned round,
        (K, C, B), as ``training.compute_metrics_stacked(..., turned=True)`` takes it."""
        k = self.flat.shape[0]
        h = x.expand(k, *x.shape)
        for layer in range(self.n_layers):
            # Into reused buffers, activated in place: the validation set's activations
            # are megabytes (a tenth of a wide group's epoch when freshly allocated).
            out = _reused(self.buffers, f"eval{layer}", (k, h.shape[1], self.width), self.flat)
            torch.baddbmm(self.biases[layer], h, self.weights[layer], out=out)
            h = _activate_(self.activation_name, out)
        return self._output_turned(h)

    def _output_turned(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer on (K, B, W) inputs, as (K, C, B)."""
        return torch.baddbmm(self.out_bias_t, self.weights[-1], h.transpose(1, 2))

    # (No torch.no_grad on the step's methods: no tensor of theirs requires a gradient,
    # and entering the mode costs microseconds a call, a step's worth of them a percent.)
    def forward_train(
        self, x: torch.Tensor, masks: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """``forward`` on (K, B, F) batches, its output turned round, (K, C, B) (the
        layout of FusedLoss), and what ``backward`` needs of each hidden layer: its
        input, pre-activation, activation and mask."""
        saved: list[tuple[torch.Tensor, ...]] = []
        h = x
        activation = _FUNCTIONS[self.activation_name]
        for layer in range(self.n_layers):
            pre = torch.baddbmm(self.biases[layer], h, self.weights[layer])
            post = activation(pre)
            mask = masks[layer] if layer < len(masks) else None
            saved.append((h, pre, post) if mask is None else (h, pre, post, mask))
            h = post if mask is None else post * mask
        saved.append((h,))
        return self._output_turned(h), saved

    def backward(
        self,
        saved: list[tuple[torch.Tensor, ...]],
        grad_out: torch.Tensor,
        l1: torch.Tensor | None = None,
    ) -> None:
        """Write into ``flat_grad`` every member's gradients, given the gradient of the
        summed loss with respect to the output as ``forward_train`` gives it, (K, C, B)
        (and, with ``l1``, each member's L1 penalty on its weights)."""
        # The output layer, from the gradient turned round, (K, C, B): weights (K, C, W)
        # are that times the inputs; the inputs' gradient is turned back, (K, B, W).
        # Products into fresh tensors, then copied: bmm's out= on a strided view loops
        # over the members one matrix at a time (four times slower here).
        self.weight_grads[-1].copy_(torch.bmm(grad_out, saved[-1][0]))
        torch.sum(grad_out, dim=2, out=self.out_bias_grad)
        grad = torch.bmm(grad_out.transpose(1, 2), self.weights[-1])
        name = self.activation_name
        for layer in range(self.n_layers - 1, -1, -1):
            h, pre, post, *mask = saved[layer]
            if mask:
                grad = grad * mask[0]
            grad = _activation_backward(name, grad, pre, post)
            self.weight_grads[layer].copy_(torch.bmm(h.transpose(1, 2), grad))
            torch.sum(grad, dim=1, keepdim=True, out=self.bias_grads[layer])
            if layer:
                grad = torch.bmm(grad, self.weights_t[layer])
        if l1 is not None:
            scale = l1.view(-1, 1, 1)
            for w, g in zip(self.weights, self.weight_grads, strict=True):
                g.add_(w.sign() * scale)

    def weight_l1(self) -> torch.Tensor:
        """Per member, the sum of absolute weights (biases excluded), as in models.weight_l1."""
        return torch.stack([w.abs().sum(dim=(1, 2)) for w in self.weights]).sum(dim=0)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the members at ``index`` (their order)."""
        self.flat = self.flat[index]
        self._make_views()
        rows = index.tolist()
        self.generators = [self.generators[i] for i in rows]
        self.keys = [self.keys[i] for i in rows]
        self.n_params = [self.n_params[i] for i in rows]
        self.widths = [self.widths[i] for i in rows]

    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """Member ``m``'s weights as the state dict of its own ``build_model`` module."""
        return self.row_state(self.flat[m], self.keys[m], self.widths[m])

    def row_state(
        self, row: torch.Tensor, keys: Sequence[tuple[str, str]], width: int
    ) -> dict[str, torch.Tensor]:
        """A member's row of ``flat`` (now or saved earlier) as the state dict of its own
        ``build_model`` module; ``keys`` and ``width`` are that member's."""
        state: dict[str, torch.Tensor] = {}
        for layer, ((wkey, bkey), (weight_columns, shape, bias_columns)) in enumerate(
            zip(keys, self.layout, strict=True)
        ):
            weight = row[weight_columns].view(shape)
            linear = weight.T if layer < self.n_layers else weight  # nn.Linear's (out, in)
            out = width if layer < self.n_layers else linear.shape[0]
            inp = linear.shape[1] if layer == 0 else width
            state[wkey] = linear[:out, :inp].clone()
            state[bkey] = row[bias_columns][:out].clone()
        return state


def _reused(
    buffers: dict[str, torch.Tensor], key: str, shape: Sequence[int], like: torch.Tensor
) -> torch.Tensor:
    """An uninitialised ``shape`` tensor of ``like``'s dtype and device, carved from
    ``buffers[key]`` (grown when too small): one block kept from one epoch to the next,
    not a fresh allocation each time, since a block of megabytes comes from the OS anew
    and its first write faults in every page."""
    size = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
    return buffer[:size].view(*shape)


# The activations of models.ACTIVATIONS (torch's defaults) as functions: a module call
# costs its dispatch on top of the function's.
_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
}


def _activate_(name: str, t: torch.Tensor) -> torch.Tensor:
    """``ACTIVATIONS[name]`` (torch's defaults) applied to ``t`` in place, where torch has
    an in-place form of the same kernel."""
    if name == "relu":
        return t.relu_()
    if name == "tanh":
        return t.tanh_()
    if name == "silu":
        return F.silu(t, inplace=True)
    if name == "leaky_relu":
        return F.leaky_relu_(t)
    if name == "elu":
        return F.elu_(t)
    return ACTIVATIONS[name]()(t)


def _activation_backward(
    name: str, grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor
) -> torch.Tensor:
    """The gradient through ``ACTIVATIONS[name]`` (torch's defaults), by the kernel autograd
    calls for it."""
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward(grad, post, 0)
    if name == "tanh":
        return aten.tanh_backward(grad, post)
    if name == "gelu":
        return aten.gelu_backward(grad, pre, approximate="none")
    if name == "silu":
        return aten.silu_backward(grad, pre)
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad, pre, 0.01, False)
    if name == "elu":
        return aten.elu_backward(grad, 1.0, 1, 1, False, pre)
    raise ValueError(f"no fused backward for activation {name!r}")


def _member_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator a member draws dropout and noise from: on CPU a copy of the global
    RNG right after its model was built (what the sequential path draws from next)."""
    if device.type == "cpu":
        gen = torch.Generator()
        gen.set_state(torch.get_rng_state())
        return gen
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------- losses

# A fused loss: from the group's output turned round, (K, C, B) (FusedMLP.forward_train),
# and the targets, each member's mean loss (K,) and the gradient of their sum with respect
# to that output; the values and gradients autograd gives for the sequential path's loss
# (training.loss_function). A softmax over the classes of (K, C, B) runs 2.5x faster, and
# its backward 3x, than over the last dimension of (K, B, C) with ten classes.
_LossGrad = tuple[torch.Tensor, torch.Tensor]
FusedLoss = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], _LossGrad]


def _class_targets(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class probabilities (K, B, C) or class indices (K, B) as (K, C, B) probabilities."""
    k, c, b = out.shape
    if y.dtype.is_floating_point:
        return y.reshape(k, b, c).transpose(1, 2)
    return torch.zeros_like(out).scatter_(1, y.reshape(k, 1, b), 1.0)


def _cross_entropy(smoothing_key: str | None) -> FusedLoss:
    """Cross-entropy of log-softmax outputs (label smoothing read from ``smoothing_key``),
    against class indices or class probabilities (F.cross_entropy's formulas)."""

    def loss(out: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> _LossGrad:
        k, c, b = out.shape
        smoothing = float(kw.get(smoothing_key, 0.0)) if smoothing_key else 0.0
        logp = out.log_softmax(dim=1)
        if y.dtype.is_floating_point:  # class probabilities
            target = _class_targets(out, y)
            if smoothing:
                target = target * (1 - smoothing) + smoothing / c
            per = -(target * logp).sum(dim=1)
            grad = target * (-1.0 / b)
        else:
            index = y.reshape(k, 1, b)
            per = -logp.gather(1, index).squeeze(1)
            grad = torch.zeros_like(logp).scatter_(1, index, -(1 - smoothing) / b)
            if smoothing:
                per = per * (1 - smoothing) + (-logp.sum(dim=1)) * (smoothing / c)
                grad -= smoothing / (c * b)
        aten = torch.ops.aten
        return per.mean(dim=1), aten._log_softmax_backward_data(grad, logp, 1, out.dtype)

    return loss


def _pointwise_grad(name: str, diff: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """d loss / d input of F.<name>_loss(input, target) (reduction "none") at
    ``diff = input - target``: the formula of its backward kernel."""
    if name == "mse":
        return 2 * diff
    if name == "l1":
        return diff.sign()
    if name == "huber":
        delta = float(kw.get("delta", 1.0))
        return diff.clamp(-delta, delta)
    return (diff / float(kw.get("beta", 1.0))).clamp(-1.0, 1.0)  # smooth_l1


POINTWISE: dict[str, Callable[..., torch.Tensor]] = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
    "smooth_l1": F.smooth_l1_loss,
}


def _probs(name: str) -> FusedLoss:
    """A regression loss used for classes: softmax probabilities against one-hot targets."""

    def loss(out: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> _LossGrad:
        _, c, b = out.shape
        probs = out.softmax(dim=1)
        target = _class_targets(out, y)
        per = POINTWISE[name](probs, target, reduction="none", **kw)
        grad = _pointwise_grad(name, probs - target, kw) * (1.0 / (b * c))
        aten = torch.ops.aten
        return per.mean(dim=(1, 2)), aten._softmax_backward_data(grad, probs, 1, out.dtype)

    return loss


def _flat_bce(out: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> _LossGrad:
    _, c, b = out.shape
    target = _class_targets(out, y)
    per = F.binary_cross_entropy_with_logits(out, target, reduction="none")
    return per.mean(dim=(1, 2)), (out.sigmoid() - target) * (1.0 / (b * c))


def _regression(name: str, *, with_kw: bool) -> FusedLoss:
    def loss(out: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> _LossGrad:
        extra = kw if with_kw else {}
        pred = out.squeeze(1)  # (K, 1, B): one target
        per = POINTWISE[name](pred, y, reduction="none", **extra)
        grad = _pointwise_grad(name, pred - y, extra) * (1.0 / pred.shape[1])
        return per.mean(dim=1), grad.view(out.shape)

    return loss


FUSED_CLASSIFICATION_LOSSES: dict[str, FusedLoss] = {
    "cross_entropy": _cross_entropy("label_smoothing"),
    "nll": _cross_entropy(None),
    "mse": _probs("mse"),
    "huber": _probs("huber"),
    "l1": _probs("l1"),
    "smooth_l1": _probs("smooth_l1"),
    "bce": _flat_bce,
}
FUSED_REGRESSION_LOSSES: dict[str, FusedLoss] = {
    "mse": _regression("mse", with_kw=False),
    "huber": _regression("huber", with_kw=True),
    "l1": _regression("l1", with_kw=False),
    "smooth_l1": _regression("smooth_l1", with_kw=True),
}


# --------------------------------------------------------------------------- optimizers

# Each optimizer's defaults, as torch's (and training.AdaBound's).
_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"momentum": 0.0, "dampening": 0.0, "nesterov": 0.0, "weight_decay": 0.0},
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2},
    "rmsprop": {"alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0},
    "adagrad": {"lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0},
    "adadelta": {"rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
    "adabound": {
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "final_lr": 0.1,
        "gamma": 1e-3,
    },
}


def _hyper(config: TrialConfig) -> dict[str, float]:
    """The member's optimizer hyperparameters with torch's defaults filled in, after the
    sequential path's own adjustments (training.build_optimizer)."""
    params = dict(config.optimizer_params)
    out = {
        name: float(params.get(name, default))
        for name, default in _DEFAULTS[config.optimizer].items()
    }
    out["lr"] = float(params["lr"])
    if config.optimizer == "sgd":
        if out["nesterov"] and not out["momentum"]:
            out["nesterov"] = 0.0
        if out["nesterov"] and out["dampening"]:
            out["dampening"] = 0.0
    return out


# Below this a second moment is raised to it before its square root, which changes no
# update (its root, 1e-15, is far below any eps): torch's vectorised sqrt on this CPU
# takes 8x longer on zeros and 40x on denormals than on normal numbers, and a padded or
# dead unit's moments are exactly that.
SQRT_FLOOR = 1e-30

# The step at which RMSprop runs the fused Adam kernel: 1 - alpha**RMSPROP_STEP is exactly
# 1 in double precision for every alpha below 1, so the kernel's bias corrections vanish.
RMSPROP_STEP = 2.0**60


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    return t.clamp_min(SQRT_FLOOR).sqrt_()


# A per-member coefficient: a (K, 1) tensor, or a Python float where every member has
# the same value (then torch's own scalar forms apply: fewer operations, and the very
# arithmetic of the sequential path).
Coefficient = torch.Tensor | float


def _axpy_(t: torch.Tensor, x: torch.Tensor, c: Coefficient) -> torch.Tensor:
    """t += x * c, in place."""
    return t.add_(x, alpha=c) if isinstance(c, float) else t.addcmul_(x, c)


def _plus(t: torch.Tensor, x: torch.Tensor, c: Coefficient) -> torch.Tensor:
    """t + x * c, a new tensor."""
    return t.add(x, alpha=c) if isinstance(c, float) else t.addcmul(x, c)


def _addcmul_(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: Coefficient) -> torch.Tensor:
    """t += a * b * c, in place."""
    return t.addcmul_(a, b, value=c) if isinstance(c, float) else t.addcmul_(a, b * c)


def _addcdiv_(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: Coefficient) -> torch.Tensor:
    """t += a / b * c, in place."""
    return t.addcdiv_(a, b, value=c) if isinstance(c, float) else t.addcdiv_(a * c, b)


def _column(c: Coefficient, like: torch.Tensor) -> torch.Tensor:
    """``c`` as a (K, 1) tensor beside ``like`` (K, P)."""
    if isinstance(c, float):
        return torch.full((like.shape[0], 1), c, dtype=like.dtype, device=like.device)
    return c


class FusedOptimizer:
    """One optimizer over stacked parameters whose hyperparameters are per-member
    coefficients (see Coefficient).

    The update formulas are torch's single-tensor ones (and training.AdaBound's), so a
    member follows the path it would follow alone up to float rounding."""

    def __init__(
        self, name: str, configs: Sequence[TrialConfig], params: Sequence[torch.Tensor]
    ) -> None:
        self.name = name
        self.hyper = [_hyper(c) for c in configs]
        self.base_lrs = [h["lr"] for h in self.hyper]
        self.lrs = list(self.base_lrs)
        self.step_count = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.ahead = 1  # steps whose coefficients are computed in one go (see plan)
        self._block: list[dict[str, Coefficient]] = []
        self._block_start = 0
        self.kernel = self._kernel_settings()
        self._kernel_step = torch.zeros((), device=self.device)
        self._kernel_step_value = 0.0
        self._update = getattr(self, f"_{name}")
        self._scratch: dict[torch.Size, torch.Tensor] = {}

    def _kernel_settings(self) -> dict[str, float] | None:
        """The shared settings under which torch's fused Adam kernel updates the group
        (``_kernel_direction``), or None: on a CPU, for Adam and AdamW members that share
        their betas and eps (the learning rate and weight decay may differ), and for
        RMSprop members that share alpha and eps, as Adam with beta1 = 0 and bias
        corrections of exactly 1 (``_rmsprop``)."""
        if self.device.type != "cpu" or "cpu" not in FUSED_KERNELS.get("adam", set()):
            return None
        if self.name in ("adam", "adamw"):
            shared = {(h["beta1"], h["beta2"], h["eps"]) for h in self.hyper}
        elif self.name == "rmsprop":
            shared = {(0.0, h["alpha"], h["eps"]) for h in self.hyper}
        else:
            return None
        if len(shared) != 1:
            return None
        beta1, beta2, eps = shared.pop()
        if not 0.0 <= beta2 < 1.0:  # alpha = 1 would make RMSprop's bias correction 0
            return None
        return {"beta1": beta1, "beta2": beta2, "eps": eps}

    def _kernel_direction(
        self, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: float
    ) -> torch.Tensor:
        """-m'/(sqrt(v')/sqrt(1 - beta2^step) + eps) / (1 - beta1^step) for every member
        in one pass of torch's fused Adam kernel, which also updates the moments m and v
        from g: the kernel run with lr 1 on a zeroed tensor. Each member's learning rate
        then scales its own row."""
        assert self.kernel is not None
        direction = self._scratch.get(g.shape)
        if direction is None:
            direction = self._scratch[g.shape] = torch.empty_like(g)
        direction.zero_()
        torch._fused_adam_(
            [direction],
            [g],
            [m],
            [v],
            [],
            [self._step_tensor(step)],
            lr=1.0,
            beta1=self.kernel["beta1"],
            beta2=self.kernel["beta2"],
            weight_decay=0.0,
            eps=self.kernel["eps"],
            amsgrad=False,
            maximize=False,
        )
        return direction

    def _step_tensor(self, step: float) -> torch.Tensor:
        """The kernel's step as a tensor, refilled only when it changes (never for
        RMSprop's constant step)."""
        if step != self._kernel_step_value:
            self._kernel_step.fill_(step)
            self._kernel_step_value = step
        return self._kernel_step

    def set_lrs(self, lrs: Sequence[float]) -> None:
        self.lrs = list(lrs)
        self._block = []

    def plan(self, steps: int) -> None:
        """The next ``steps`` steps share the current learning rates (an epoch): their
        coefficients are computed and moved to the device in one transfer, not one a
        step (on a GPU a transfer a step would stall the queue of kernels)."""
        self.ahead = max(1, steps)
        self._block = []

    def keep(self, index: torch.Tensor) -> None:
        rows = index.tolist()
        self.hyper = [self.hyper[i] for i in rows]
        self.base_lrs = [self.base_lrs[i] for i in rows]
        self.lrs = [self.lrs[i] for i in rows]
        self.state = [{k: v[index] for k, v in s.items()} for s in self.state]
        self._block = []

    def _get(self, key: str) -> list[float]:
        return [h[key] for h in self.hyper]

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Update ``params`` in place from ``grads``: (K, P) tensors, one row per member
        (tensors that need no gradient: no torch.no_grad, which costs microseconds a call)."""
        self.step_count += 1
        t = self.step_count
        if not self._block_start <= t < self._block_start + len(self._block):
            self._block = self._coefficient_block(t, self.ahead)
            self._block_start = t
        coeffs = self._block[t - self._block_start]
        decay = coeffs.get("wd") if self.name != "adamw" else None
        update = self._update
        for p, g, state in zip(params, grads, self.state, strict=True):
            if decay is not None:
                g = _plus(g, p, decay)
            update(p, g, state, coeffs)

    def _coefficient_block(self, t: int, steps: int) -> list[dict[str, Coefficient]]:
        """The per-member scalars of steps ``t .. t+steps-1``, computed in double
        precision like torch's Python floats: a float where the members agree, else
        (K, 1) tensors, all of them moved to the device in one transfer."""
        per_step = [self._coefficients(t + i) for i in range(steps)]
        names = list(per_step[0])
        varying = [n for n in names if any(len(set(c[n])) > 1 for c in per_step)]
        rows: list[dict[str, Coefficient]] = [
            {n: float(c[n][0]) for n in names if n not in varying} for c in per_step
        ]
        if varying:
            values = [[c[n] for n in varying] for c in per_step]
            block = torch.tensor(values, dtype=torch.float64).to(self.dtype).to(self.device)
            for row, tensors in zip(rows, block.view(steps, len(varying), -1, 1), strict=True):
                row.update(zip(varying, tensors, strict=True))
        return rows

    def _coefficients(self, t: int) -> dict[str, list[float]]:
        """The per-member scalars of step ``t`` (1-based), one list each."""
        lr = self.lrs
        h = self.hyper
        c: dict[str, list[float]] = {"lr": lr, "-lr": [-x for x in lr]}
        wd = self._get("weight_decay")
        if any(wd):
            c["wd"] = wd
        if self.name in ("adam", "adamw", "adabound"):
            b1, b2 = self._get("beta1"), self._get("beta2")
            c["b1"], c["b2"] = b1, b2
            c["1-b1"], c["1-b2"] = [1 - b for b in b1], [1 - b for b in b2]
            c["eps"] = self._get("eps")
            bc1 = [1 - b**t for b in b1]
            bc2 = [1 - b**t for b in b2]
            if self.name == "adabound":
                c["step_size"] = [
                    lr_ * math.sqrt(b) / a for lr_, a, b in zip(lr, bc1, bc2, strict=True)
                ]
                finals = [
                    x["final_lr"] * lr_ / base
                    for x, lr_, base in zip(h, lr, self.base_lrs, strict=True)
                ]
                c["lower"] = [
                    f * (1 - 1 / (x["gamma"] * t + 1)) for f, x in zip(finals, h, strict=True)
                ]
                c["upper"] = [
                    f * (1 + 1 / (x["gamma"] * t)) for f, x in zip(finals, h, strict=True)
                ]
            else:
                c["-step_size"] = [-lr_ / a for lr_, a in zip(lr, bc1, strict=True)]
                c["bc2_sqrt"] = [math.sqrt(b) for b in bc2]
            if self.name == "adamw":
                c["decay"] = [1 - lr_ * x["weight_decay"] for lr_, x in zip(lr, h, strict=True)]
        elif self.name == "sgd":
            m = self._get("momentum")
            c["m"] = m
            c["1-d"] = [1 - x["dampening"] for x in h]
            c["nesterov"] = self._get("nesterov")
            c["has_m"] = [1.0 if v else 0.0 for v in m]
        elif self.name == "rmsprop":
            a = self._get("alpha")
            c["a"], c["1-a"] = a, [1 - v for v in a]
            c["eps"] = self._get("eps")
            c["m"] = self._get("momentum")
        elif self.name == "adagrad":
            c["-clr"] = [-lr_ / (1 + (t - 1) * x["lr_decay"]) for lr_, x in zip(lr, h, strict=True)]
            c["eps"] = self._get("eps")
        elif self.name == "adadelta":
            rho = self._get("rho")
            c["rho"], c["1-rho"] = rho, [1 - r for r in rho]
            c["eps"] = self._get("eps")
        return c

    def _adam(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        s: dict[str, torch.Tensor],
        c: dict[str, Coefficient],
    ) -> None:
        if not s:
            s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = s["m"], s["v"]
        if self.kernel is not None:
            # Adam's step is -lr times a direction that does not depend on lr (weight
            # decay is already in g): one pass of torch's fused kernel over the group's
            # moments (the sequential path runs the same kernel), then each member's
            # rate scales its own. Three passes instead of ten, a third of the time.
            _axpy_(p, self._kernel_direction(g, m, v, self.step_count), c["lr"])
            return
        m.lerp_(g, c["1-b1"])
        _addcmul_(v.mul_(c["b2"]), g, g, c["1-b2"])
        denom = (_sqrt(v) / c["bc2_sqrt"]).add_(c["eps"])
        _addcdiv_(p, m, denom, c["-step_size"])

    def _adamw(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        s: dict[str, torch.Tensor],
        c: dict[str, Coefficient],
    ) -> None:
        p.mul_(c["decay"])
        self._adam(p, g, s, c)

    def _adabound(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        s: dict[str, torch.Tensor],
        c: dict[str, Coefficient],
    ) -> None:
        if not s:
            s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = s["m"], s["v"]
        _axpy_(m.mul_(c["b1"]), g, c["1-b1"])
        _addcmul_(v.mul_(c["b2"]), g, g, c["1-b2"])
        step = c["step_size"] / (_sqrt(v) + c["eps"])
        lower, upper = c["lower"], c["upper"]
        if isinstance(lower, float) and isinstance(upper, float):
            step.clamp_(lower, upper)
        else:  # a float bound as a column, so that both bounds are tensors
            step.clamp_(_column(lower, step), _column(upper, step))
        p.add_(-step * m)

    def _sgd(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        s: dict[str, torch.Tensor],
        c: dict[str, Coefficient],
    ) -> None:
        has_m, nesterov = c["has_m"], c["nesterov"]
        if isinstance(has_m, float) and not has_m:  # plain SGD for every member
            _axpy_(p, g, c["-lr"])
            return
        if "buf" not in s:
            s["buf"] = g.clone()
        else:
            _axpy_(s["buf"].mul_(c["m"]), g, c["1-d"])
        buf = s["buf"]
        if isinstance(nesterov, float):
            direction = _plus(g, buf, c["m"]) if nesterov else buf
        else:
            direction = torch.where(nesterov > 0, _plus(g, buf, c["m"]), buf)
        if not isinstance(has_m, float):  # some members without momentum: plain SGD
            direction = torch.where(has_m > 0, direction, g)
        _axpy_(p, direction, c["-lr"])

    def _rmsprop(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        s: dict[str, torch.Tensor],
        c: dict[str, Coefficient],
    ) -> None:
        if not s:
            s["sq"], s["buf"] = torch.zeros_like(p), torch.zeros_like(p)
        sq, buf = s["sq"], s["buf"]
        no_momentum = isinstance(c["m"], float) and not c["m"]
        if self.kernel is not None:
            # RMSprop is Adam with beta1 = 0 (its first moment is then g itself) and
            # beta2 = alpha, without bias corrections: at a step so large that alpha to
            # its power is 0, the kernel's corrections are exactly 1. So one pass gives
            # every member's -g / (sqrt(v) + eps), with v updated as RMSprop updates it;
            # six passes before, a quarter of a wide group's step.
            if "m" not in s:
                s["m"] = torch.zeros_like(p)  # the kernel's first moment: g after a step
            direction = self._kernel_direction(g, s["m"], sq, RMSPROP_STEP)
            if no_momentum:
                _axpy_(p, direction, c["lr"])
            else:
                _axpy_(p, buf.mul_(c["m"]).sub_(direction), c["-lr"])
            return
        _addcmul_(sq.mul_(c["a"]), g, g, c["1-a"])
        avg = _sqrt(sq).add_(c["eps"])
        if no_momentum:
            _axpy_(p, g.div(avg), c["-lr"])
            return
        buf.mul_(c["m"]).addcdiv_(g, avg)
        _axpy_(p, buf, c["-lr"])

    def _adagrad(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        s: dict[str, torch.Tensor],
        c: dict[str, Coefficient],
    ) -> None:
        if not s:
            s["sum"] = torch.zeros_like(p)
        s["sum"].addcmul_(g, g)
        std = _sqrt(s["sum"]).add_(c["eps"])
        _addcdiv_(p, g, std, c["-clr"])

    def _adadelta(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        s: dict[str, torch.Tensor],
        c: dict[str, Coefficient],
    ) -> None:
        if not s:
            s["sq"], s["acc"] = torch.zeros_like(p), torch.zeros_like(p)
        sq, acc = s["sq"], s["acc"]
        _addcmul_(sq.mul_(c["rho"]), g, g, c["1-rho"])
        std = sq.add(c["eps"]).sqrt_()
        delta = acc.add(c["eps"]).sqrt_().div_(std).mul_(g)
        _addcmul_(acc.mul_(c["rho"]), delta, delta, c["1-rho"])
        _axpy_(p, delta, c["-lr"])


class MixedOptimizer:
    """Members with different optimizers in one fused model: a FusedOptimizer per
    optimizer, each updating its members' rows of the stacked parameters in place
    through a slice. The members of one optimizer must be side by side (train_packed
    orders them so); dropping members keeps them so."""

    def __init__(self, configs: Sequence[TrialConfig], params: Sequence[torch.Tensor]) -> None:
        names = [c.optimizer for c in configs]
        self.parts: list[tuple[list[int], FusedOptimizer]] = []
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            if rows != list(range(rows[0], rows[-1] + 1)):
                raise ValueError("MixedOptimizer needs each optimizer's members side by side")
            self.parts.append((rows, FusedOptimizer(name, [configs[i] for i in rows], params)))
        self.device = params[0].device
        self.k = len(configs)

    def _per_member(self, attr: str) -> list[float]:
        out = [0.0] * self.k
        for rows, opt in self.parts:
            for row, value in zip(rows, getattr(opt, attr), strict=True):
                out[row] = value
        return out

    @property
    def base_lrs(self) -> list[float]:
        return self._per_member("base_lrs")

    @property
    def lrs(self) -> list[float]:
        return self._per_member("lrs")

    def set_lrs(self, lrs: Sequence[float]) -> None:
        for rows, opt in self.parts:
            opt.set_lrs([lrs[i] for i in rows])

    def plan(self, steps: int) -> None:
        for _, opt in self.parts:
            opt.plan(steps)

    def keep(self, index: torch.Tensor) -> None:
        position = {old: new for new, old in enumerate(index.tolist())}
        parts = []
        for rows, opt in self.parts:
            local = [j for j, row in enumerate(rows) if row in position]
            if local:
                opt.keep(torch.tensor(local, device=self.device))
                parts.append(([position[rows[j]] for j in local], opt))
        self.parts = parts
        self.k = len(position)

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        if len(self.parts) == 1:
            self.parts[0][1].step(params, grads)
            return
        for rows, opt in self.parts:
            part = slice(rows[0], rows[-1] + 1)
            opt.step([p[part] for p in params], [g[part] for g in grads])


# --------------------------------------------------------------------------- the loop


@dataclass
class PackedResult(TrainResult):
    """A member's TrainResult, plus its weights at the best epoch (state-dict form)."""

    best_state: dict[str, torch.Tensor] | None = None
    group_size: int = 1


@dataclass
class _Member:
    config: TrialConfig
    hook: EpochHook | None
    perm_generator: torch.Generator
    history: list[dict[str, float]] = field(default_factory=list)
    tracked: list[float] = field(default_factory=list)
    best_value: float = math.inf
    best_epoch: int = 0
    waited: int = 0
    first_loss: float | None = None
    best_row: torch.Tensor | None = None  # its row of FusedMLP.flat at its best epoch
    keys: list[tuple[str, str]] = field(default_factory=list)  # its state dict's keys


def train_packed(
    configs: Sequence[TrialConfig],
    data: DeviceData,
    *,
    objective: str = "val_loss",
    patience: int = 0,
    on_epoch: Sequence[EpochHook | None] | None = None,
    keep_state: bool = True,
    _rank: Sequence[int] | None = None,
) -> list[PackedResult | Exception]:
    """Train compatible ``configs`` (see ``group_key``) as one fused model.

    ``on_epoch[m](epoch, metrics)`` is member m's hook, as in ``training.train`` (it may
    raise, e.g. TrialPruned, to end that member); each epoch the hooks run in the order of
    ``configs`` (a pruner may compare a member with the ones before it: _PackPruner).
    Returns per member its PackedResult, or the exception that ended it (TrialDiverged,
    TrialPruned, ...). A BaseException that is not an Exception (a stop signal) ends the
    whole group and propagates."""
    if not configs:
        return []
    keys = {group_key(c) for c in configs}
    if None in keys or len(keys) != 1:
        raise ValueError("train_packed needs configurations that share one group_key")
    first = configs[0]
    device = data.X_train.device
    table = (
        FUSED_CLASSIFICATION_LOSSES if data.task == "classification" else FUSED_REGRESSION_LOSSES
    )
    loss_fn = table[first.loss]
    hooks = list(on_epoch) if on_epoch is not None else [None] * len(configs)
    order = sorted(range(len(configs)), key=lambda i: configs[i].optimizer)
    if order != list(range(len(configs))):
        # Members of one optimizer side by side: each optimizer then updates a slice of
        # the stacked parameters in place (MixedOptimizer). Members are independent, so
        # the order changes nothing else; results come back in the caller's order.
        ordered = train_packed(
            [configs[i] for i in order],
            data,
            objective=objective,
            patience=patience,
            on_epoch=[hooks[i] for i in order],
            keep_state=keep_state,
            _rank=order,
        )
        back: list[PackedResult | Exception] = [RuntimeError("unset")] * len(configs)
        for position, i in enumerate(order):
            back[i] = ordered[position]
        return back
    rank = list(_rank) if _rank is not None else list(range(len(configs)))
    members = [
        _Member(c, hook, torch.Generator().manual_seed(c.seed))
        for c, hook in zip(configs, hooks, strict=True)
    ]
    model = FusedMLP(configs, data.input_shape, data.n_outputs, device)
    for member, names in zip(members, model.keys, strict=True):
        member.keys = names
    optimizer = MixedOptimizer(configs, [model.flat])
    results: list[PackedResult | Exception | None] = [None] * len(configs)
    alive = list(range(len(configs)))  # original indices of the members still training
    n_params = list(model.n_params)
    watch = objective if objective.startswith("val_") else "val_loss"
    started = time.perf_counter()
    n = data.X_train.shape[0]
    bs = first.batch_size
    for epoch in range(first.epochs):
        live = [members[i] for i in alive]
        optimizer.set_lrs(
            [
                scheduled_lr(m.config, epoch, base, m.tracked)
                for m, base in zip(live, optimizer.base_lrs, strict=True)
            ]
        )
        train_loss = _run_fused_epoch(model, optimizer, loss_fn, data, live, n, bs)
        measured = compute_metrics_stacked(
            _validate(model, data), data.y_val, data.task, data.n_outputs, data.y_std, turned=True
        )
        ended: set[int] = set()
        improved: list[int] = []
        # The hooks in the caller's order of the members (see _rank), not the optimizers'.
        in_order = sorted(enumerate(alive), key=lambda ri: rank[ri[1]])
        for row, index in in_order:
            member = members[index]
            try:
                metrics = _epoch_metrics(measured[row], train_loss[row], epoch, member)
                metrics["lr"] = optimizer.lrs[row]
                member.history.append(metrics)
                value = objective_value(metrics, watch)
                member.tracked.append(value)
                if value < member.best_value:
                    member.best_value, member.best_epoch, member.waited = value, epoch, 0
                    improved.append(row)
                else:
                    member.waited += 1
                if member.hook is not None:
                    member.hook(epoch, metrics)
            except Exception as exc:  # pruned, diverged, or the hook failed: this member ends
                results[index] = exc
                ended.add(index)
                continue
            if patience and member.waited >= patience:
                ended.add(index)
        if keep_state and improved:  # the improved members' weights, in one copy
            improved.sort()  # rows (the hooks ran in the caller's order): row i is saved[i]
            everyone = len(improved) == len(alive)
            saved = (
                model.flat.clone()
                if everyone
                else model.flat[torch.tensor(improved, device=device)]
            )
            for position, row in enumerate(improved):
                members[alive[row]].best_row = saved[position]
        for index in ended:
            if results[index] is None:  # stopped early (the others ended by an exception)
                results[index] = _result(
                    members[index], model, n_params[index], started, len(configs), stopped=True
                )
        if ended:
            rows = [row for row, index in enumerate(alive) if index not in ended]
            alive = [alive[row] for row in rows]
            if not alive:
                break
            keep = torch.tensor(rows, dtype=torch.long, device=device)
            model.keep(keep)
            optimizer.keep(keep)
    for index in alive:
        results[index] = _result(
            members[index], model, n_params[index], started, len(configs), stopped=False
        )
    return [r if r is not None else RuntimeError("member did not finish") for r in results]


@torch.inference_mode()  # a tenth cheaper a step than no_grad (no version counters)
def _run_fused_epoch(
    model: FusedMLP,
    optimizer: MixedOptimizer,
    loss_fn: FusedLoss,
    data: DeviceData,
    live: Sequence[_Member],
    n: int,
    bs: int,
) -> list[float]:
    """One epoch of every live member; each member's mean training loss."""
    device = data.X_train.device
    perms = torch.stack([torch.randperm(n, generator=m.perm_generator) for m in live]).to(device)
    configs = [m.config for m in live]
    dropouts = [c.dropout for c in configs]
    noises = [c.noise_std for c in configs]
    l1 = torch.tensor([c.l1 for c in configs], dtype=data.X_train.dtype, device=device)
    use_l1 = bool(l1.any())
    loss_params = configs[0].loss_params
    objectives: list[torch.Tensor] = []  # each step's, summed at the end (one op, not one a step)
    ahead = _EpochMasks(model, dropouts, noises, n, bs)
    optimizer.plan(-(-n // bs))
    noise_scale = None
    if any(noises) and device.type not in EXACT_STREAMS:
        noise_scale = torch.tensor(noises, dtype=data.X_train.dtype).view(-1, 1, 1).to(device)
    params, grads = [model.flat], [model.flat_grad]
    for step, (x, y) in enumerate(_batches(data, perms, bs, model.buffers)):
        b = x.shape[1]
        if noise_scale is not None:
            x = x + noise_scale * torch.randn(
                x.shape, generator=model.group_generator, device=device, dtype=x.dtype
            )
        elif any(noises):
            x = x + _member_noise(model, noises, x)
        masks = ahead.masks(step, b)
        out, saved = model.forward_train(x, masks)
        losses, grad_out = loss_fn(out, y, loss_params)
        objective = losses
        if use_l1:
            objective = losses + l1 * model.weight_l1()
        model.backward(saved, grad_out, l1 if use_l1 else None)
        optimizer.step(params, grads)
        objectives.append(objective)  # with the L1 term, as the sequential loss
    if not objectives:
        return [0.0] * len(live)
    return (torch.stack(objectives).sum(dim=0) / len(objectives)).tolist()


# The most bytes of gathered training rows held at once (see _batches).
GATHER_BYTES = 16 * 2**20


def _batches(
    data: DeviceData, perms: torch.Tensor, bs: int, buffers: dict[str, torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each member's batches of an epoch in the order of its permutation (``perms`` is
    (K, n)), as (K, b, F) inputs and (K, b, ...) targets.

    The rows of many steps are gathered in one ``index_select`` (a tenth of the time of
    ``X_train[idx]``), at most GATHER_BYTES of them at once, into reused ``buffers``, and
    each step takes a view: gathered a step at a time, the random reads of a narrow
    group's rows cost it a tenth of its epoch (the batched products read the strided
    views as fast as contiguous ones)."""
    k, n = perms.shape
    row_bytes = k * data.X_train[0].numel() * data.X_train.element_size()
    span = max(bs, GATHER_BYTES // max(row_bytes, 1) // bs * bs)
    for first in range(0, n, span):
        rows = perms[:, first : first + span]
        width = rows.shape[1]
        flat = rows.reshape(-1)
        gathered = []
        for key, source in (("x", data.X_train), ("y", data.y_train)):
            out = _reused(buffers, key, (flat.numel(), *source.shape[1:]), source)
            gathered.append(torch.index_select(source, 0, flat, out=out))
        xs = gathered[0].view(k, width, -1)
        ys = gathered[1].view(k, width, *data.y_train.shape[1:])
        # Every step's views in two calls, not two slicings a step.
        yield from zip(xs.split(bs, dim=1), ys.split(bs, dim=1), strict=True)


def _member_noise(model: FusedMLP, noises: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """Gaussian input noise, each member from its own generator (sequential order)."""
    rows = []
    for m, std in enumerate(noises):
        if std > 0:
            draw = torch.randn(x.shape[1:], generator=model.generators[m], device=x.device)
            rows.append(std * draw)
        else:
            rows.append(torch.zeros(x.shape[1:], device=x.device, dtype=x.dtype))
    return torch.stack(rows)


class _EpochMasks:
    """An epoch's dropout masks, drawn many steps at a time.

    A member's dropout generator is used for nothing else when it has no input noise, so
    its masks for a run of full batches can be drawn in one call: the same random stream,
    split into the same per-step, per-layer pieces as one draw a step gives (and as the
    sequential path draws them). That is one draw per member per chunk of steps instead
    of five tensor operations per member per step, a third of a narrow fused group's step.
    Members with input noise (whose generator alternates noise and dropout draws) and the
    last, shorter batch draw step by step as before.

    On devices outside EXACT_STREAMS the whole group's masks for a run of steps come from
    one draw of the group's generator, each member's rate and width applied by
    broadcasting: the same distribution, not the same draws as alone."""

    CHUNK_BYTES = 32 * 2**20  # the largest block of masks held at once

    def __init__(
        self,
        model: FusedMLP,
        dropouts: Sequence[float],
        noises: Sequence[float],
        n: int,
        bs: int,
    ) -> None:
        self.model = model
        self.dropouts = list(dropouts)
        self.any = any(p > 0 for p in dropouts)
        weight = model.flat
        self.shared = weight.device.type not in EXACT_STREAMS
        # Members whose generator alternates noise and dropout draws (never with the
        # group's generator): drawn step by step.
        self.stepwise = [
            m
            for m, (p, s) in enumerate(zip(dropouts, noises, strict=True))
            if p > 0 and s > 0 and not self.shared
        ]
        self.bs = bs
        self.n_full = n // bs
        per_step = model.n_layers * len(dropouts) * bs * model.width * weight.element_size()
        self.chunk = max(1, min(self.n_full, self.CHUNK_BYTES // max(per_step, 1)))
        self.block: list[list[torch.Tensor]] | None = None
        self.block_tensor: torch.Tensor | None = None
        self.block_start = -1
        if self.shared and self.any:
            k, width = len(self.dropouts), model.width
            thresholds = torch.tensor([keep_threshold(p) for p in self.dropouts])
            self.threshold = thresholds.view(1, 1, k, 1, 1).to(weight.device)
            scale = torch.zeros(k, width, dtype=weight.dtype)
            for m, p in enumerate(self.dropouts):
                scale[m, : model.widths[m]] = 1 / (1 - p)
            self.scale = scale.view(1, 1, k, 1, width).to(weight.device)

    def masks(self, step: int, b: int) -> list[torch.Tensor | None]:
        """Per hidden layer a (K, b, width) mask scaled by 1/(1-p), each member's drawn
        from its own generator exactly as models.Dropout draws it alone; None without
        dropout."""
        if not self.any:
            return [None] * self.model.n_layers
        if step >= self.n_full:  # the last, shorter batch: every member draws now
            return list(self._draw(1, b, stepwise=False)[0].unbind(0))
        if self.block is None or not (
            self.block_start <= step < self.block_start + len(self.block)
        ):
            self.block_start = step
            block = self._draw(min(self.chunk, self.n_full - step), self.bs, stepwise=True)
            # Each step's per-layer views, made for the whole block at once.
            self.block = [list(layers.unbind(0)) for layers in block.unbind(0)]
            self.block_tensor = block
        masks: list[torch.Tensor | None] = list(self.block[step - self.block_start])
        if self.stepwise and self.block_tensor is not None:
            whole = self.block_tensor[step - self.block_start]  # (n_layers, K, b, width)
            for m in self.stepwise:
                self._fill(whole[:, m].unsqueeze(0), m, 1, self.bs)
        return masks

    def _draw(self, steps: int, b: int, *, stepwise: bool) -> torch.Tensor:
        """Masks of ``steps`` batches of ``b`` rows, (steps, n_layers, K, b, width): padded
        units zero; with ``stepwise`` the units of the members in ``self.stepwise`` are
        left to the caller (who draws them step by step)."""
        model = self.model
        weight = model.flat
        width = model.width
        shape = (steps, model.n_layers, len(self.dropouts), b, width)
        if self.shared:
            bits = random_bits(shape, device=weight.device, generator=model.group_generator)
            return (bits < self.threshold).to(weight.dtype) * self.scale
        block = _reused(model.buffers, "masks", shape, weight)  # one for the whole training
        for m, p in enumerate(self.dropouts):  # every value of the block written once
            w = model.widths[m]
            if w < width:
                block[:, :, m, :, w:] = 0.0
            if p <= 0:
                block[:, :, m, :, :w] = 1.0
            elif not (stepwise and m in self.stepwise):
                self._fill(block[:, :, m], m, steps, b)
        return block

    def _fill(self, out: torch.Tensor, m: int, steps: int, b: int) -> None:
        """Draw member ``m``'s masks for ``steps`` batches of ``b`` rows into
        ``out[..., :w]`` (shaped (steps, n_layers, b, width)): one draw, the same stream
        as ``steps`` draws of one step each, layer after layer."""
        model, p = self.model, self.dropouts[m]
        w = model.widths[m]
        count = b * w
        words = (count + 3) // 4
        # models.dropout_mask's draw and values, written straight into ``out``.
        bits = random_bits(
            (steps, model.n_layers, words * 4),
            device=model.flat.device,
            generator=model.generators[m],
        )
        # The comparison writes 0/1 floats straight into the block, then scaled in
        # place: a third of the time of a boolean mask multiplied into it (which went
        # through a temporary and a copy), a fifth of a wide group's epoch.
        target = out[..., :w]
        torch.lt(bits[..., :count].reshape(target.shape), keep_threshold(p), out=target)
        target.mul_(1 / (1 - p))


# The most hidden values (members x rows x width) a fused group evaluates in one pass.
EVAL_ACTIVATIONS = 2**26


@torch.no_grad()
def _validate(model: FusedMLP, data: DeviceData) -> torch.Tensor:
    """Every member's (K, C, B) validation outputs; a large validation set a block of
    rows at a time (each block holds K members' activations: it shrinks as K grows)."""
    x = data.X_val.reshape(data.X_val.shape[0], -1)
    rows = max(256, EVAL_ACTIVATIONS // (model.flat.shape[0] * model.width))
    return forward_in_chunks(model.forward, x, dim=2, rows=rows)


def _epoch_metrics(
    metrics: dict[str, float], train_loss: float, epoch: int, member: _Member
) -> dict[str, float]:
    """The member's epoch metrics, with the sequential path's NaN/explosion guards."""
    if not math.isfinite(train_loss):
        raise TrialDiverged(f"training loss became {train_loss} at epoch {epoch + 1}")
    if member.first_loss is None:
        member.first_loss = train_loss
    elif train_loss > 1e4 * max(member.first_loss, 1e-3):
        raise TrialDiverged(
            f"training loss exploded to {train_loss:.3g} at epoch {epoch + 1} "
            f"(from {member.first_loss:.3g})"
        )
    if not all(math.isfinite(v) for v in metrics.values()):
        raise TrialDiverged(f"validation metrics became non-finite at epoch {epoch + 1}")
    metrics["train_loss"] = train_loss
    return metrics


def _result(
    member: _Member, model: FusedMLP, n_params: int, started: float, size: int, *, stopped: bool
) -> PackedResult:
    # A member's share of the group's time: what it cost, amortised over the group.
    seconds = (time.perf_counter() - started) / size
    best = dict(member.history[member.best_epoch])
    best["n_params"] = float(n_params)
    best["train_seconds"] = seconds
    return PackedResult(
        metrics=best,
        history=member.history,
        epochs_run=len(member.history),
        best_epoch=member.best_epoch,
        n_params=n_params,
        train_seconds=seconds,
        stopped_early=stopped,
        best_state=(
            None
            if member.best_row is None
            else model.row_state(member.best_row, member.keys, member.config.hidden_units)
        ),
        group_size=size,
    )


# --------------------------------------------------------------------------- the run loop


def run_packed(run: Any) -> None:
    """The packed trial loop of ``studies.run_study`` (``--pack K``): ask up to K trials,
    train each compatible group fused and the rest one by one, tell every trial."""
    from automl.lifecycle import Heartbeats, retry_history
    from automl.studies import _fail_stale_trials

    study = run.study
    pack = max(1, int(run.options.pack))
    while (reason := run.stop_reason()) is None:
        trials: list[optuna.Trial] = []
        try:
            with run.stopper.protected():
                _fail_stale_trials(study)
                _ask_pack(run, min(pack, _room(run)), trials)
                for trial in trials:
                    run.obs.trial_started(trial.number, trial.params)
            # Every asked trial is RUNNING from now on: its heartbeat starts now, not when
            # its group trains (a trial waiting for its turn had none, and after a kill
            # stayed RUNNING forever).
            with Heartbeats(study._storage, [t._trial_id for t in trials]):
                _train_pack(run, trials, retry_history)
        except BaseException:
            # A stop signal or a broken storage: no asked trial is left RUNNING (the ones
            # already told are skipped). One protected block, so that a signal does not
            # cut this bookkeeping short.
            with run.stopper.protected():
                for trial in trials:
                    _abandon(run, trial)
            raise
    run.summary.stop_reason = reason


def _train_pack(run: Any, trials: list[optuna.Trial], retry_history: Any) -> None:
    """Train asked trials: compatible ones fused, in pieces (pack_pieces), the rest (and
    retries, which resume their checkpoint) one by one; tell each. With helper processes
    (pack_pool), they train pieces while this process trains the rest."""
    from automl.studies import _run_trial

    pool = run.pack_pool
    processes = pool.processes if pool is not None else 1
    finished = run.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruner = run.study.pruner
    short = getattr(pruner, "_n_startup_trials", 0) - len(finished) if pack_pruning(pruner) else 0
    if processes > 1 and 0 < short < len(trials):
        # Too few finished trials to prune by (a new study's first pack): the first
        # ``short`` trials cannot be pruned, so they train first, shared out; then the
        # rest, judged against them (as they would be trained one after another).
        order = sorted(trials, key=lambda t: t.number)
        _train_pack(run, order[:short], retry_history)
        _train_pack(run, order[short:], retry_history)
        return
    configs = [run.objective.config_for(t, _original(t)) for t in trials]
    fusable = [not retry_history(t) for t in trials]
    data = run.objective.data
    pieces, alone = pack_pieces(configs, fusable, data, processes=processes)
    if pool is None or processes < 2:
        for piece in pieces:
            _run_group(run, [trials[i] for i in piece], [configs[i] for i in piece])
        for i in alone:
            run.count(_run_trial(run, trials[i]))
        return
    # Every piece is judged against the trials finished before the pack (and its own
    # earlier members), whichever process trains it and whenever: the same pruning
    # decisions however the pieces are shared out.
    from automl.pack_pool import make_job

    jobs = [  # (pieces come costliest first; the helpers take them in that order)
        make_job(key, [trials[i] for i in piece], [configs[i] for i in piece], run, finished)
        for key, piece in enumerate(pieces)
    ]
    with pool.session(jobs) as session:
        for i in alone:  # only this process trains these: first, while helpers take pieces
            run.count(_run_trial(run, trials[i]))
        for key, reply in session:  # reply None: train it here
            piece = pieces[key]
            members = [trials[i] for i in piece]
            _run_group(run, members, [configs[i] for i in piece], finished=finished, reply=reply)


def pack_pieces(
    configs: Sequence[TrialConfig],
    fusable: Sequence[bool],
    data: DeviceData,
    *,
    processes: int = 1,
) -> tuple[list[list[int]], list[int]]:
    """Indices of ``configs`` as fused pieces, most costly first (a piece of one member
    trains fused too: the fused loop is two to three times faster than the sequential
    one), and the ones to train one by one: those ``fusable`` marks False (retries, which
    resume a checkpoint) and those that cannot be fused. Groups of a shared structure are
    split by width (split_by_width); with several ``processes`` the costliest pieces are
    halved until the work can be shared out evenly."""
    indices = [i for i, f in enumerate(fusable) if f]
    groups, alone = group_configs([configs[i] for i in indices])
    n_features = math.prod(int(d) for d in data.input_shape)
    device = data.X_train.device.type
    pieces: list[list[int]] = []
    for group in groups:
        members = [indices[i] for i in group]
        parts = split_by_width([configs[i] for i in members], n_features, data.n_outputs, device)
        pieces.extend([members[i] for i in part] for part in parts)
    for i in alone:  # alone because it has no partner: fused on its own
        if group_key(configs[indices[i]]) is not None:
            pieces.append([indices[i]])
    in_pieces = {i for piece in pieces for i in piece}
    rest = sorted(i for i in range(len(configs)) if i not in in_pieces)
    n_rows = int(data.X_train.shape[0])

    def cost(piece: list[int]) -> float:
        return piece_cost([configs[i] for i in piece], n_features, data.n_outputs, n_rows)

    if processes > 1 and device == "cpu":
        pieces = _balance(pieces, cost, processes)
    # Members in the order they were asked (the order the pruner judges them in).
    return sorted((sorted(p) for p in pieces), key=cost, reverse=True), rest


def _balance(
    pieces: list[list[int]], cost: Callable[[list[int]], float], processes: int
) -> list[list[int]]:
    """Halve the costliest piece (members in width order, cut where the two halves cost
    most alike) while it costs more than an even share of the work among ``processes``
    and has two members or more; at most 4 pieces a process."""
    pieces = [list(p) for p in pieces]
    while pieces and len(pieces) < 4 * processes:
        total = sum(cost(p) for p in pieces)
        biggest = max(pieces, key=cost)
        if len(biggest) < 2 or cost(biggest) <= 1.05 * total / processes:
            break
        cut = min(
            range(1, len(biggest)),
            key=lambda c: max(cost(biggest[:c]), cost(biggest[c:])),
        )
        pieces.remove(biggest)
        pieces += [biggest[:cut], biggest[cut:]]
    return pieces


def piece_cost(
    configs: Sequence[TrialConfig], n_features: int, n_outputs: int, n_rows: int
) -> float:
    """Milliseconds (by the cost model of split_by_width) to train ``configs`` as one
    fused group padded to its widest member, every member for all its epochs."""
    first = configs[0]
    width = padded_width(max(c.hidden_units for c in configs))
    steps = -(-n_rows // first.batch_size) * first.epochs
    return steps * _step_ms(first, len(configs), width, n_features, n_outputs)


def _step_ms(
    config: TrialConfig, members: int, width: int, n_features: int, n_outputs: int
) -> float:
    """The cost model's milliseconds for one step of ``members`` fused members of
    ``config``'s depth and batch size, padded to ``width`` units."""
    per_row = n_features * width + (config.n_layers - 1) * width * width + width * n_outputs
    mflops = 6.0 * config.batch_size * per_row / 1e6  # forward and backward (3x) MACs (2x)
    return GROUP_MS + members * (MEMBER_MS + MS_PER_MFLOP * mflops)


# Searched names that decide a trial's group (group_key): a pack shares them.
STRUCTURE = ("n_layers", "batch_size", "loss", "activation", "epochs")


def _ask_pack(run: Any, k: int, trials: list[optuna.Trial]) -> None:
    """Ask ``k`` trials (into ``trials``) that can be fused: the sampler chooses the first
    trial freely; the other k-1 share its structure (depth, batch size, loss, activation;
    see STRUCTURE) and the sampler chooses the rest of each (widths, optimizer, learning
    rate, dropout, ...). Across packs the structure is searched like any parameter. A
    first trial that cannot be fused (a CNN, batch norm, ...) gets k-1 free companions,
    and so does every trial of a grid search: each trial is its own point of the grid
    (those that share a structure still fuse).

    The companions' structure is fixed by the sampler while their parameters are drawn
    (_StructureSampler), not by enqueuing them: an enqueued trial is a database write,
    and popping it a fresh read of all the study's trials (25 ms a trial at 64 trials,
    growing with the study), and another worker could pop it first."""
    study = run.study
    first = study.ask()
    trials.append(first)
    if k == 1:
        return
    # The pack's parameters are written together at the end (one transaction, not one a
    # trial); until then this process reads its trials from memory (storage_cache).
    write_all = getattr(study._storage, "flush_trials", None)
    flush = write_all is None
    config = run.objective.config_for(first, _original(first), flush=flush)
    if group_key(config) is None or isinstance(study.sampler, optuna.samplers.GridSampler):
        if write_all is not None:
            write_all([first._trial_id])
        for _ in range(k - 1):
            trials.append(study.ask())
        return
    loss_prefix = f"{config.loss}_"
    fixed = {
        name: value
        for name, value in first.params.items()
        if name in STRUCTURE or name.startswith(loss_prefix)
    }
    sampler = study.sampler
    study.sampler = _StructureSampler(fixed, sampler)
    try:
        for _ in range(k - 1):
            trial = study.ask()
            trials.append(trial)
            run.objective.config_for(trial, _original(trial), flush=flush)  # drawn now
    finally:
        study.sampler = sampler
        if write_all is not None:
            write_all([t._trial_id for t in trials])


class _StructureSampler(optuna.samplers.BaseSampler):
    """``base``, with the parameters in ``fixed`` set to their values, as an enqueued
    trial's are: the base sampler samples its relative search space whole (CMA-ES and
    GP keep one space across trials) and the fixed values replace what it chose."""

    def __init__(self, fixed: dict[str, Any], base: optuna.samplers.BaseSampler) -> None:
        self.fixed = fixed
        self.base = base

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        params = self.base.sample_relative(study, trial, search_space)
        return {**params, **{n: v for n, v in self.fixed.items() if n in search_space}}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        if param_name in self.fixed:
            return self.fixed[param_name]
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.base.after_trial(study, trial, state, values)


def _original(trial: optuna.Trial) -> int:
    from automl.lifecycle import original_number

    return original_number(trial)


def _room(run: Any) -> int:
    """How many more trials this call may start."""
    import os

    from optuna.trial import TrialState

    from automl.studies import n_finished
    from automl.workers import WORKERS_ENV

    opts = run.options
    room = []
    if opts.n_trials is not None:
        room.append(opts.n_trials - run.summary.n_run)
    if opts.until is not None:
        # Trials other workers are training count too: each worker sizing its pack from
        # the finished ones alone overshot --until by up to a pack each. (At least one:
        # a worker still moves, and the overshoot stays under the number of workers.)
        finished = n_finished(run.study, fresh=True)
        running = len(run.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        # Workers started together ask their packs at the same moment: each takes its
        # share of what is left.
        workers = os.environ.get(WORKERS_ENV, "1")
        share = int(workers) if workers.isdigit() and int(workers) > 0 else 1
        room.append(-(-(opts.until - finished - running) // share))
    elif run.target is not None:
        room.append(run.target - run.summary.n_run)
    return max(1, min(room)) if room else max(1, int(opts.pack))


def _run_group(
    run: Any,
    trials: Sequence[optuna.Trial],
    configs: Sequence[TrialConfig],
    *,
    finished: Sequence[optuna.trial.FrozenTrial] | None = None,
    reply: Sequence[MemberRecord] | None = None,
) -> None:
    """Train one fused group and tell each member's trial its own end; or, with
    ``reply``, take what a helper process recorded training it (pack_pool) and tell the
    same as if it had trained here: each epoch reported, each pruning decision repeated.

    The members come in the order they were asked (pack_pieces): each epoch they report,
    and the pruner judges them, in that order, as if they had trained one after another
    (_PackPruner). ``finished``: the trials the pruner compares with (with the members
    before each); None for the study's finished trials as they are now."""
    from automl.checkpoints import Checkpointer

    objective = run.objective
    hooks = [objective.epoch_hook(t, c) for t, c in zip(trials, configs, strict=True)]
    study = run.study
    pruner = study.pruner
    if reply is not None:
        study.pruner = _Replayed(pruner, trials, reply)
    elif pack_pruning(pruner):
        direction = study.direction if len(study.directions) == 1 else None
        study.pruner = _PackPruner(pruner, trials, finished=finished, direction=direction)
    try:  # (the members' heartbeats are run_packed's, for the whole pack)
        if reply is not None:
            results: Sequence[PackedResult | BaseException] = [
                _replay(record, hook) for record, hook in zip(reply, hooks, strict=True)
            ]
        else:
            results = train_packed(
                configs,
                objective.data,
                objective=objective.space.objectives[0],
                patience=objective.space.train.patience,
                on_epoch=hooks,
            )
    except Exception as exc:  # the group as a whole failed: every member fails
        first = (str(exc).splitlines() or [""])[0][:200]
        results = [exc] * len(trials)
        log.debug("fused group failed: %s", first, exc_info=True)
    finally:
        study.pruner = pruner
    # Every member is told before a signal (deferred to the block's end) or the failure
    # limit (run.count) may stop the run.
    told = []
    with run.stopper.protected():
        for trial, config, result in zip(trials, configs, results, strict=True):
            checkpoint = Checkpointer(run.checkpoint_dir, trial.number)
            outcome = _outcome(run, trial, config, result, checkpoint)
            told.append(_tell_member(run, trial, checkpoint, outcome))
    for frozen in told:
        run.count(frozen)


# --------------------------------------------------------------------------- pack pruning


def pack_pruning(pruner: optuna.pruners.BasePruner) -> bool:
    """Whether ``pruner`` judges a trial by the finished trials' values at each step (the
    percentile and median pruners): _PackPruner then counts a group's earlier members."""
    return isinstance(pruner, optuna.pruners.PercentilePruner)


class _PackPruner(optuna.pruners.BasePruner):
    """The study's percentile (or median) pruner for the members of one fused group.

    Optuna's percentile pruner compares a trial, at each step, with the trials already
    *finished* at that step. The members of a group train side by side, so none of them
    has finished while the others train: a study's first group trained unpruned (there
    was nothing to compare with), and the weak trials it finished lowered the median that
    every later trial was held to, so that later groups hardly pruned either (a 64-trial
    ``--pack 8`` search trained 509 epochs, against 343 one trial at a time).

    Here a member is judged as if the group had trained one after another, in the order
    its trials were asked: against the finished trials *and* the members asked before it
    that are still training (they have reported this step and were not pruned), which
    would have finished before it started. The base pruner's own settings (startup
    trials, warm-up steps, interval, percentile) apply unchanged.

    ``finished``: the finished trials to compare with (a snapshot taken when the pack
    started, so that a piece is judged alike in whichever process trains it); None for
    the study's own, as they are at each step. ``direction``: the study's."""

    def __init__(
        self,
        base: optuna.pruners.BasePruner,
        trials: Sequence[optuna.Trial | optuna.trial.FrozenTrial],
        *,
        finished: Sequence[optuna.trial.FrozenTrial] | None = None,
        direction: optuna.study.StudyDirection | None = None,
    ) -> None:
        self.base = base
        self.numbers = {t._trial_id: t.number for t in trials}
        self.finished = None if finished is None else list(finished)
        self.direction = direction
        # Each member's latest frozen trial (what Trial.should_prune passes), and the
        # members pruned so far.
        self.latest: dict[int, optuna.trial.FrozenTrial] = {}
        self.pruned: set[int] = set()

    def prune(self, study: Any, trial: optuna.trial.FrozenTrial) -> bool:
        number = self.numbers.get(trial._trial_id)
        if number is None:
            return self.base.prune(study, trial)
        self.latest[trial._trial_id] = trial
        earlier = [
            frozen
            for trial_id, frozen in self.latest.items()
            if self.numbers[trial_id] < number and trial_id not in self.pruned
        ]
        view = _PackView(study, self.finished, earlier, self.direction)
        decision = bool(self.base.prune(view, trial))  # type: ignore[arg-type]
        if decision:
            self.pruned.add(trial._trial_id)
        return decision


class _PackView:
    """What a percentile pruner reads of a study (``get_trials`` of finished trials,
    ``direction``) for _PackPruner: the finished trials (``study``'s own when
    ``finished`` is None) and the group's ``earlier`` members."""

    def __init__(
        self,
        study: Any,
        finished: list[optuna.trial.FrozenTrial] | None,
        earlier: list[optuna.trial.FrozenTrial],
        direction: optuna.study.StudyDirection | None,
    ) -> None:
        self._study = study
        self._finished = finished
        self._earlier = earlier
        self._direction = direction

    @property
    def direction(self) -> optuna.study.StudyDirection:
        return self._direction if self._direction is not None else self._study.direction

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[optuna.trial.FrozenTrial]:
        if states is not None and TrialState.COMPLETE not in states:
            return [] if self._finished is not None else self._study.get_trials(deepcopy, states)
        if self._finished is None:
            finished = self._study.get_trials(deepcopy=deepcopy, states=states)
        else:
            finished = self._finished
        return [*finished, *self._earlier]


class _Replayed(optuna.pruners.BasePruner):
    """The pruning decisions a helper process took for a group's members (pack_pool),
    given again when their epochs are reported here: pruned at its recorded epoch."""

    def __init__(
        self,
        base: optuna.pruners.BasePruner,
        trials: Sequence[optuna.Trial],
        records: Sequence[MemberRecord],
    ) -> None:
        self.base = base
        self.pruned_at = {
            t._trial_id: len(r.history) - 1
            for t, r in zip(trials, records, strict=True)
            if r.kind == "pruned"
        }
        self.members = {t._trial_id for t in trials}

    def prune(self, study: Any, trial: optuna.trial.FrozenTrial) -> bool:
        if trial._trial_id not in self.members:
            return self.base.prune(study, trial)
        return trial.last_step is not None and trial.last_step == self.pruned_at.get(
            trial._trial_id
        )


def _replay(record: MemberRecord, hook: EpochHook) -> PackedResult | Exception:
    """A member's end as train_packed gives it, from a helper's ``record``: its epochs
    reported again through ``hook`` (which raises TrialPruned at a pruned epoch)."""
    try:
        for epoch, metrics in enumerate(record.history):
            hook(epoch, dict(metrics))
    except Exception as exc:
        return exc
    return record.outcome()


def _outcome(
    run: Any,
    trial: optuna.Trial,
    config: TrialConfig,
    result: PackedResult | BaseException,
    checkpoint: Any,
) -> tuple[Any, list[float] | None, str]:
    import optuna
    from optuna.trial import TrialState

    from automl.errors import AutomlError

    if isinstance(result, PackedResult):
        values = run.objective.finish(trial, config, result)
        if result.best_state is not None:
            # The state the sequential path's last checkpoint holds, in memory: the
            # study's best trial keeps its weights from it (checkpoints.keep_weights)
            # the same way, and no other member's is written to a file.
            checkpoint.final = {
                "epoch": result.epochs_run - 1,
                "model": result.best_state,
                "best_epoch": result.best_epoch,
            }
        return TrialState.COMPLETE, values, ""
    if isinstance(result, optuna.TrialPruned):
        return TrialState.PRUNED, None, str(result) or "pruned"
    if isinstance(result, TrialDiverged):
        return TrialState.PRUNED, None, f"diverged: {result}"
    if isinstance(result, AutomlError):
        raise result
    first = (str(result).splitlines() or [""])[0][:200]
    return TrialState.FAIL, None, f"{type(result).__name__}: {first}".rstrip(": ")


def _tell_member(
    run: Any, trial: optuna.Trial, checkpoint: Any, outcome: tuple[Any, list[float] | None, str]
) -> Any:
    from automl.studies import _tell

    return _tell(run, trial, checkpoint, outcome, interrupted=False)


def _abandon(run: Any, trial: optuna.Trial) -> None:
    """Tell an asked trial that never ran (or was cut off) as failed, queued for a retry."""
    from optuna.trial import TrialState

    from automl.checkpoints import Checkpointer

    try:
        state = run.study._storage.get_trial(trial._trial_id).state
    except Exception:  # the storage itself is gone: nothing more to record
        return
    if state.is_finished():
        return
    checkpoint = Checkpointer(run.checkpoint_dir, trial.number)
    with run.stopper.protected():
        _tell_member_interrupted(run, trial, checkpoint, (TrialState.FAIL, None, "interrupted"))
    # (studies._tell counts an interrupted trial; run.count's failure limit is not
    # applied, so that every asked trial is told.)


def _tell_member_interrupted(
    run: Any, trial: optuna.Trial, checkpoint: Any, outcome: tuple[Any, list[float] | None, str]
) -> Any:
    from automl.studies import _tell

    return _tell(run, trial, checkpoint, outcome, interrupted=True)
