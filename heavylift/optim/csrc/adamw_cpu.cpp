// Out-of-place fused AdamW on CPU, fp32 state.
//
// Reads (p, m, v) from one buffer set and writes the stepped (p, m, v) to another (which may be the
// same: in place), with the gradient scaled by `grad_mul` inside the same pass. One pass over 28 bytes
// per parameter, whether it commits in place or writes a second buffer set for speculation, so
// speculation needs no snapshot copy. Arithmetic: torch.optim.AdamW's (decoupled decay, bias
// correction), in fp32 with the scalar factors computed in double.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace heavylift {
// the compact formats, in their own files
void adamw_step_int8_moments(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& ms_in,
                             const at::Tensor& v_in, const at::Tensor& vs_in, const at::Tensor& grad,
                             const at::Tensor& p_out, const at::Tensor& m_out, const at::Tensor& ms_out,
                             const at::Tensor& v_out, const at::Tensor& vs_out, int64_t row_len, int64_t block,
                             double lr, double beta1, double beta2, double eps, double weight_decay,
                             int64_t step, double grad_mul);
void adamw_step_bf16_master(const at::Tensor& p_in, const at::Tensor& c_in, const at::Tensor& m_in,
                            const at::Tensor& v_in, const at::Tensor& grad, const at::Tensor& p_out,
                            const at::Tensor& c_out, const at::Tensor& m_out, const at::Tensor& v_out,
                            double lr, double beta1, double beta2, double eps, double weight_decay,
                            int64_t step, double grad_mul);
void adamw_step_bf16_master_int8(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& ms_in,
                                 const at::Tensor& v_in, const at::Tensor& vs_in, const at::Tensor& grad,
                                 const at::Tensor& p_out, const at::Tensor& m_out, const at::Tensor& ms_out,
                                 const at::Tensor& v_out, const at::Tensor& vs_out, int64_t row_len,
                                 int64_t block, int64_t key, int64_t offset, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, int64_t step, double grad_mul);
}  // namespace heavylift

namespace {
using heavylift::AdamScalars;
using heavylift::bf16_load;
using heavylift::bf16_store;
using heavylift::check;

#if defined(__AVX512F__)
// 16 gradients as fp32: loaded as they are, or bf16 widened (shifted into the high half: exact).
inline __m512 grad16(const float* g) { return _mm512_loadu_ps(g); }
inline __m512 grad16(const uint16_t* g) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

template <typename G>
void adamw_step_impl(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& v_in, const G* g,
                     const at::Tensor& p_out, const at::Tensor& m_out, const at::Tensor& v_out, int64_t n,
                     const AdamScalars& k) {
  const float step_size = k.step_size, decay = k.decay, b1 = k.b1, b2 = k.b2, c1 = k.c1, c2 = k.c2;
  const float bc2s = k.bc2s, epsf = k.eps, gm = k.gmul;
  const bool scale = k.scale, decays = k.decays;
  const float* pi = p_in.data_ptr<float>();
  const float* mi = m_in.data_ptr<float>();
  const float* vi = v_in.data_ptr<float>();
  float* po = p_out.data_ptr<float>();
  float* mo = m_out.data_ptr<float>();
  float* vo = v_out.data_ptr<float>();
  // One element of the update; the vector body below does exactly the same operations in the same
  // order (-ffp-contract=off: every multiply and add rounded separately, no FMA contraction).
  auto one = [&](int64_t d) {
    float gv = heavylift::grad_at(g, d);
    if (scale) gv = gv * gm;
    float pv = pi[d];
    if (decays) pv = pv * decay;
    const float mv = mi[d] * b1 + gv * c1;
    const float vv = vi[d] * b2 + gv * gv * c2;
    const float denom = __builtin_sqrtf(vv) / bc2s + epsf;
    po[d] = pv - step_size * mv / denom;
    mo[d] = mv;
    vo[d] = vv;
  };
  const bool in_place = po == pi;
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t d = begin;
#if defined(__AVX512F__)
    // Out of place, the outputs are written with streaming stores: no read-for-ownership of lines the
    // step only overwrites (28 bytes/param of traffic instead of 40; 26 with a bf16 gradient).
    if (!in_place) {
      for (; d < end && (reinterpret_cast<uintptr_t>(po + d) & 63) != 0; ++d) one(d);
      const bool aligned = ((reinterpret_cast<uintptr_t>(mo + d) | reinterpret_cast<uintptr_t>(vo + d)) & 63) == 0;
      if (aligned) {
        const __m512 vb1 = _mm512_set1_ps(b1), vb2 = _mm512_set1_ps(b2), vc1 = _mm512_set1_ps(c1),
                     vc2 = _mm512_set1_ps(c2), vbc = _mm512_set1_ps(bc2s), veps = _mm512_set1_ps(epsf),
                     vss = _mm512_set1_ps(step_size), vdec = _mm512_set1_ps(decay), vgm = _mm512_set1_ps(gm);
        for (; d + 16 <= end; d += 16) {
          __m512 gv = grad16(g + d);
          if (scale) gv = _mm512_mul_ps(gv, vgm);
          __m512 pv = _mm512_loadu_ps(pi + d);
          if (decays) pv = _mm512_mul_ps(pv, vdec);
          const __m512 mv = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(mi + d), vb1), _mm512_mul_ps(gv, vc1));
          const __m512 vv = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(vi + d), vb2),
                                          _mm512_mul_ps(_mm512_mul_ps(gv, gv), vc2));
          const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), vbc), veps);
          pv = _mm512_sub_ps(pv, _mm512_div_ps(_mm512_mul_ps(vss, mv), denom));
          _mm512_stream_ps(po + d, pv);
          _mm512_stream_ps(mo + d, mv);
          _mm512_stream_ps(vo + d, vv);
        }
        _mm_sfence();
      }
    }
