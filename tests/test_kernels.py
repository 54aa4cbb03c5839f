"""slimtrain.kernels: every Triton kernel (run by the interpreter, TRITON_INTERPRET=1 from
conftest) against its pure-PyTorch twin, the quantizer against bitsandbytes, and the
stochastic roundings against their expectation. Tensors stay <= 1e5 elements."""

from __future__ import annotations

import inspect
import io
import math
import shutil

import pytest
import torch

from slimtrain import kernels as K
from slimtrain.kernels import dispatch
from slimtrain.kernels import triton_kernels as tk



def _bnb_functional():
    # The reference quantizer: only the tests that compare against it need bitsandbytes.
    return pytest.importorskip("bitsandbytes.functional")


def _moment_like(n: int, seed: int = 0) -> torch.Tensor:
    # Adam-moment-like data: magnitudes spread over several decades, one all-zero block.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2) * 1e-3
    x[256:512] = 0
    return x


# ---------------------------------------------------------------------------- maps
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bitsandbytes(signed):
    bnbF = _bnb_functional()
    assert torch.equal(K.dynamic_map(signed), bnbF.create_dynamic_map(signed=signed))


# ---------------------------------------------------------------------------- block-wise 8-bit
@pytest.mark.parametrize("block", [64, 256, 2048])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_blockwise_triton_equals_reference(block, signed):
    x = _moment_like(30_001)  # not a multiple of any block size: exercises the short tail
    if not signed:
        x = x.abs()
    codes_t, absmax_t = K.quantize_blockwise(x, signed=signed, block_size=block, backend="triton")
    codes_r, absmax_r = K.quantize_blockwise(x, signed=signed, block_size=block, backend="torch")
    assert codes_t.dtype == torch.uint8 and codes_t.shape == x.shape
    assert absmax_t.shape == (math.ceil(x.numel() / block),)
    assert torch.equal(codes_t, codes_r) and torch.equal(absmax_t, absmax_r)
    deq_t = K.dequantize_blockwise(codes_t, absmax_t, signed=signed, block_size=block, backend="triton")
    deq_r = K.dequantize_blockwise(codes_r, absmax_r, signed=signed, block_size=block, backend="torch")
    assert torch.equal(deq_t, deq_r)
    assert torch.all(deq_r[256:512] == 0) if block <= 256 else torch.isfinite(deq_r).all()


@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_error_not_worse_than_bitsandbytes(signed):
    bnbF = _bnb_functional()
    x = _moment_like(65_536, seed=1)
    if not signed:
        x = x.abs()
    codes, absmax = K.quantize_blockwise(x, signed=signed, block_size=256, backend="torch")
    ours = (K.dequantize_blockwise(codes, absmax, signed=signed, block_size=256) - x).abs()
    code = bnbF.create_dynamic_map(signed=signed)
    q, state = bnbF.quantize_blockwise(x, code=code, blocksize=256)
    theirs = (bnbF.dequantize_blockwise(q, state) - x).abs()
    assert torch.equal(absmax, state.absmax)
    # Same map and scales. We always pick the nearest code; bnb's CPU quantizer sometimes takes
    # the neighbour (and any code in an all-zero block), so no element of ours is worse and the
    # mean error is lower (measured: 9.74e-5 vs 9.81e-5 signed, 4.59e-5 vs 4.67e-5 unsigned).
    assert torch.all(ours <= theirs + 1e-12)
    nonzero = absmax.repeat_interleave(256)[: x.numel()] > 0
    assert (codes == q)[nonzero].float().mean() > 0.85
    assert ours.mean() <= theirs.mean()


# ---------------------------------------------------------------------------- fused AdamW step
def _adam_case(n: int, seed: int = 0, param_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=g).to(param_dtype)
    grad = torch.randn(n, generator=g) * 1e-2
    m = _moment_like(n, seed + 1)
    v = _moment_like(n, seed + 2).pow(2) * 10
    c1, a1 = K.quantize_blockwise(m, signed=True)
    c2, a2 = K.quantize_blockwise(v, signed=False)
    return param, grad, c1, a1, c2, a2


HYPER = dict(step_size=1e-3 / (1 - 0.9**3), beta1=0.9, beta2=0.999, inv_sqrt_bc2=1 / math.sqrt(1 - 0.999**3),
             eps=1e-8, decay=1 - 1e-3 * 0.01)


