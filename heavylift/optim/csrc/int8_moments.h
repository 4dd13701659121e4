// The int8-moments step of one buffer set, shared by the formats that keep m and r = sqrt(v) as 8-bit
// block codes: int8-moments (fp32 master) and bf16-master-int8 (bf16 master, stochastically rounded).
// The codes are optim/quant.py's, which documents them:
//   m: signed linear, m = code * absmax / 127;
//   r: unsigned 8-bit float relative to absmax, 4 exponent bits (2^-15 .. 2^0) and 4 mantissa bits,
//      code 0 = 0, code 241 = absmax; a non-zero r below 2^-15 * absmax is stored as 2^-15 * absmax.
// Blocks follow rows: row r of a shard is elements [r * row_len, (r + 1) * row_len), cut into blocks of
// `block` elements, the last one ragged. Each thread takes whole blocks: it decodes, steps and keeps the
// new m and r of one block in two stack arrays (never a buffer the size of the bucket), then encodes
// them against the block's new maxima. Every block is read whole before any of it is written, so the
// output set may be the input set (in place). The master's storage is a policy (`Master`): how an element
// is widened to fp32 on load and narrowed on store (the store sees the element's index in the shard).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"

namespace heavylift {
namespace int8m {

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

// The moments' buffers of one step (in and out) and the block layout, checked against n elements.
struct Moments {
  const int8_t* mi;
  int8_t* mo;
  const uint8_t* vi;
  uint8_t* vo;
  const float *msi, *vsi;
  float *mso, *vso;
  int64_t row_len, block, per_row, blocks;

  Moments(int64_t n, int64_t row_len_, int64_t block_, const at::Tensor& m_in, const at::Tensor& ms_in,
          const at::Tensor& v_in, const at::Tensor& vs_in, const at::Tensor& m_out, const at::Tensor& ms_out,
          const at::Tensor& v_out, const at::Tensor& vs_out)
      : row_len(row_len_), block(block_) {
    TORCH_CHECK(row_len >= 1 && n % row_len == 0, "row_len ", row_len, " does not divide ", n, " elements");
    TORCH_CHECK(block >= 1 && block <= kMaxBlock, "block must be in [1, ", kMaxBlock, "], not ", block);
    per_row = (row_len + block - 1) / block;
    blocks = n / row_len * per_row;
    check(m_in, n, "m_in", at::kChar); check(m_out, n, "m_out", at::kChar);
    check(v_in, n, "v_in", at::kByte); check(v_out, n, "v_out", at::kByte);
    check(ms_in, blocks, "ms_in"); check(ms_out, blocks, "ms_out");
    check(vs_in, blocks, "vs_in"); check(vs_out, blocks, "vs_out");
    mi = m_in.data_ptr<int8_t>(); mo = m_out.data_ptr<int8_t>();
    vi = v_in.data_ptr<uint8_t>(); vo = v_out.data_ptr<uint8_t>();
    msi = ms_in.data_ptr<float>(); vsi = vs_in.data_ptr<float>();
    mso = ms_out.data_ptr<float>(); vso = vs_out.data_ptr<float>();
  }
};

// One AdamW step over every block: master pi -> po (Master::T elements), moments mm, gradient g.
template <typename Master, typename G>
void step_blocks(const Moments& mm, const typename Master::T* pi, typename Master::T* po, const Master master,
                 const G* g, const AdamScalars& k) {
  using T = typename Master::T;
  const int64_t block = mm.block;
  at::parallel_for(0, mm.blocks, std::max<int64_t>(1, (1 << 14) / block), [=, &mm, &k](int64_t b0, int64_t b1) {
    alignas(64) float mbuf[kMaxBlock];
    alignas(64) float rbuf[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b / mm.per_row, col = (b % mm.per_row) * block;
      const int64_t start = row * mm.row_len + col, len = std::min(block, mm.row_len - col);
      const float m_step = mm.msi[b] / kMLevels, r_scale = mm.vsi[b];
      const G* __restrict__ g_ = g + start;
      const T* __restrict__ pi_ = pi + start;
      T* __restrict__ po_ = po + start;
      const int8_t* __restrict__ mi_ = mm.mi + start;
      const uint8_t* __restrict__ vi_ = mm.vi + start;
      float m_max = 0.0f, r_max = 0.0f;
#pragma omp simd reduction(max : m_max, r_max)
      for (int64_t d = 0; d < len; ++d) {
        const float gv = grad_at(g_, d) * k.gmul;
        const float pv = master.load(pi_[d]) * k.decay;
        const float r_old = e4m4_decode(vi_[d]) * r_scale;
        const float mv = static_cast<float>(mi_[d]) * m_step * k.b1 + gv * k.c1;
        const float vv = r_old * r_old * k.b2 + gv * gv * k.c2;
        const float rv = __builtin_sqrtf(vv);
        const float denom = rv / k.bc2s + k.eps;
        po_[d] = master.store(pv - k.step_size * mv / denom, start + d);
        mbuf[d] = mv;
        rbuf[d] = rv;
        m_max = std::max(m_max, std::fabs(mv));
        r_max = std::max(r_max, rv);
      }
      const float m_inv = m_max > 0.0f ? kMLevels / m_max : 0.0f;
      const float r_inv = r_max > 0.0f ? 1.0f / r_max : 0.0f;
      int8_t* __restrict__ mo_ = mm.mo + start;
      uint8_t* __restrict__ vo_ = mm.vo + start;
#pragma omp simd
      for (int64_t d = 0; d < len; ++d) {
        const float q = std::min(std::max(__builtin_rintf(mbuf[d] * m_inv), -kMLevels), kMLevels);
        mo_[d] = static_cast<int8_t>(q);
        vo_[d] = e4m4_encode(rbuf[d] * r_inv);
      }
      mm.mso[b] = m_max;
      mm.vso[b] = r_max;
    }
  });
}

}  // namespace int8m
}  // namespace heavylift
