// CUDA handler of flashkda_decode: a few new tokens per row against a fp32 state (pool) updated in place.
// Operands, results and semantics: cpp/kda_decode_binding.h.
//
// The recurrence is independent per value column v of the state: with alpha = exp(g_t), the new
// column is  S'[:, v] = alpha * S[:, v],  S[:, v] = S'[:, v] + k_t * beta (v_t[v] - k_t . S'[:, v]),
// and o_t[v] = q_t . S[:, v] = q_t . S'[:, v] + (q_t . k_t) * beta (v_t[v] - k_t . S'[:, v]).
// So one CTA owns a strip of BV value columns of one (row, value head) state: it reads the strip once
// into registers (16-byte coalesced loads), applies the row's T tokens in order (one combined reduction
// over K per token: k.S' and q.S' together), and writes the strip back once. The per-token vectors
// (q, k, gate, beta, v) are loaded and pre-processed (l2norm, gate, sigmoid) by one warp per token
// into shared memory, up to 8 tokens at a time.
//
// Layout "kv" ([K, V], v contiguous): a thread holds RK rows x 4 columns; the reduction over K is a
// warp butterfly plus a cross-warp pass through shared memory. Layout "vk" ([V, K], k contiguous): a
// thread holds 4 consecutive k of a few v rows; the reduction over K stays inside a warp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kda_bindings.h"
#include "kda_decode_binding.h"
#include "kda_env.h"
#include "kda_gate_math.cuh"

namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTokensPerChunk = kWarps;  // one warp pre-processes one token

template <typename X>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float ld(const float* p) { return *p; }
  static __device__ __forceinline__ void st(float* p, float x) { *p = x; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void st(__half* p, float x) { *p = __float2half_rn(x); }
};

struct DecodeParams {
  const void *q, *k, *v, *g, *beta;
  const float *a_log, *dt_bias;
  const int32_t* indices;  // nullptr: row b uses slot b
  float* state;
  void* o;
  int64_t B, T, H, HV, V, P, group;
  int nvb;  // value-column blocks per head
  float scale, lower_bound;
  int gate;  // 0 precomputed, 1 softplus, 2 bounded
  bool use_a_log, qk_l2norm, beta_sigmoid, allow_neg_eigval;
};

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

using flashkda::Sigmoid;
using flashkda::Softplus;

template <int K, int BV>
struct alignas(16) Smem {
  float q[kTokensPerChunk][K];      // l2-normalised (when asked) and scaled
  float k[kTokensPerChunk][K];      // l2-normalised (when asked)
  float alpha[kTokensPerChunk][K];  // exp(log-decay)
  float v[kTokensPerChunk][BV];
  float beta[kTokensPerChunk];
  float qk[kTokensPerChunk];
  float red[2][kWarps][2][BV];  // kv layout: per-warp partial k.S' and q.S', double-buffered by token parity
};

// Loads and pre-processes tokens [t0, t0 + 8) of this (row, head) into shared memory (one warp each).
template <typename X, int K, int BV>
__device__ __forceinline__ void LoadTokens(const DecodeParams& p, Smem<K, BV>& sm, int64_t row, int64_t l,
                                           int64_t hv, int64_t v0, int64_t t0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = t0 + warp;
  if (t >= p.T) return;
  const int64_t h = hv / p.group;
  const X* q = static_cast<const X*>(p.q) + ((row * p.T + t) * p.H + h) * K;
  const X* k = static_cast<const X*>(p.k) + ((row * p.T + t) * p.H + h) * K;
  const X* g = static_cast<const X*>(p.g) + ((row * p.T + t) * p.HV + hv) * K;
  constexpr int E = K / 32;
  float qv[E], kv[E], gv[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    qv[i] = Cvt<X>::ld(q + lane + 32 * i);
    kv[i] = Cvt<X>::ld(k + lane + 32 * i);
    gv[i] = Cvt<X>::ld(g + lane + 32 * i);
  }
  const X* vrow = static_cast<const X*>(p.v) + ((row * p.T + t) * p.HV + hv) * p.V;
#pragma unroll
  for (int c = lane; c < BV; c += 32) sm.v[warp][c] = v0 + c < p.V ? Cvt<X>::ld(vrow + v0 + c) : 0.f;
  float bt = Cvt<X>::ld(static_cast<const X*>(p.beta) + (row * p.T + t) * p.HV + hv);
  float qs = p.scale, ks = 1.f;
  if (p.qk_l2norm) {
    float qn = 0.f, kn = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      qn += qv[i] * qv[i];
      kn += kv[i] * kv[i];
    }
    qn = WarpSum(qn);
    kn = WarpSum(kn);
    qs *= rsqrtf(qn + 1e-6f);
    ks = rsqrtf(kn + 1e-6f);
  }
  float dot = 0.f;
  const float a = p.gate != 0 ? __expf(p.a_log[l * p.HV + hv]) : 0.f;
  const float* dtb = p.dt_bias + (l * p.HV + hv) * K;
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int kk = lane + 32 * i;
    qv[i] *= qs;
    kv[i] *= ks;
    dot += qv[i] * kv[i];
    float x = gv[i];
    if (p.gate == 1) {
      x = -a * Softplus(x + dtb[kk]);
    } else if (p.gate == 2) {
      float y = x + dtb[kk];
      if (p.use_a_log) y *= a;
      x = p.lower_bound * Sigmoid(y);
    }
    sm.q[warp][kk] = qv[i];
    sm.k[warp][kk] = kv[i];
    sm.alpha[warp][kk] = __expf(x);
  }
  dot = WarpSum(dot);
  if (lane == 0) {
    if (p.beta_sigmoid) {
      bt = Sigmoid(bt);
      if (p.allow_neg_eigval) bt *= 2.f;
    }
    sm.beta[warp] = bt;
    sm.qk[warp] = dot;
  }
}