#endif
#pragma omp simd
    for (int64_t e = d; e < end; ++e) one(e);
  });
}

void adamw_step(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& v_in,
                const at::Tensor& grad, const at::Tensor& p_out, const at::Tensor& m_out,
                const at::Tensor& v_out, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step, double grad_mul) {
  const int64_t n = grad.numel();
  check(p_in, n, "p_in"); check(m_in, n, "m_in"); check(v_in, n, "v_in");
  check(p_out, n, "p_out"); check(m_out, n, "m_out"); check(v_out, n, "v_out");
  const AdamScalars k(lr, beta1, beta2, eps, weight_decay, step, grad_mul);
  heavylift::with_grad(grad, n, [&](auto g) { adamw_step_impl(p_in, m_in, v_in, g, p_out, m_out, v_out, n, k); });
}

// bf16 moments: m and v are stored as bfloat16 (round to nearest even), computed in fp32. 20 bytes per
// parameter of traffic instead of 28, 4 fewer bytes of host memory per parameter per buffer set.
void adamw_step_bf16_moments(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& v_in,
                             const at::Tensor& grad, const at::Tensor& p_out, const at::Tensor& m_out,
                             const at::Tensor& v_out, double lr, double beta1, double beta2, double eps,
                             double weight_decay, int64_t step, double grad_mul) {
  const int64_t n = grad.numel();
  check(p_in, n, "p_in"); check(p_out, n, "p_out");
  for (auto [t, what] : {std::pair{&m_in, "m_in"}, {&v_in, "v_in"}, {&m_out, "m_out"}, {&v_out, "v_out"}}) {
    check(*t, n, what, at::kBFloat16);
  }
  const AdamScalars k(lr, beta1, beta2, eps, weight_decay, step, grad_mul);
  const float step_size = k.step_size, b1 = k.b1, b2 = k.b2, c1 = k.c1, c2 = k.c2, bc2s = k.bc2s,
              epsf = k.eps;
  const float* pi = p_in.data_ptr<float>();
  float* po = p_out.data_ptr<float>();
  const uint16_t* mi = heavylift::bf16_in(m_in);
  const uint16_t* vi = heavylift::bf16_in(v_in);
  uint16_t* mo = heavylift::bf16_out(m_out);
  uint16_t* vo = heavylift::bf16_out(v_out);
  heavylift::with_grad(grad, n, [&](auto g) {
    using G = heavylift::grad_t<decltype(g)>;
    at::parallel_for(0, n, 1 << 14, [=](int64_t begin, int64_t end) {
      // locals (captured by value, pointers restrict) so the compiler can vectorize the loop; in place
      // (p_out == p_in) is still sound: every element is read before it is written, at the same index
      const G* __restrict__ g_ = g;
      const float* __restrict__ pi_ = pi;
      float* __restrict__ po_ = po;
      const uint16_t* __restrict__ mi_ = mi;
      const uint16_t* __restrict__ vi_ = vi;
      uint16_t* __restrict__ mo_ = mo;
      uint16_t* __restrict__ vo_ = vo;
      const float gmul = k.gmul, dec = k.decay;
#pragma omp simd
      for (int64_t d = begin; d < end; ++d) {
        const float gv = heavylift::grad_at(g_, d) * gmul;
        const float pv = pi_[d] * dec;
        const float mv = bf16_load(mi_[d]) * b1 + gv * c1;
        const float vv = bf16_load(vi_[d]) * b2 + gv * gv * c2;
        const float denom = __builtin_sqrtf(vv) / bc2s + epsf;
        po_[d] = pv - step_size * mv / denom;
        mo_[d] = bf16_store(mv);
        vo_[d] = bf16_store(vv);
      }
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adamw_step", &adamw_step, "out-of-place fused AdamW step (fp32 state; fp32 or bf16 gradient)",
        py::call_guard<py::gil_scoped_release>());
  m.def("adamw_step_bf16_moments", &adamw_step_bf16_moments,
        "out-of-place fused AdamW step, fp32 master, bf16 moments, fp32 or bf16 gradient",
        py::call_guard<py::gil_scoped_release>());
  m.def("adamw_step_int8_moments", &heavylift::adamw_step_int8_moments,
        "out-of-place fused AdamW step, fp32 master, fp32 or bf16 gradient, m and sqrt(v) block-quantized to 8 bits",
        py::call_guard<py::gil_scoped_release>());
  m.def("adamw_step_bf16_master", &heavylift::adamw_step_bf16_master,
        "out-of-place fused AdamW step, bf16 master with a bf16 Kahan compensation, bf16 moments",
        py::call_guard<py::gil_scoped_release>());
  m.def("adamw_step_bf16_master_int8", &heavylift::adamw_step_bf16_master_int8,
        "out-of-place fused AdamW step, bf16 master stochastically rounded, m and sqrt(v) block-quantized to 8 bits",
        py::call_guard<py::gil_scoped_release>());
}
