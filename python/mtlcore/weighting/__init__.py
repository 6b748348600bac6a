"""Loss-weighting strategies for multi-task training, one small class each behind one interface.

Loss-based strategies (:class:`LossWeighting`) turn the per-task losses ``L [T]`` of a step
into the scalar that is back-propagated: ``total(L) = sum_i w_i L_i (+ regularisers)``.
Gradient-based strategies (:class:`GradientWeighting`) combine per-task gradients ``G [T, D]``
(by default with respect to the shared representation, see :class:`mtlcore.train.Trainer`)
into one gradient ``[D]`` and report the task weights they imply.

=============  ==========================================================================
name           strategy
=============  ==========================================================================
equal          w_i = 1
fixed          w_i given
uncertainty    learnable log-variances s_i: sum_i exp(-s_i) L_i + s_i (Kendall et al. 2018)
dwa            w = T softmax(r / temperature), r_i = L_i(e-1) / L_i(e-2) (Liu et al. 2019)
rlw            w = T softmax(normal noise), drawn every step (Lin et al. 2021)
famo           weights softmax(xi) on log-losses, xi adapted so that all losses fall at
               the same rate (Liu et al. 2023)
gradnorm       learnable w balancing the tasks' gradient norms (Chen et al. 2018)
pcgrad         projects away conflicting components (Yu et al. 2020)
mgda           min-norm point of the convex hull of the gradients (Sener & Koltun 2018)
cagrad         conflict-averse direction near the mean gradient (Liu et al. 2021)
=============  ==========================================================================

Use :func:`get` to build one by name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "DWA",
    "FAMO",
    "MGDA",
    "RLW",
    "STRATEGIES",
    "CAGrad",
    "Equal",
    "Fixed",
    "GradNorm",
    "GradientWeighting",
    "LossWeighting",
    "PCGrad",
    "Strategy",
    "Uncertainty",
    "get",
    "min_norm_point",
]


class Strategy(nn.Module):
    """What every strategy has: its number of tasks and whether it combines gradients."""

    gradient_based = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = int(num_tasks)


class LossWeighting(Strategy):
    """Base of the loss-based strategies: ``total(losses)`` per step, ``end_epoch(mean losses)``
    once per epoch, ``after_step(losses)`` after the optimizer step (FAMO)."""

    def weights(self, losses: Tensor) -> Tensor:
        """The task weights of this step (detached, ``[T]``)."""
        raise NotImplementedError

    def total(self, losses: Tensor) -> Tensor:
        return (self.weights(losses).to(losses) * losses).sum()

    def end_epoch(self, epoch_losses: Tensor) -> None:
        pass

    def after_step(self, losses: Tensor) -> None:
        pass


class Equal(LossWeighting):
    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones(self.num_tasks, device=losses.device)


class Fixed(LossWeighting):
    def __init__(self, num_tasks: int, weights) -> None:
        super().__init__(num_tasks)
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (num_tasks,) or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"fixed weights must be {num_tasks} finite values >= 0, got {w}")
        self.register_buffer("w", w)

    def weights(self, losses: Tensor) -> Tensor:
        return self.w


class Uncertainty(LossWeighting):
    """``sum_i exp(-s_i) L_i + s_i``, learnable ``s``: put ``parameters()`` in the optimizer."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def weights(self, losses: Tensor) -> Tensor:
        return torch.exp(-self.log_vars.detach())

    def total(self, losses: Tensor) -> Tensor:
        s = self.log_vars.to(losses)
        return (torch.exp(-s) * losses + s).sum()


class DWA(LossWeighting):
    """Dynamic weight average: equal weights for the first two epochs, then
    ``T softmax(r / temperature)`` with ``r_i`` the ratio of task i's last two epoch losses."""

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        self.temperature = float(temperature)
        self.register_buffer("history", torch.zeros(0, num_tasks))

    def weights(self, losses: Tensor) -> Tensor:
        if self.history.shape[0] < 2:
            return torch.ones(self.num_tasks, device=losses.device)
        r = self.history[-1] / self.history[-2].clamp(min=1e-12)
        return (self.num_tasks * torch.softmax(r / self.temperature, 0)).to(losses.device)

    def end_epoch(self, epoch_losses: Tensor) -> None:
        row = epoch_losses.detach().float().cpu().view(1, -1)
        self.history = torch.cat([self.history.cpu(), row])[-2:]


