// Shared by heavylift's CPU AdamW kernels: argument checks, bf16 conversions, the step's scalars.
#pragma once
#include <ATen/ATen.h>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace heavylift {

inline void check(const at::Tensor& t, int64_t n, const char* what, at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(),
              what, " must be a contiguous ", c10::toString(dtype), " CPU tensor");
  TORCH_CHECK(t.numel() == n, what, " has ", t.numel(), " elements, expected ", n);
}

// bfloat16 as its 16 bits: round to nearest even; NaN becomes 0x7fc0 as in c10::BFloat16. Branch-free,
// so the loops that call these vectorize.
inline float bf16_load(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline uint16_t bf16_store(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded) >> 16);
}

inline const uint16_t* bf16_in(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline uint16_t* bf16_out(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

// The gradient slot holds fp32 or bf16 (offload.grad_slot). The kernels are templates on its element type
// and widen a bf16 gradient on load (exact): no fp32 copy of the slot is ever made.
inline float grad_at(const float* g, int64_t d) { return g[d]; }
inline float grad_at(const uint16_t* g, int64_t d) { return bf16_load(g[d]); }

// Calls `body` with the gradient's data as `const float*` or `const uint16_t*` (bf16), after checking it.
template <typename Body>
void with_grad(const at::Tensor& grad, int64_t n, Body&& body) {
  if (grad.scalar_type() == at::kBFloat16) {
    check(grad, n, "grad", at::kBFloat16);
    body(bf16_in(grad));
  } else {
    check(grad, n, "grad");
    body(static_cast<const float*>(grad.data_ptr<float>()));
  }
}

// The element type behind a `with_grad` pointer.
template <typename P>
using grad_t = std::remove_const_t<std::remove_pointer_t<P>>;

// The scalars of one AdamW step, torch.optim.AdamW's arithmetic: factors computed in double, applied in
// fp32. `gmul` and `decay` are 1 when the gradient is not scaled or there is no weight decay.
struct AdamScalars {
  float step_size, decay, b1, b2, c1, c2, bc2s, eps, gmul;
  bool scale, decays;

  AdamScalars(double lr, double beta1, double beta2, double eps_, double weight_decay, int64_t step,
              double grad_mul) {
    TORCH_CHECK(step >= 1, "step counts from 1");
    step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
    decays = weight_decay != 0.0;
    decay = decays ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
    b1 = static_cast<float>(beta1);
    b2 = static_cast<float>(beta2);
    c1 = static_cast<float>(1.0 - beta1);
    c2 = static_cast<float>(1.0 - beta2);
    bc2s = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
    eps = static_cast<float>(eps_);
    scale = grad_mul != 1.0;
    gmul = scale ? static_cast<float>(grad_mul) : 1.0f;
  }
};

}  // namespace heavylift
