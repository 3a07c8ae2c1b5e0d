"""Loss-weighting strategies: how per-task losses become the gradient that is applied.

Applied outside the methods (a method returns per-task losses; see mtpsl.methods.base), so any
method combines with any strategy. A strategy owns the backward pass because several of them
(GradNorm, MGDA, PCGrad, CAGrad) act on per-task gradients rather than on a weighted sum. A
strategy may hold learnable parameters (optimised with the model, or in its own optimiser
group) and must cope with a task absent from a batch: its loss is then an exact 0 that does
not depend on the parameters, and the strategy must neither divide by it nor let it disturb
its state.

Strategies: ``uniform`` (plain sum), ``uncertainty`` (Kendall et al. 2018), ``gradnorm``
(Chen et al. 2018), ``dwa`` (Liu et al. 2019), ``mgda`` (Sener & Koltun 2018), ``pcgrad``
(Yu et al. 2020), ``cagrad`` (Liu et al. 2021).

Gradient strategies (mgda, pcgrad, cagrad) take one gradient per present task with respect to
the model's shared parameters, reduce them to their T x T Gram matrix, and turn it into one
coefficient per task, so the applied shared gradient is ``sum_k alpha_k g_k`` (PCGrad's
projections and CAGrad's update are linear in the task gradients too). The remaining
parameters (task heads) and the method's ``extra`` terms get an ordinary backward pass. With no
shared parameters (single-task learning's separate networks) there is nothing to reconcile and
these strategies, like GradNorm, fall back to the plain sum.

Strategies that need to know which tasks are present read ``present`` on the host (one device
sync per step): an absent task's parameters are then left out of the graph, so their gradient
stays ``None`` and the optimiser (Adam's momentum included) does not move them.

Adding a strategy: subclass :class:`Weighting`, set ``Options`` if it takes any, register it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from .errors import ConfigError
from .optim import OptimGroup
from .registry import Registry

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Weighting(nn.Module):
    """Base class: a weighted sum (override :meth:`combine`) or a gradient rule (override
    :meth:`backward`)."""

    Options: ClassVar[type[BaseModel]] = NoOptions
    linear_in_losses: ClassVar[bool] = False
    """True when the gradient is linear in the task losses within a step (a fixed weighted
    sum), so scaling the losses by fp16's loss scale scales the gradient alike: only such
    strategies may run under ``train.amp=fp16``."""

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.options = options if options is not None else self.Options()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        shared: Sequence[nn.Parameter],
        present: Tensor,
    ) -> Tensor:
        """Backpropagate the training objective; return the (detached) total for logging.

        ``extra`` is the sum of the method's already-weighted extra terms (consistency,
        adversarial...); ``shared`` lists the parameters every task's loss flows through, in
        forward order (empty for single-task learning), for gradient-based strategies;
        ``present`` is bool ``[T]`` (``task_names`` order, on the device): which tasks have at
        least one labelled image in this batch.
        """
        return _backward(self.combine(task_losses) + extra)

    def end_epoch(self, task_means: Mapping[str, float]) -> None:
        """Hook called with each task's mean training loss over the epoch (DWA uses it)."""

    def optimizer_groups(self) -> list[OptimGroup]:
        """Groups with their own optimiser; parameters in none of them join the main group."""
        return []

    def _present_indices(self, present: Tensor) -> list[int]:
        """Indices of the present tasks (reads ``present`` on the host: one sync)."""
        return [i for i, flag in enumerate(present.tolist()) if flag]


def _backward(total: Tensor) -> Tensor:
    """Backward ``total`` when anything requires a gradient; return it detached."""
    if total.requires_grad:
        total.backward()
    return total.detach()


