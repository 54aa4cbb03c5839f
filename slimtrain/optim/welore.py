"""WeLore: one-shot, data-agnostic, non-uniform low-rank compression of a model's weights, and
the parameter groups to fine-tune only the low-rank components.

Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank
Gradients" (arXiv:2407.11239, 2024; reference code github.com/VITA-Group/WeLore).

Rank choice (the paper's heavy-tail criterion, as its code does it): each matrix's singular
values are min-max normalised to [0, 1]; one global threshold ``tau`` drops, in every matrix, the
singular values whose normalised value is below ``tau``. Heavy-tailed spectra (many small values
next to a few large ones) lose many ranks, flat spectra few, so ranks come out non-uniform. A
matrix whose kept rank ``k`` would not save parameters (``k (m + n) >= m n``) stays dense: a
Non-Low-rank Component (N-LRC); the others become Low-rank Components (LRCs), two factors
``A (m, k) @ B (k, n)``. The reference code fixes ``tau`` per model and keeps a matrix dense
unless its rank drops by more than half; here ``tau`` is the smallest threshold whose kept
parameter count meets ``target_reduction`` (found by bisection over the normalised values), and
the break-even test is exact.

Fine-tuning (WeLore-PEFT): the factors train, N-LRC weights are frozen (``train_dense=False``,
the paper's choice) or train too; embeddings, norms and the head are frozen. Memory per
parameter: an LRC of rank ``k`` stores and trains ``k (m + n)`` weights (AdamW: 2 more floats
each), instead of ``m n``; frozen weights cost no optimizer state. ``welore_merge`` writes dense
weights ``A @ B`` back into plain ``nn.Linear`` layers, so the model saves as an ordinary
Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .param_groups import ALL_LINEAR, _matches, _output_layer_names


class LowRankLinear(nn.Module):
    """``y = x B^T A^T + bias``: a rank-``k`` stand-in for an (out, in) ``nn.Linear``.

    From the truncated SVD ``W ~ U_k S_k V_k^T`` the factors are balanced, ``A = U_k S_k^{1/2}``
    (out, k) and ``B = S_k^{1/2} V_k^T`` (k, in), so both train at the same scale.
    Parameters: ``k (in + out)`` (+ bias) instead of ``in * out``.
    """

    def __init__(self, A: Tensor, B: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.rank = B.shape[1], A.shape[0], A.shape[1]
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.B), self.A, self.bias)

    def merged_weight(self) -> Tensor:
        return self.A @ self.B

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class WeLoreReport:
    """What ``welore_compress`` did: the threshold, each matrix's (kept rank, full rank), and the
    parameter counts of the considered matrices before / after."""

    threshold: float
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)
    compressed: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def kept_ratio(self) -> float:
        return self.params_after / self.params_before


def _normalised(s: Tensor) -> Tensor:
    """Min-max normalised singular values (descending); a flat spectrum maps to all ones."""
    span = s.max() - s.min()
    return torch.ones_like(s) if span <= 0 else (s - s.min()) / span


def _kept_params(tau: float, spectra: list[Tensor], shapes: list[tuple[int, int]]) -> tuple[int, list[int]]:
    total, ranks = 0, []
    for s, (m, n) in zip(spectra, shapes):
        k = int((s >= tau).sum())  # s descending, s[0] == 1 >= tau: k >= 1
        lowrank = k * (m + n) < m * n
        total += k * (m + n) if lowrank else m * n
        ranks.append(k if lowrank else min(m, n))
    return total, ranks


def welore_ranks(weights: dict[str, Tensor], target_reduction: float, *,
                 progress: bool = False) -> tuple[float, dict[str, int]]:
    """The threshold and each matrix's kept rank (full rank = stays dense) so that the matrices'
    parameter count drops by at least ``target_reduction``; raises if no threshold reaches it."""
    _check_target(target_reduction)
    names = list(weights)
    shapes = [tuple(weights[k].shape) for k in names]
    spectra = [_normalised(torch.linalg.svdvals(_svd_input(weights[k])))
               for k in _bar(names, progress, "WeLore: singular values")]
    budget = (1.0 - target_reduction) * sum(m * n for m, n in shapes)
    candidates = torch.unique(torch.cat(spectra))  # ascending; kept params fall as tau rises
    if _kept_params(float(candidates[-1]), spectra, shapes)[0] > budget:
        raise ValueError(f"target_reduction={target_reduction!r} is out of reach even at rank 1 everywhere; "
                         "lower it or compress more matrices (target_modules)")
    lo, hi = 0, len(candidates) - 1  # invariant: candidates[hi] meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if _kept_params(float(candidates[mid]), spectra, shapes)[0] <= budget:
            hi = mid
        else:
            lo = mid + 1
    tau = float(candidates[hi])
    return tau, dict(zip(names, _kept_params(tau, spectra, shapes)[1]))


def _bar(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


def _check_target(target_reduction) -> None:
    if isinstance(target_reduction, bool) or not isinstance(target_reduction, (int, float)) or \
            not 0.0 < target_reduction < 1.0:
        raise ValueError(f"target_reduction={target_reduction!r} must lie in (0, 1) (the fraction of the "
                         "compressed matrices' parameters to remove, e.g. 0.5)")


def _targets(model: nn.Module, target_modules) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    output_names = _output_layer_names(model)
    found, seen = [], set()
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.Linear) or id(module.weight) in seen:
            continue
        if _matches(name, module, target_modules, output_names):
            seen.add(id(module.weight))
            parent_name, _, child = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, child, name, module))
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear")
    return found


@torch.no_grad()
def welore_compress(model: nn.Module, target_reduction: float, *, target_modules=ALL_LINEAR,
                    train_dense: bool = False, progress: bool = False) -> WeLoreReport:
    """Compress ``model`` in place: each targeted ``nn.Linear`` (default: all but the output layer)
    whose kept rank saves parameters becomes a :class:`LowRankLinear` (trainable factors), the
    others stay dense (trainable iff ``train_dense``); everything else is frozen.

    ``target_reduction`` in (0, 1) is the fraction of the targeted matrices' parameters removed
    (at least; ranks are integers). Ranks come from the global singular-value threshold (module
    docstring). The SVD runs in float32 (float64 for float64 weights); the factors get the
    weight's dtype and device. ``progress=True`` shows tqdm bars over the SVDs.
    """
    _check_target(target_reduction)
    targets = _targets(model, target_modules)
    weights = {name: lin.weight for _, _, name, lin in targets}
    tau, ranks = welore_ranks(weights, target_reduction, progress=progress)
    report = WeLoreReport(threshold=tau)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, child, name, lin in _bar(targets, progress, "WeLore: factors"):
        m, n = lin.weight.shape
        k = ranks[name]
        report.ranks[name] = (k, min(m, n))
        report.params_before += m * n
        if k < min(m, n):
            A, B = svd_factors(lin.weight, k)
            bias = lin.bias.detach().clone() if lin.bias is not None else None
            setattr(parent, child, LowRankLinear(A, B, bias))
            report.compressed.append(name)
            report.params_after += k * (m + n)
        else:
            lin.weight.requires_grad_(train_dense)
            if lin.bias is not None:
                lin.bias.requires_grad_(train_dense)
            report.params_after += m * n
    return report


def _svd_input(weight: Tensor) -> Tensor:
    # float32 SVD for float32 / half weights (their own rounding dominates), float64 for float64
    return weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)


def svd_factors(weight: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Balanced rank-``k`` factors ``A (m, k), B (k, n)`` of ``weight``'s truncated SVD (computed
    in float32, or float64 for float64 weights), in the weight's dtype."""
    U, S, Vh = torch.linalg.svd(_svd_input(weight), full_matrices=False)
    root = S[:k].sqrt()
    A = U[:, :k] * root  # (m, k)
    B = root[:, None] * Vh[:k]  # (k, n)
    return A.to(weight.dtype).contiguous(), B.to(weight.dtype).contiguous()


