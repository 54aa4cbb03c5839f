"""MeZO / SparseMeZO: SPSA against analytic gradients, bit-exact restore, memory, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from helpers import text_batches, tiny_llama
from memtrack import PeakLiveBytes
from slimtrain.optim import MeZO, SparseMeZO, magnitude_thresholds, noise_like, spsa_grad
from slimtrain.optim.registry import build_optimizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    # compare bit patterns, so -0.0 vs 0.0 or a NaN payload would count as a change
    return t.detach().clone().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _lm_closure(model, batch):
    return lambda: model(input_ids=batch, labels=batch).loss


# ---------------------------------------------------------------- SPSA vs analytic gradients
def test_averaged_estimate_converges_to_true_gradient_on_quadratic():
    """E_z[(z . g) z] = g: the mean over many seeds must point along the analytic A w - b."""
    torch.manual_seed(0)
    d = 12
    q = torch.randn(d, d, dtype=torch.float64)
    a = q @ q.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)
    w = nn.Parameter(torch.randn(d, dtype=torch.float64))
    w0 = w.detach().clone()
    true_grad = a @ w0 - b

    def loss():
        return 0.5 * w @ a @ w - b @ w

    n = 3000
    opt = MeZO([w], lr=1.0, eps=1e-3, n_perturbations=n, seed=1)
    opt.step(loss)
    estimate = (w0 - w.detach())  # lr = 1: the update is minus the averaged estimate
    cos = torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0)
    # relative error of the mean of n estimates is ~ sqrt((d + 1) / n) = 0.066
    assert cos > 0.99, f"cosine to the analytic gradient {cos:.4f}"
    assert abs(estimate.norm() / true_grad.norm() - 1) < 0.2
    # and fewer perturbations are measurably worse, so the average is what converges
    w.data.copy_(w0)
    MeZO([w], lr=1.0, eps=1e-3, n_perturbations=10, seed=1).step(loss)
    cos10 = torch.nn.functional.cosine_similarity(w0 - w.detach(), true_grad, dim=0)
    assert cos10 < cos


def test_one_perturbation_small_eps_matches_directional_derivative():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    params = list(net.parameters())

    def loss():
        return torch.nn.functional.mse_loss(net(x), y)

    seed = 1234
    projected, _ = spsa_grad(loss, params, seed, eps=1e-6)
    grads = torch.autograd.grad(loss(), params)
    directional = sum((g * noise_like(p, seed, i).double()).sum() for i, (p, g) in enumerate(zip(params, grads)))
    assert projected == pytest.approx(float(directional), rel=1e-6)

    # the class stores the same scalar and its seed, so a resume can replay the update
    opt = MeZO(params, lr=0.0, eps=1e-6, seed=3)
    opt.step(loss)
    zo = opt.state_dict()["zo"]
    seed = int(zo["seeds"][0])
    grads = torch.autograd.grad(loss(), params)
    directional = sum((g * noise_like(p, seed, i).double()).sum() for i, (p, g) in enumerate(zip(params, grads)))
    assert float(zo["projected_grads"][0]) == pytest.approx(float(directional), rel=1e-6)


# ---------------------------------------------------------------- exact restore
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparse", [False, True])
def test_plus_minus_restore_is_bit_exact(dtype, sparse):
    model = tiny_llama(dtype=dtype)
    batch = text_batches(1, batch=2, seq=16)[0]
    before = [_bits(p) for p in model.parameters()]
    cls = SparseMeZO if sparse else MeZO
    opt = cls(model.parameters(), lr=0.0, eps=1e-3, n_perturbations=2, model=model)
    for _ in range(3):
        opt.step(_lm_closure(model, batch))
    for p, ref in zip(model.parameters(), before):
        assert torch.equal(_bits(p), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_naive_half_precision_walk_drifts(dtype):
    """The reference failure we avoid: +eps z, -2 eps z, +eps z in the weight dtype (MeZO's
    fp16 code path), or in fp32 rounded after each move, does not return the weights, so they
    random-walk every step; spsa_grad's walk does."""
    model = tiny_llama(dtype=dtype)
    w = model.model.layers[0].mlp.up_proj.weight
    ref = w.detach().clone()
    z = noise_like(w, seed=5, index=0).to(dtype)
    with torch.no_grad():
        w.add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    assert (w != ref).float().mean() > 0.05
    # fp32 arithmetic with a rounding to the weight dtype after each move is no better
    z32 = noise_like(w, seed=5, index=0) * 1e-3
    a = (ref.float() + z32).to(dtype)
    b = (a.float() - 2 * z32).to(dtype)
    assert ((b.float() + z32).to(dtype) != ref).float().mean() > 0.05
    w.data.copy_(ref)
    spsa_grad(lambda: torch.zeros(()), [w], seed=5, eps=1e-3)
    assert torch.equal(_bits(w), _bits(ref))