def _plain_sum(task_losses: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.stack([task_losses[t] for t in names]).sum()


def _weighted_sum(
    weights: Tensor, task_losses: Mapping[str, Tensor], names: Sequence[str]
) -> Tensor:
    """``sum_k weights[k] * L_k`` in ``names`` order."""
    return torch.stack([weights[i] * task_losses[t] for i, t in enumerate(names)]).sum()


@WEIGHTINGS.register("uniform")
class Uniform(Weighting):
    """Equal weights: the plain sum of the task losses (Eq. 1 of paper 001)."""

    linear_in_losses = True

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return _plain_sum(task_losses, self.task_names)


# --------------------------------------------------------------------------- uncertainty


class UncertaintyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    regulariser: Literal["half", "full"] = "half"
    """half: Kendall et al.'s ``s/2`` term (default); full: ``s`` as the TaskTransferNet code."""


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """Homoscedastic uncertainty (Kendall et al. 2018): ``sum_k 0.5 exp(-s_k) L_k + c s_k``.

    ``s_k`` is a learned log-variance per task (init 0, in the main optimiser group), ``c`` is
    1/2 (``half``, the paper's form; the optimum is ``s = log L``) or 1 (``full``, as in the
    TaskTransferNet code; optimum ``s = log(L / 2)``). An absent task contributes no term at
    all, so its ``s`` gets no gradient.
    """

    Options = UncertaintyOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.log_vars = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in self.task_names)
        self.reg = 0.5 if self.options.regulariser == "half" else 1.0

    def objective(self, task_losses: Mapping[str, Tensor], indices: Sequence[int]) -> Tensor:
        terms = [
            0.5 * torch.exp(-self.log_vars[i]) * task_losses[self.task_names[i]]
            + self.reg * self.log_vars[i]
            for i in indices
        ]
        return torch.stack(terms).sum() if terms else self.log_vars[0].new_zeros(()).detach()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return self.objective(task_losses, range(len(self.task_names)))

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        shared: Sequence[nn.Parameter],
        present: Tensor,
    ) -> Tensor:
        indices = self._present_indices(present)
        return _backward(self.objective(task_losses, indices) + extra)


# --------------------------------------------------------------------------- GradNorm


class GradNormOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    alpha: float = Field(default=0.16, ge=0.0)
    """Restoring-force strength (0.16 in the TaskTransferNet code)."""
    lr: float = Field(default=0.025, gt=0.0)
    """Learning rate of the weights' own Adam (constant, no schedule)."""


@WEIGHTINGS.register("gradnorm")
class GradNorm(Weighting):
    """GradNorm (Chen et al. 2018): learn task weights that balance gradient magnitudes.

    Per step, over the present tasks: ``G_k = ||d(w_k L_k)/dW||`` with ``W`` the last 4-d shared
    tensor (the last shared conv's weight), ``r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0))``
    with ``L_k(0)`` the task's first observed (present) loss, and
    ``L_grad = sum_k |G_k - detach(mean(G) r_k^alpha)|`` gives the weights' gradient; the model
    gets the gradient of ``sum_k w_k L_k`` (weights held constant). The weights' optimiser
    steps after this call returns, so the renormalisation to ``sum w = T`` happens at the
    start of the next call (:meth:`current_weights` shows the renormalised values). Absent
    tasks are left out of ``mean(G)`` and ``L_grad`` (their weight gets no gradient). Without
    a shared 4-d tensor (single-task learning) it is the plain weighted sum and nothing is
    learned.
    """

    Options = GradNormOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.weights = nn.ParameterList(nn.Parameter(torch.ones(())) for _ in self.task_names)
        n = len(self.task_names)
        self.register_buffer("initial_losses", torch.zeros(n))
        self.register_buffer("observed", torch.zeros(n, dtype=torch.bool))

    def optimizer_groups(self) -> list[OptimGroup]:
        return [
            OptimGroup(
                "gradnorm",
                list(self.weights),
                lr=self.options.lr,
                optimizer="adam",
                betas=(0.9, 0.999),
                schedule="step",
                gamma=1.0,
                weight_decay=0.0,
            )
        ]

    @torch.no_grad()
    def renormalise(self) -> None:
        """Rescale the weights to sum to the number of tasks."""
        total = torch.stack(list(self.weights)).sum()
        for w in self.weights:
            w.mul_(len(self.weights) / total)

    def current_weights(self) -> Tensor:
        """The weights as the next step will use them (renormalised)."""
        w = torch.stack([p.detach() for p in self.weights])
        return w * len(w) / w.sum()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return _weighted_sum(self.current_weights(), task_losses, self.task_names)

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        shared: Sequence[nn.Parameter],
        present: Tensor,
    ) -> Tensor:
        self.renormalise()
        losses = torch.stack([task_losses[t] for t in self.task_names])
        weights = torch.stack([p.detach() for p in self.weights])
        total = (weights * losses).sum() + extra
        layer = _last_conv_weight(shared)
        indices = self._present_indices(present)
        if layer is None or not indices:
            return _backward(total)
        self._observe(losses.detach(), present)
        grads = self._weight_gradients(losses, layer, indices)
        result = _backward(total)
        for i, g in zip(indices, grads, strict=True):
            self.weights[i].grad = g
        return result

    @torch.no_grad()
    def _observe(self, losses: Tensor, present: Tensor) -> None:
        """Record each task's first observed loss (device-side, no sync)."""
        first = present.to(losses.device) & ~self.observed
        self.initial_losses.copy_(torch.where(first, losses, self.initial_losses))
        self.observed |= first

    def _weight_gradients(self, losses: Tensor, layer: Tensor, indices: list[int]) -> tuple:
        norms = torch.stack(
            [
                _norm_or_zero(
                    torch.autograd.grad(losses[i], layer, retain_graph=True, allow_unused=True)[0],
                    layer,
                )
                for i in indices
            ]
        )
        params = [self.weights[i] for i in indices]
        g_norms = torch.stack(params).abs() * norms
        relative = losses.detach()[indices] / self.initial_losses[indices].clamp_min(1e-12)
        ratios = relative / relative.mean().clamp_min(1e-12)
        target = (g_norms.mean() * ratios.pow(self.options.alpha)).detach()
        return torch.autograd.grad((g_norms - target).abs().sum(), params)