class RLW(LossWeighting):
    """Random loss weighting: ``T softmax(z)``, ``z ~ N(0, 1)`` drawn every step."""

    def __init__(self, num_tasks: int, seed: int = 0) -> None:
        super().__init__(num_tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def weights(self, losses: Tensor) -> Tensor:
        z = torch.randn(self.num_tasks, generator=self.generator)
        return (self.num_tasks * torch.softmax(z, 0)).to(losses.device)


class FAMO(LossWeighting):
    """Fast adaptive multitask optimisation: the step minimises ``sum_i z_i log L_i`` scaled by
    ``c = 1 / sum_i (z_i / L_i)`` (so the weight of task i on its raw loss is
    ``w_i = c z_i / L_i``), ``z = softmax(xi)``; after the step, ``xi`` moves against the
    tasks whose log-loss fell most: ``xi <- xi - lr (J^T (log L_before - log L_after) + decay xi)``
    with ``J`` the Jacobian of the softmax."""

    def __init__(self, num_tasks: int, lr: float = 0.025, decay: float = 1e-3) -> None:
        super().__init__(num_tasks)
        self.lr = float(lr)
        self.decay = float(decay)
        self.register_buffer("xi", torch.zeros(num_tasks))
        self._before: Tensor | None = None

    def weights(self, losses: Tensor) -> Tensor:
        z = torch.softmax(self.xi, 0).to(losses.device)
        inv = z / losses.detach().clamp(min=1e-8)
        return inv / inv.sum()

    def total(self, losses: Tensor) -> Tensor:
        self._before = losses.detach().float().clamp(min=1e-8).log()
        return super().total(losses)

    def after_step(self, losses: Tensor) -> None:
        # On the device of xi (the Trainer moves the strategy to its device): no host sync.
        if self._before is None:
            return
        xi = self.xi
        after = losses.detach().float().clamp(min=1e-8).log()
        delta = (self._before - after).to(xi.device)
        z = torch.softmax(xi, 0)
        jacobian = torch.diag(z) - torch.outer(z, z)
        self.xi = xi - self.lr * (jacobian.T @ delta + self.decay * xi)
        self._before = None


# ---------------------------------------------------------------------------------------------
# Gradient-based
# ---------------------------------------------------------------------------------------------


class GradientWeighting(Strategy):
    """Base of the gradient-based strategies: ``combine(grads [T, D], losses [T])`` returns
    the combined gradient ``[D]`` and the task weights ``[T]`` it corresponds to (what the
    task-specific heads are trained with)."""

    gradient_based = True

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto the probability simplex (sort-based)."""
    u, _ = torch.sort(v, descending=True)
    css = u.cumsum(0) - 1
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int((u - css / k > 0).nonzero().max())
    return (v - css[rho] / (rho + 1)).clamp(min=0)


def min_norm_point(grads: Tensor, iterations: int = 2000) -> Tensor:
    """The weights ``w`` on the simplex minimising ``|w^T G|`` (the min-norm point of the
    convex hull of the rows of ``G``), in float64 on the Gram matrix. Up to 10 rows: exact,
    by solving the equality-constrained problem on every support and keeping the best feasible
    one; beyond: projected gradient descent (step 1 / largest eigenvalue)."""
    g = grads.detach().double()
    t = g.shape[0]
    gram = g @ g.T
    if t == 1:
        return torch.ones(1, dtype=grads.dtype, device=grads.device)
    if t <= 10:
        best_value, best_w = float("inf"), None
        for mask in range(1, 1 << t):
            support = [i for i in range(t) if mask >> i & 1]
            m = gram[support][:, support]
            # min w^T M w with sum(w) = 1 on the support: w proportional to M^+ 1 (KKT).
            x = torch.linalg.pinv(m) @ torch.ones(len(support), dtype=g.dtype)
            total = float(x.sum())
            if abs(total) < 1e-15:
                continue
            w_s = x / total
            if (w_s < -1e-12).any():
                continue
            w = torch.zeros(t, dtype=g.dtype)
            w[support] = w_s.clamp(min=0)
            w = w / w.sum()
            value = float(w @ gram @ w)
            if value < best_value - 1e-15:
                best_value, best_w = value, w
        assert best_w is not None  # single rows are always feasible
        return best_w.to(grads)
    w = torch.full((t,), 1.0 / t, dtype=g.dtype)
    step = 1.0 / float(torch.linalg.eigvalsh(gram).max().clamp(min=1e-20))
    for _ in range(iterations):
        w = _project_simplex(w - step * (gram @ w))
    return w.to(grads)


class MGDA(GradientWeighting):
    """MGDA-UB: the min-norm convex combination of the task gradients (of the shared
    representation, the upper bound of Sener & Koltun). ``normalize`` rescales each gradient to
    unit norm first ("l2"), or by the loss ("loss"), or not ("none")."""

    def __init__(self, num_tasks: int, normalize: str = "none") -> None:
        super().__init__(num_tasks)
        if normalize not in ("none", "l2", "loss"):
            raise ValueError(f"normalize must be none, l2 or loss, got {normalize!r}")
        self.normalize = normalize

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        scale = torch.ones(grads.shape[0], device=grads.device, dtype=grads.dtype)
        if self.normalize == "l2":
            scale = 1 / grads.norm(dim=1).clamp(min=1e-12)
        elif self.normalize == "loss":
            scale = 1 / losses.detach().to(grads).clamp(min=1e-12)
        w = min_norm_point(grads * scale[:, None]) * scale
        return w @ grads, w


class PCGrad(GradientWeighting):
    """Projects each task gradient onto the normal plane of every other task gradient it
    conflicts with (negative inner product), in a random order per step, then sums them."""

    def __init__(self, num_tasks: int, seed: int = 0) -> None:
        super().__init__(num_tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        projected = grads.clone()
        t = grads.shape[0]
        for i in range(t):
            for j in torch.randperm(t, generator=self.generator).tolist():
                if j == i:
                    continue
                dot = projected[i] @ grads[j]
                if dot < 0:
                    projected[i] -= dot / grads[j].square().sum().clamp(min=1e-20) * grads[j]
        return projected.sum(0), torch.ones(t, device=grads.device, dtype=grads.dtype)


class CAGrad(GradientWeighting):
    """Conflict-averse gradient: with ``g0`` the mean gradient, ``w`` minimising
    ``g_w . g0 + c |g0| |g_w|`` on the simplex (``g_w = w^T G``), the direction
    ``g0 + c |g0| / |g_w| g_w``; ``c`` (default 0.5) bounds its distance from ``g0``."""

    def __init__(self, num_tasks: int, c: float = 0.5, iterations: int = 60) -> None:
        super().__init__(num_tasks)
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}")
        self.c = float(c)
        self.iterations = int(iterations)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        g = grads.double()
        t = g.shape[0]
        gram = g @ g.T
        g0_norm = float(gram.mean().clamp(min=0).sqrt())  # |mean of the rows|
        theta = torch.zeros(t, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=0.1)
        mean_w = torch.full((t,), 1.0 / t, dtype=torch.float64)
        with torch.enable_grad():
            for _ in range(self.iterations):
                w = torch.softmax(theta, 0)
                gw_g0 = w @ gram @ mean_w
                gw_norm = (w @ gram @ w).clamp(min=1e-20).sqrt()
                objective = gw_g0 + self.c * g0_norm * gw_norm
                opt.zero_grad()
                objective.backward()
                opt.step()
        w = torch.softmax(theta.detach(), 0)
        gw_norm = float((w @ gram @ w).clamp(min=1e-20).sqrt())
        coef = self.c * g0_norm / gw_norm
        weights = (mean_w + coef * w).to(grads)
        return weights @ grads, weights


class GradNorm(GradientWeighting):
    """GradNorm: weights ``w`` (summing to T) updated every step so that each task's weighted
    gradient norm ``w_i |g_i|`` approaches ``mean_j(w_j |g_j|) r_i^alpha``, ``r_i`` the task's
    loss ratio to its first loss relative to the mean ratio (gradient step of size ``lr`` on
    ``sum_i |w_i |g_i| - target_i|``, targets held constant)."""

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(num_tasks)
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.register_buffer("w", torch.ones(num_tasks))
        self.register_buffer("initial", torch.zeros(0))

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        # On the device of w (the Trainer moves the strategy to its device): no host sync.
        w = self.w
        losses = losses.detach().float().to(w.device)
        if self.initial.numel() == 0:
            self.initial = losses.clamp(min=1e-12)
        norms = grads.detach().float().norm(dim=1).to(w.device)
        weighted = w * norms
        ratio = losses / self.initial
        ratio = ratio / ratio.mean().clamp(min=1e-12)
        target = weighted.mean() * ratio.pow(self.alpha)
        w = (w - self.lr * torch.sign(weighted - target) * norms).clamp(min=0)
        w = w * self.num_tasks / w.sum().clamp(min=1e-12)
        self.w = w
        weights = w.to(grads)
        return weights @ grads, weights


STRATEGIES: dict[str, type[Strategy]] = {
    "equal": Equal,
    "fixed": Fixed,
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "rlw": RLW,
    "famo": FAMO,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "cagrad": CAGrad,
}


def get(name: str, num_tasks: int, **kwargs) -> LossWeighting | GradientWeighting:
    """The strategy ``name`` (a key of :data:`STRATEGIES`) for ``num_tasks`` tasks."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown weighting {name!r}; expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](num_tasks, **kwargs)
