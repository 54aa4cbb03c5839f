"""slimtrain.parallel: whole-tensor ownership and DataParallelOptimizer's bytes, counted by hand
with real gloo processes (its trajectories are tested through the trainer in
test_data_parallel_trainer.py; DDP's low-rank hook in test_ddp_engine.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import run_ranks, tiny_llama
from slimtrain.optim import GaLoreAdamW, galore_param_groups
from slimtrain.parallel import Comm



def test_owner_assignment_balances_state():
    from slimtrain.parallel import assign_owners, state_cost

    model = tiny_llama()
    groups = galore_param_groups(model, rank=8)
    owners = assign_owners(groups, 4)
    load = [0] * 4
    for g, own in zip(groups, owners):
        for p, o in zip(g["params"], own):
            load[o] += state_cost(p, g)
    biggest = max(state_cost(p, g) for g in groups for p in g["params"])
    assert max(load) - min(load) <= biggest  # greedy largest-first bound


# -- DataParallelOptimizer byte accounting, counted by hand from the shapes ---------------------
class _ByteNet(torch.nn.Module):
    """Small shapes whose bytes are easy to count: two GaLore matrices (one tall, one wide) and
    four tensors GaLore leaves alone (embedding, output head, a bias, a norm)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 16)  # (50, 16): plain
        self.up = torch.nn.Linear(16, 40, bias=False)  # (40, 16): GaLore
        self.down = torch.nn.Linear(40, 16)  # weight (16, 40): GaLore; bias (16,): plain
        self.norm = torch.nn.Parameter(torch.ones(16))  # plain
        self.lm_head = torch.nn.Linear(16, 50, bias=False)  # (50, 16): output layer, plain


def _dp_bytes(rank, world_size):
    from slimtrain.parallel import DataParallelOptimizer

    out = {}
    for name, stage in (("adamw0", 0), ("adamw2", 2), ("galore0", 0)):
        torch.manual_seed(0)
        model = _ByteNet()
        if name.startswith("galore"):
            opt = GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=200), lr=1e-3)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        comm = Comm()
        dpo = DataParallelOptimizer(opt, zero_stage=stage, comm=comm)
        gen = torch.Generator().manual_seed(rank)
        steps = []
        for _ in range(2):  # GaLore: step 1 computes the projectors, step 2 is a steady step
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            comm.reset()
            dpo.sync_gradients()
            dpo.clip_grad_norm_(1.0)
            dpo.step()
            dpo.zero_grad()
            steps.append(dict(comm.bytes))
        out[name] = steps
    return out


@pytest.mark.distributed
def test_data_parallel_optimizer_bytes_match_hand_count():
    f32 = 4
    plain = 50 * 16 + 50 * 16 + 16 + 16  # embedding, head, bias, norm
    every = plain + 40 * 16 + 16 * 40  # + the two GaLore matrices, whole
    r = 4
    # GaLore keeps the larger side: (40, 16) -> (40, r), (16, 40) -> (r, 40): r * max(m, n) each
    galore_steady = plain + r * 40 + r * 40
    for out in run_ranks(_dp_bytes, 2):  # every rank hands the same payload to each collective
        for step in out["adamw0"]:  # DDP: every gradient all-reduced once, nothing else
            assert step == {"all_reduce": every * f32}
        for step in out["adamw2"]:
            # ZeRO-2: each gradient reduced once (to its owner), each parameter broadcast once
            # (from its owner), plus the one-scalar all-reduce of the global clipping norm
            assert step == {"reduce": every * f32, "broadcast": every * f32, "all_reduce": 1 * f32}
        steady = out["galore0"][1]
        assert steady == {"all_reduce": galore_steady * f32}