def welore_param_groups(model: nn.Module, *, weight_decay: float = 0.0, dense_lr: float | None = None) -> list[dict]:
    """``[low-rank factors (+ their biases), trainable dense weights]`` for any torch optimizer;
    ``dense_lr`` gives the dense group its own learning rate. Empty groups are left out."""
    lowrank_ids = {id(p) for mod in model.modules() if isinstance(mod, LowRankLinear) for p in mod.parameters()}
    lowrank, dense = [], []
    for p in model.parameters():
        if p.requires_grad:
            (lowrank if id(p) in lowrank_ids else dense).append(p)
    if not lowrank and not dense:
        raise ValueError("the model has no trainable parameters: run welore_compress(model, ...) first")
    groups = []
    if lowrank:
        groups.append({"params": lowrank, "weight_decay": weight_decay})
    if dense:
        groups.append({"params": dense, "weight_decay": weight_decay, **({"lr": dense_lr} if dense_lr else {})})
    return groups


@torch.no_grad()
def welore_merge(model: nn.Module) -> nn.Module:
    """Replace every :class:`LowRankLinear` by a plain ``nn.Linear`` holding ``A @ B`` (in place;
    returns ``model``), so ``save_pretrained`` writes an ordinary checkpoint."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            A = module.A
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=A.device, dtype=A.dtype)
            lin.weight.copy_(module.merged_weight())
            if module.bias is not None:
                lin.bias.copy_(module.bias)
            lin.weight.requires_grad_(module.A.requires_grad)
            setattr(parent, child, lin)
    return model