template <typename X>
__device__ __forceinline__ void StoreOut(const DecodeParams& p, int64_t row, int64_t t, int64_t hv, int64_t col,
                                         float x) {
  Cvt<X>::st(static_cast<X*>(p.o) + ((row * p.T + t) * p.HV + hv) * p.V + col, x);
}

// Resident CTAs per SM the register allocation must allow: the state strip is BV * K / 256 floats per
// thread, and the more CTAs (state bytes) in flight per SM, the closer a memory-bound launch gets to HBM
// bandwidth.
template <int K, int BV>
constexpr int MinBlocks() {
  constexpr int f = BV * K / kThreads;
  return f <= 16 ? 4 : (f <= 32 ? 3 : 2);
}

template <typename X, int K, int BV, bool VK>
__global__ void __launch_bounds__(kThreads, MinBlocks<K, BV>()) KdaDecodeKernel(const DecodeParams p) {
  __shared__ Smem<K, BV> sm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t blk = blockIdx.x;
  const int64_t vb = blk % p.nvb;
  const int64_t hv = (blk / p.nvb) % p.HV;
  const int64_t row = blk / (static_cast<int64_t>(p.nvb) * p.HV);
  const int64_t l = row / p.B, b = row % p.B;
  const int64_t v0 = vb * BV;
  const int64_t slot = p.indices != nullptr ? static_cast<int64_t>(p.indices[row]) : b;
  if (slot < 0 || slot >= p.P) {  // padding or out-of-range index: o = 0, the pool is not touched
    for (int64_t i = threadIdx.x; i < p.T * BV; i += kThreads) {
      const int64_t t = i / BV, col = v0 + i % BV;
      if (col < p.V) StoreOut<X>(p, row, t, hv, col, 0.f);
    }
    return;
  }
  float* base = p.state + ((l * p.P + slot) * p.HV + hv) * static_cast<int64_t>(K) * p.V;

  if constexpr (!VK) {
    // ---------------- [K, V] layout ----------------
    constexpr int TPR = BV / 4;        // threads per state row (one float4 each)
    constexpr int KPW = 32 / TPR;      // k-groups per warp
    constexpr int KG = kWarps * KPW;   // k-groups per CTA
    static_assert(K % KG == 0, "K too small for this BV");
    constexpr int RK = K / KG;         // rows per thread
    const int cq = lane % TPR, kl = lane / TPR;
    const int kg = warp * KPW + kl;
    const int64_t col = v0 + cq * 4;
    const bool colok = col < p.V;  // V % 4 == 0: a quad is all in or all out
    float4 s[RK];
#pragma unroll
    for (int i = 0; i < RK; ++i) {
      s[i] = colok ? *reinterpret_cast<const float4*>(base + (kg + KG * i) * p.V + col) : make_float4(0, 0, 0, 0);
    }
    for (int64_t t0 = 0; t0 < p.T; t0 += kTokensPerChunk) {
      if (t0 > 0) __syncthreads();
      LoadTokens<X, K, BV>(p, sm, row, l, hv, v0, t0);
      __syncthreads();
      const int nt = static_cast<int>(p.T - t0 < kTokensPerChunk ? p.T - t0 : kTokensPerChunk);
      for (int tt = 0; tt < nt; ++tt) {
        const int64_t t = t0 + tt;
        const int buf = static_cast<int>(t & 1);
        float4 pk = make_float4(0, 0, 0, 0), pq = make_float4(0, 0, 0, 0);
#pragma unroll
        for (int i = 0; i < RK; ++i) {
          const int kk = kg + KG * i;
          const float a = sm.alpha[tt][kk], kx = sm.k[tt][kk], qx = sm.q[tt][kk];
          s[i].x *= a; s[i].y *= a; s[i].z *= a; s[i].w *= a;
          pk.x += kx * s[i].x; pk.y += kx * s[i].y; pk.z += kx * s[i].z; pk.w += kx * s[i].w;
          pq.x += qx * s[i].x; pq.y += qx * s[i].y; pq.z += qx * s[i].z; pq.w += qx * s[i].w;
        }
#pragma unroll
        for (int o = TPR; o < 32; o <<= 1) {
          pk.x += __shfl_xor_sync(0xffffffffu, pk.x, o);
          pk.y += __shfl_xor_sync(0xffffffffu, pk.y, o);
          pk.z += __shfl_xor_sync(0xffffffffu, pk.z, o);
          pk.w += __shfl_xor_sync(0xffffffffu, pk.w, o);
          pq.x += __shfl_xor_sync(0xffffffffu, pq.x, o);
          pq.y += __shfl_xor_sync(0xffffffffu, pq.y, o);
          pq.z += __shfl_xor_sync(0xffffffffu, pq.z, o);
          pq.w += __shfl_xor_sync(0xffffffffu, pq.w, o);
        }
        if (kl == 0) {
          *reinterpret_cast<float4*>(&sm.red[buf][warp][0][cq * 4]) = pk;
          *reinterpret_cast<float4*>(&sm.red[buf][warp][1][cq * 4]) = pq;
        }
        __syncthreads();
        float4 rk = make_float4(0, 0, 0, 0), rq = make_float4(0, 0, 0, 0);
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float4 a = *reinterpret_cast<const float4*>(&sm.red[buf][w][0][cq * 4]);
          const float4 c = *reinterpret_cast<const float4*>(&sm.red[buf][w][1][cq * 4]);
          rk.x += a.x; rk.y += a.y; rk.z += a.z; rk.w += a.w;
          rq.x += c.x; rq.y += c.y; rq.z += c.z; rq.w += c.w;
        }
        const float bt = sm.beta[tt], qk = sm.qk[tt];
        const float4 vv = *reinterpret_cast<const float4*>(&sm.v[tt][cq * 4]);
        float4 u;
        u.x = bt * (vv.x - rk.x); u.y = bt * (vv.y - rk.y); u.z = bt * (vv.z - rk.z); u.w = bt * (vv.w - rk.w);
#pragma unroll
        for (int i = 0; i < RK; ++i) {
          const float kx = sm.k[tt][kg + KG * i];
          s[i].x += kx * u.x; s[i].y += kx * u.y; s[i].z += kx * u.z; s[i].w += kx * u.w;
        }
        if (warp == 0 && kl == 0 && colok) {
          StoreOut<X>(p, row, t, hv, col + 0, rq.x + qk * u.x);
          StoreOut<X>(p, row, t, hv, col + 1, rq.y + qk * u.y);
          StoreOut<X>(p, row, t, hv, col + 2, rq.z + qk * u.z);
          StoreOut<X>(p, row, t, hv, col + 3, rq.w + qk * u.w);
        }
      }
    }
    if (colok) {
#pragma unroll
      for (int i = 0; i < RK; ++i) *reinterpret_cast<float4*>(base + (kg + KG * i) * p.V + col) = s[i];
    }
  } else {
    // ---------------- [V, K] layout ----------------
    constexpr int LPR = (K / 4) < 32 ? (K / 4) : 32;  // lanes per state row (v)
    constexpr int KC = K / (4 * LPR);                 // float4 chunks per lane along k
    constexpr int RPW = 32 / LPR;                     // rows per warp instruction
    constexpr int ROWS = BV / kWarps;                 // rows per warp
    static_assert(ROWS % RPW == 0, "K too small for this BV");
    constexpr int RI = ROWS / RPW;                    // row instructions per lane
    const int kq = lane % LPR, rl = lane / LPR;
    float4 s[RI][KC];
    // Row j of this lane is value column v0 + r0 + j * RPW; rows past V are masked.
    const int r0 = warp * ROWS + rl;
#define FKDA_ROW_OK(j) (v0 + r0 + (j) * RPW < p.V)
#pragma unroll
    for (int j = 0; j < RI; ++j) {
      const int64_t col = v0 + r0 + j * RPW;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        s[j][c] = FKDA_ROW_OK(j) ? *reinterpret_cast<const float4*>(base + col * K + (c * LPR + kq) * 4)
                         : make_float4(0, 0, 0, 0);
      }
    }
    for (int64_t t0 = 0; t0 < p.T; t0 += kTokensPerChunk) {
      if (t0 > 0) __syncthreads();
      LoadTokens<X, K, BV>(p, sm, row, l, hv, v0, t0);
      __syncthreads();
      const int nt = static_cast<int>(p.T - t0 < kTokensPerChunk ? p.T - t0 : kTokensPerChunk);
      for (int tt = 0; tt < nt; ++tt) {
        const int64_t t = t0 + tt;
        float4 a4[KC], k4[KC], q4[KC];
#pragma unroll
        for (int c = 0; c < KC; ++c) {
          const int kk = (c * LPR + kq) * 4;
          a4[c] = *reinterpret_cast<const float4*>(&sm.alpha[tt][kk]);
          k4[c] = *reinterpret_cast<const float4*>(&sm.k[tt][kk]);
          q4[c] = *reinterpret_cast<const float4*>(&sm.q[tt][kk]);
        }
        const float bt = sm.beta[tt], qk = sm.qk[tt];
#pragma unroll
        for (int j = 0; j < RI; ++j) {
          float pk = 0.f, pq = 0.f;
#pragma unroll
          for (int c = 0; c < KC; ++c) {
            float4& x = s[j][c];
            x.x *= a4[c].x; x.y *= a4[c].y; x.z *= a4[c].z; x.w *= a4[c].w;
            pk += k4[c].x * x.x + k4[c].y * x.y + k4[c].z * x.z + k4[c].w * x.w;
            pq += q4[c].x * x.x + q4[c].y * x.y + q4[c].z * x.z + q4[c].w * x.w;
          }
#pragma unroll
          for (int o = 1; o < LPR; o <<= 1) {
            pk += __shfl_xor_sync(0xffffffffu, pk, o);
            pq += __shfl_xor_sync(0xffffffffu, pq, o);
          }
          const int r = r0 + j * RPW;
          const float u = bt * (sm.v[tt][r] - pk);
#pragma unroll
          for (int c = 0; c < KC; ++c) {
            float4& x = s[j][c];
            x.x += k4[c].x * u; x.y += k4[c].y * u; x.z += k4[c].z * u; x.w += k4[c].w * u;
          }
          if (kq == 0 && FKDA_ROW_OK(j)) StoreOut<X>(p, row, t, hv, v0 + r, pq + qk * u);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < RI; ++j) {
      if (!FKDA_ROW_OK(j)) continue;
      const int64_t col = v0 + r0 + j * RPW;
#pragma unroll
      for (int c = 0; c < KC; ++c) *reinterpret_cast<float4*>(base + col * K + (c * LPR + kq) * 4) = s[j][c];
    }
#undef FKDA_ROW_OK
  }
}