def _run_step(case, backend, out=False, **overrides):
    param, grad, c1, a1, c2, a2 = (t.clone() for t in case)
    skipped = torch.zeros(1, dtype=torch.int32)
    o = torch.full_like(grad, 7.0) if out else None
    K.adamw8bit_update(param, grad, c1, a1, c2, a2, skipped, out=o, backend=backend, **{**HYPER, **overrides})
    return param, c1, a1, c2, a2, skipped, o


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_adamw8bit_kernel_equals_reference(param_dtype):
    case = list(_adam_case(50_003, param_dtype=param_dtype))
    case[1][7] = float("nan")
    case[1][40_000] = float("-inf")
    triton_out = _run_step(case, "triton")
    torch_out = _run_step(case, "torch")
    for a, b in zip(triton_out[:-1], torch_out[:-1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert int(triton_out[5]) == 2


def test_adamw8bit_kernel_out_mode_equals_reference():
    case = _adam_case(20_000, seed=3)
    t = _run_step(case, "triton", out=True)
    r = _run_step(case, "torch", out=True)
    assert torch.equal(t[6], r[6]) and torch.equal(t[1], r[1]) and torch.equal(t[3], r[3])
    assert torch.equal(t[0], case[0])  # out mode leaves the parameter alone


def test_adamw8bit_step_matches_fp32_adamw_on_dequantized_state():
    # Analytic reference: torch.optim.AdamW's update from the dequantized moments, in fp64.
    case = _adam_case(10_240, seed=4)  # whole blocks
    param, grad, c1, a1, c2, a2 = case
    m0 = K.dequantize_blockwise(c1, a1, signed=True).double()
    v0 = K.dequantize_blockwise(c2, a2, signed=False).double()
    g = grad.double()
    m = 0.9 * m0 + 0.1 * g
    v = 0.999 * v0 + 0.001 * g * g
    expected = param.double() * HYPER["decay"] - HYPER["step_size"] * m / (v.sqrt() * HYPER["inv_sqrt_bc2"] + 1e-8)
    new_p, nc1, na1, nc2, na2, skipped, _ = _run_step(case, "triton")
    torch.testing.assert_close(new_p.double(), expected, rtol=1e-6, atol=1e-7)
    # The re-quantized moments carry only the 8-bit quantization error of the new values.
    m_err = (K.dequantize_blockwise(nc1, na1, signed=True).double() - m).abs()
    assert m_err.max() <= 0.02 * na1.double().repeat_interleave(256)[: m.numel()].max()
    torch.testing.assert_close(na1.double(), m.abs().view(-1, 256).amax(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(na2.double(), v.abs().view(-1, 256).amax(1), rtol=1e-6, atol=0)
    assert int(skipped) == 0


@pytest.mark.skipif(shutil.which("c++") is None, reason="the C++ CPU path needs a compiler")
@pytest.mark.parametrize("out", [False, True])
def test_adamw8bit_cpp_cpu_path_equals_reference(out):
    # The fast CPU path (one OpenMP loop, built on first use) against the eager twin.
    case = list(_adam_case(50_003, seed=6))
    case[1][11] = float("nan")
    cpp = _run_step(case, "cpp", out=out)
    ref = _run_step(case, "torch", out=out)
    for a, b in zip(cpp, ref):
        assert (a is None and b is None) or torch.equal(a, b)
    assert int(cpp[5]) == 1


needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="the C++ CPU path needs a compiler")


@needs_cxx
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("simd", [True, False])
def test_cpp_nearest_code_equals_twin_search_on_every_boundary(signed, simd):
    # The C++ step's O(1) code lookup (AVX2: one gather of maps.code_table; scalar: lut +
    # one compare) against the twin's plain binary search over the midpoints. The nearest code
    # is a step function of x that changes only at midpoints, and the lookup's pieces change
    # only at 16-bit bucket edges, so checking both ends of every bucket and every midpoint
    # +-1 ulp covers every value in [-1, 1] (all that m / absmax can be), plus NaN.
    from slimtrain.kernels import cpu_fused, maps, reference

    values, mids = maps.quant_tables(signed)
    h = torch.arange(65536, dtype=torch.int64)
    ends = torch.stack([h << 16, (h << 16) | 0xFFFF]).to(torch.int32).view(torch.float32).reshape(-1)
    m = mids[:-1]
    x = torch.cat([ends, m, torch.nextafter(m, torch.full_like(m, 2.0)), torch.nextafter(m, torch.full_like(m, -2.0)),
                   values, torch.tensor([float("nan"), -0.0, 0.0, 1.0, -1.0])])
    x = x[(x.abs() <= 1) | x.isnan()]
    expected = reference.search_codes(x, mids).to(torch.uint8)
    assert torch.equal(cpu_fused.nearest_codes(x, signed, simd=simd), expected)


def _edge_case(n: int, block: int, seed: int):
    # Moments with an all-zero block whose gradient is zero too (its new absmax is 0), and
    # non-finite gradients inside the 8-wide vector part and in a block's scalar tail.
    param, grad, _, _, _, _ = _adam_case(n, seed=seed)
    m = _moment_like(n, seed + 1)
    v = _moment_like(n, seed + 2).pow(2) * 10
    zero = slice(2 * block, 3 * block)
    m[zero], v[zero], grad[zero] = 0, 0, 0
    bad = [i for i in (5, block + 3) if i < n - 1] + [n - 1]
    grad[bad] = torch.tensor([float("nan"), float("inf"), float("-inf")][-len(bad):])
    c1, a1 = K.quantize_blockwise(m, signed=True, block_size=block)
    c2, a2 = K.quantize_blockwise(v, signed=False, block_size=block)
    return (param, grad, c1, a1, c2, a2), len(bad)


@needs_cxx
@pytest.mark.parametrize("n,block", [(66_101, 256), (40_013, 100), (77, 256)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("out", [False, True])
def test_cpp_step_equals_twin_partial_zero_nonfinite_threads(n, block, threads, simd, out):
    # Bit-exact against the eager twin: same fp32 operations in the same order, no FMA, and
    # the fp32 sqrt is correctly rounded like the twin's fp64 sqrt rounded once. Sizes: a short
    # last block, a block size that is not a multiple of the 8-wide vector (scalar tails in
    # every block), a tensor smaller than one block; 2 threads split the blocks between them.
    from slimtrain.kernels import cpu_fused, maps

    case, n_bad = _edge_case(n, block, seed=11)
    ref = _run_step(case, "torch", out=out, block_size=block)
    param, grad, c1, a1, c2, a2 = (t.clone() for t in case)
    skipped = torch.zeros(1, dtype=torch.int32)
    o = torch.full_like(grad, 7.0) if out else None
    tables = [(*maps.quant_tables(s), *maps.code_lut(s)) for s in (True, False)]
    coeffs = {**HYPER, "one_minus_beta1": 1 - HYPER["beta1"], "one_minus_beta2": 1 - HYPER["beta2"]}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_fused.adamw8bit_step(param, grad, c1, a1, c2, a2, *tables, skipped, o, block=block, simd=simd, **coeffs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip((param, c1, a1, c2, a2, skipped, o), ref):
        assert (a is None and b is None) or torch.equal(a, b)
    assert int(skipped) == n_bad
    if n > 3 * block:
        assert torch.all(a1[2] == 0) and torch.all(a2[2] == 0)  # the zero block stays finite


@needs_cxx
def test_auto_backend_uses_cpp_on_cpu_and_falls_back_when_it_cannot_build(monkeypatch):
    from slimtrain.kernels import cpu_fused

    x = torch.zeros(4)
    assert dispatch.resolve_step(x) == "cpp"  # the default CPU step, the C++ build being available
    assert dispatch.resolve_step(x, "torch") == "torch"
    # A failed build: warned once, then the eager twin, also when "cpp" was asked for.
    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_fused, "BUILD_ERROR", [])
    monkeypatch.setattr(cpu_fused, "module", broken)
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert dispatch.resolve_step(x) == "torch"
    case = _adam_case(3000, seed=5)
    ref = _run_step(case, "torch")
    for backend in (None, "cpp"):
        got = _run_step(case, backend)
        assert all(torch.equal(a, b) for a, b in zip(got[:-1], ref[:-1]))


def test_adamw8bit_nonfinite_grads_skipped_and_zero_block_finite():
    n = 4096
    param = torch.randn(n)
    grad = torch.zeros(n)  # zero gradient and zero moments: every new absmax is 0
    c1, a1 = K.quantize_blockwise(torch.zeros(n), signed=True)
    c2, a2 = K.quantize_blockwise(torch.zeros(n), signed=False)
    grad[300:310] = float("nan")
    grad[1000] = float("inf")
    case = (param, grad, c1, a1, c2, a2)
    for backend in ("triton", "torch") + (("cpp",) if shutil.which("c++") else ()):
        new_p, nc1, na1, nc2, na2, skipped, _ = _run_step(case, backend, decay=1.0)
        assert torch.isfinite(new_p).all() and torch.equal(new_p, param)
        assert torch.all(na1 == 0) and torch.all(na2 == 0)
        assert torch.all(K.dequantize_blockwise(nc1, na1) == 0)
        assert int(skipped) == 11


def test_adamw8bit_hyperparameters_are_runtime_arguments():
    # A schedule must not recompile: only layout knobs may be compile-time constants.
    sig = inspect.signature(tk.adamw8bit_kernel.fn)
    constexpr = {name for name, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
    assert constexpr == {"WRITE_OUT", "PARAM_BF16", "ROWS", "BLOCK"}
    for name in ("step_size", "beta1", "beta2", "inv_sqrt_bc2", "eps", "decay"):
        assert name in sig.parameters


# ---------------------------------------------------------------------------- stochastic rounding
def test_stochastic_round_bf16_triton_equals_reference_and_neighbours():
    x = torch.randn(70_000) * 3
    x[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    t = K.stochastic_round_bf16(x, seed=11, backend="triton")
    r = K.stochastic_round_bf16(x, seed=11, backend="torch")
    assert t.dtype == torch.bfloat16 and torch.equal(t.view(torch.int16), r.view(torch.int16))
    assert torch.isinf(r[0]) and torch.isinf(r[1]) and torch.isnan(r[2])
    finite = x[3:]
    lo = finite.to(torch.bfloat16)  # RNE is one of the two neighbours; the other is one ulp away
    y = r[3:].float()
    down = torch.where(finite.abs() >= lo.float().abs(), lo.float(), torch.nextafter(lo, lo * 0).float())
    assert torch.all((y - finite).abs() < (finite.abs() * 2**-7) + 1e-30)
    assert torch.all((y == down) | ((y - finite).abs() <= (y - down).abs()))


@pytest.mark.parametrize("value", [1.0 + 2**-9, -3.1415926, 1e-3 * (1 + 0.3 * 2**-7)])
def test_stochastic_round_bf16_is_unbiased(value):
    # 65536 independent draws (one per element) of the same value: the mean must be the value,
    # while round-to-nearest is off by up to half an ulp.
    x = torch.full((65_536,), value, dtype=torch.float32)
    y = K.stochastic_round_bf16(x, seed=5, backend="torch").double()
    ulp = 2.0 ** (math.floor(math.log2(abs(value))) - 7)
    assert set(y.unique().tolist()) <= {math.floor(value / ulp) * ulp, math.ceil(value / ulp) * ulp}
    assert abs(y.mean().item() - value) < 5 * (ulp / 2) / math.sqrt(x.numel())
    assert abs(x.to(torch.bfloat16).double().mean().item() - value) > 5 * (ulp / 2) / math.sqrt(x.numel())


@pytest.mark.parametrize("group", [64, 256])
def test_int8_sr_triton_equals_reference(group):
    x = torch.randn(33_333)
    x[:group] = 0  # an all-zero group: scale 0, codes 0, dequantizes to 0
    ct, st = K.quantize_int8_sr(x, group, seed=9, backend="triton")
    cr, sr = K.quantize_int8_sr(x, group, seed=9, backend="torch")
    assert ct.dtype == torch.int8 and torch.equal(ct, cr) and torch.equal(st, sr)
    assert torch.all(sr[0] == 0)
    dt = K.dequantize_int8(ct, st, group, backend="triton")
    assert torch.equal(dt, K.dequantize_int8(cr, sr, group, backend="torch"))
    # Each element lands on one of the two grid points around it.
    scale = sr.repeat_interleave(group)[: x.numel()]
    assert torch.all((dt - x).abs() <= scale * (1 + 1e-6))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_int8_sr_pieces_with_start_equal_the_whole(backend):
    # The INT8 update of QGaLoreAdamW8bit quantizes a matrix piece by piece (start = the
    # piece's flat offset): codes and scales must be the whole tensor's, draw for draw; a
    # wrong offset would repeat the first piece's random stream.
    group = 64
    x = torch.randn(20_000)  # 312.5 groups: the last piece ends in a partial group
    cw, sw = K.quantize_int8_sr(x, group, seed=4, backend=backend)
    cuts = [0, 64 * 50, 64 * 51, 64 * 200, x.numel()]
    for a, b in zip(cuts, cuts[1:]):
        c, sc = K.quantize_int8_sr(x[a:b], group, seed=4, start=a, backend=backend)
        assert torch.equal(c, cw[a:b]) and torch.equal(sc, sw[a // group:a // group + sc.numel()]), (a, b)
    c, _ = K.quantize_int8_sr(x[64 * 50:64 * 51], group, seed=4, backend=backend)  # start=0: another draw
    assert not torch.equal(c, cw[64 * 50:64 * 51])
    with pytest.raises(ValueError, match="multiple of group_size"):
        K.quantize_int8_sr(x[:128], group, seed=4, start=32, backend=backend)


def test_int8_sr_is_unbiased():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, generator=g)
    base[0] = 4.0  # fixes the scale at 4/127 for every draw
    draws = torch.stack([K.dequantize_int8(*K.quantize_int8_sr(base, 256, seed=s), 256) for s in range(400)])
    scale = 4.0 / 127
    err = draws.double().mean(0) - base.double()
    # per-element draw std <= scale/2, so the mean over 400 draws is within 5 sigma
    assert err.abs().max() < 5 * (scale / 2) / math.sqrt(400)
    nearest = torch.round(base / scale) * scale
    assert (nearest - base).abs().max() > 0.3 * scale  # round-to-nearest would be biased here


# ---------------------------------------------------------------------------- INT4
@pytest.mark.parametrize("numel,group", [(40_001, 128), (4096, 64)])
def test_int4_pack_triton_equals_reference(numel, group):
    x = torch.randn(numel)
    pt = K.pack_int4(x, group, backend="triton")
    pr = K.pack_int4(x, group, backend="torch")
    assert pt[0].dtype == torch.uint8 and pt[0].numel() == (numel + 1) // 2
    for a, b in zip(pt, pr):
        assert torch.equal(a, b)
    ut = K.unpack_int4(*pt, numel, group, backend="triton")
    ur = K.unpack_int4(*pr, numel, group, backend="torch")
    assert torch.equal(ut, ur)
    # Asymmetric 4-bit grid: error at most half a step of its group.
    step = pr[1].repeat_interleave(group)[:numel]
    assert torch.all((ur - x).abs() <= step / 2 * (1 + 1e-5) + 1e-7)


def test_int4_layout_two_codes_per_byte():
    x = torch.arange(16, dtype=torch.float32)  # min 0, scale 1: codes equal the values
    packed, scales, mins = K.pack_int4(x, 16, backend="triton")
    assert scales.item() == 1.0 and mins.item() == 0.0
    expected = torch.tensor([(2 * i) | ((2 * i + 1) << 4) for i in range(8)], dtype=torch.uint8)
    assert torch.equal(packed, expected)
    assert torch.equal(K.unpack_int4(packed, scales, mins, 16, 16), x)


# ---------------------------------------------------------------------------- dispatch
def test_dispatch_auto_and_overrides(monkeypatch):
    with pytest.raises(ValueError, match="power of two"):
        K.quantize_blockwise(torch.zeros(10), block_size=100, backend="triton")
    x = torch.zeros(4)
    assert dispatch.resolve(x) == "torch"  # CPU tensor: eager PyTorch by default
    with K.kernel_backend("triton"):
        assert dispatch.resolve(x) == "triton"  # allowed: the interpreter is on in tests
    monkeypatch.setenv("SLIMTRAIN_KERNEL_BACKEND", "compile")
    assert dispatch.resolve(x) == "compile"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        dispatch.resolve(x, "triton")
    with pytest.raises(ValueError, match="not one of"):
        dispatch.resolve(x, "cuda")


@pytest.mark.parametrize("available", [True, False])
def test_resolve_step_is_the_one_decision_for_the_adam_step(monkeypatch, available):
    # The table of the dispatch docstring, with the C++ build's availability faked (no build).
    from slimtrain.kernels import cpu_fused

    monkeypatch.setattr(cpu_fused, "available", lambda: available)
    f32, bf16 = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    strided = torch.zeros(8, 2)[:, 0]
    cpp_or = lambda other: "cpp" if available else other  # noqa: E731
    assert dispatch.resolve_step(f32) == cpp_or("torch")
    assert dispatch.resolve_step(bf16) == "torch"  # auto never waits for a compile
    assert dispatch.resolve_step(f32, grad=strided) == "torch"
    assert dispatch.resolve_step(f32, "cpp") == cpp_or("torch")
    assert dispatch.resolve_step(bf16, "cpp") == ("compile" if available else "torch")
    assert dispatch.resolve_step(f32, "cpp", grad=strided) == ("compile" if available else "torch")
    # Out mode writes ``out``, not the parameter: a bf16 parameter does not matter.
    assert dispatch.resolve_step(bf16, grad=f32, out=torch.zeros(8)) == cpp_or("torch")
    assert dispatch.resolve_step(f32, grad=f32, out=bf16) == "torch"
    for name in ("torch", "compile", "triton"):
        assert dispatch.resolve_step(f32, name) == name
    with K.kernel_backend("torch"):
        assert dispatch.resolve_step(f32) == "torch"


def test_every_triton_kernel_has_one_launch_entry_with_its_constexprs():
    from slimtrain.kernels import ops

    kernels = {name for name in dir(tk) if name.endswith("_kernel")}
    assert sorted(spec.kernel for spec in ops.TRITON_LAUNCHES.values()) == sorted(kernels)
    extra = {"adamw8bit": {"WRITE_OUT", "PARAM_BF16"}}  # passed per call by adamw8bit_update
    for op, spec in ops.TRITON_LAUNCHES.items():
        sig = inspect.signature(getattr(tk, spec.kernel).fn)
        constexpr = {name for name, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
        for cuda in (False, True):
            grid, meta = spec.grid(10_000, 64, cuda)
            assert set(meta) | extra.get(op, set()) == constexpr, op
            assert len(grid) == 1 and grid[0] >= 1


def test_blockwise8bit_state_type_round_trips_through_optimizer_state():
    x = _moment_like(5_000, seed=7)
    q = K.Blockwise8bit.quantize(x, signed=True, block_size=256, backend="torch")
    codes, absmax = K.quantize_blockwise(x, signed=True, block_size=256, backend="torch")
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, absmax)
    assert torch.equal(q.dequantize(), K.dequantize_blockwise(codes, absmax, signed=True))
    assert q.nbytes == 5_000 + 4 * math.ceil(5_000 / 256) and torch.equal(q.map, K.dynamic_map(True))
    state: dict = {}
    q.store(state, "exp_avg")
    assert set(state) == {"exp_avg_codes", "exp_avg_absmax"}  # the keys checkpoints hold
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = K.Blockwise8bit.load(torch.load(buf, weights_only=True), "exp_avg", signed=True, block_size=256)
    assert torch.equal(back.codes, codes) and torch.equal(back.absmax, absmax)
    assert K.Blockwise8bit.load({}, "exp_avg", signed=True) is None
    # zeros: the quantizer's own encoding of an all-zero tensor, without quantizing it.
    for signed in (True, False):
        z = K.Blockwise8bit.zeros(torch.empty(3, 700), signed=signed, block_size=256)
        ref_codes, ref_absmax = K.quantize_blockwise(torch.zeros(3, 700), signed=signed, block_size=256)
        assert torch.equal(z.codes, ref_codes) and torch.equal(z.absmax, ref_absmax)
    with pytest.raises(ValueError, match="uint8"):
        K.Blockwise8bit(codes.to(torch.int8), absmax, True)
    with pytest.raises(ValueError, match="one value per block"):
        K.Blockwise8bit(codes, absmax[:-1], True)


def test_packed_int4_state_type_round_trips_through_optimizer_state():
    x = torch.randn(48, 20)
    p = K.PackedInt4.pack(x, 64, backend="torch")
    ref = K.pack_int4(x.reshape(-1), 64, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip((p.packed, p.scales, p.mins), ref))
    assert torch.equal(p.unpack(), K.unpack_int4(*ref, x.numel(), 64).view(48, 20))
    assert p.nbytes == 480 + 8 * 15
    state: dict = {}
    p.store(state, "proj_left")
    assert set(state) == {"proj_left_int4", "proj_left_scales", "proj_left_mins", "proj_left_shape"}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = K.PackedInt4.load(torch.load(buf, weights_only=True), "proj_left", 64)
    assert back.shape == (48, 20) and torch.equal(back.unpack(), p.unpack())
    assert K.PackedInt4.load({}, "proj_left", 64) is None
    with pytest.raises(ValueError, match="one value per group"):
        K.PackedInt4(p.packed, p.scales, p.mins, p.shape, 128)


def test_group_view_pads_the_tail_and_views_whole_groups():
    x = torch.arange(10.0)
    v = K.group_view(x, 4, fill=-1.0)
    assert v.shape == (3, 4) and torch.equal(v[2], torch.tensor([8.0, 9.0, -1.0, -1.0]))
    whole = torch.arange(8.0)
    assert K.group_view(whole, 4).data_ptr() == whole.data_ptr()  # no copy without padding
