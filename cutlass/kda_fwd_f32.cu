// The forward for float32 inputs: the token-by-token recurrence in float32 on the CUDA cores, accurate to float32
// rounding (DESIGN §5 asks 2e-3 of fp32 inputs on the GPU; the chunked tensor-core kernels round their operands
// to bf16 and land near 5e-3). It is slower than the bf16 / fp16 kernels (benchmarks/NOTES.md, session 17); cast
// the inputs to bf16 for speed.
//
// The recurrence is column-separable: column c of the state S (K x V) only meets column c of v and o. A CTA owns
// one (batch row, value head) and Cols<NC>() state columns. A lane holds NC adjacent columns over K / 8 rows;
// the 8 lanes of a row group (sub 0..7) share those columns, so the two K-long dot products of a token (k.S and
// q.S) end in three shuffles, and each k, q, a value a lane reads from shared memory serves Nc columns. Per chunk
// of F32Tokens<K>() tokens the CTA first copies q, k, g, v, beta and the slots into shared memory (cp.async, one
// chunk ahead), then pre-processes them there (l2norm, scale, gate, exp, beta), then every warp runs its columns
// through the chunk:
//   S' = diag(a) S;  r = beta (v - S'^T k);  S = S' + k r^T;  o = S^T q   (as the CPU kernel, kda_fwd_cpu.cc).
#include <cuda_runtime.h>

#include "kda_fwd_launch.h"

