// Fused CPU LoRA-apply for TFlow's transient, per-row deltas (inference, no autograd):
//   out[b, t, :] += (x[b, t, :] @ a[b]^T) @ bt[b]       a: [B, R, d_in], bt: [B, R, d_out]
// One op per Linear call instead of four eager ops (cast, shrink, expand, add); the factors are
// stored as fp32 or bf16 (half the bytes), the rank-R intermediate and the accumulation are fp32
// either way, and the result is rounded once into out's dtype.
// Rows are split evenly over ATen's thread pool unless the update is tiny.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Element conversions written so the compiler can vectorise the loops (bf16 <-> fp32 as bit ops,
// round-to-nearest-even; NaN payloads are not preserved, which a LoRA update never produces).
template <typename T> static inline float to_f32(T v) { return static_cast<float>(v); }
template <> inline float to_f32<c10::BFloat16>(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T> static inline T from_f32(float f) { return static_cast<T>(f); }
template <> inline c10::BFloat16 from_f32<c10::BFloat16>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

template <typename scalar_t, typename factor_t>
static void rows_kernel(const scalar_t* x, const factor_t* a, const factor_t* bt, scalar_t* out,
                        int64_t B, int64_t T, int64_t I, int64_t R, int64_t O,
                        int64_t xs_b, int64_t xs_t, int64_t os_b, int64_t os_t, int64_t grain) {
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(I), xa(R), acc(O);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      const scalar_t* xr = x + b * xs_b + t * xs_t;
      #pragma omp simd
      for (int64_t i = 0; i < I; ++i) xf[i] = to_f32(xr[i]);
      const factor_t* A = a + b * R * I;               // [R, I]
      for (int64_t r = 0; r < R; ++r) {                // shrink: xa = x A^T  (fp32)
        const factor_t* ar = A + r * I;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t i = 0; i < I; ++i) s += xf[i] * to_f32(ar[i]);
        xa[r] = s;
      }
      const factor_t* Bt = bt + b * R * O;             // [R, O]
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = 0; r < R; ++r) {                // expand: acc = xa B^T  (fp32)
        const float s = xa[r];
        const factor_t* br = Bt + r * O;
        #pragma omp simd
        for (int64_t o = 0; o < O; ++o) acc[o] += s * to_f32(br[o]);
      }
      scalar_t* orow = out + b * os_b + t * os_t;
      #pragma omp simd
      for (int64_t o = 0; o < O; ++o) orow[o] = from_f32<scalar_t>(to_f32(orow[o]) + acc[o]);
    }
  });
}

// out[b, t, :] += (x[b, t, :] @ a[b]^T) @ bt[b]   (in place; returns out)
torch::Tensor lora_add_(torch::Tensor out, torch::Tensor x, torch::Tensor a, torch::Tensor bt) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && (x.requires_grad() || a.requires_grad() || bt.requires_grad())),
              "lora_add_ has no backward: call it with autograd off (the reference path trains)");
  if (x.dim() == 2 && out.dim() == 2) {  // a Linear called on [B, d]
    lora_add_(out.unsqueeze(1), x.unsqueeze(1), a, bt);
    return out;
  }
  TORCH_CHECK(x.dim() == 3 && out.dim() == 3, "x and out must be [B, T, d]");
  TORCH_CHECK(x.size(0) == a.size(0), "input batch ", x.size(0), " != ", a.size(0),
              " rows of generated deltas (beam search / num_return_sequences>1 are not supported)");
  if (x.stride(2) != 1) x = x.contiguous();
  TORCH_CHECK(a.scalar_type() == bt.scalar_type() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16),
              "factors must both be float32 or both bfloat16");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous(), "factors must be contiguous");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "x and out dtypes differ");
  TORCH_CHECK(out.stride(2) == 1, "out's last dim must be contiguous");
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), R = a.size(1), O = out.size(2);
  TORCH_CHECK(a.size(0) == B && a.size(2) == I && bt.size(0) == B && bt.size(1) == R && bt.size(2) == O, "shape mismatch");
  // Rows split evenly over ATen's threads once the update is worth a fork (~32k multiply-adds):
  // decode (B rows of one token) then uses every core like the base Linear does, instead of one.
  const int64_t rows = B * T, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = (rows * (I * R + R * O) < (int64_t(1) << 15)) ? rows : std::max<int64_t>(1, (rows + threads - 1) / threads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tflow_lora_add_", [&] {
    auto run = [&](auto factor_tag) {  // factor storage: float or BFloat16
      using factor_t = decltype(factor_tag);
      rows_kernel<scalar_t, factor_t>(x.data_ptr<scalar_t>(), a.data_ptr<factor_t>(), bt.data_ptr<factor_t>(),
                                      out.data_ptr<scalar_t>(), B, T, I, R, O, x.stride(0), x.stride(1),
                                      out.stride(0), out.stride(1), grain);
    };
    if (a.scalar_type() == at::kFloat) run(float{}); else run(c10::BFloat16{});
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_add_", &lora_add_, "out[b,t] += (x[b,t] @ a[b]^T) @ bt[b], in place (fp32 or bf16 factors, fp32 accumulation, no autograd)");
}