def _last_conv_weight(shared: Sequence[nn.Parameter]) -> nn.Parameter | None:
    convs = [p for p in shared if p.dim() == 4 and p.requires_grad]
    return convs[-1] if convs else None


def _norm_or_zero(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad.detach().norm() if grad is not None else like.new_zeros(())


# --------------------------------------------------------------------------- DWA


class DWAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(default=2.0, gt=0.0)
    """Softmax temperature T (2 in MTAN)."""


@WEIGHTINGS.register("dwa")
class DWA(Weighting):
    """Dynamic Weight Average (Liu et al. 2019, MTAN): per-epoch weights from loss ratios.

    ``w_k = T_tasks * softmax_k(r_k / temperature)`` with ``r_k = L_k(e-1) / L_k(e-2)`` the
    ratio of the last two epochs' mean training losses; weight 1 for the first two epochs. A
    ratio that cannot be formed (a task with no loss in one of those epochs) counts as 1.
    """

    linear_in_losses = True  # the weights are fixed within an epoch

    Options = DWAOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        n = len(self.task_names)
        self.register_buffer("history", torch.full((2, n), float("nan")))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("lambdas", torch.ones(n))

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return _weighted_sum(self.lambdas, task_losses, self.task_names)

    @torch.no_grad()
    def end_epoch(self, task_means: Mapping[str, float]) -> None:
        row = [float(task_means.get(t, math.nan)) for t in self.task_names]
        self.history[0] = self.history[1].clone()
        self.history[1] = torch.tensor(row, device=self.history.device)
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            self.lambdas.copy_(
                dwa_weights(self.history[0], self.history[1], self.options.temperature)
            )


def dwa_weights(before: Tensor, last: Tensor, temperature: float) -> Tensor:
    """DWA's weights from two epochs' mean losses (invalid ratios count as 1)."""
    ratio = last / before
    ratio = torch.where(torch.isfinite(ratio) & (before > 0), ratio, torch.ones_like(ratio))
    return (len(ratio) * torch.softmax(ratio / temperature, dim=0)).float()


# --------------------------------------------------------------------------- gradient rules


class GradientWeighting(Weighting):
    """Base of strategies that combine per-task gradients of the shared parameters.

    Subclasses turn the Gram matrix of the present tasks' gradients into coefficients
    ``alpha`` (:meth:`coefficients`); the shared gradient becomes ``sum_k alpha_k g_k`` plus
    the gradient of ``extra``; the other parameters get the gradient of
    ``sum_k h_k L_k + extra`` with ``h = alpha`` if ``heads_follow`` else 1.
    """

    heads_follow: ClassVar[bool] = False

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return _plain_sum(task_losses, self.task_names)

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        shared: Sequence[nn.Parameter],
        present: Tensor,
    ) -> Tensor:
        params = [p for p in shared if p.requires_grad]
        indices = self._present_indices(present)
        if not params or not indices:
            return _backward(self.combine(task_losses) + extra)
        losses = [task_losses[self.task_names[i]] for i in indices]
        grads = torch.stack([_flat_grad(loss, params) for loss in losses])
        gram = (grads @ grads.T).double().cpu().numpy()
        values = torch.stack(losses).detach().double().cpu().numpy()
        alpha = torch.as_tensor(
            self.coefficients(gram, values), dtype=grads.dtype, device=grads.device
        )
        heads = alpha if self.heads_follow else torch.ones_like(alpha)
        total = (heads * torch.stack(losses)).sum() + extra
        total.backward()
        if not torch.equal(alpha, heads):
            _add_to_grads(params, (alpha - heads) @ grads)
        return total.detach()


