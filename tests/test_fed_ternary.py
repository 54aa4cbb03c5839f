"""Ternary (ComPEFT) uploads: decompression equals the dense formula, bytes equal the stated
encoding, error feedback telescopes, a simulation with ternary + DP trains, and a crashed ternary
run resumes to the uninterrupted one's weights bit for bit (error-feedback residuals included)."""

from __future__ import annotations

import math

import pytest
import torch

from slimtrain.federated import TernaryCompressor, build_compressor, global_norm
from slimtrain.federated.server import FederatedSimulation
from test_fed_simulation import SimulatedCrash, assets, crash_during, make_cfg, params_equal  # noqa: F401  (fixture)


def _raw_bytes(payload) -> int:
    return sum(len(t.contiguous().numpy().tobytes()) for t in payload.values())


def _dense_formula(x: torch.Tensor, fraction: float, scale: str = "mean", alpha: float = 1.0) -> torch.Tensor:
    """scale * sign(x) on the ceil(f * numel) largest |x|, zero elsewhere (ComPEFT)."""
    flat = x.reshape(-1).double()
    k = math.ceil(fraction * flat.numel())
    order = flat.abs().argsort(descending=True)[:k]
    s = flat[order].abs().mean() if scale == "mean" else alpha * flat.std()
    out = torch.zeros_like(flat)
    out[order] = s * flat[order].sign()
    return out.view(x.shape)


def _delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"attn.weight": torch.randn(48, 32, generator=g) * torch.exp(torch.randn(48, 32, generator=g)),
            "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
            "norm.weight": torch.randn(32, generator=g)}


@pytest.mark.parametrize("fraction", [0.02, 0.3])  # sparse and dense encodings
@pytest.mark.parametrize("scale,alpha", [("mean", 1.0), ("std", 1.0), ("std", 2.5)])
def test_decompression_equals_the_dense_formula(fraction, scale, alpha):
    comp = TernaryCompressor(fraction, scale=scale, alpha=alpha)
    delta = _delta(0)
    back = comp.decompress(comp.compress(3, delta))
    for name, x in delta.items():
        want = _dense_formula(x, fraction, scale, alpha)
        # same support and signs exactly; the scale differs only by float32 vs float64 summation
        assert torch.equal(back[name] != 0, want != 0), name
        assert torch.equal(back[name].sign(), want.sign().float()), name
        torch.testing.assert_close(back[name].double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fraction", [0.02, 0.3])
def test_bytes_are_the_stated_encoding(fraction):
    comp = TernaryCompressor(fraction)
    delta = _delta(1)
    payload = comp.compress(0, delta)
    assert comp.nbytes(payload) == _raw_bytes(payload)
    expected = 0
    for x in delta.values():
        d, k = x.numel(), math.ceil(fraction * x.numel())
        sparse, dense = 4 * k + math.ceil(k / 8), math.ceil(d / 4)  # int32 index + sign bit | 2-bit codes
        expected += min(sparse, dense) + 4 + 8 * x.dim()  # + fp32 scale + int64 shape
    assert comp.nbytes(payload) == expected
    uses_dense = {n for n in delta if f"{n}|codes" in payload}
    assert uses_dense == (set(delta) if fraction == 0.3 else set())  # sparse below ~6% density


def test_error_feedback_telescopes():
    """What was sent plus what the client still holds equals every delta ever produced."""
    g = torch.Generator().manual_seed(0)
    drift = torch.randn(1000, generator=g)
    deltas = [{"w": drift + 0.5 * torch.randn(1000, generator=g)} for _ in range(200)]
    comp = TernaryCompressor(0.1)
    sent = torch.zeros(1000)
    for d in deltas:
        sent += comp.decompress(comp.compress(7, d))["w"]
    true = torch.stack([d["w"] for d in deltas]).sum(0)
    residual = comp.client_state(7)["w"]
    torch.testing.assert_close(sent + residual, true, atol=1e-3, rtol=0)
    assert float(residual.norm()) < 0.05 * float(true.norm())  # the residual stays bounded
    plain = TernaryCompressor(0.1, error_feedback=False)
    lost = sum(plain.decompress(plain.compress(7, d))["w"] for d in deltas)
    assert float((lost - true).norm()) > 5 * float(residual.norm())
    assert global_norm(plain.client_state(7)) == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="fraction=0"):
        build_compressor("ternary", fraction=0)
    with pytest.raises(ValueError, match="scale='max' is not one of"):
        TernaryCompressor(0.1, scale="max")
    with pytest.raises(ValueError, match="alpha=0.0 must be > 0"):
        TernaryCompressor(0.1, scale="std", alpha=0.0)


def test_simulation_with_ternary_and_dp_trains(assets, tmp_path):  # noqa: F811
    cfg = make_cfg(assets, tmp_path / "run", **{"federated.compression": "ternary",
                                                "federated.compression_fraction": 0.05, "federated.rounds": 3,
                                                "federated.local_steps": 4, "federated.dp.noise_multiplier": 0.3,
                                                "optim.lr": 1e-2,
                                                "federated.dp.clip_norm": 1.0})
    sim = FederatedSimulation(cfg)
    before = sim.evaluate()
    trainable = [p for p in sim.model.parameters() if p.requires_grad]
    per_client = sum(min(4 * math.ceil(0.05 * p.numel()) + math.ceil(math.ceil(0.05 * p.numel()) / 8),
                         math.ceil(p.numel() / 4)) + 4 + 8 * p.dim() for p in trainable)
    epsilons = []
    for _ in range(3):
        record = sim.run_round(say=lambda *_: None)
        assert record["bytes_up"] == record["replied"] * per_client
        epsilons.append(record["epsilon"])
    after = sim.evaluate()
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # DP accounted every round
    assert after < before - 0.05, (before, after)


def test_crash_and_resume_with_ternary_uploads_equals_uninterrupted_run(assets, tmp_path):  # noqa: F811
    # each client's error-feedback residual lives in its on-disk state: a resume must carry it
    extra = {"federated.rounds": 4, "federated.compression": "ternary", "federated.compression_fraction": 0.1,
             "federated.dp.noise_multiplier": 0.3, "federated.dp.clip_norm": 1.0, "optim.lr": 1e-2}
    straight = FederatedSimulation(make_cfg(assets, tmp_path / "straight", **extra))
    straight.run()

    out = tmp_path / "crashed"
    sim = FederatedSimulation(make_cfg(assets, out, **extra))
    crash_round = 2
    crash_during(sim, crash_round)
    with pytest.raises(SimulatedCrash):
        sim.run()
    resumed = FederatedSimulation(make_cfg(assets, out, **extra), resume=True)
    assert resumed.round == crash_round
    summary = resumed.run()
    assert params_equal(resumed.global_params, straight.global_params)
    assert summary["epsilon"] == pytest.approx(straight.epsilon, rel=1e-12)
