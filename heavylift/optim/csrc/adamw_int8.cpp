// int8-moments: fp32 master, fp32 or bf16 gradient; m and r = sqrt(v) block-quantized to 8 bits with one fp32 scale
// (the block's absolute maximum) each. The codes are optim/quant.py's, which documents them:
//   m: signed linear, m = code * absmax / 127;
//   r: unsigned 8-bit float relative to absmax, 4 exponent bits (2^-15 .. 2^0) and 4 mantissa bits,
//      code 0 = 0, code 241 = absmax; a non-zero r below 2^-15 * absmax is stored as 2^-15 * absmax.
// Blocks follow rows: row r of a shard is elements [r * row_len, (r + 1) * row_len), cut into blocks of
// `block` elements, the last one ragged. Each thread takes whole blocks: it decodes, steps and keeps the
// new m and r of one block in two stack arrays (never a buffer the size of the bucket), then encodes
// them against the block's new maxima. Reads (p, m, v) from one buffer set and writes another, which
// may be the same (every block is read whole before any of it is written). 10 bytes of traffic per
// parameter each way instead of 16 (fp32) and 12 (bf16 moments), plus 8 per block, and the gradient.
#include <ATen/Parallel.h>

#include "common.h"

namespace heavylift {
namespace {

constexpr int64_t kMaxBlock = 1024;
constexpr float kMLevels = 127.0f;

inline float e4m4_decode(uint8_t c) {
  const uint32_t k = static_cast<uint32_t>(c) - 1u;  // wraps for c = 0, which is selected away
  const uint32_t bits = (((k >> 4) + 112u) << 23) | ((k & 15u) << 19);  // 2^((k>>4) - 15) * (1 + (k&15)/16)
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return c ? f : 0.0f;
}

inline uint8_t e4m4_encode(float y) {  // y in [0, 1]
  uint32_t u;
  __builtin_memcpy(&u, &y, 4);
  const uint32_t rounded = u + 0x3ffffu + ((u >> 19) & 1u);  // 4 mantissa bits, nearest even
  const int32_t e = static_cast<int32_t>(rounded >> 23) - 127;
  const int32_t code = (e + 15) * 16 + static_cast<int32_t>((rounded >> 19) & 15u) + 1;
  return static_cast<uint8_t>(y > 0.0f ? (e < -15 ? 1 : code) : 0);
}

}  // namespace

void adamw_step_int8_moments(const at::Tensor& p_in, const at::Tensor& m_in, const at::Tensor& ms_in,
                             const at::Tensor& v_in, const at::Tensor& vs_in, const at::Tensor& grad,
                             const at::Tensor& p_out, const at::Tensor& m_out, const at::Tensor& ms_out,
                             const at::Tensor& v_out, const at::Tensor& vs_out, int64_t row_len, int64_t block,
                             double lr, double beta1, double beta2, double eps, double weight_decay,
                             int64_t step, double grad_mul) {
  const int64_t n = grad.numel();
  TORCH_CHECK(row_len >= 1 && n % row_len == 0, "row_len ", row_len, " does not divide ", n, " elements");
  TORCH_CHECK(block >= 1 && block <= kMaxBlock, "block must be in [1, ", kMaxBlock, "], not ", block);
  const int64_t per_row = (row_len + block - 1) / block, blocks = n / row_len * per_row;
  check(p_in, n, "p_in"); check(p_out, n, "p_out");
  check(m_in, n, "m_in", at::kChar); check(m_out, n, "m_out", at::kChar);
  check(v_in, n, "v_in", at::kByte); check(v_out, n, "v_out", at::kByte);
  check(ms_in, blocks, "ms_in"); check(ms_out, blocks, "ms_out");
  check(vs_in, blocks, "vs_in"); check(vs_out, blocks, "vs_out");
  const AdamScalars k(lr, beta1, beta2, eps, weight_decay, step, grad_mul);
  const float* pi = p_in.data_ptr<float>();
  float* po = p_out.data_ptr<float>();
  const int8_t* mi = m_in.data_ptr<int8_t>();
  int8_t* mo = m_out.data_ptr<int8_t>();
  const uint8_t* vi = v_in.data_ptr<uint8_t>();
  uint8_t* vo = v_out.data_ptr<uint8_t>();
  const float* msi = ms_in.data_ptr<float>();
  const float* vsi = vs_in.data_ptr<float>();
  float* mso = ms_out.data_ptr<float>();
  float* vso = vs_out.data_ptr<float>();
  with_grad(grad, n, [&](auto g) {
    using G = grad_t<decltype(g)>;
    at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 14) / block), [=](int64_t b0, int64_t b1) {
      alignas(64) float mbuf[kMaxBlock];
      alignas(64) float rbuf[kMaxBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row = b / per_row, col = (b % per_row) * block;
        const int64_t start = row * row_len + col, len = std::min(block, row_len - col);
        const float m_step = msi[b] / kMLevels, r_scale = vsi[b];
        const G* __restrict__ g_ = g + start;
        const float* __restrict__ pi_ = pi + start;
        float* __restrict__ po_ = po + start;
        const int8_t* __restrict__ mi_ = mi + start;
        const uint8_t* __restrict__ vi_ = vi + start;
        float m_max = 0.0f, r_max = 0.0f;
#pragma omp simd reduction(max : m_max, r_max)
        for (int64_t d = 0; d < len; ++d) {
          const float gv = grad_at(g_, d) * k.gmul;
          const float pv = pi_[d] * k.decay;
          const float r_old = e4m4_decode(vi_[d]) * r_scale;
          const float mv = static_cast<float>(mi_[d]) * m_step * k.b1 + gv * k.c1;
          const float vv = r_old * r_old * k.b2 + gv * gv * k.c2;
          const float rv = __builtin_sqrtf(vv);
          const float denom = rv / k.bc2s + k.eps;
          po_[d] = pv - k.step_size * mv / denom;
          mbuf[d] = mv;
          rbuf[d] = rv;
          m_max = std::max(m_max, std::fabs(mv));
          r_max = std::max(r_max, rv);
        }
        const float m_inv = m_max > 0.0f ? kMLevels / m_max : 0.0f;
        const float r_inv = r_max > 0.0f ? 1.0f / r_max : 0.0f;
        int8_t* __restrict__ mo_ = mo + start;
        uint8_t* __restrict__ vo_ = vo + start;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) {
          const float q = std::min(std::max(__builtin_rintf(mbuf[d] * m_inv), -kMLevels), kMLevels);
          mo_[d] = static_cast<int8_t>(q);
          vo_[d] = e4m4_encode(rbuf[d] * r_inv);
        }
        mso[b] = m_max;
        vso[b] = r_max;
      }
    });
  });
}

}  // namespace heavylift
