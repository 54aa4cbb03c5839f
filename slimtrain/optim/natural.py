"""Natural GaLore: the inverse empirical Fisher applied to GaLore's low-rank gradient.

Das, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning",
arXiv:2410.16029 (2024), section "Natural Gradient Transform". With ``G = [vec(g_k), ...,
vec(g_{k-s+1})]`` the last ``s`` projected gradients (the current one included) as columns, the
empirical Fisher is ``F = lambda I + G G^T`` (no 1/s: the paper's and its code's definition) and
the direction handed to Adam is, by Woodbury's identity,

    g~ = F^{-1} g = (1/lambda) (g - G (lambda I + G^T G)^{-1} G^T g) = G (lambda I + G^T G)^{-1} e_k

(the last form since ``g`` is column ``k`` of ``G``; it avoids the first form's cancellation,
see ``woodbury_direction``), so only an ``s x s`` system is solved; ``F`` (d x d, d = numel of
the projected gradient) is never formed. A brief's ``(1/s) G G^T + lambda' I`` Fisher is the same direction times ``s``
with ``lambda = s * lambda'``; Adam is scale-invariant up to ``eps``, so only the ratio of
``lambda`` to the gradients' squared norm matters.

Memory: the history is ``s * d`` floats per projected matrix (fp32 for half-precision
parameters), i.e. ``s`` more copies of the low-rank gradient, next to GaLore-Adam's two moments
of ``d`` floats each. The paper's "no additional memory overhead" holds against AdamW's full-rank
state, not against GaLore: with ``s = 10`` the history is five times GaLore's moments.
"""

from __future__ import annotations

import torch
from torch import Tensor

NATURAL_DEFAULT_DAMPING = 1e-3  # the reference code's lambda


def check_natural_args(history, damping) -> None:
    """Errors name the argument and its allowed range."""
    if isinstance(history, bool) or not isinstance(history, int) or history < 0:
        raise ValueError(f"natural_history={history!r} must be an integer >= 0 (0 = plain GaLore; e.g. 10)")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise ValueError(f"natural_damping={damping!r} must be a number > 0 (Tikhonov lambda, e.g. 1e-3)")


def woodbury_direction(history: Tensor, index: int, damping: float) -> Tensor:
    """``(damping I + G G^T)^{-1} g`` for ``g = history[index]``, the history rows (s, d) being
    ``G``'s columns; returns a flat (d,) tensor in ``history``'s dtype.

    Because ``g`` is itself a column of ``G`` (``g = G e_index``), Woodbury's identity in its
    push-through form ``(lambda I + G G^T)^{-1} G = G (lambda I + G^T G)^{-1}`` gives

        g~ = G w,   (lambda I + G^T G) w = e_index   (an s x s solve)

    which equals the paper's ``(1/lambda)(g - G (lambda I + G^T G)^{-1} G^T g)`` but without its
    cancellation: when ``||g||^2 >> lambda`` (the usual case with lambda = 1e-3) the paper's form
    subtracts two nearly equal vectors and then divides by lambda, which in float32 loses every
    digit (``tests/test_natural_galore.py::test_float32_direction_is_accurate``). The s x s Gram
    matrix is formed in ``history``'s dtype and solved in float64 (cheap; its condition number is
    up to ``1 + ||G||^2 / lambda``), with LU so rounding that leaves it slightly indefinite still
    solves.
    """
    gram = (history @ history.T).double()  # (s, s)  G^T G
    gram.diagonal().add_(damping)
    e = torch.zeros(history.shape[0], 1, dtype=torch.float64, device=history.device)
    e[index] = 1.0
    w = torch.linalg.solve(gram, e).squeeze(1).to(history.dtype)  # (s,)
    return history.T @ w  # (d,)


def natural_gradient(grad: Tensor, history: Tensor, count: Tensor, damping: float) -> Tensor:
    """Push ``grad`` into the ring buffer ``history`` (s, d), advance ``count`` (gradients seen so
    far, a 0-d int64 tensor) and return the natural direction over the filled rows, shaped like
    ``grad`` in ``history``'s dtype (fp32 for half-precision gradients)."""
    s = history.shape[0]
    n = int(count)
    history[n % s].copy_(grad.reshape(-1))
    count += 1
    filled = history[: min(n + 1, s)]
    return woodbury_direction(filled, n % s, damping).view(grad.shape)
