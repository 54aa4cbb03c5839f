"""The fused 8-bit AdamW step as one C++ loop for CPU tensors (backend ``"cpp"``).

Same arithmetic, in the same order and precision, as :func:`.reference.adamw8bit_step` (fp32,
no fused multiply-add, sqrt taken in fp64 and rounded once), so it is bit-identical to the
PyTorch twin and hence to the Triton kernel. Each OpenMP task owns whole 256-blocks: a block
is read once (param, grad, 2 codes), its new moments live in a 2 KB stack buffer while the
absmax is found, and param and codes are written once -- the 16 bytes per parameter that the
8-bit step must move, where the eager twin moves several times that through temporaries.
Built on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler with
OpenMP is required; the build is cached by torch).
"""

from __future__ import annotations

import functools
import time

from torch import Tensor

BUILD_SECONDS: dict[str, float] = {}

_SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <vector>

static inline int64_t code_of(float x, const float* mids, const uint8_t* lut, int64_t refine) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    int64_t idx = lut[bits >> 16];
    for (int64_t r = 0; r < refine; ++r) idx += (mids[idx] < x) ? 1 : 0;
    return idx;
}

void adamw8bit_step(torch::Tensor param, torch::Tensor grad, torch::Tensor codes1, torch::Tensor absmax1,
                    torch::Tensor codes2, torch::Tensor absmax2,
                    torch::Tensor values1, torch::Tensor mids1, torch::Tensor lut1, int64_t refine1,
                    torch::Tensor values2, torch::Tensor mids2, torch::Tensor lut2, int64_t refine2,
                    torch::Tensor skipped, torch::Tensor out, bool write_out, int64_t block,
                    double step_size_d, double beta1_d, double omb1_d, double beta2_d, double omb2_d,
                    double inv_sqrt_bc2_d, double eps_d, double decay_d) {
    const float step_size = (float)step_size_d, beta1 = (float)beta1_d, omb1 = (float)omb1_d;
    const float beta2 = (float)beta2_d, omb2 = (float)omb2_d, inv_sqrt_bc2 = (float)inv_sqrt_bc2_d;
    const float eps = (float)eps_d, decay = (float)decay_d;
    const int64_t n = grad.numel();
    const int64_t nb = (n + block - 1) / block;
    float* p = write_out ? nullptr : param.data_ptr<float>();
    float* o = write_out ? out.data_ptr<float>() : nullptr;
    const float* g = grad.data_ptr<float>();
    uint8_t* c1 = codes1.data_ptr<uint8_t>();
    uint8_t* c2 = codes2.data_ptr<uint8_t>();
    float* a1 = absmax1.data_ptr<float>();
    float* a2 = absmax2.data_ptr<float>();
    const float* v1 = values1.data_ptr<float>();
    const float* v2 = values2.data_ptr<float>();
    const float* m1 = mids1.data_ptr<float>();
    const float* m2 = mids2.data_ptr<float>();
    const uint8_t* l1 = lut1.data_ptr<uint8_t>();
    const uint8_t* l2 = lut2.data_ptr<uint8_t>();
    int64_t bad_total = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad_total)
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t start = b * block;
        const int64_t len = std::min(block, n - start);
        // New moments of this block, kept until its absmax is known (stack for the usual sizes).
        float mstack[1024], vstack[1024];
        std::vector<float> mheap, vheap;
        float* mbuf = mstack;
        float* vbuf = vstack;
        if (len > 1024) {
            mheap.resize(len);
            vheap.resize(len);
            mbuf = mheap.data();
            vbuf = vheap.data();
        }
        const float s1 = a1[b], s2 = a2[b];
        float amax1 = 0.f, amax2 = 0.f;
        for (int64_t j = 0; j < len; ++j) {
            const int64_t i = start + j;
            float gi = g[i];
            const bool ok = std::isfinite(gi);
            const float m0 = v1[c1[i]] * s1;
            const float vv0 = v2[c2[i]] * s2;
            float m = m0, v = vv0;
            if (ok) {
                const float a = beta1 * m0;
                const float c = omb1 * gi;
                m = a + c;
                const float gg = gi * gi;
                const float d = beta2 * vv0;
                const float e = omb2 * gg;
                v = d + e;
            } else {
                bad_total += 1;
            }
            const float sq = (float)std::sqrt((double)v);
            const float den = sq * inv_sqrt_bc2 + eps;
            const float ratio = m / den;
            const float u = step_size * ratio;
            if (write_out) {
                o[i] = ok ? u : 0.f;
            } else if (ok) {
                const float pd = p[i] * decay;
                p[i] = pd - u;
            }
            mbuf[j] = m;
            vbuf[j] = v;
            amax1 = std::max(amax1, std::fabs(m));
            amax2 = std::max(amax2, std::fabs(v));
        }
        const float d1 = amax1 > 0.f ? amax1 : 1.f;
        const float d2 = amax2 > 0.f ? amax2 : 1.f;
        for (int64_t j = 0; j < len; ++j) {
            c1[start + j] = (uint8_t)code_of(mbuf[j] / d1, m1, l1, refine1);
            c2[start + j] = (uint8_t)code_of(vbuf[j] / d2, m2, l2, refine2);
        }
        a1[b] = amax1;
        a2[b] = amax2;
    }
    skipped.add_((int)bad_total);
}
"""


@functools.lru_cache(maxsize=None)
def module():
    from torch.utils.cpp_extension import load_inline

    start = time.perf_counter()
    mod = load_inline(
        name="slimtrain_adamw8bit_cpu",
        cpp_sources=["#include <cstring>\n#include <algorithm>\n" + _SOURCE],
        functions=["adamw8bit_step"],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
    BUILD_SECONDS["cpp"] = time.perf_counter() - start
    return mod


def adamw8bit_step(param: Tensor, grad: Tensor, codes1, absmax1, codes2, absmax2, tables1, tables2, skipped,
                   out: Tensor | None, *, block: int, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2,
                   inv_sqrt_bc2, eps, decay) -> None:
    """C++ twin of :func:`slimtrain.kernels.reference.adamw8bit_step` (fp32 contiguous tensors)."""
    values1, mids1, lut1, refine1 = tables1
    values2, mids2, lut2, refine2 = tables2
    write_out = out is not None
    module().adamw8bit_step(
        param if not write_out else grad, grad, codes1, absmax1, codes2, absmax2,
        values1, mids1, lut1, refine1, values2, mids2, lut2, refine2, skipped,
        out if write_out else grad, write_out, block,
        step_size, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bc2, eps, decay)
