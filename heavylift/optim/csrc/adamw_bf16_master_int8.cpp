// bf16-master-int8: a bf16 master with no compensation term, stochastically rounded after every step
// (stochastic_round.h: random bits from a hash of the element's global index, the step and the
// parameter's key), m and r = sqrt(v) as int8-moments keeps them (int8_moments.h, the same code).
// 4 bytes/param of state + 8 per 256-element block; the GPU weight is the master itself (2-byte upload,
// no cast). Out of place or in place.
#include "int8_moments.h"
#include "stochastic_round.h"

namespace heavylift {
namespace {

struct Bf16StochasticMaster {
  using T = uint16_t;
  uint32_t stream;
  int64_t offset;  // global index of the shard's first element
  float load(uint16_t h) const { return bf16_load(h); }
  uint16_t store(float x, int64_t i) const { return bf16_store_stochastic(x, sr_bits(offset + i, stream)); }
};

}  // namespace

void adamw_step_bf16_master_int8(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& ms_in,
                                 const at::Tensor& v_in, const at::Tensor& vs_in, const at::Tensor& grad,
                                 const at::Tensor& p_out, const at::Tensor& m_out, const at::Tensor& ms_out,
                                 const at::Tensor& v_out, const at::Tensor& vs_out, int64_t row_len,
                                 int64_t block, int64_t key, int64_t offset, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, int64_t step, double grad_mul) {
  const int64_t n = grad.numel();
  const int8m::Moments mm(n, row_len, block, m_in, ms_in, v_in, vs_in, m_out, ms_out, v_out, vs_out);
  check(p_in, n, "p_in", at::kBFloat16); check(p_out, n, "p_out", at::kBFloat16);
  TORCH_CHECK(key >= 0 && key <= 0xffffffffLL, "key must be a 32-bit unsigned integer, not ", key);
  TORCH_CHECK(offset >= 0, "offset must be >= 0, not ", offset);
  const AdamScalars k(lr, beta1, beta2, eps, weight_decay, step, grad_mul);
  const Bf16StochasticMaster master{sr_stream(static_cast<uint32_t>(key), step), offset};
  with_grad(grad, n, [&](auto g) { int8m::step_blocks(mm, bf16_in(p_in), bf16_out(p_out), master, g, k); });
}

}  // namespace heavylift