def _flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


@torch.no_grad()
def _add_to_grads(params: Sequence[nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        piece = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)


class MGDAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    normalisation: Literal["none", "l2", "loss", "loss+"] = "none"
    """Gradient normaliser before the min-norm solve, as Sener & Koltun's code: none, the
    gradient's l2 norm, the loss value, or loss times l2 norm."""


@WEIGHTINGS.register("mgda")
class MGDA(GradientWeighting):
    """MGDA (Sener & Koltun 2018): descend along the min-norm point of the task gradients.

    The weights ``alpha`` (on the simplex) minimise ``||sum_k alpha_k g_k / n_k||`` with
    ``n_k`` the normaliser; they then weight the raw losses, heads included, as the authors'
    code does. The gradients are taken with respect to the shared parameters (the exact
    problem; MGDA-UB's cheaper representation-level bound is not used, because a strategy sees
    parameters, not the encoder's output). Solved in closed form for two tasks and by
    Frank-Wolfe otherwise.
    """

    Options = MGDAOptions
    heads_follow = True

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        scale = {
            "none": np.ones_like(losses),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.options.normalisation]
        scale = np.maximum(scale, 1e-12)
        return min_norm_coefficients(gram / np.outer(scale, scale))


def _two_point(aa: float, ab: float, bb: float) -> float:
    """gamma in [0, 1] minimising ||gamma a + (1 - gamma) b||^2, from the inner products."""
    denom = aa - 2.0 * ab + bb
    if denom <= 1e-20:
        return 1.0
    return float(np.clip((bb - ab) / denom, 0.0, 1.0))


def min_norm_coefficients(gram: np.ndarray, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """The point of the simplex minimising ``w^T gram w`` (the min-norm convex combination).

    Exact for two vectors; otherwise Frank-Wolfe with exact line search, started from the best
    pair.
    """
    k = len(gram)
    w = np.zeros(k)
    if k == 1:
        return np.ones(1)
    best = math.inf
    for i in range(k):
        for j in range(i + 1, k):
            g = _two_point(gram[i, i], gram[i, j], gram[j, j])
            cost = g * g * gram[i, i] + 2 * g * (1 - g) * gram[i, j] + (1 - g) ** 2 * gram[j, j]
            if cost < best:
                best, w = cost, np.zeros(k)
                w[i], w[j] = g, 1.0 - g
    for _ in range(max_iter if k > 2 else 0):
        gw = gram @ w
        t = int(np.argmin(gw))
        gamma = _two_point(w @ gw, gw[t], gram[t, t])
        new = gamma * w
        new[t] += 1.0 - gamma
        if np.abs(new - w).sum() < tol:
            return new
        w = new
    return w


class PCGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = 0
    """Seed of the strategy's own generator for the projection orders."""


@WEIGHTINGS.register("pcgrad")
class PCGrad(GradientWeighting):
    """PCGrad (Yu et al. 2020): project away conflicting components, then sum.

    For each present task, its gradient is projected onto the normal plane of every other
    task's (original) gradient it conflicts with (negative dot product), in a random order
    drawn per task from the strategy's own generator; the projected gradients are summed.
    The generator's state is saved with the strategy (``state_dict``), so a resumed run draws
    the same orders. Task-specific parameters get the plain sum.
    """

    Options = PCGradOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.generator = torch.Generator().manual_seed(self.options.seed)

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state.cpu())

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        k = len(gram)
        orders = [torch.randperm(k, generator=self.generator).tolist() for _ in range(k)]
        return pcgrad_coefficients(gram, orders)


def pcgrad_coefficients(gram: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Coefficients of the summed projected gradients in the original ones.

    Row ``i`` of ``coef`` expresses task ``i``'s projected gradient; its dot product with
    ``g_j`` is ``coef[i] @ gram[:, j]``, so only the Gram matrix is needed.
    """
    k = len(gram)
    coef = np.eye(k)
    for i in range(k):
        for j in orders[i]:
            if j == i or gram[j, j] <= 0.0:
                continue
            dot = coef[i] @ gram[:, j]
            if dot < 0.0:
                coef[i, j] -= dot / gram[j, j]
    return coef.sum(0)


class CAGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    c: float = Field(default=0.4, ge=0.0)
    """Radius of the trust region around the mean gradient, relative to its norm."""
    rescale: Literal[0, 1, 2] = 1
    """Divide the update by 1 (0), 1 + c^2 (1, the authors' default) or 1 + c (2)."""


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientWeighting):
    """CAGrad (Liu et al. 2021): the update maximising the worst task's improvement near g0.

    With ``g0`` the mean gradient, the dual ``min_{w in simplex} g_w . g0 + c ||g0|| ||g_w||``
    (``g_w = sum_k w_k g_k``) is solved on the Gram matrix by projected gradient descent with
    backtracking; the update is ``(g0 + c ||g0|| g_w / ||g_w||) / rescale`` on the shared
    parameters. ``c = 0`` gives the mean gradient. Task-specific parameters get the plain sum.
    """

    Options = CAGradOptions

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return cagrad_coefficients(gram, self.options.c, self.options.rescale)


def cagrad_coefficients(gram: np.ndarray, c: float, rescale: int = 1) -> np.ndarray:
    """Coefficients of CAGrad's update in the task gradients (see :class:`CAGrad`)."""
    k = len(gram)
    mean = np.full(k, 1.0 / k)
    g0_norm = math.sqrt(max(gram.mean(), 0.0))
    radius = c * g0_norm
    w = cagrad_dual(gram, radius)
    gw_norm = math.sqrt(max(w @ gram @ w, 0.0))
    alpha = mean + radius / (gw_norm + 1e-8) * w
    return alpha / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]


def cagrad_dual(
    gram: np.ndarray, radius: float, max_iter: int = 500, tol: float = 1e-12
) -> np.ndarray:
    """argmin over the simplex of ``w^T gram b + radius sqrt(w^T gram w)``, b uniform."""
    k = len(gram)
    scale = float(np.trace(gram)) / k
    w = np.full(k, 1.0 / k)
    if scale <= 0.0 or radius == 0.0 or k == 1:
        return w
    a, r = gram / scale, radius / math.sqrt(scale)  # the objective scales by 1/scale
    linear = a @ w

    def value(x: np.ndarray) -> float:
        return float(x @ linear + r * math.sqrt(max(x @ a @ x, 0.0) + 1e-12))

    def grad(x: np.ndarray) -> np.ndarray:
        return linear + r * (a @ x) / math.sqrt(max(x @ a @ x, 0.0) + 1e-12)

    step, current = 1.0, value(w)
    for _ in range(max_iter):
        g = grad(w)
        while True:
            new = project_simplex(w - step * g)
            diff = new - w
            bound = current + g @ diff + diff @ diff / (2 * step)
            new_value = value(new)
            if new_value <= bound + 1e-15 or step < 1e-12:
                break
            step *= 0.5
        if diff @ diff < tol:
            return new
        w, current, step = new, new_value, step * 2.0
    return w


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    ks = np.arange(1, len(v) + 1)
    rho = ks[u - cumulative / ks > 0][-1]
    return np.maximum(v - cumulative[rho - 1] / rho, 0.0)


def build_weighting(
    name: str, task_names: Sequence[str], options: Mapping[str, Any] | None = None
) -> Weighting:
    """Registry lookup + option validation, with errors that name the config key."""
    try:
        cls = WEIGHTINGS.get(name)
    except KeyError as err:
        raise ConfigError(f"method.weighting: {err.args[0]}") from None
    try:
        parsed = cls.Options.model_validate(dict(options or {}))
    except ValidationError as err:
        details = "; ".join(
            f"method.weighting_options.{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in err.errors()
        )
        allowed = ", ".join(cls.Options.model_fields) or "(none)"
        raise ConfigError(f"{details} (weighting {name!r} accepts: {allowed})") from None
    return cls(task_names, parsed)