template <typename X, int K, int BV, bool VK>
cudaError_t Launch(cudaStream_t stream, DecodeParams p, int64_t blocks) {
  p.nvb = static_cast<int>((p.V + BV - 1) / BV);
  KdaDecodeKernel<X, K, BV, VK><<<static_cast<unsigned>(blocks * p.nvb), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Strip width BV (value columns per CTA): 16 when there are few (row, head) pairs (N=1 decode: more
// CTAs in flight), 64 for large launches (more state bytes in flight per thread), else 32.
// FLASHKDA_DECODE_BV=16|32|64 in the environment forces one (read once; a tuning knob for benchmarks).
inline int ForcedBv() {
  static const int bv = flashkda::EnvColumnBlock("FLASHKDA_DECODE_BV");
  return bv;
}

template <typename X, int K, bool VK>
cudaError_t LaunchK(cudaStream_t stream, const DecodeParams& p, int64_t pairs) {
  const int64_t ctas32 = pairs * ((p.V + 31) / 32);
  int bv = ctas32 < 264 ? 16 : (ctas32 >= 1056 ? 64 : 32);
  if (ForcedBv() != 0) bv = ForcedBv();
  if constexpr (K >= 64) {
    if (bv == 16) return Launch<X, K, 16, VK>(stream, p, pairs);
  }
  if constexpr (K <= 128) {
    if (bv == 64) return Launch<X, K, 64, VK>(stream, p, pairs);
  }
  return Launch<X, K, 32, VK>(stream, p, pairs);
}

template <typename X, bool VK>
cudaError_t LaunchLayout(cudaStream_t stream, const DecodeParams& p, int64_t K, int64_t pairs) {
  switch (K) {
    case 32: return LaunchK<X, 32, VK>(stream, p, pairs);
    case 64: return LaunchK<X, 64, VK>(stream, p, pairs);
    case 128: return LaunchK<X, 128, VK>(stream, p, pairs);
    case 256: return LaunchK<X, 256, VK>(stream, p, pairs);
    default: return cudaErrorInvalidValue;
  }
}

template <typename X>
cudaError_t LaunchDtype(cudaStream_t stream, const DecodeParams& p, int64_t K, bool vk, int64_t pairs) {
  return vk ? LaunchLayout<X, true>(stream, p, K, pairs) : LaunchLayout<X, false>(stream, p, K, pairs);
}

}  // namespace

static ffi::Error KdaCudaDecodeImpl(cudaStream_t stream, FLASHKDA_DECODE_PARAMS) {
  flashkda::KdaOptions opt;
  if (auto err = FLASHKDA_DECODE_OPTIONS(opt); !err.success()) return err;
  flashkda::DecodeDims s;
  if (auto err = flashkda::ParseDecodeOperands(q, k, v, g, beta, a_log, dt_bias, state_indices, state, opt, *o,
                                             *new_state, &s);
      !err.success()) {
    return err;
  }
  if (s.K != 32 && s.K != 64 && s.K != 128 && s.K != 256) {
    return ffi::Error::InvalidArgument("flashkda_decode (CUDA): K must be 32, 64, 128 or 256");
  }
  if (s.V % 4 != 0) return ffi::Error::InvalidArgument("flashkda_decode (CUDA): V must be a multiple of 4");
  if (new_state->untyped_data() != state.untyped_data() && state.size_bytes() > 0) {
    // XLA honours the alias, so this does not happen; stay correct (and graph-safe) if it ever does.
    if (cudaMemcpyAsync(new_state->untyped_data(), state.untyped_data(), state.size_bytes(),
                        cudaMemcpyDeviceToDevice, stream) != cudaSuccess) {
      return ffi::Error::Internal("flashkda_decode: state copy failed");
    }
  }
  const int64_t pairs = s.rows() * s.HV;
  if (pairs == 0 || s.T == 0) return ffi::Error::Success();
  if (pairs * ((s.V + 15) / 16) >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("flashkda_decode (CUDA): too many rows");
  }
  DecodeParams p{};
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.beta = beta.untyped_data();
  p.a_log = static_cast<const float*>(a_log.untyped_data());
  p.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  p.indices = s.has_indices ? static_cast<const int32_t*>(state_indices.untyped_data()) : nullptr;
  p.state = static_cast<float*>(new_state->untyped_data());
  p.o = o->untyped_data();
  p.B = s.B;
  p.T = s.T;
  p.H = s.H;
  p.HV = s.HV;
  p.V = s.V;
  p.P = s.P;
  p.group = s.group();
  p.scale = opt.scale;
  p.lower_bound = opt.lower_bound;
  p.gate = static_cast<int>(opt.gate);
  p.use_a_log = opt.use_a_log;
  p.qk_l2norm = opt.qk_l2norm;
  p.beta_sigmoid = opt.beta_sigmoid;
  p.allow_neg_eigval = opt.allow_neg_eigval;
  cudaError_t err;
  switch (s.dtype) {
    case ffi::DataType::BF16:
      err = LaunchDtype<__nv_bfloat16>(stream, p, s.K, opt.state_vk, pairs);
      break;
    case ffi::DataType::F16:
      err = LaunchDtype<__half>(stream, p, s.K, opt.state_vk, pairs);
      break;
    case ffi::DataType::F32:
      err = LaunchDtype<float>(stream, p, s.K, opt.state_vk, pairs);
      break;
    default:
      return ffi::Error::InvalidArgument("flashkda_decode (CUDA): inputs must be bf16, f16 or f32");
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("flashkda_decode: kernel launch failed: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaDecodeCuda, KdaCudaDecodeImpl,
                              FLASHKDA_DECODE_BINDING(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                              {ffi::Traits::kCmdBufferCompatible});
