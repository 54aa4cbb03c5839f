"""GaLore family: equality with galore-torch, exact resume, layer-wise mode, robustness."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.distributed as dist

from helpers import run_ranks, text_batches, tiny_llama
from slimtrain.optim import GaLoreAdafactor, GaLoreAdamW, galore_adamw, galore_param_groups
from slimtrain.optim import projector as proj

warnings.filterwarnings("ignore", category=FutureWarning)


def _galore_torch():
    # The reference implementation: only the tests that compare against it need galore-torch.
    return pytest.importorskip("galore_torch")


def _groups(model, rank=16, gap=3, proj_type="std", **extra):
    return galore_param_groups(model, rank=rank, update_proj_gap=gap, scale=0.25, proj_type=proj_type, **extra)


def _train(model, opt, batches, sched=None):
    losses = []
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _max_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


# -- reference equality ----------------------------------------------------------------------
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_adamw_matches_galore_torch(proj_type):
    galore_torch = _galore_torch()
    ref_model = tiny_llama()
    model = copy.deepcopy(ref_model)
    kw = dict(lr=3e-3, weight_decay=0.05)
    ref = galore_torch.GaLoreAdamW(_groups(ref_model, proj_type=proj_type), **kw)
    ours = GaLoreAdamW(_groups(model, proj_type=proj_type), **kw)
    batches = text_batches(7)  # gap 3: refreshes at steps 0, 3, 6
    ref_losses = _train(ref_model, ref, batches)
    losses = _train(model, ours, batches)
    # Same operations in the same order: equal to float32 rounding (observed: bit-identical).
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert _max_diff(ref_model, model) < 1e-6


def test_adafactor_matches_galore_torch():
    galore_torch = _galore_torch()
    ref_model = tiny_llama()
    model = copy.deepcopy(ref_model)
    kw = dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.01)
    ref = galore_torch.GaLoreAdafactor(_groups(ref_model), **kw)
    ours = GaLoreAdafactor(_groups(model), **kw)
    batches = text_batches(7)
    assert _train(model, ours, batches) == pytest.approx(_train(ref_model, ref, batches), abs=1e-6)
    assert _max_diff(ref_model, model) < 1e-6


def test_adafactor_relative_step_matches_galore_torch():
    galore_torch = _galore_torch()
    ref_model = tiny_llama()
    model = copy.deepcopy(ref_model)
    ref = galore_torch.GaLoreAdafactor(_groups(ref_model))
    ours = GaLoreAdafactor(_groups(model))
    batches = text_batches(4)
    _train(ref_model, ref, batches)
    _train(model, ours, batches)
    assert _max_diff(ref_model, model) < 1e-6


def test_groups_without_rank_are_plain_adamw_like_galore_torch():
    galore_torch = _galore_torch()
    ref_model = tiny_llama()
    model = copy.deepcopy(ref_model)
    ref = galore_torch.GaLoreAdamW(ref_model.parameters(), lr=1e-3)
    ours = GaLoreAdamW(model.parameters(), lr=1e-3)
    batches = text_batches(3)
    _train(ref_model, ref, batches)
    _train(model, ours, batches)
    assert _max_diff(ref_model, model) < 1e-6


# -- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,method", [(GaLoreAdamW, "svd"), (GaLoreAdamW, "randomized"), (GaLoreAdafactor, "svd")])
def test_resume_is_exact(cls, method):
    kw = dict(lr=3e-3) if cls is GaLoreAdamW else dict(lr=1e-2, relative_step=False, beta1=0.9)
    batches = text_batches(10)
    straight = tiny_llama()
    opt = cls(_groups(straight, gap=4, proj_method=method), **kw)
    full_losses = _train(straight, opt, batches)

    first = tiny_llama()
    opt1 = cls(_groups(first, gap=4, proj_method=method), **kw)
    losses = _train(first, opt1, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # tensors only: no pickled projector objects

    resumed = tiny_llama(seed=123)  # different init, fully overwritten by the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(_groups(resumed, gap=4, proj_method=method), **kw)
    opt2.load_state_dict(ckpt["optim"])
    losses += _train(resumed, opt2, batches[5:])
    assert losses == full_losses  # bit-exact
    assert _max_diff(straight, resumed) == 0.0


def test_state_is_tensors_only():
    model = tiny_llama()
    opt = GaLoreAdamW(_groups(model), lr=1e-3)
    _train(model, opt, text_batches(1))
    for state in opt.state.values():
        for key, value in state.items():
            assert isinstance(value, torch.Tensor), f"state[{key!r}] is {type(value)}"


# -- layer-wise ------------------------------------------------------------------------------
def _run_accumulated(model, opt, micro_batches, accum, sched):
    losses = []
    for i in range(0, len(micro_batches), accum):
        total = 0.0
        for x in micro_batches[i : i + accum]:
            loss = model(input_ids=x, labels=x).loss / accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(total)
    return losses


def _run_accumulated_lowrank(model, opt, micro_batches, accum, sched):
    """The ordinary optimizer fed what the layer-wise hooks form, in their order: on a steady step
    each micro-batch's gradient of a GaLore matrix is projected at once and accumulated in the
    low-rank buffer (the first assigned, the rest added in place); on a refresh step, and for
    every other tensor, the full gradient accumulates in ``p.grad`` as usual."""
    losses = []
    for i in range(0, len(micro_batches), accum):
        steady = {id(p) for p, _ in opt.galore_params() if accum > 1 and not opt.needs_refresh(p)}
        acc, total = {}, 0.0
        for x in micro_batches[i : i + accum]:
            loss = model(input_ids=x, labels=x).loss / accum
            loss.backward()
            total += loss.item()
            for p in model.parameters():
                if id(p) in steady and p.grad is not None:
                    low = opt.project_grad(p, p.grad)
                    if id(p) in acc:
                        acc[id(p)].add_(low)
                    else:
                        acc[id(p)] = low
                    p.grad = None
        for p in model.parameters():
            if id(p) in acc:
                opt.set_projected_grad(p, acc[id(p)])
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("accum", [1, 4])
def test_layerwise_equals_ordinary(accum):
    micro = text_batches(6 * accum, batch=2)
    kw = dict(lr=3e-3, weight_decay=0.01)
    extra = dict(max_grad_norm=0.5)  # per-tensor clipping is part of the layer-wise contract

    def sched_for(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)

    ordinary_model = tiny_llama()
    ordinary = GaLoreAdamW(_groups(ordinary_model, gap=3, **extra), **kw)
    # The layer-wise mode projects each micro-batch's gradient before accumulating it (its
    # memory saving); accumulate-then-project differs by float association, which the SVD
    # refresh amplifies differently per CPU. So the reference forms the same sums in the same
    # order through the ordinary optimizer's public API, and the two must agree bit for bit.
    ref_losses = _run_accumulated_lowrank(ordinary_model, ordinary, micro, accum, sched_for(ordinary))

    lw_model = tiny_llama()
    layerwise = GaLoreAdamW(_groups(lw_model, gap=3, **extra), layerwise=True, accumulation_steps=accum, **kw)
    losses = _run_accumulated(lw_model, layerwise, micro, accum, sched_for(layerwise))

    assert losses == ref_losses
    assert _max_diff(ordinary_model, lw_model) == 0.0
    assert all(p.grad is None for p in lw_model.parameters())


def test_layerwise_accumulates_low_rank_buffer():
    model = tiny_llama()
    opt = GaLoreAdamW(_groups(model, rank=8, gap=100), layerwise=True, accumulation_steps=2, lr=1e-3)
    x1, x2, x3 = text_batches(3)
    for x in (x1, x2):  # first step: refresh step, full gradient kept for the SVD
        model(input_ids=x, labels=x).loss.backward()
    opt.step()
    model(input_ids=x3, labels=x3).loss.backward()  # first micro-batch of a non-refresh step
    weight = model.model.layers[0].mlp.down_proj.weight  # (64, 160)
    assert weight.grad is None  # full gradient freed immediately
    assert opt.state[weight]["grad_acc"].shape == (8, 160)  # low-rank buffer only (left projector: m < n)


# -- robustness ------------------------------------------------------------------------------
def test_rank_larger_than_matrix_is_clamped():
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = GaLoreAdamW([{"params": [w], "rank": 32}], lr=1e-2)
    w.grad = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="rank=32 is larger"):
        opt.step()
    assert opt.state[w]["proj_right"].shape == (4, 4)
    assert opt.state[w]["exp_avg"].shape == (6, 4)


def test_conv_weight_is_projected_as_matrix():
    torch.manual_seed(0)
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    flat = torch.nn.Parameter(conv.detach().reshape(8, 27).clone())
    opt_c = GaLoreAdamW([{"params": [conv], "rank": 4, "update_proj_gap": 2}], lr=1e-2)
    opt_f = GaLoreAdamW([{"params": [flat], "rank": 4, "update_proj_gap": 2}], lr=1e-2)
    for _ in range(3):
        g = torch.randn(8, 27)
        conv.grad, flat.grad = g.reshape(8, 3, 3, 3).clone(), g.clone()
        opt_c.step()
        opt_f.step()
    assert conv.shape == (8, 3, 3, 3)
    torch.testing.assert_close(conv.detach().reshape(8, 27), flat.detach(), rtol=0, atol=0)


def test_failed_svd_keeps_previous_projector(monkeypatch):
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1}], lr=1e-2)
    w.grad = torch.randn(16, 8)
    opt.step()
    before = opt.state[w]["proj_right"].clone()

    def broken_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    w.grad = torch.randn(16, 8)
    with pytest.warns(UserWarning, match="keeping the previous projector"):
        opt.step()
    assert torch.equal(opt.state[w]["proj_right"], before)
    assert torch.isfinite(w).all()


def test_non_finite_svd_result_keeps_previous_projector(monkeypatch):
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1}], lr=1e-2)
    w.grad = torch.randn(16, 8)
    opt.step()
    before = opt.state[w]["proj_right"].clone()
    real_svd = torch.linalg.svd

    def nan_svd(a, full_matrices=True):
        u, s, vh = real_svd(a, full_matrices=full_matrices)
        return u, s, torch.full_like(vh, float("nan"))

    monkeypatch.setattr(torch.linalg, "svd", nan_svd)
    w.grad = torch.randn(16, 8)
    with pytest.warns(UserWarning):
        opt.step()
    assert torch.equal(opt.state[w]["proj_right"], before)
    assert torch.isfinite(w).all()


def test_bf16_parameters_train_close_to_fp32():
    batches = text_batches(4)
    m32 = tiny_llama()
    m16 = tiny_llama(dtype=torch.bfloat16)
    o32 = GaLoreAdamW(_groups(m32), lr=3e-3)
    o16 = GaLoreAdamW(_groups(m16), lr=3e-3)
    l32 = _train(m32, o32, batches)
    l16 = _train(m16, o16, batches)
    weight = m16.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16
    state = o16.state[weight]
    assert state["exp_avg"].dtype == torch.float32 and state["proj_right"].dtype == torch.float32
    assert l16 == pytest.approx(l32, rel=2e-2)
    # load_state_dict must not cast our fp32 moments down to the parameter's bf16
    o16b = GaLoreAdamW(_groups(m16), lr=3e-3)
    o16b.load_state_dict(o16.state_dict())
    assert o16b.state[weight]["exp_avg"].dtype == torch.float32


def test_flat_zero_partition_gets_clear_error():
    flat = torch.nn.Parameter(torch.randn(4676))
    with pytest.raises(ValueError, match="ZeRO"):
        GaLoreAdamW([{"params": [flat], "rank": 8}])
    # a partition swapped in after construction (what DeepSpeed does) fails at step time
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}])
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn(4676)
    with pytest.raises(ValueError, match="1-D tensor of shape \\(4676,\\)"):
        opt.step()


@pytest.mark.parametrize(
    "group,kwargs,match",
    [
        ({"rank": 0}, {}, "rank=0"),
        ({"rank": 4, "proj_type": "diagonal"}, {}, "proj_type='diagonal'"),
        ({"rank": 4, "proj_method": "qr"}, {}, "proj_method='qr'"),
        ({"rank": 4, "update_proj_gap": 0}, {}, "update_proj_gap=0"),
        ({}, {"lr": -1.0}, "lr=-1.0"),
        ({}, {"betas": (0.9, 1.0)}, "betas"),
        ({}, {"accumulation_steps": 0}, "accumulation_steps=0"),
    ],
)
def test_bad_inputs_name_the_value(group, kwargs, match):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [w], **group}], **kwargs)


def test_adafactor_bad_inputs():
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="relative_step"):
        GaLoreAdafactor([w], lr=1e-3)
    with pytest.raises(ValueError, match="warmup_init"):
        GaLoreAdafactor([w], lr=1e-3, relative_step=False, warmup_init=True)


# -- param groups ----------------------------------------------------------------------------
def test_param_groups_all_linear_excludes_head_and_embeddings():
    model = tiny_llama()
    regular, galore = galore_param_groups(model, rank=8)
    ids = {id(p) for p in galore["params"]}
    assert id(model.lm_head.weight) not in ids
    assert id(model.model.embed_tokens.weight) not in ids
    linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert ids == {id(w) for w in linear}
    assert galore["rank"] == 8 and galore["scale"] == 0.25 and galore["update_proj_gap"] == 200
    n_total = sum(1 for _ in model.parameters())
    assert len(regular["params"]) + len(galore["params"]) == n_total


def test_param_groups_list_and_regex():
    model = tiny_llama()
    _, by_list = galore_param_groups(model, target_modules=["q_proj", "v_proj"], rank=8)
    _, by_regex = galore_param_groups(model, target_modules=r".*\.(q|v)_proj", rank=8)
    assert len(by_list["params"]) == 4  # 2 layers x (q, v)
    assert [id(p) for p in by_list["params"]] == [id(p) for p in by_regex["params"]]


def test_param_groups_tied_head_is_included_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    regular, galore = galore_param_groups(model, target_modules=["lm_head"], rank=8)
    assert [id(p) for p in galore["params"]] == [id(model.lm_head.weight)]
    assert id(model.lm_head.weight) not in {id(p) for p in regular["params"]}
    GaLoreAdamW([regular, galore])  # torch rejects a parameter that appears in two groups


def test_param_groups_no_match_raises():
    with pytest.raises(ValueError, match="matched no module"):
        galore_param_groups(tiny_llama(), target_modules=["not_a_module"])


# -- projector -------------------------------------------------------------------------------
def _real_gradient():
    model = tiny_llama(hidden=128)
    x = text_batches(1, batch=8, seq=64)[0]
    model(input_ids=x, labels=x).loss.backward()
    return model.model.layers[0].mlp.up_proj.weight.grad  # (320, 128)


def test_randomized_projector_captures_nearly_the_svd_energy():
    grad = _real_gradient()
    rank = 16
    exact = proj.compute_projector(grad, rank, "right", method="svd")
    g = torch.Generator().manual_seed(0)
    approx = proj.compute_projector(grad, rank, "right", method="randomized", power_iters=2, generator=g)
    e_exact = proj.captured_energy(grad, *exact)
    e_approx = proj.captured_energy(grad, *approx)
    # analytic optimum: the top-r squared singular values
    s = torch.linalg.svdvals(grad.float())
    assert e_exact == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-4)
    assert e_approx >= 0.97 * e_exact
    right = approx[1]
    torch.testing.assert_close(right @ right.T, torch.eye(rank), atol=1e-5, rtol=0)


def test_projection_sides_follow_galore_torch():
    assert proj.projection_side((10, 4), "std") == "right"
    assert proj.projection_side((4, 10), "std") == "left"
    assert proj.projection_side((10, 4), "reverse_std") == "left"
    assert proj.projection_side((4, 10), "reverse_std") == "right"
    with pytest.raises(ValueError, match="proj_type='x'"):
        proj.projection_side((4, 4), "x")


# -- functional step on already-projected gradients, across real ranks ------------------------
def _lowrank_allreduce_rank(rank, world_size):
    torch.manual_seed(0)
    w0 = torch.randn(32, 12)
    left = torch.linalg.qr(torch.randn(32, 4))[0]  # the same projector on every rank
    local_grad = torch.randn(32, 12, generator=torch.Generator().manual_seed(rank + 1))
    # (a) all-reduce the full gradient, then project
    full = local_grad.clone()
    dist.all_reduce(full)
    low_a = proj.project(full / world_size, left, None)
    # (b) project locally, all-reduce only the (4, 12) low-rank gradient
    low_b = proj.project(local_grad, left, None)
    dist.all_reduce(low_b)
    low_b /= world_size
    outs = []
    for low in (low_a, low_b):
        w = w0.clone()
        galore_adamw([w], [low], [torch.zeros_like(low)], [torch.zeros_like(low)], [torch.tensor(0.0)],
                     [left], [None], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                     correct_bias=True, scale=0.25)
        outs.append(w)
    return outs


@pytest.mark.distributed
def test_functional_step_on_allreduced_projected_gradients():
    results = run_ranks(_lowrank_allreduce_rank, 2)
    for via_full, via_low in results:
        torch.testing.assert_close(via_full, via_low, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)