# ---------------------------------------------------------------- memory
def test_no_grad_and_peak_memory_is_that_of_inference_forwards():
    model = tiny_llama(layers=2)
    batch = text_batches(1, batch=8, seq=64)[0]
    closure = _lm_closure(model, batch)
    with torch.inference_mode(), PeakLiveBytes() as inference:
        closure()
        closure()
    opt = MeZO(model.parameters(), lr=1e-4, model=model, chunk_size=4096)
    with PeakLiveBytes() as step:
        opt.step(closure)
    opt.step(closure)
    assert all(p.grad is None for p in model.parameters())
    assert opt.state_dict()["state"] == {}  # no per-parameter state at all
    assert step.peak <= 1.05 * inference.peak, (step.peak, inference.peak)


# ---------------------------------------------------------------- sparse mask
def test_sparse_updates_only_the_smallest_weights_of_each_tensor():
    model = tiny_llama()
    batch = text_batches(1, batch=2, seq=16)[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SparseMeZO(model.parameters(), lr=1e-2, eps=1e-3, sparsity=0.75, model=model)
    opt.step(_lm_closure(model, batch))
    for name, p in model.named_parameters():
        ref = before[name].reshape(-1)
        keep = -(-ref.numel() // 4)  # ceil(25%)
        smallest = torch.zeros(ref.numel(), dtype=torch.bool)
        smallest[ref.abs().argsort()[:keep]] = True
        smallest |= ref.abs() <= ref.abs().sort().values[keep - 1]  # ties at the threshold
        changed = p.detach().reshape(-1) != ref
        assert not (changed & ~smallest).any(), name
        if ref.numel() > 16 and ref.std() > 0:  # (norm weights start all-ones: one tie class)
            assert changed.float().mean() > 0.2, name


@pytest.mark.parametrize("mask_interval", [None, 1])
def test_sparse_threshold_fixed_or_refreshed(mask_interval):
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight
    start = w.detach().abs().reshape(-1).sort().values[w.numel() // 2 - 1]
    batch = text_batches(1, batch=2, seq=16)[0]
    opt = SparseMeZO(model.parameters(), lr=0.5, eps=1e-3, sparsity=0.5, mask_interval=mask_interval, model=model)
    for _ in range(3):
        opt.step(_lm_closure(model, batch))
    # thresholds are taken at the start of a step, so refresh once more to read the current one
    current = w.detach().abs().reshape(-1).sort().values[w.numel() // 2 - 1]
    assert current != start  # lr is large enough to move the median
    opt.step(lambda: torch.zeros(()))
    expected = start if mask_interval is None else current
    assert float(opt.state[w]["threshold"]) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------- semantics
def test_weight_decay_skips_biases_and_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = MeZO(net.parameters(), lr=0.1, weight_decay=0.5)
    opt.step(lambda: torch.zeros(()))  # constant loss: SPSA estimate 0, only decay acts
    for name, p in net.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if p.dim() >= 2 else before[name]
        torch.testing.assert_close(p.detach(), expected)


def test_dropout_is_off_during_evaluations_and_mode_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    model.train()
    seen = []

    def closure():
        seen.append([m.training for m in model.modules()])
        return model(torch.ones(2, 4)).sum()

    MeZO(model.parameters(), lr=1e-3, n_perturbations=2, model=model).step(closure)
    assert seen and not any(any(s) for s in seen)
    assert all(m.training for m in model.modules())


def test_resume_replays_the_same_trajectory():
    batches = text_batches(4, batch=2, seq=16)
    model = tiny_llama()
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def run(opt, m, steps):
        for b in steps:
            opt.step(_lm_closure(m, b))

    opt = SparseMeZO(model.parameters(), lr=1e-3, sparsity=0.5, mask_interval=2, n_perturbations=2, model=model, seed=9)
    run(opt, model, batches)
    reference = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(init)
    opt = SparseMeZO(model.parameters(), lr=1e-3, sparsity=0.5, mask_interval=2, n_perturbations=2, model=model, seed=9)
    run(opt, model, batches[:2])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = SparseMeZO(resumed.parameters(), lr=1e-3, sparsity=0.5, mask_interval=2, n_perturbations=2,
                      model=resumed, seed=0)
    opt2.load_state_dict(ckpt["optim"])
    run(opt2, resumed, batches[2:])
    for p, ref in zip(resumed.parameters(), reference):
        assert torch.equal(p.detach(), ref)


def test_mezo_reduces_a_regression_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    net = nn.Linear(8, 1)
    loss = lambda: torch.nn.functional.mse_loss(net(x), y)  # noqa: E731
    with torch.no_grad():
        start = float(loss())
    opt = MeZO(net.parameters(), lr=2e-2, eps=1e-3, n_perturbations=4)
    for _ in range(200):
        opt.step(loss)
    with torch.no_grad():
        assert float(loss()) < 0.2 * start


def test_registry_and_errors():
    model = tiny_llama()
    mezo = build_optimizer("mezo", model, lr=1e-5)
    sparse = build_optimizer("sparse_mezo", model, lr=1e-5, sparsity=0.9)
    assert isinstance(mezo, MeZO) and isinstance(sparse, SparseMeZO)
    assert mezo.spec.zeroth_order and SparseMeZO.spec.zeroth_order
    assert mezo.model is model  # the factory wires eval mode for the evaluations
    with pytest.raises(ValueError, match="closure"):
        mezo.step()
    with pytest.raises(ValueError, match="sparsity=1.0"):
        SparseMeZO(model.parameters(), sparsity=1.0)
    with pytest.raises(ValueError, match="eps=0"):
        MeZO(model.parameters(), eps=0)
    batch = text_batches(1, batch=2, seq=8)[0]
    with pytest.raises(ValueError, match="requires grad"):
        with torch.enable_grad():
            mezo.step(lambda: torch.enable_grad()(lambda: model(input_ids=batch, labels=batch).loss)())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_chunked_magnitude_threshold_equals_sorted_reference(dtype):
    torch.manual_seed(0)
    p = (torch.randn(300, 37) * 0.02).to(dtype)
    p[0, :5] = 0.0  # ties at zero
    for sparsity in (0.0, 0.5, 0.75, 0.999):
        keep = max(1, math.ceil((1 - sparsity) * p.numel()))
        expected = p.abs().reshape(-1).float().sort().values[keep - 1]
        assert magnitude_thresholds([p], sparsity, chunk_size=1000)[0] == expected


@pytest.mark.parametrize("name", ["mezo", "sparse_mezo"])
def test_slimtrain_trainer_runs_zeroth_order_without_gradients(tmp_path, name):
    from slimtrain.trainer import Trainer, load_config
    from trainer_setup import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "run"), **{
        "optim.name": name, "optim.lr": 1e-3, "train.steps": 3}))
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.spec.zeroth_order and int(trainer.optimizer.state_dict()["zo"]["step"]) == 3
    assert all(p.grad is None for p in trainer.model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))
