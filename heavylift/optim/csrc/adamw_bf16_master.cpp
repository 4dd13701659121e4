// bf16-master: the master weight is the unevaluated sum p + c of two bfloat16 numbers (Kahan-compensated
// summation with the compensation stored in bf16: ~16 significant bits instead of bf16's 8), m and v in
// bf16, gradient fp32. Per element, in fp32: e = p + c (exact), AdamW on e, p' = bf16(e'),
// c' = bf16(e' - p') (e' - p' is exact in fp32; only its rounding to bf16 is lost). The GPU weight is p'
// itself: the upload is 2 bytes/param with no cast. 8 bytes/param of state, 20 of traffic per step
// (reads p c m v g, writes p c m v). Out of place or in place (each element read before written).
#include <ATen/Parallel.h>

#include "common.h"

namespace heavylift {

void adamw_step_bf16_master(const at::Tensor& p_in, const at::Tensor& c_in, const at::Tensor& m_in,
                            const at::Tensor& v_in, const at::Tensor& grad, const at::Tensor& p_out,
                            const at::Tensor& c_out, const at::Tensor& m_out, const at::Tensor& v_out,
                            double lr, double beta1, double beta2, double eps, double weight_decay,
                            int64_t step, double grad_mul) {
  const int64_t n = grad.numel();
  for (auto [t, what] : {std::pair{&p_in, "p_in"}, {&c_in, "c_in"}, {&m_in, "m_in"}, {&v_in, "v_in"},
                         {&p_out, "p_out"}, {&c_out, "c_out"}, {&m_out, "m_out"}, {&v_out, "v_out"}}) {
    check(*t, n, what, at::kBFloat16);
  }
  const AdamScalars k(lr, beta1, beta2, eps, weight_decay, step, grad_mul);
  const uint16_t *pi = bf16_in(p_in), *ci = bf16_in(c_in), *mi = bf16_in(m_in), *vi = bf16_in(v_in);
  uint16_t *po = bf16_out(p_out), *co = bf16_out(c_out), *mo = bf16_out(m_out), *vo = bf16_out(v_out);
  with_grad(grad, n, [&](auto g) {
    using G = grad_t<decltype(g)>;
    at::parallel_for(0, n, 1 << 14, [=](int64_t begin, int64_t end) {
      const G* __restrict__ g_ = g;
      const uint16_t* __restrict__ pi_ = pi;
      const uint16_t* __restrict__ ci_ = ci;
      const uint16_t* __restrict__ mi_ = mi;
      const uint16_t* __restrict__ vi_ = vi;
      uint16_t* __restrict__ po_ = po;
      uint16_t* __restrict__ co_ = co;
      uint16_t* __restrict__ mo_ = mo;
      uint16_t* __restrict__ vo_ = vo;
#pragma omp simd
      for (int64_t d = begin; d < end; ++d) {
        const float gv = grad_at(g_, d) * k.gmul;
        const float ev = (bf16_load(pi_[d]) + bf16_load(ci_[d])) * k.decay;
        const float mv = bf16_load(mi_[d]) * k.b1 + gv * k.c1;
        const float vv = bf16_load(vi_[d]) * k.b2 + gv * gv * k.c2;
        const float denom = __builtin_sqrtf(vv) / k.bc2s + k.eps;
        const float e_new = ev - k.step_size * mv / denom;
        const uint16_t p_new = bf16_store(e_new);
        po_[d] = p_new;
        co_[d] = bf16_store(e_new - bf16_load(p_new));
        mo_[d] = bf16_store(mv);
        vo_[d] = bf16_store(vv);
      }
    });
  });
}

}  // namespace heavylift
