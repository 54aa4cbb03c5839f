"""Natural GaLore (natural_history > 0): Woodbury direction vs a dense solve, the optimizer vs a
dense-solve reference loop, exact resume, off == plain GaLore, the other GaLore optimizers, bad input."""

from __future__ import annotations

import io

import pytest
import torch

from helpers import text_batches, tiny_llama
from slimtrain.optim import GaLoreAdafactor, GaLoreAdamW, galore_param_groups
from slimtrain.optim.galore_adamw8bit import GaLoreAdamW8bit
from slimtrain.optim.natural import natural_gradient, woodbury_direction
from slimtrain.optim.registry import build_optimizer


def _groups(model, rank=8, gap=3, **extra):
    return galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=0.25, **extra)


def _loss(model, x):
    # computed here, not by transformers (which casts the logits to float32): float64 end to end
    logits = model(input_ids=x).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _train(model, opt, batches):
    losses = []
    for x in batches:
        loss = _loss(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _dense(history_rows: list[torch.Tensor], g: torch.Tensor, damping: float) -> torch.Tensor:
    """(lambda I + G G^T)^{-1} vec(g), G's columns the history: formed and solved densely."""
    G = torch.stack([h.reshape(-1) for h in history_rows], dim=1).double()  # (d, s)
    F = G @ G.T + damping * torch.eye(G.shape[0], dtype=torch.float64)
    return torch.linalg.solve(F, g.reshape(-1).double()).view_as(g)


# -- the direction ---------------------------------------------------------------------------
def _cond(rows, damping):
    """Condition number of lambda I + G G^T: (lambda + sigma_max(G)^2) / lambda."""
    G = torch.stack([r.reshape(-1) for r in rows]).double()
    return (damping + torch.linalg.matrix_norm(G, ord=2).item() ** 2) / damping


@pytest.mark.parametrize("s", [1, 3, 20])  # 20 > d = 15: more history than dimensions still solves
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_woodbury_equals_dense_solve_float64(s, damping):
    gen = torch.Generator().manual_seed(s)
    rows = [0.1 * torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(s)]
    got = woodbury_direction(torch.stack([r.reshape(-1) for r in rows]), s - 1, damping).view(3, 5)
    want = _dense(rows, rows[-1], damping)
    # both solves are backward stable: each is within ~cond(F) * eps64 of the truth
    tol = 10 * _cond(rows, damping) * torch.finfo(torch.float64).eps
    assert tol < 1e-11
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_float32_direction_is_accurate():
    """With ||g||^2 >> lambda (a 512-entry gradient of unit entries, lambda = 1e-3) the paper's
    (1/lambda)(g - G z) loses every float32 digit; the push-through form stays at float32 accuracy."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(64, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    want = _dense(rows, rows[-1], 1e-3).reshape(-1)
    got = woodbury_direction(torch.stack([r.reshape(-1) for r in rows]).float(), 2, 1e-3).double()
    assert (got - want).abs().max() < 1e-5 * want.abs().max()  # observed ~1e-7
    # the paper's form, same float32 inputs, for contrast
    G, g = torch.stack([r.reshape(-1) for r in rows]).float().T, rows[-1].reshape(-1).float()
    z = torch.linalg.solve(G.T @ G + 1e-3 * torch.eye(3), G.T @ g)
    paper = ((g - G @ z) / 1e-3).double()
    assert (paper - want).abs().max() > 1e-2 * want.abs().max()


def test_ring_buffer_keeps_the_last_s_gradients():
    s, damping = 4, 1e-2
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 6, generator=gen, dtype=torch.float64) for _ in range(11)]
    history = torch.zeros(s, 12, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.int64)
    for k, g in enumerate(grads):
        got = natural_gradient(g, history, count, damping)
        want = _dense(grads[max(0, k - s + 1) : k + 1], g, damping)  # current one included
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert int(count) == len(grads)
    assert torch.equal(history[(len(grads) - 1) % s], grads[-1].reshape(-1))


# -- the optimizer -----------------------------------------------------------------------------
def test_optimizer_equals_dense_reference_loop():
    """GaLoreAdamW(natural_history=3) vs plain GaLoreAdamW fed (lambda I + G G^T)^{-1} g solved
    densely in float64 from our own history of its projected gradients (set_projected_grad).

    lr = 0 keeps both models equal, so both see the same gradients on 7 different batches (the
    ring buffer wraps, the projector refreshes at steps 0, 3, 6) and every step's Adam moments,
    which are linear in the direction, can be compared without a trajectory amplifying rounding
    (a trained trajectory is in test_trains_tiny_llama_and_differs_from_galore)."""
    s, damping = 3, 1e-3
    model = tiny_llama()
    # rank 4 keeps the dense (d x d, d <= 640) solves cheap
    opt = GaLoreAdamW(_groups(model, rank=4, gap=3), lr=0.0, natural_history=s, natural_damping=damping)
    ref = GaLoreAdamW(_groups(model, rank=4, gap=3), lr=0.0)
    histories: dict[int, list[torch.Tensor]] = {}
    for x in text_batches(7):
        worst_cond = 1.0
        _loss(model, x).backward()
        grads = {id(p): p.grad.clone() for p in model.parameters()}
        opt.step()
        for p, group in ref.galore_params():
            p.grad = grads[id(p)]
            if ref.needs_refresh(p):
                ref.refresh_projector(p, p.grad, group)
            low = ref.project_grad(p, p.grad)
            hist = histories.setdefault(id(p), [])
            hist.append(low.clone())
            del hist[:-s]
            worst_cond = max(worst_cond, _cond(hist, damping))
            ref.set_projected_grad(p, _dense(hist, low, damping).to(low.dtype))
            p.grad = None
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        # Projectors, hence projected gradients and the history, are float32; our s x s Gram
        # matrix is formed in float32, so the direction is within ~cond(F) * eps32 of the dense
        # float64 solve (relative; cond ~ 5e3 here, so ~2e-3; observed ~4e-7); the moments are
        # linear in it. A wrong slot, a missing current gradient or a stale history is off by O(1).
        tol = 10 * worst_cond * torch.finfo(torch.float32).eps
        for p, _ in ref.galore_params():
            for key in ("exp_avg", "exp_avg_sq"):
                want = ref.state[p][key]
                torch.testing.assert_close(opt.state[p][key], want, rtol=tol, atol=tol * want.abs().max().item())
            assert torch.equal(opt.state[p]["proj_left" if "proj_left" in opt.state[p] else "proj_right"],
                               ref.state[p]["proj_left" if "proj_left" in ref.state[p] else "proj_right"])
    assert all(int(opt.state[p]["nat_count"]) == 7 for p, _ in opt.galore_params())


def test_history_zero_is_bit_identical_to_plain_galore():
    batches = text_batches(6)
    a, b = tiny_llama(), tiny_llama()
    la = _train(a, GaLoreAdamW(_groups(a), lr=3e-3), batches)
    opt_b = GaLoreAdamW(_groups(b, natural_history=0), lr=3e-3, natural_history=0)
    lb = _train(b, opt_b, batches)
    assert la == lb
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not any("nat_history" in st for st in opt_b.state.values())


def test_trains_tiny_llama_and_differs_from_galore():
    batches = text_batches(16)
    model, plain = tiny_llama(), tiny_llama()
    losses = _train(model, GaLoreAdamW(_groups(model, gap=5), lr=3e-3, natural_history=4), batches)
    plain_losses = _train(plain, GaLoreAdamW(_groups(plain, gap=5), lr=3e-3), batches)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert losses[1:] != plain_losses[1:]  # the preconditioner really acts


def test_resume_is_exact():
    kw = dict(lr=3e-3, natural_history=3)
    batches = text_batches(10)  # gap 4: refreshes at 0, 4, 8; the ring buffer wraps at step 3
    straight = tiny_llama()
    full_losses = _train(straight, GaLoreAdamW(_groups(straight, gap=4), **kw), batches)

    first = tiny_llama()
    opt1 = GaLoreAdamW(_groups(first, gap=4), **kw)
    losses = _train(first, opt1, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_llama(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = GaLoreAdamW(_groups(resumed, gap=4), **kw)
    opt2.load_state_dict(ckpt["optim"])
    losses += _train(resumed, opt2, batches[5:])
    assert losses == full_losses
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize("accum", [1, 2])
def test_layerwise_mode_preconditions_once_per_step(accum):
    """Layer-wise (update-in-backward) mode feeds the history once per optimizer step, with the
    accumulated low-rank gradient; with one micro-batch it runs the very same operations."""
    micro = text_batches(5 * accum, batch=2)

    def run(model, opt):
        losses = []
        for i in range(0, len(micro), accum):
            for x in micro[i : i + accum]:
                loss = _loss(model, x) / accum
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    a, b = tiny_llama(), tiny_llama()
    ordinary = GaLoreAdamW(_groups(a, gap=3), lr=3e-3, natural_history=3)
    layerwise = GaLoreAdamW(_groups(b, gap=3), lr=3e-3, natural_history=3, layerwise=True, accumulation_steps=accum)
    la, lb = run(a, ordinary), run(b, layerwise)
    assert all(int(st["nat_count"]) == 5 for st in layerwise.state.values() if "nat_count" in st)
    if accum == 1:
        assert la == lb and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("cls,kw", [(GaLoreAdamW8bit, dict(lr=3e-3, min_8bit_size=0)),
                                    (GaLoreAdafactor, dict(lr=1e-2, relative_step=False, beta1=0.9,
                                                           scale_parameter=False))])
def test_other_galore_optimizers_take_the_group_key(cls, kw):
    """The preconditioner lives in the shared base: a group key turns it on for every GaLore optimizer."""
    batches = text_batches(12)
    model = tiny_llama()
    opt = cls(_groups(model, gap=4, natural_history=4), **kw)
    losses = _train(model, opt, batches)
    assert all(int(st["nat_count"]) == 12 for st in opt.state.values() if "nat_count" in st)
    assert sum(1 for st in opt.state.values() if "nat_history" in st) == 14  # 2 layers x 7 linears
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses


def test_registry_entry_defaults_to_history_10():
    model = tiny_llama()
    opt = build_optimizer("natural_galore_adamw", model, lr=1e-3, rank=8)
    galore = [g for g in opt.param_groups if "rank" in g]
    assert len(galore) == 1 and galore[0]["natural_history"] == 10 and galore[0]["natural_damping"] == 1e-3
    assert build_optimizer("natural_galore_adamw", model, lr=1e-3, rank=8,
                           natural_history=2).param_groups[-1]["natural_history"] == 2


def test_transformers_trainer_runs_natural_galore(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from slimtrain.integrations.hf import slimtrain_optimizer_cls_and_kwargs

    rows = torch.cat(text_batches(4, batch=4, seq=32))
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=3e-3,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=slimtrain_optimizer_cls_and_kwargs(
                          "natural_galore_adamw", lr=3e-3, rank=8, update_proj_gap=2, natural_history=3))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert any(int(st.get("nat_count", 0)) == 4 for st in opt.state.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(natural_history=-1), r"natural_history=-1 must be an integer >= 0"),
    (dict(natural_history=2.5), r"natural_history=2.5 must be an integer >= 0"),
    (dict(natural_damping=0.0), r"natural_damping=0.0 must be a number > 0"),
    (dict(natural_damping=-1e-3), r"natural_damping=-0.001 must be a number > 0"),
])
def test_bad_inputs_name_the_argument_and_range(kwargs, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW(_groups(model), lr=1e-3, **kwargs)
    with pytest.raises(ValueError, match=match):  # as a group key too
        GaLoreAdamW(_groups(model, **kwargs), lr=1e-3)


def test_registry_entry_refuses_a_history_of_zero():
    """natural_galore_adamw without a history would be plain GaLore in disguise: a clear error instead."""
    from slimtrain.optim.registry import build_optimizer

    with pytest.raises(ValueError, match=r"natural_history=0.*integer >= 1"):
        build_optimizer("natural_galore_adamw", tiny_llama(), lr=1e-3, rank=4, natural_history=0)
