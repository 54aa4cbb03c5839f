"""WeLore on a tiny Llama: factors == truncated SVD, the target is met with non-uniform ranks,
merge round trip, only the factors train, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import text_batches, tiny_llama
from slimtrain.optim.welore import LowRankLinear, welore_compress, welore_merge, welore_param_groups, welore_ranks


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LowRankLinear)) and "lm_head" not in n}


def _pretrained_like(dtype=torch.float32):
    """A tiny Llama whose weights have a decaying spectrum (random init is flat: nothing to drop),
    different per matrix so the ranks differ, like trained weights."""
    model = tiny_llama(dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, lin in enumerate(_linears(model).values()):
            m, n = lin.weight.shape
            U, _, Vh = torch.linalg.svd(torch.randn(m, n, generator=gen, dtype=torch.float64), full_matrices=False)
            decay = 0.3 + 0.6 * (i % 5) / 4  # heavier or lighter tails
            s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -decay
            lin.weight.copy_(((U * s) @ Vh).to(dtype))
    return model


def test_factors_reconstruct_the_truncated_svd():
    model = _pretrained_like(torch.float64)
    before = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    report = welore_compress(model, 0.5)
    assert report.compressed
    for name in report.compressed:
        mod = model.get_submodule(name)
        assert isinstance(mod, LowRankLinear)
        k = report.ranks[name][0]
        U, S, Vh = torch.linalg.svd(before[name], full_matrices=False)
        want = (U[:, :k] * S[:k]) @ Vh[:k]
        # float64 products of k terms of size <= sigma_max: within k * eps64 * sigma_max
        tol = 4 * k * torch.finfo(torch.float64).eps * S[0].item()
        assert (mod.A @ mod.B - want).abs().max().item() < tol
        assert mod.rank == k and mod.A.shape == (before[name].shape[0], k)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_kept_parameters_meet_the_target_with_nonuniform_ranks(target):
    model = _pretrained_like()
    dense_params = sum(m.weight.numel() for m in _linears(model).values())
    report = welore_compress(model, target)
    kept = sum(p.numel() for m in _linears(model).values() for p in m.parameters())
    assert kept == report.params_after and report.params_before == dense_params
    assert kept <= (1 - target) * dense_params
    assert report.kept_ratio > 1 - target - 0.15  # not overshooting wildly (exactness: next test)
    ranks = {k for k, full in report.ranks.values() if k < full}
    assert len(ranks) > 3  # non-uniform


def test_threshold_is_the_smallest_that_meets_the_target():
    model = _pretrained_like()
    weights = {n: m.weight for n, m in _linears(model).items()}
    tau, ranks = welore_ranks(weights, 0.5)
    # recount by hand: one singular value fewer kept anywhere is what the next lower threshold
    # would give back; so raising any dropped matrix's rank by the values at exactly tau fails
    spectra = {n: torch.linalg.svdvals(w.double()) for n, w in weights.items()}
    norm = {n: (s - s.min()) / (s.max() - s.min()) for n, s in spectra.items()}
    for n, (m, k) in zip(weights, [(w.shape, ranks[n]) for n, w in weights.items()]):
        kept = int((norm[n] >= tau).sum())
        assert k == (kept if kept * sum(m) < m[0] * m[1] else min(m))
    lower = max(float(v) for s in norm.values() for v in s if v < tau)
    total = sum(w.numel() for w in weights.values())

    def params_at(t):
        out = 0
        for n, w in weights.items():
            k = int((norm[n] >= t).sum())
            out += k * sum(w.shape) if k * sum(w.shape) < w.numel() else w.numel()
        return out

    assert params_at(tau) <= 0.5 * total < params_at(lower)


def test_merge_round_trip_gives_the_same_logits():
    model = _pretrained_like(torch.float64)
    welore_compress(model, 0.5)
    x = text_batches(1)[0]
    compressed = model(input_ids=x).logits
    welore_merge(model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    merged = model(input_ids=x).logits
    # x B^T A^T vs x (A B)^T: float64 reassociation only
    torch.testing.assert_close(merged, compressed, rtol=1e-10, atol=1e-10)
    state = model.state_dict()
    assert all(not k.endswith((".A", ".B")) for k in state)  # a plain Llama checkpoint again
    fresh = tiny_llama(dtype=torch.float64)
    fresh.load_state_dict(state)


@pytest.mark.parametrize("train_dense", [False, True])
def test_training_moves_only_the_trainable_parts(train_dense):
    model = _pretrained_like()
    report = welore_compress(model, 0.4, train_dense=train_dense)
    dense_names = [n for n in report.ranks if n not in report.compressed]
    assert dense_names  # some matrices stay dense
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(welore_param_groups(model), lr=1e-2)
    losses = []
    for x in text_batches(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        is_factor = n.endswith((".A", ".B"))
        is_dense_target = any(n == d + ".weight" for d in dense_names)
        assert moved == (is_factor or (train_dense and is_dense_target)), n
    assert len(opt.param_groups) == (2 if train_dense else 1)


@pytest.mark.parametrize("bad", [0, 1, 1.0, -0.2, 1.5, True])
def test_bad_target_reduction_names_the_range(bad):
    with pytest.raises(ValueError, match=rf"target_reduction={bad!r} must lie in \(0, 1\)"):
        welore_compress(tiny_llama(), bad)


def test_unreachable_target_is_explained():
    with pytest.raises(ValueError, match="out of reach"):
        welore_compress(_pretrained_like(), 0.999)


def test_training_the_factors_resumes_bit_exactly_from_a_weights_only_checkpoint(tmp_path):
    """5 straight steps == 2 steps + save / torch.load(weights_only=True) / load + 3 steps, exactly."""
    def fresh():
        model = _pretrained_like()
        welore_compress(model, 0.4)
        return model, torch.optim.AdamW(welore_param_groups(model), lr=1e-2)

    batches = text_batches(5)
    straight, opt = fresh()
    for x in batches:
        straight(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    first, opt = fresh()
    for x in batches[:2]:
        first(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, opt = fresh()
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    for x in batches[2:]:
        resumed(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_export_writes_back_dense_weights(tmp_path):
    """slimtrain's export of a WeLore model is an ordinary Hugging Face Llama with W = A @ B."""
    from transformers import AutoModelForCausalLM

    from slimtrain.run.export import export_model

    model = _pretrained_like()
    welore_compress(model, 0.4)
    x = text_batches(1)[0]
    with torch.no_grad():
        want = model(input_ids=x).logits
    export_model(model, str(tmp_path / "hf"))
    assert any(isinstance(m, LowRankLinear) for m in model.modules())  # the model itself is untouched
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32 reassociation of x B^T A^T
