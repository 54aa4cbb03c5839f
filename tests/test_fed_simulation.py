"""The federated simulation end to end on a tiny Llama and real English text: DP accounting
against Opacus, memory O(model) (only active clients are read), reproducibility, faults, crash +
resume, byte counts, FedProx, MeZO and GaLore clients, and the privacy budget stop."""

from __future__ import annotations

import glob
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from slimtrain.federated.config import ConfigError, load_config
from slimtrain.federated.privacy import clip_delta
from slimtrain.federated.server import FederatedSimulation
from slimtrain.federated.store import ClientStore
from trainer_setup import text_file, tiny_model_dir


class SimulatedCrash(BaseException):
    """Stands in for a killed server process: not an Exception, so no client handler catches it."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed_assets")
    return {"model": tiny_model_dir(root), "text": text_file(root, nbytes=30_000)}


def make_cfg(assets, out, **extra):
    """A seconds-long DP simulation of 12 clients of the tiny model on tiny-shakespeare."""
    args = {
        "output_dir": str(out),
        "model.name": assets["model"],
        "data.files": f"[{assets['text']}]",
        "data.seq_len": 32,
        "data.max_eval_blocks": 8,
        "optim.lr": 3e-3,
        "federated.clients": 12,
        "federated.participation": 0.5,
        "federated.rounds": 3,
        "federated.local_steps": 2,
        "federated.batch_size": 4,
        "federated.partition": "iid",
        "federated.progress": False,
        "federated.dp.clip_norm": 0.5,
        "federated.dp.noise_multiplier": 1.0,
        "federated.dp.delta": 1e-3,
    }
    args.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


def params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def opacus_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(z, q, rounds)]
    return float(acc.get_epsilon(delta=delta))


# ---------------------------------------------------------------------------- DP accounting
def test_epsilon_every_round_matches_opacus(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", **{"federated.dp.noise_multiplier": 1.3})
    sim = FederatedSimulation(cfg)
    summary = sim.run()
    from slimtrain.run.metrics import read_metrics

    rows = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:  # the epsilon printed and logged after round r is Opacus's for r rounds of (q, z)
        assert r["epsilon"] == pytest.approx(opacus_epsilon(1.3, 0.5, r["round"], 1e-3), rel=1e-9)
    assert summary["epsilon"] == pytest.approx(opacus_epsilon(1.3, 0.5, 3, 1e-3), rel=1e-9)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert math.isfinite(summary["final_eval_loss"])


def test_budget_stops_before_exceeding_target_epsilon(assets, tmp_path):
    eps2, eps3 = opacus_epsilon(1.0, 0.5, 2, 1e-3), opacus_epsilon(1.0, 0.5, 3, 1e-3)
    target = (eps2 + eps3) / 2
    cfg = make_cfg(assets, tmp_path / "run", **{"federated.rounds": 5, "federated.dp.target_epsilon": target})
    summary = FederatedSimulation(cfg).run()
    assert summary["rounds"] == 2, summary
    assert summary["epsilon"] == pytest.approx(eps2) and summary["epsilon"] <= target
    assert "privacy budget" in summary["stop_reason"] and "round 3" in summary["stop_reason"]


def test_noise_multiplier_derived_from_target_epsilon(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", **{"federated.dp.noise_multiplier": 0, "federated.dp.target_epsilon": 8.0,
                                                "federated.rounds": 2})
    summary = FederatedSimulation(cfg).run()
    assert summary["rounds"] == 2  # the derived z spends at most the budget over the configured rounds
    assert summary["epsilon"] <= 8.0
    assert summary["epsilon"] == pytest.approx(opacus_epsilon(summary["noise_multiplier"], 0.5, 2, 1e-3))


# ---------------------------------------------------------------------------- memory O(model)
def test_only_active_clients_are_loaded_and_nothing_is_kept(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", **{"federated.compression": "topk", "federated.compression_fraction": 0.1,
                                                "federated.keep_client_optimizer_state": True})
    sim = FederatedSimulation(cfg)
    seen = set()
    for _ in range(3):
        sim.store.reset_counters()
        _, active = sim._sample(sim.round)
        record = sim.run_round(say=lambda *_: None)
        assert sim.store.loaded_ids == active.tolist(), "a client outside the round was read from disk"
        assert record["active"] == len(active)
        # error-feedback residuals went to disk with the client; the server keeps none in memory
        assert sim.compressor.state_dict() == {}
        seen |= set(active.tolist())
    files = os.listdir(tmp_path / "run" / "clients")
    assert {int(f.split(".")[0]) for f in files} == seen
    state = torch.load(sorted(glob.glob(str(tmp_path / "run" / "clients" / "*.pt")))[0], weights_only=True)
    assert {"position", "optim", "compressor"} <= set(state)


def test_spilled_replies_give_the_same_model_and_one_reply_in_memory(assets, tmp_path, monkeypatch):
    """Replies wait on disk until aggregation (memory O(model) however many reply), which must
    not change a single bit of the result; aggregation reads them one at a time."""
    from slimtrain.federated import store

    results = {}
    for spill in (False, True):
        sim = FederatedSimulation(make_cfg(assets, tmp_path / f"spill{spill}", **{"federated.spill_replies": spill}))
        alive, peak = [0], [0]
        if spill:  # count spilled deltas materialised at once during aggregation
            real_load = store.SpilledDelta._load

            class Counted(dict):
                def __del__(self):
                    alive[0] -= 1

            def load(self):
                alive[0] += 1
                peak[0] = max(peak[0], alive[0])
                return Counted(real_load(self))

            monkeypatch.setattr(store.SpilledDelta, "_load", load)
        sim.run()
        monkeypatch.undo()
        results[spill] = sim.global_params
        assert not os.path.exists(tmp_path / f"spill{spill}" / "replies")  # scratch removed after each round
        if spill:
            assert 1 <= peak[0] <= 2, peak[0]  # DP's shape template may hold the first one a moment longer
    assert params_equal(results[False], results[True])


def test_client_store_versions_and_rollback(tmp_path):
    store = ClientStore(str(tmp_path))
    store.save(3, 1, {"position": 4})
    store.commit(1)
    store.save(3, 2, {"position": 8})
    store.save(3, 3, {"position": 12})  # rounds 2 and 3 are newer than the committed round 1
    assert sorted(os.listdir(tmp_path)) == ["3.r00000001.pt", "3.r00000002.pt", "3.r00000003.pt"]
    assert store.load(3)["position"] == 12
    store.rollback(1)  # a resume from the round-1 checkpoint redoes rounds 2 and 3
    assert store.load(3)["position"] == 4
    store.commit(3)
    store.save(3, 4, {"position": 16})  # round 1's version is still what a resume from round 3 loads
    assert sorted(os.listdir(tmp_path)) == ["3.r00000001.pt", "3.r00000004.pt"]
    store.commit(4)
    store.save(3, 5, {"position": 20})  # now round 4's version supersedes it
    assert sorted(os.listdir(tmp_path)) == ["3.r00000004.pt", "3.r00000005.pt"]
    assert store.load(7) == {} and store.loaded_ids == [3, 3, 7]
    torch.load(tmp_path / "3.r00000005.pt", weights_only=True)


# ---------------------------------------------------------------------------- reproducibility
def test_same_seed_same_result_other_seed_differs(assets, tmp_path):
    a = FederatedSimulation(make_cfg(assets, tmp_path / "a", **{"federated.partition": "shards"}))
    a.run()
    b = FederatedSimulation(make_cfg(assets, tmp_path / "b", **{"federated.partition": "shards"}))
    b.run()
    assert all(np.array_equal(x, y) for x, y in zip(a.client_blocks, b.client_blocks))
    assert params_equal(a.global_params, b.global_params)
    c = FederatedSimulation(make_cfg(assets, tmp_path / "c", **{"federated.partition": "shards", "federated.seed": 1}))
    assert not all(np.array_equal(x, y) for x, y in zip(a.client_blocks, c.client_blocks))
    assert not np.array_equal(a._sample(0)[0], c._sample(0)[0]) or not np.array_equal(a._sample(1)[0], c._sample(1)[0])


def test_dirichlet_over_source_documents_skews_clients():
    from slimtrain.federated.partition import partition
    from slimtrain.run.config import DataConfig
    from slimtrain.run.data import ByteTokenizer, pack

    data = pack(DataConfig(seq_len=256), ByteTokenizer())  # the built-in corpus: 79 documents
    docs = data.train_docs.numpy()
    # independent check of the block -> document map: block i starts inside document docs[i]
    assert docs.min() == 0 and np.all(np.diff(docs) >= 0) and len(np.unique(docs)) > 50
    skewed = partition("dirichlet", docs, 20, alpha=0.05, seed=0)
    iid = partition("iid", docs, 20, seed=0)
    top_share = lambda parts: np.mean([np.bincount(docs[p]).max() / len(p) for p in parts])  # noqa: E731
    assert top_share(skewed) > 2 * top_share(iid)


# ---------------------------------------------------------------------------- faults
def fixed_round_cfg(assets, out, **extra):
    base = {"federated.clients_per_round": 6, "federated.participation": 0, "federated.rounds": 1,
            "federated.timeout_s": 30.0}
    base.update(extra)
    return make_cfg(assets, out, **base)


def test_faulty_clients_are_dropped_and_fedavg_is_over_the_survivors(assets, tmp_path):
    cfg = fixed_round_cfg(assets, tmp_path / "faulty", **{"federated.dp.enabled": False})
    sim = FederatedSimulation(cfg)
    global0 = {k: v.clone() for k, v in sim.global_params.items()}
    active = sim._sample(0)[1].tolist()
    faults = {active[0]: "raise", active[2]: "nonfinite", active[4]: "timeout"}
    sim.fault_fn = lambda r, cid: faults.get(cid)
    record = sim.run_round(say=lambda *_: None)
    reasons = {d["client"]: d["reason"] for d in record["dropped"]}
    assert set(reasons) == set(faults)
    assert "raised ClientFailure" in reasons[active[0]]
    assert "non-finite" in reasons[active[2]]
    assert "timed out" in reasons[active[4]]
    assert record["replied"] == 3 and record["sampled"] == 6
    survivors = [c for c in active if c not in faults]
    assert sorted(int(f.split(".")[0]) for f in os.listdir(tmp_path / "faulty" / "clients")) == survivors

    # hand recomputation: each survivor trained alone from the same global model, then the
    # example-weighted mean (equal counts here) of their deltas, applied with server_lr 1
    ref = FederatedSimulation(fixed_round_cfg(assets, tmp_path / "ref", **{"federated.dp.enabled": False}))
    deltas = [ref.runner.run(c, 0, global0, {}).update.delta for c in survivors]
    expected = {k: global0[k] + sum(d[k] for d in deltas) / len(deltas) for k in global0}
    for k in expected:
        # 1e-6: a few fp32 ulps of the weights (~1); a wrong denominator would be off by ~1e-3
        torch.testing.assert_close(sim.global_params[k], expected[k], rtol=0, atol=1e-6)


def test_dp_noise_is_not_lowered_when_clients_drop(assets, tmp_path):
    extra = {"federated.dp.clip_norm": 0.05, "federated.dp.noise_multiplier": 0.7}
    full = FederatedSimulation(fixed_round_cfg(assets, tmp_path / "full", **extra))
    faulty = FederatedSimulation(fixed_round_cfg(assets, tmp_path / "faulty", **extra))
    global0 = {k: v.clone() for k, v in full.global_params.items()}
    active = full._sample(0)[1].tolist()
    dropped = {active[1]: "raise", active[3]: "nonfinite"}
    faulty.fault_fn = lambda r, cid: dropped.get(cid)
    full.run_round(say=lambda *_: None)
    faulty.run_round(say=lambda *_: None)
    clipped = {c: clip_delta(full.runner.run(c, 0, global0, {}).update.delta, 0.05)[0] for c in active}
    m = 6.0  # expected clients: the denominator stays 6 although only 4 replied
    # what is left after removing each run's clipped sum / m is its noise / m: it must be the same
    # noise (same std, same draw) whether 6 or 4 clients replied
    for k in global0:
        noise_full = full.global_params[k] - global0[k] - sum(clipped[c][k] for c in active) / m
        noise_faulty = faulty.global_params[k] - global0[k] - sum(clipped[c][k] for c in active if c not in dropped) / m
        torch.testing.assert_close(noise_faulty, noise_full, rtol=0, atol=2e-6)
    flat = torch.cat([(full.global_params[k] - global0[k] - sum(clipped[c][k] for c in active) / m).reshape(-1)
                      for k in global0])
    assert float(flat.std()) == pytest.approx(0.7 * 0.05 / m, rel=0.05)  # z C / m


def test_real_slow_client_is_dropped_by_the_deadline(assets, tmp_path, monkeypatch):
    # The deadline is measured by the server's own clock around the whole client round (not
    # only the injected straggle_s of the "timeout" fault). The clock is a fake one that moves
    # only when a client "works", so the slow client is exactly 0.6 s late and the others take
    # 0 s, however loaded the machine is (a real sleep against a 0.5 s deadline could drop the
    # others too).
    sim = FederatedSimulation(fixed_round_cfg(assets, tmp_path / "slow", **{"federated.dp.enabled": False,
                                                                             "federated.timeout_s": 0.5}))
    now = [1000.0]
    server_module = sys.modules[type(sim).__module__]
    monkeypatch.setattr(server_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    active = sim._sample(0)[1].tolist()
    run = sim.runner.run

    def slow_run(cid, *a, **kw):
        out = run(cid, *a, **kw)
        now[0] += 0.6 if cid == active[0] else 0.0  # simulated seconds of this client's round
        return out

    sim.runner.run = slow_run
    record = sim.run_round(say=lambda *_: None)
    assert [d["client"] for d in record["dropped"]] == [active[0]] and record["replied"] == 5
    assert "0.60 s > federated.timeout_s=0.5" in record["dropped"][0]["reason"]


# ---------------------------------------------------------------------------- crash and resume
def crash_during(sim, crash_round: int) -> None:
    """Make ``sim.run()`` die inside round ``crash_round`` (0-based), at its second active client
    (the first has already saved its state: a half-written round)."""
    victim = sim._sample(crash_round)[1].tolist()[1]

    def crash(r, cid):
        if r == crash_round and cid == victim:
            raise SimulatedCrash()
        return None

    sim.fault_fn = crash


def test_crash_and_resume_equals_uninterrupted_run(assets, tmp_path):
    extra = {"federated.rounds": 4, "federated.compression": "topk", "federated.compression_fraction": 0.2,
             "federated.keep_client_optimizer_state": True, "federated.strategy": "fedadam"}
    straight = FederatedSimulation(make_cfg(assets, tmp_path / "straight", **extra))
    straight.run()

    out = tmp_path / "crashed"
    sim = FederatedSimulation(make_cfg(assets, out, **extra))
    crash_round = 2  # 0-based: rounds 1 and 2 are checkpointed, round 3 dies half-way
    crash_during(sim, crash_round)
    with pytest.raises(SimulatedCrash):
        sim.run()
    assert sim.round == crash_round
    assert any(f.endswith(f".r{crash_round + 1:08d}.pt") for f in os.listdir(out / "clients"))  # half-written round

    resumed = FederatedSimulation(make_cfg(assets, out, **extra), resume=True)
    assert resumed.round == crash_round
    assert resumed.epsilon == pytest.approx(opacus_epsilon(1.0, 0.5, crash_round, 1e-3), rel=1e-9)  # not reset
    summary = resumed.run()
    assert params_equal(resumed.global_params, straight.global_params)
    assert summary["epsilon"] == pytest.approx(straight.epsilon, rel=1e-12)
    from slimtrain.run.metrics import read_metrics

    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    ref_rows = read_metrics(str(tmp_path / "straight" / "metrics.jsonl"))
    assert [r["epsilon"] for r in rows] == pytest.approx([r["epsilon"] for r in ref_rows])
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in ref_rows]
    # every checkpoint and client file is tensors / plain numbers only
    for path in glob.glob(str(out / "checkpoints" / "*" / "*.pt")) + glob.glob(str(out / "clients" / "*.pt")):
        torch.load(path, weights_only=True)


def test_fresh_start_refuses_old_checkpoints_and_clears_stale_clients(assets, tmp_path):
    import shutil

    FederatedSimulation(make_cfg(assets, tmp_path / "run", **{"federated.rounds": 1})).run()
    with pytest.raises(ConfigError, match="--resume"):
        FederatedSimulation(make_cfg(assets, tmp_path / "run"))
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # e.g. a run killed before its first checkpoint
    assert os.listdir(tmp_path / "run" / "clients")
    FederatedSimulation(make_cfg(assets, tmp_path / "run"))
    assert os.listdir(tmp_path / "run" / "clients") == []


def test_resume_refuses_a_different_partition(assets, tmp_path):
    FederatedSimulation(make_cfg(assets, tmp_path / "run", **{"federated.rounds": 1})).run()
    with pytest.raises(ConfigError, match="federated.clients"):
        FederatedSimulation(make_cfg(assets, tmp_path / "run", **{"federated.clients": 10}), resume=True)


# ---------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("compression", ["none", "topk"])
def test_byte_counts_are_the_tensor_bytes_sent(assets, tmp_path, compression):
    sim = FederatedSimulation(make_cfg(assets, tmp_path / "run", **{"federated.compression": compression,
                                                                    "federated.compression_fraction": 0.05}))
    trainable = [(n, p) for n, p in sim.model.named_parameters() if p.requires_grad]
    model_bytes = sum(p.numel() * 4 for _, p in trainable)  # fp32 broadcast of every trainable tensor
    if compression == "none":
        per_client = model_bytes
    else:  # ceil(f * numel) fp32 values + int32 indices per tensor, plus its int64 shape
        per_client = sum(math.ceil(0.05 * p.numel()) * (4 + 4) + 8 * p.dim() for _, p in trainable)
    for _ in range(2):
        record = sim.run_round(say=lambda *_: None)
        assert record["bytes_down"] == record["active"] * model_bytes
        assert record["bytes_up"] == record["replied"] * per_client


def test_lowrank_compression_reuses_the_clients_galore_projector(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", **{"optim.name": "galore_adamw", "optim.args.rank": 4,
                                                "optim.args.update_proj_gap": 10, "federated.compression": "lowrank",
                                                "federated.dp.enabled": False, "federated.rounds": 1})
    sim = FederatedSimulation(cfg)
    cid = sim._sample(0)[1].tolist()[0]
    res = sim.runner.run(cid, 0, sim.global_params, {})
    assert res.projectors, "GaLore clients expose their projectors"
    payload = sim.compressor.compress(cid, res.update.delta, context={"projectors": res.projectors})
    name, (left, right) = next(iter(res.projectors.items()))
    sent = left if left is not None else right
    torch.testing.assert_close(payload[f"{name}|{'left' if left is not None else 'right'}"], sent)
    record = sim.run_round(say=lambda *_: None)
    assert 0 < record["bytes_up"] < record["bytes_down"] / 2


# ---------------------------------------------------------------------------- client algorithms
def test_fedprox_pulls_the_client_towards_the_global_model(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", **{"federated.strategy": "fedprox", "federated.prox_mu": 0.0,
                                                "federated.local_steps": 4, "federated.dp.enabled": False})
    sim = FederatedSimulation(cfg)
    g = sim.global_params
    plain = sim.runner.run(0, 0, g, {}, prox_mu=0.0).update.delta
    prox = sim.runner.run(0, 0, g, {}, prox_mu=50.0).update.delta
    again = sim.runner.run(0, 0, g, {}, prox_mu=0.0).update.delta
    assert params_equal(plain, again)  # a client-round is a pure function of its inputs
    norm = lambda d: math.sqrt(sum(float(t.pow(2).sum()) for t in d.values()))  # noqa: E731
    assert norm(prox) < 0.9 * norm(plain)  # ||w_prox - w_global|| < ||w_plain - w_global||
    # the first step starts at w == w_global, where the proximal gradient is zero
    one = make_cfg(assets, tmp_path / "one", **{"federated.local_steps": 1, "federated.dp.enabled": False})
    sim1 = FederatedSimulation(one)
    torch.testing.assert_close(sim1.runner.run(0, 0, g, {}, prox_mu=50.0).update.delta,
                               sim1.runner.run(0, 0, g, {}, prox_mu=0.0).update.delta, rtol=0, atol=1e-6)


def test_zeroth_order_clients_train_with_a_closure(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", **{"optim.name": "mezo", "optim.lr": 1e-4, "federated.rounds": 2})
    sim = FederatedSimulation(cfg)
    assert sim.runner.spec.zeroth_order
    r0 = sim.runner.run(0, 0, sim.global_params, {})
    r1 = sim.runner.run(1, 0, sim.global_params, {})
    n0 = sum(float(t.abs().sum()) for t in r0.update.delta.values())
    assert n0 > 0 and math.isfinite(r0.loss)
    # different clients draw different perturbation directions
    assert not params_equal(r0.update.delta, r1.update.delta)
    summary = sim.run()
    assert summary["rounds"] == 2 and math.isfinite(summary["final_eval_loss"])


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, words", [
    (["federated.clients_per_round=5"], ["clients_per_round=5", "participation=0.1", "exactly one"]),
    (["federated.strategy=fedau"], ["fedau", "federated.dp.enabled=false"]),
    (["federated.dp.clip=1"], ["federated.dp.clip", "clip_norm"]),
    (["federated.partition=random"], ["federated.partition", "dirichlet", "shards"]),
    (["federated.prox_mu=0.1"], ["federated.prox_mu", "fedprox"]),
    (["federated.dp.delta=2"], ["federated.dp.delta", "between 0 and 1"]),
])
def test_config_errors_name_the_key_and_the_fix(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_optimizer_and_unsupported_one_are_config_errors(assets, tmp_path):
    with pytest.raises(ConfigError, match="allowed choices"):
        FederatedSimulation(make_cfg(assets, tmp_path / "a", **{"optim.name": "sgdx"}))
    with pytest.raises(ConfigError, match="qgalore_adamw8bit"):
        FederatedSimulation(make_cfg(assets, tmp_path / "b", **{"optim.name": "qgalore_adamw8bit"}))
