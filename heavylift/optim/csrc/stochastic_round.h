// Stochastic rounding of fp32 to bfloat16 with counter-based random bits: the bits of an element are a
// hash of (its global index, the step, a per-parameter stream key), never a generator's state, so a
// step's result does not depend on the thread count, the chunking, in place vs out of place, or what
// ran before, and a resumed run draws the bits the uninterrupted one would have. optim/stochastic.py is
// the same arithmetic in torch ops (the tests' reference) and makes the keys.
#pragma once
#include <cstdint>

namespace heavylift {

// MurmurHash3's 32-bit finalizer: a bijection with full avalanche.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// The stream of one parameter shard's step: its key (seed and parameter name) mixed with the step count.
inline uint32_t sr_stream(uint32_t key, int64_t step) {
  return fmix32(key ^ fmix32(static_cast<uint32_t>(step) * 0x9e3779b9u));
}

// 32 random bits for element `index` (its global index in the parameter) in `stream`.
inline uint32_t sr_bits(int64_t index, uint32_t stream) {
  const uint64_t i = static_cast<uint64_t>(index);
  return fmix32(fmix32(static_cast<uint32_t>(i) ^ stream) ^ static_cast<uint32_t>(i >> 32));
}

// f rounded to one of its two bfloat16 neighbours, up (in magnitude) with probability equal to the
// dropped 16 bits' fraction of a bf16 ulp: adding 16 uniform bits below the kept ones and truncating.
// So E[result] = f exactly for finite f away from the overflow threshold. NaN becomes 0x7fc0.
inline uint16_t bf16_store_stochastic(float f, uint32_t bits) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint32_t rounded = u + (bits >> 16);
  return static_cast<uint16_t>(((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded) >> 16);
}

}  // namespace heavylift