namespace flashkda {
namespace fwd {
namespace {

constexpr int kLanesPerCol = 8;                 // lanes sharing a column (K / 8 rows each)
constexpr int kColGroups = 32 / kLanesPerCol;   // column groups of a warp (4)
constexpr int kF32Warps = 2;
constexpr int kF32Threads = 32 * kF32Warps;
constexpr int kValidTok = 1, kStartTok = 2, kEndTok = 4;

// State columns per CTA for NC columns per lane (V is a multiple of it). LaunchFwdF32 picks NC: 4 (64 state
// registers at K = 128; 2 at K = 256) where that still gives a CTA per SM, else 1 (4x the CTAs, shorter steps).
template <int NC>
constexpr int Cols() { return kF32Warps * kColGroups * NC; }
// Tokens per chunk: each of q, k, g takes F32Tokens x K floats (8 KB) of shared memory, ~50 KB in all.
template <int K>
constexpr int F32Tokens() { return 2048 / K; }

// Shared memory of one CTA (floats unless named): the raw copy of the next chunk and the pre-processed current one.
template <int K, int NC>
struct F32Smem {
  static constexpr int TC = F32Tokens<K>();
  // 16-byte rows first (cp.async and float4 reads), the per-token scalars after them.
  alignas(16) float q_raw[TC][K];
  alignas(16) float k_raw[TC][K];
  alignas(16) float g_raw[TC][K];
  alignas(16) float v_raw[TC][Cols<NC>()];
  alignas(16) float q[TC][K];
  alignas(16) float k[TC][K];
  alignas(16) float a[TC][K];
  alignas(16) float v[TC][Cols<NC>()];
  float beta_raw[TC], beta[TC];
  int slot_raw[TC + 2];  // slots of tokens t0 - 1 .. t0 + TC (-1 outside [0, T))
  int slot[TC], flags[TC];
};

__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

// Issues the copies of tokens [t0, t0 + TC) of row b (zeros past T) into the raw half; one commit group.
template <int K, int NC>
__device__ void LoadChunk(const Params& p, F32Smem<K, NC>& sm, int b, int hv, int c0, int t0) {
  constexpr int TC = F32Tokens<K>(), K4 = K / 4;
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* g = static_cast<const float*>(p.g);
  const float* v = static_cast<const float*>(p.v);
  const float* beta = static_cast<const float*>(p.beta);
  const int h = hv / p.group;
  for (int i = threadIdx.x; i < TC * K4; i += kF32Threads) {
    const int j = i / K4, e = (i % K4) * 4, t = t0 + j;
    const bool in = t < p.T;
    const size_t bt = static_cast<size_t>(b) * p.T + (in ? t : 0);
    CpAsync16(&sm.q_raw[j][e], q + (bt * p.H + h) * K + e, in);
    CpAsync16(&sm.k_raw[j][e], k + (bt * p.H + h) * K + e, in);
    CpAsync16(&sm.g_raw[j][e], g + (bt * p.HV + hv) * K + e, in);
  }
  constexpr int C4 = Cols<NC>() / 4;
  for (int i = threadIdx.x; i < TC * C4; i += kF32Threads) {
    const int j = i / C4, e = (i % C4) * 4, t = t0 + j;
    const bool in = t < p.T;
    const size_t bt = static_cast<size_t>(b) * p.T + (in ? t : 0);
    CpAsync16(&sm.v_raw[j][e], v + (bt * p.HV + hv) * p.V + c0 + e, in);
  }
  for (int j = threadIdx.x; j < TC + 2; j += kF32Threads) {
    const int t = t0 - 1 + j;
    const size_t bt = static_cast<size_t>(b) * p.T + t;
    if (t >= 0 && t < p.T) {
      CpAsync4(&sm.slot_raw[j], p.slot + bt);
      if (j >= 1 && j <= TC) CpAsync4(&sm.beta_raw[j - 1], beta + bt * p.HV + hv);
    } else {
      sm.slot_raw[j] = -1;
    }
  }
  CpAsyncCommit();
}

__device__ __forceinline__ float SigmoidF32(float x) { return 1.f / (1.f + expf(-x)); }

// Effective log-decay (kda_cpu_common.h's GateEff, in float32).
__device__ __forceinline__ float GateF32(const Params& p, float x, float dt, float a_coef) {
  if (p.gate_mode == 0) return x;
  if (p.gate_mode == 1) {
    const float y = x + dt;
    return -a_coef * (fmaxf(y, 0.f) + log1pf(expf(-fabsf(y))));
  }
  return p.lower_bound * SigmoidF32(p.use_a_log ? a_coef * (x + dt) : x + dt);
}

// Raw half -> pre-processed half, a warp per token.
template <int K, int NC>
__device__ void Preprocess(const Params& p, F32Smem<K, NC>& sm, int b, int hv) {
  constexpr int TC = F32Tokens<K>();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* dtb = p.dt_bias + (static_cast<size_t>(b) * p.HV + hv) * K;
  const float a_coef = expf(p.a_log[static_cast<size_t>(b) * p.HV + hv]);
  for (int j = warp; j < TC; j += kF32Warps) {
    const int s = sm.slot_raw[j + 1];
    int f = 0;
    if (s >= 0) f = kValidTok | (sm.slot_raw[j] != s ? kStartTok : 0) | (sm.slot_raw[j + 2] != s ? kEndTok : 0);
    float qs = p.scale, ks = 1.f;
    if (p.qk_l2norm) {
      float sq = 0.f, sk = 0.f;
      for (int e = lane; e < K; e += 32) {
        sq = fmaf(sm.q_raw[j][e], sm.q_raw[j][e], sq);
        sk = fmaf(sm.k_raw[j][e], sm.k_raw[j][e], sk);
      }
      sq = WarpSum(sq);
      sk = WarpSum(sk);
      qs *= 1.f / sqrtf(sq + 1e-6f);
      ks = 1.f / sqrtf(sk + 1e-6f);
    }
    for (int e = lane; e < K; e += 32) {
      sm.q[j][e] = sm.q_raw[j][e] * qs;
      sm.k[j][e] = sm.k_raw[j][e] * ks;
      sm.a[j][e] = expf(GateF32(p, sm.g_raw[j][e], dtb[e], a_coef));
    }
    if (lane < Cols<NC>()) sm.v[j][lane] = sm.v_raw[j][lane];
    if (lane == 0) {
      float be = sm.beta_raw[j];
      if (p.beta_sigmoid) be = (p.allow_neg ? 2.f : 1.f) * SigmoidF32(be);
      sm.beta[j] = be;
      sm.slot[j] = s;
      sm.flags[j] = f;
    }
  }
}

// Sum over the kLanesPerCol lanes of a column (every one of them gets it).
__device__ __forceinline__ float ColumnSum(float x) {
#pragma unroll
  for (int o = 1; o < kLanesPerCol; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Row of element (m, e) of a lane's column share: row groups of 4 interleaved over the column's lanes (sub),
// so that the lanes of a column read consecutive 16-byte words of a K-vector.
__device__ __forceinline__ int RowOf(int m, int sub) { return 32 * m + 4 * sub; }

// Element n of a lane's Nc-column vector (float4 or float2 in shared / global memory).
template <int N>
struct ColVec;
template <>
struct ColVec<4> {
  using T = float4;
  __device__ static void Get(const T& x, float (&y)[4]) { y[0] = x.x, y[1] = x.y, y[2] = x.z, y[3] = x.w; }
  __device__ static T Make(const float (&y)[4]) { return make_float4(y[0], y[1], y[2], y[3]); }
};
template <>
struct ColVec<1> {
  using T = float;
  __device__ static void Get(const T& x, float (&y)[1]) { y[0] = x; }
  __device__ static T Make(const float (&y)[1]) { return y[0]; }
};
template <>
struct ColVec<2> {
  using T = float2;
  __device__ static void Get(const T& x, float (&y)[2]) { y[0] = x.x, y[1] = x.y; }
  __device__ static T Make(const float (&y)[2]) { return make_float2(y[0], y[1]); }
};

// State element (row i, column c) of one [K, V] (state_vk: [V, K]) matrix.
__device__ __forceinline__ size_t StateIndex(const Params& p, int i, int c) {
  return p.state_vk ? static_cast<size_t>(c) * p.K + i : static_cast<size_t>(i) * p.V + c;
}

template <int K, int NC>
__global__ void __launch_bounds__(kF32Threads) FwdF32Kernel(const Params p) {
  constexpr int TC = F32Tokens<K>(), M = K / 32, CC = Cols<NC>();  // M float4 row groups per lane
  using Vec = ColVec<NC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  F32Smem<K, NC>& sm = *reinterpret_cast<F32Smem<K, NC>*>(smem_raw);
  const int ncb = p.V / CC;
  const int cb = blockIdx.x % ncb, bh = blockIdx.x / ncb;
  const int hv = bh % p.HV, b = bh / p.HV;
  const int c0 = cb * CC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % kLanesPerCol;
  const int col = (warp * kColGroups + lane / kLanesPerCol) * NC;  // first of the lane's columns in the CTA
  const int gc = c0 + col;
  const size_t mat = static_cast<size_t>(p.K) * p.V;
  float* o = static_cast<float*>(p.o);

  float S[M][4][NC];  // rows RowOf(m, sub) + e, columns gc + n
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int n = 0; n < NC; ++n) S[m][e][n] = 0.f;

  LoadChunk<K, NC>(p, sm, b, hv, c0, 0);
  for (int t0 = 0; t0 < p.T; t0 += TC) {
    CpAsyncWait<0>();
    __syncthreads();  // the raw chunk is in; the previous chunk's pre-processed half is no longer read
    Preprocess<K, NC>(p, sm, b, hv);
    __syncthreads();  // pre-processed half written, raw half free
    if (t0 + TC < p.T) LoadChunk<K, NC>(p, sm, b, hv, c0, t0 + TC);
    const int n_tok = min(TC, p.T - t0);
    for (int j = 0; j < n_tok; ++j) {
      const int f = sm.flags[j];
      float* orow = o + ((static_cast<size_t>(b) * p.T + t0 + j) * p.HV + hv) * p.V + gc;
      float res[NC];
      if (!(f & kValidTok)) {
#pragma unroll
        for (int n = 0; n < NC; ++n) res[n] = 0.f;
        if (sub == 0) *reinterpret_cast<typename Vec::T*>(orow) = Vec::Make(res);
        continue;
      }
      if (f & kStartTok) {
        const int s = sm.slot[j];
        const float* src = p.init != nullptr && s < p.S_init
                               ? p.init + ((static_cast<size_t>(b) * p.S_init + s) * p.HV + hv) * mat : nullptr;
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int n = 0; n < NC; ++n)
              S[m][e][n] = src == nullptr ? 0.f : src[StateIndex(p, RowOf(m, sub) + e, gc + n)];
      }
      float kr[M][4], acc[NC];
#pragma unroll
      for (int n = 0; n < NC; ++n) acc[n] = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4 a4 = *reinterpret_cast<const float4*>(&sm.a[j][RowOf(m, sub)]);
        const float4 k4 = *reinterpret_cast<const float4*>(&sm.k[j][RowOf(m, sub)]);
        const float av[4] = {a4.x, a4.y, a4.z, a4.w};
        kr[m][0] = k4.x, kr[m][1] = k4.y, kr[m][2] = k4.z, kr[m][3] = k4.w;
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int n = 0; n < NC; ++n) {
            S[m][e][n] *= av[e];
            acc[n] = fmaf(kr[m][e], S[m][e][n], acc[n]);
          }
      }
      float vv[NC];
      Vec::Get(*reinterpret_cast<const typename Vec::T*>(&sm.v[j][col]), vv);
      const float beta = sm.beta[j];
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        res[n] = (vv[n] - ColumnSum(acc[n])) * beta;  // r
        acc[n] = 0.f;
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4 q4 = *reinterpret_cast<const float4*>(&sm.q[j][RowOf(m, sub)]);
        const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int n = 0; n < NC; ++n) {
            S[m][e][n] = fmaf(kr[m][e], res[n], S[m][e][n]);
            acc[n] = fmaf(qv[e], S[m][e][n], acc[n]);
          }
      }
#pragma unroll
      for (int n = 0; n < NC; ++n) res[n] = ColumnSum(acc[n]);
      if (sub == 0) *reinterpret_cast<typename Vec::T*>(orow) = Vec::Make(res);
      if ((f & kEndTok) && p.final_state != nullptr && sm.slot[j] < p.S_final) {
        float* dst = p.final_state + ((static_cast<size_t>(b) * p.S_final + sm.slot[j]) * p.HV + hv) * mat;
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int n = 0; n < NC; ++n) dst[StateIndex(p, RowOf(m, sub) + e, gc + n)] = S[m][e][n];
      }
    }
  }
}

template <int K, int NC>
cudaError_t LaunchK(const Params& p, cudaStream_t stream) {
  const size_t smem = sizeof(F32Smem<K, NC>);
  cudaError_t err = cudaFuncSetAttribute(FwdF32Kernel<K, NC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const long long grid = static_cast<long long>(p.B) * p.HV * (p.V / Cols<NC>());
  FwdF32Kernel<K, NC><<<static_cast<unsigned>(grid), kF32Threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchFwdF32(const Params& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0 || p.HV == 0 || p.V == 0) return cudaSuccess;
  const bool wide = static_cast<long long>(p.B) * p.HV * (p.V / Cols<4>()) >= SmCount();
  switch (p.K) {
    case 64: return wide ? LaunchK<64, 4>(p, stream) : LaunchK<64, 1>(p, stream);
    case 128: return wide ? LaunchK<128, 4>(p, stream) : LaunchK<128, 1>(p, stream);
    case 256: return wide ? LaunchK<256, 2>(p, stream) : LaunchK<256, 1>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fwd
}  // namespace flashkda
