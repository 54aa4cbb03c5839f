"""slimtrain.federated.privacy: DP-FedAvg's noise and clipping against their analytic values
(McMahan et al. 2018), the adaptive-clipping noise split of Andrew et al. (2021), and the
privacy accountant against Opacus's RDP analysis and against published epsilons."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from slimtrain.federated import (
    ClientUpdate,
    DPFedAvgAggregator,
    DPStrategy,
    FedAdam,
    FedAU,
    FedAvg,
    PrivacyAccountant,
    clip_delta,
    global_norm,
    noise_multiplier_for,
)



def _opacus():
    """Opacus's RDP analysis and accountant, the reference of the accountant tests (the
    clipping and noise tests need neither): ``(rdp module, RDPAccountant, its orders)``."""
    rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
    from opacus.accountants import RDPAccountant

    return rdp, RDPAccountant, RDPAccountant.DEFAULT_ALPHAS


@pytest.fixture(autouse=True)
def _quiet_opacus():
    # Opacus warns when the optimal RDP order sits at the edge of its grid; not a test concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _delta(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(30, 20, generator=g) * scale, "a.bias": torch.randn(20, generator=g) * scale}


def _zeros_like(d):
    return {k: torch.zeros_like(t) for k, t in d.items()}


# ---------------------------------------------------------------------------- clipping
def test_clip_delta_bounds_the_global_norm_and_keeps_direction():
    d = _delta(0, scale=3.0)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in d.values()))
    clipped, reported = clip_delta(d, 2.0)
    assert reported == pytest.approx(norm, rel=1e-9)
    assert global_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    for k in d:
        assert torch.allclose(clipped[k], d[k] * (2.0 / norm), atol=1e-6)
    small = {k: t * 1e-3 for k, t in d.items()}
    same, _ = clip_delta(small, 2.0)
    assert all(torch.equal(same[k], small[k]) for k in d)  # under the bound: untouched
    with pytest.raises(ValueError, match="non-finite"):
        clip_delta({"x": torch.tensor([float("nan")])}, 1.0)


def test_each_contribution_is_bounded_so_sensitivity_is_C_over_m():
    """Without noise the output is sum_i clip(d_i) / m; adding one user with a huge delta moves it
    by exactly C / m in norm, never more."""
    C, m = 1.5, 8.0
    agg = DPFedAvgAggregator(C, 0.0, m, seed=0)
    ups = [ClientUpdate(i, _delta(i, scale=0.01 * 10**i), 1) for i in range(4)]  # norms 0.2 .. 200
    out = agg.combine(ups, 0)
    expected = {k: sum(clip_delta(u.delta, C)[0][k] for u in ups) / m for k in out}
    assert all(torch.allclose(out[k], expected[k], atol=1e-6) for k in out)
    outlier = ClientUpdate(9, _delta(9, scale=1e4), 1)
    with_outlier = agg.combine(ups + [outlier], 1)
    diff = {k: with_outlier[k] - out[k] for k in out}
    assert global_norm(diff) == pytest.approx(C / m, rel=1e-5)


# ---------------------------------------------------------------------------- noise
def test_noise_std_matches_z_C_over_m():
    C, z, m = 2.0, 1.3, 10.0
    agg = DPFedAvgAggregator(C, z, m, seed=123)
    like = {"big": torch.zeros(400, 500)}  # 200k draws
    out = agg.combine([], 0, like=like)["big"].double()
    n = out.numel()
    target = z * C / m
    assert agg.noise_std == pytest.approx(target)
    # sample std of n normals: relative standard error 1/sqrt(2n) = 0.16%; allow 1% (~6 sigma)
    assert float(out.std()) == pytest.approx(target, rel=0.01)
    assert abs(float(out.mean())) < 5 * target / math.sqrt(n)
    # fourth moment check that it is Gaussian, not merely the right variance: kurtosis 3 +- 0.05
    kurt = float(((out - out.mean()) ** 4).mean() / out.var() ** 2)
    assert kurt == pytest.approx(3.0, abs=0.05)


def test_noise_is_seeded_by_round_and_reproducible():
    like = _zeros_like(_delta(0))
    a = DPFedAvgAggregator(1.0, 1.0, 5.0, seed=7).combine([], 3, like=like)
    b = DPFedAvgAggregator(1.0, 1.0, 5.0, seed=7).combine([], 3, like=like)
    c = DPFedAvgAggregator(1.0, 1.0, 5.0, seed=7).combine([], 4, like=like)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["a.weight"], c["a.weight"])


def test_dropped_clients_never_lower_the_noise():
    """Half the sampled clients fail: the output is the (smaller) clipped sum / m plus *the same*
    noise as with all replies; with no replies it is that noise alone."""
    C, z, m = 1.0, 1.1, 10.0
    ups = [ClientUpdate(i, _delta(i), 1) for i in range(10)]
    full = DPFedAvgAggregator(C, z, m, seed=1).combine(ups, 5)
    half = DPFedAvgAggregator(C, z, m, seed=1).combine(ups[:5], 5)
    none = DPFedAvgAggregator(C, z, m, seed=1).combine([], 5, like=_zeros_like(ups[0].delta))
    for k in full:
        noise_full = full[k] - sum(clip_delta(u.delta, C)[0][k] for u in ups) / m
        noise_half = half[k] - sum(clip_delta(u.delta, C)[0][k] for u in ups[:5]) / m
        assert torch.allclose(noise_full, noise_half, atol=1e-6)
        assert torch.allclose(noise_full, none[k], atol=1e-6)
    assert float(none["a.weight"].std()) == pytest.approx(z * C / m, rel=0.15)  # 600 draws


def test_zero_replies_without_shapes_is_a_clear_error():
    with pytest.raises(ValueError, match="like=global_params"):
        DPFedAvgAggregator(1.0, 1.0, 5.0, seed=0).combine([], 0)


# ---------------------------------------------------------------------------- DP + strategies
def test_dp_refuses_non_uniform_strategies():
    agg = DPFedAvgAggregator(1.0, 1.0, 5.0, seed=0)
    for bad in (FedAvg(weighted=True), FedAU(10)):
        with pytest.raises(ValueError, match="not uniform.*clip_norm / expected_clients"):
            DPStrategy(bad, agg)


def test_dp_strategy_uses_the_inner_server_optimizer(tmp_path):
    params = {k: torch.ones_like(t) for k, t in _delta(0).items()}
    ups = [ClientUpdate(i, _delta(i), 1) for i in range(3)]
    dp = DPStrategy(FedAvg(weighted=False, server_lr=0.5), DPFedAvgAggregator(1.0, 0.8, 4.0, seed=2))
    noisy = DPFedAvgAggregator(1.0, 0.8, 4.0, seed=2).combine(ups, 0)
    new = dp.aggregate(params, ups, 0)
    assert all(torch.allclose(new[k], params[k] + 0.5 * noisy[k]) for k in params)
    # FedAdam on the noisy delta; its moments and the clip norm survive a weights-only load
    def adaptive():
        return DPFedAvgAggregator(1.0, 0.8, 4.0, seed=2, adaptive_clip=True, clip_count_stddev=1.0)

    adam = DPStrategy(FedAdam(server_lr=0.01), adaptive())
    p = adam.aggregate(params, ups, 0)
    torch.save(adam.state_dict(), tmp_path / "dp.pt")
    back = DPStrategy(FedAdam(server_lr=0.01), adaptive())
    back.load_state_dict(torch.load(tmp_path / "dp.pt", weights_only=True))
    assert back.aggregator.clip_norm == adam.aggregator.clip_norm != 1.0
    q1, q2 = adam.aggregate(p, ups, 1), back.aggregate(p, ups, 1)
    assert all(torch.equal(q1[k], q2[k]) for k in q1)


# ---------------------------------------------------------------------------- adaptive clipping
def test_adaptive_clip_noise_split_matches_andrew_et_al():
    """Thm. 1 of Andrew et al. 2021: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), sigma_b = m / 20."""
    agg = DPFedAvgAggregator(1.0, 1.0, 100.0, seed=0, adaptive_clip=True)
    assert agg.clip_count_stddev == 5.0
    assert agg.delta_noise_multiplier == pytest.approx((1 - 1 / 100) ** -0.5)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        DPFedAvgAggregator(1.0, 1.0, 10.0, seed=0, adaptive_clip=True)  # sigma_b = 0.5: 2 sigma_b = z


def test_adaptive_clip_tracks_the_target_quantile():
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(0.0, 0.5, 20))  # fixed per-client update norms
    ups = [ClientUpdate(i, {"x": torch.tensor([float(nm), 0.0])}, 1) for i, nm in enumerate(norms)]
    agg = DPFedAvgAggregator(0.05, 0.0, 20.0, seed=0, adaptive_clip=True, target_quantile=0.3)
    for r in range(300):
        agg.combine(ups, r)
    # the fraction of norms under the clip should settle at the target quantile (+- one client)
    assert abs(np.mean(norms <= agg.clip_norm) - 0.3) <= 1 / 20 + 1e-9


# ---------------------------------------------------------------------------- accountant
def _opacus_epsilon(segments, delta):
    """Epsilon straight from Opacus's analysis functions: summed RDP curves, Balle et al. conversion."""
    opacus_rdp, _, orders = _opacus()
    rdp = sum(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders) for z, q, n in segments)
    return float(opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


@pytest.mark.parametrize("q", [0.001, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("z", [0.7, 1.0, 4.0])
@pytest.mark.parametrize("steps", [1, 50, 1000])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_epsilon_matches_opacus_grid(q, z, steps, delta):
    _, RDPAccountant, _ = _opacus()
    acc = PrivacyAccountant()
    for _ in range(steps):
        acc.step(z, q)
    assert acc.rounds == steps
    eps = acc.epsilon(delta)
    assert eps == pytest.approx(_opacus_epsilon([(z, q, steps)], delta), rel=1e-9)
    ref = RDPAccountant()
    ref.history = [(z, q, steps)]
    assert eps == pytest.approx(ref.get_epsilon(delta=delta), rel=1e-9)


def test_epsilon_with_changing_noise_matches_opacus():
    acc = PrivacyAccountant()
    plan = [(1.0, 0.02, 30), (2.0, 0.02, 10), (1.0, 0.05, 5)]
    for z, q, n in plan:
        for _ in range(n):
            acc.step(z, q)
    assert acc.epsilon(1e-5) == pytest.approx(_opacus_epsilon(plan, 1e-5), rel=1e-9)


@pytest.mark.parametrize(
    "z,epochs,published",
    [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)],
)
def test_published_epsilons_tf_privacy_tutorial(z, epochs, published):
    """TensorFlow Privacy, tutorials/README.md, "Select Parameters" table: MNIST DP-SGD with
    N = 60000, batch 256 (q = 256/60000), delta = 1e-5, steps = epochs * N // 256. Those numbers
    were produced with Mironov's (2017, Prop. 3) RDP -> (eps, delta) conversion,
    eps = min_a RDP(a) + log(1/delta) / (a - 1); Opacus's RDP curve under that conversion must
    reproduce them (to the table's 2 decimals, 0.2%), and the accountant's tighter conversion
    (Balle et al. 2020) must not report more."""
    opacus_rdp, _, orders = _opacus()
    q, steps, delta = 256 / 60000, epochs * 60000 // 256, 1e-5
    rdp = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders))
    orders = np.asarray(orders)
    classic = float(np.min(rdp + math.log(1 / delta) / (orders - 1)))
    assert classic == pytest.approx(published, rel=2e-3)
    acc = PrivacyAccountant()
    acc.load_state_dict({"history": torch.tensor([[z, q, steps]], dtype=torch.float64)})
    assert acc.epsilon(delta) <= classic


