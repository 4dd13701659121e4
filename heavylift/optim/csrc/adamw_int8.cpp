// int8-moments: fp32 master, fp32 or bf16 gradient; m and r = sqrt(v) block-quantized to 8 bits with one
// fp32 scale (the block's absolute maximum) each; the step itself is int8_moments.h's. Reads (p, m, v)
// from one buffer set and writes another, which may be the same. 10 bytes of traffic per parameter each
// way instead of 16 (fp32) and 12 (bf16 moments), plus 8 per block, and the gradient.
#include "int8_moments.h"

namespace heavylift {
namespace {

struct Fp32Master {
  using T = float;
  float load(float x) const { return x; }
  float store(float x, int64_t) const { return x; }
};

}  // namespace

void adamw_step_int8_moments(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& ms_in,
                             const at::Tensor& v_in, const at::Tensor& vs_in, const at::Tensor& grad,
                             const at::Tensor& p_out, const at::Tensor& m_out, const at::Tensor& ms_out,
                             const at::Tensor& v_out, const at::Tensor& vs_out, int64_t row_len, int64_t block,
                             double lr, double beta1, double beta2, double eps, double weight_decay,
                             int64_t step, double grad_mul) {
  const int64_t n = grad.numel();
  const int8m::Moments mm(n, row_len, block, m_in, ms_in, v_in, vs_in, m_out, ms_out, v_out, vs_out);
  check(p_in, n, "p_in"); check(p_out, n, "p_out");
  const AdamScalars k(lr, beta1, beta2, eps, weight_decay, step, grad_mul);
  const float* pi = p_in.data_ptr<float>();
  float* po = p_out.data_ptr<float>();
  with_grad(grad, n, [&](auto g) { int8m::step_blocks(mm, pi, po, Fp32Master{}, g, k); });
}

}  // namespace heavylift
