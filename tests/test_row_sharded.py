"""GaLore on row-sharded matrices (FSDP2's Shard(0) DTensors) with real gloo processes.

Each rank holds rows k of a tiny Llama's MLP gate_proj (160, 64) and of its real gradients on
tiny-shakespeare, as a DTensor on a 1-D mesh. References are single-process:
``projector.randomized_range`` and exact SVD on the whole gradient, and unsharded
``GaLoreAdamW(proj_type="right", proj_method="randomized")``. At this shape the sharded refresh
takes the distributed range finder (:func:`slimtrain.optim.row_shards.refresh_plan`).
"""

from __future__ import annotations

import pytest
import torch

from helpers import run_ranks, text_batches, tiny_llama
from slimtrain.optim import GaLoreAdamW
from slimtrain.optim import projector as proj
from slimtrain.optim import row_shards
from slimtrain.parallel import Comm

RANK_R, OVERSAMPLE, POWER_ITERS = 8, 8, 2
GAP, STEPS, SEED = 3, 7, 11  # refreshes at steps 0, 3, 6
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, scale=0.25)


@pytest.fixture(scope="module")
def trajectory():
    """gate_proj of layer 1 after 3 AdamW steps on real text, and its gradients on the next
    STEPS batches (taken along the AdamW run, so they change from step to step)."""
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    weight = model.model.layers[1].mlp.gate_proj.weight
    w0, grads = None, []
    for i, x in enumerate(text_batches(3 + STEPS, batch=8, seq=64)):
        model(input_ids=x, labels=x).loss.backward()
        if i == 3:
            w0 = weight.detach().clone()
        if i >= 3:
            grads.append(weight.grad.clone())
        opt.step()
        opt.zero_grad()
    return w0, grads


def _rows(t, rank, world_size):
    m = t.shape[0]
    return t[rank * m // world_size : (rank + 1) * m // world_size]


def _worker(rank, world_size, w0, grads):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    comm = Comm()
    p = row_shards.distributed_right_projector(_rows(grads[0], rank, world_size), RANK_R, comm.all_reduce,
                                               oversample=OVERSAMPLE, power_iters=POWER_ITERS, seed=SEED)
    finder = {"p": p, "bytes": dict(comm.bytes), "calls": dict(comm.calls)}
    # GaLoreAdamW itself on the DTensor shards, as FSDP2 hands them to it
    mesh = init_device_mesh("cpu", (world_size,))

    def shard(t):
        return DTensor.from_local(_rows(t, rank, world_size).clone(), mesh, [Shard(0)], shape=t.shape,
                                  stride=t.stride())

    w = torch.nn.Parameter(shard(w0))
    opt = GaLoreAdamW([{"params": [w], "rank": RANK_R, "update_proj_gap": GAP, "proj_type": "right",
                        "proj_method": "randomized", "oversample": OVERSAMPLE, "power_iters": POWER_ITERS,
                        "proj_seed": SEED, "scale": HYPER["scale"]}],
                      lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    plan = row_shards.refresh_plan(tuple(w0.shape), RANK_R, "randomized", OVERSAMPLE, POWER_ITERS)
    weights = []
    for g in grads:
        w.grad = shard(g)
        opt.step()
        weights.append(w.to_local().detach().clone())
    return {"finder": finder, "weights": weights, "exp_avg": opt.state[w]["exp_avg"], "plan": plan}


def _signs_fixed(p):
    # the reference's singular vectors with each row's largest-|entry| made positive
    peak = p.gather(1, p.abs().argmax(dim=1, keepdim=True))
    return p * torch.where(peak < 0, -1.0, 1.0)


def _reference(w0, grads, steps, fix_signs):
    w = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([{"params": [w], "rank": RANK_R, "update_proj_gap": GAP, "proj_type": "right",
                        "proj_method": "randomized", "oversample": OVERSAMPLE, "power_iters": POWER_ITERS,
                        "proj_seed": SEED, "scale": HYPER["scale"]}],
                      lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    weights = []
    for g in grads[:steps]:
        if fix_signs:  # refresh as GaLoreAdamW does, then only normalise the rows' signs
            if opt.needs_refresh(w):
                opt.refresh_projector(w, g, opt.param_groups[0])
                opt.state[w]["proj_right"] = _signs_fixed(opt.state[w]["proj_right"])
            opt.set_projected_grad(w, opt.project_grad(w, g))
        else:
            w.grad = g.clone()
        opt.step()
        weights.append(w.detach().clone())
    return weights, opt.state[w]


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_row_sharded_galore_matches_single_process(trajectory, world_size):
    w0, grads = trajectory
    out = run_ranks(_worker, world_size, w0, grads)
    n = w0.shape[1]
    ell = RANK_R + OVERSAMPLE

    # (a) range finder from row shards == single-process randomized range finder on the whole G
    g = grads[0]
    _, ref = proj.randomized_range(g, RANK_R, oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                                   generator=torch.Generator().manual_seed(SEED))
    p = out[0]["finder"]["p"]
    for other in out[1:]:
        assert torch.equal(other["finder"]["p"], p)  # every rank holds the same projector, bit for bit
    # fp32: the two differ only in the order of float operations (measured ~1e-6)
    torch.testing.assert_close(p, _signs_fixed(ref), atol=2e-5, rtol=0)
    _, exact = proj.compute_projector(g, RANK_R, "right", method="svd")
    lost_exact = 1.0 - proj.captured_energy(g, None, exact)
    lost = 1.0 - proj.captured_energy(g, None, p)
    assert 0 < lost_exact < 1e-2  # a real, non-trivial gradient at this rank
    assert lost <= 1.01 * lost_exact  # within 1% of the optimum's lost energy
    # ... for (power_iters + 1) all-reduces of (n, r + p) floats
    assert out[0]["finder"]["calls"] == {"all_reduce": POWER_ITERS + 1}
    assert out[0]["finder"]["bytes"] == {"all_reduce": (POWER_ITERS + 1) * n * ell * 4}

    # (b) GaLoreAdamW on the DTensor shards == unsharded GaLoreAdamW, rows concatenated
    assert out[0]["plan"] == "range_finder"
    sharded = [torch.cat([o["weights"][t] for o in out]) for t in range(STEPS)]
    # one refresh: the reference exactly as users run it (a projector's signs cannot matter yet)
    plain, _ = _reference(w0, grads, GAP, fix_signs=False)
    for t in range(GAP):
        torch.testing.assert_close(sharded[t], plain[t], atol=1e-6, rtol=1e-5)
    # later refreshes keep the moments, so the reference's singular vectors get the same signs
    ref_weights, ref_state = _reference(w0, grads, STEPS, fix_signs=True)
    for t in range(STEPS):
        torch.testing.assert_close(sharded[t], ref_weights[t], atol=1e-6, rtol=1e-5)
    # the sharded moments are the rows of the unsharded ones
    torch.testing.assert_close(torch.cat([o["exp_avg"] for o in out]), ref_state["exp_avg"], atol=1e-7, rtol=1e-4)
    assert not torch.equal(sharded[-1], w0)