def test_epsilon_after_does_not_mutate_and_predicts(tmp_path):
    acc = PrivacyAccountant()
    assert acc.epsilon(1e-5) == 0.0
    for _ in range(20):
        acc.step(1.0, 0.05)
    before = acc.state_dict()["history"].clone()
    eps_now = acc.epsilon(1e-5)
    predicted = acc.epsilon_after(5, 1.0, 0.05, 1e-5)
    assert torch.equal(acc.state_dict()["history"], before) and acc.epsilon(1e-5) == eps_now
    assert predicted > eps_now
    assert acc.epsilon_after(0, 1.0, 0.05, 1e-5) == eps_now
    for _ in range(5):
        acc.step(1.0, 0.05)
    assert acc.epsilon(1e-5) == pytest.approx(predicted, rel=1e-12)


def test_accountant_survives_a_crash(tmp_path):
    acc = PrivacyAccountant()
    for r in range(30):
        acc.step(1.0 if r < 20 else 1.5, 0.1)
    torch.save(acc.state_dict(), tmp_path / "acc.pt")
    resumed = PrivacyAccountant()
    resumed.load_state_dict(torch.load(tmp_path / "acc.pt", weights_only=True))
    assert resumed.rounds == 30
    assert resumed.epsilon(1e-5) == acc.epsilon(1e-5) > 0
    resumed.step(1.5, 0.1)
    acc.step(1.5, 0.1)
    assert resumed.epsilon(1e-5) == acc.epsilon(1e-5)


def test_noise_multiplier_for_meets_the_target():
    z = noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, rounds=200)
    assert PrivacyAccountant.noise_multiplier_for(3.0, 1e-5, 0.05, 200) == z
    eps = _opacus_epsilon([(z, 0.05, 200)], 1e-5)
    assert 3.0 - 0.01 <= eps <= 3.0  # Opacus's search tolerance is 0.01 in epsilon
    assert _opacus_epsilon([(0.97 * z, 0.05, 200)], 1e-5) > 3.0 - 0.01


def test_accountant_errors_name_the_bad_value():
    acc = PrivacyAccountant()
    with pytest.raises(ValueError, match="sample_rate=1.5"):
        acc.step(1.0, 1.5)
    with pytest.raises(ValueError, match="noise_multiplier=0"):
        acc.step(0, 0.1)
    with pytest.raises(ValueError, match="delta=0"):
        acc.epsilon(0)
