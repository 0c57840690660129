// The forward for float32 inputs: the token-by-token recurrence in float32 on the CUDA cores, accurate to float32
// rounding (DESIGN §5 asks 2e-3 of fp32 inputs on the GPU; the chunked tensor-core kernels round their operands
// to bf16 and land near 5e-3). It is slower than the bf16 / fp16 kernels (benchmarks/NOTES.md, session 17); cast
// the inputs to bf16 for speed.
//
// The recurrence is column-separable: column c of the state S (K x V) only meets column c of v and o. A CTA owns
// one (batch row, value head) and Cols<NC>() state columns. A compute-warp lane holds NC adjacent columns over
// K / 8 rows; the 8 lanes of a row group (sub 0..7) share those columns, so the two K-long dot products of a token
// (k.S and q.S) end in three shuffles, and each k, q, a value a lane reads from shared memory serves NC columns.
// Two load warps copy chunk c + 1 into shared memory (cp.async) and pre-process chunk c (l2norm, scale, gate, exp,
// beta, token flags from the slots) while the two compute warps run chunk c - 1, handing chunks over through named
// barriers (two buffers each way). Per token, as the CPU kernel (kda_fwd_cpu.cc):
//   S' = diag(a) S;  r = beta (v - S'^T k);  S = S' + k r^T;  o = S^T q.
#include <cuda_runtime.h>

#include "kda_fwd_launch.h"

namespace flashkda {
namespace fwd {
namespace {

constexpr int kLanesPerCol = 8;                 // lanes sharing a column (K / 8 rows each)
constexpr int kColGroups = 32 / kLanesPerCol;   // column groups of a warp (4)
constexpr int kComputeWarps = 2;                // warps running the recurrence
constexpr int kLoadWarps = 2;                   // warps copying and pre-processing the next chunk
constexpr int kLoadThreads = 32 * kLoadWarps;
constexpr int kF32Threads = 32 * (kComputeWarps + kLoadWarps);
// Named barriers (0 is __syncthreads): among the load warps; chunk buffer i full / empty (all threads).
constexpr int kBarLoad = 1, kBarFull = 2, kBarEmpty = 4;
constexpr int kValidTok = 1, kStartTok = 2, kEndTok = 4;

// State columns per CTA for NC columns per lane (V is a multiple of it). LaunchFwdF32 picks NC: 4 (64 state
// registers at K = 128; 2 at K = 256) where that still gives a CTA per SM, else 1 (4x the CTAs, shorter steps).
template <int NC>
constexpr int Cols() { return kComputeWarps * kColGroups * NC; }
// Tokens per chunk: each of q, k, g takes F32Tokens x K floats of shared memory: 4 KB with several columns per lane
// (~54 KB for the CTA's four chunk buffers at NC = 4: four CTAs fit an SM, whose compute warps the large grids
// need), 8 KB with one (small grids, one or two CTAs per SM: fewer chunk hand-overs). H100, session 17.
template <int K, int NC>
constexpr int F32Tokens() { return (NC == 1 ? 2048 : 1024) / K; }

// One chunk as copied (F32Raw) and as pre-processed (F32Ready); 16-byte rows first (cp.async and float4 reads),
// the per-token scalars after them.
template <int K, int NC>
struct F32Raw {
  static constexpr int TC = F32Tokens<K, NC>();
  alignas(16) float q[TC][K];
  alignas(16) float k[TC][K];
  alignas(16) float g[TC][K];
  alignas(16) float v[TC][Cols<NC>()];
  float beta[TC];
  int slot[TC + 2];  // slots of tokens t0 - 1 .. t0 + TC (-1 outside [0, T))
};
template <int K, int NC>
struct F32Ready {
  static constexpr int TC = F32Tokens<K, NC>();
  alignas(16) float q[TC][K];
  alignas(16) float k[TC][K];
  alignas(16) float a[TC][K];
  alignas(16) float v[TC][Cols<NC>()];
  float beta[TC];
  int slot[TC], flags[TC];
};
// Shared memory of one CTA: two chunks in each form, so that the load warps copy chunk c + 1 and pre-process
// chunk c while the compute warps run chunk c - 1.
template <int K, int NC>
struct F32Smem {
  F32Raw<K, NC> raw[2];
  F32Ready<K, NC> ready[2];
  float dtb[K];
};

__device__ __forceinline__ void BarSync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void BarArrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

// Load threads (tid = thread index among them) issue the copies of tokens [t0, t0 + TC) of row b (zeros past T);
// one commit group.
template <int K, int NC>
__device__ void LoadChunk(const Params& p, F32Raw<K, NC>& sm, int tid, int b, int hv, int c0, int t0) {
  constexpr int TC = F32Tokens<K, NC>(), K4 = K / 4;
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* g = static_cast<const float*>(p.g);
  const float* v = static_cast<const float*>(p.v);
  const float* beta = static_cast<const float*>(p.beta);
  const int h = hv / p.group;
  for (int i = tid; i < TC * K4; i += kLoadThreads) {
    const int j = i / K4, e = (i % K4) * 4, t = t0 + j;
    const bool in = t < p.T;
    const size_t bt = static_cast<size_t>(b) * p.T + (in ? t : 0);
    CpAsync16(&sm.q[j][e], q + (bt * p.H + h) * K + e, in);
    CpAsync16(&sm.k[j][e], k + (bt * p.H + h) * K + e, in);
    CpAsync16(&sm.g[j][e], g + (bt * p.HV + hv) * K + e, in);
  }
  constexpr int C4 = Cols<NC>() / 4;
  for (int i = tid; i < TC * C4; i += kLoadThreads) {
    const int j = i / C4, e = (i % C4) * 4, t = t0 + j;
    const bool in = t < p.T;
    const size_t bt = static_cast<size_t>(b) * p.T + (in ? t : 0);
    CpAsync16(&sm.v[j][e], v + (bt * p.HV + hv) * p.V + c0 + e, in);
  }
  for (int j = tid; j < TC + 2; j += kLoadThreads) {
    const int t = t0 - 1 + j;
    const size_t bt = static_cast<size_t>(b) * p.T + t;
    if (t >= 0 && t < p.T) {
      CpAsync4(&sm.slot[j], p.slot + bt);
      if (j >= 1 && j <= TC) CpAsync4(&sm.beta[j - 1], beta + bt * p.HV + hv);
    } else {
      sm.slot[j] = -1;
    }
  }
  CpAsyncCommit();
}

// Raw chunk -> pre-processed chunk, a load warp (lw) per token.
template <int K, int NC>
__device__ void Preprocess(const Params& p, const F32Raw<K, NC>& raw, F32Ready<K, NC>& out, const float* dtb,
                           float a_coef, int lw) {
  constexpr int TC = F32Tokens<K, NC>();
  const int lane = threadIdx.x & 31;
  for (int j = lw; j < TC; j += kLoadWarps) {
    const int s = raw.slot[j + 1];
    int f = 0;
    if (s >= 0) f = kValidTok | (raw.slot[j] != s ? kStartTok : 0) | (raw.slot[j + 2] != s ? kEndTok : 0);
    float qs = p.scale, ks = 1.f;
    if (p.qk_l2norm) {
      float sq = 0.f, sk = 0.f;
      for (int e = lane; e < K; e += 32) {
        sq = fmaf(raw.q[j][e], raw.q[j][e], sq);
        sk = fmaf(raw.k[j][e], raw.k[j][e], sk);
      }
      sq = WarpSum(sq);
      sk = WarpSum(sk);
      qs *= 1.f / sqrtf(sq + 1e-6f);
      ks = 1.f / sqrtf(sk + 1e-6f);
    }
    for (int e = lane; e < K; e += 32) {
      out.q[j][e] = raw.q[j][e] * qs;
      out.k[j][e] = raw.k[j][e] * ks;
      out.a[j][e] = expf(GateActivation(p, raw.g[j][e], dtb[e], a_coef));  // the prep's gate bits
    }
    if (lane < Cols<NC>()) out.v[j][lane] = raw.v[j][lane];
    if (lane == 0) {
      out.beta[j] = ActivateBeta(p, raw.beta[j], true);
      out.slot[j] = s;
      out.flags[j] = f;
    }
  }
}

// The load warps' loop: chunk c is copied into raw[c % 2] one chunk ahead, then pre-processed into ready[c % 2]
// once the compute warps have left chunk c - 2 there.
template <int K, int NC>
__device__ void LoadWarps(const Params& p, F32Smem<K, NC>& sm, int b, int hv, int c0, int nchunks) {
  constexpr int TC = F32Tokens<K, NC>();
  const int tid = threadIdx.x - 32 * kComputeWarps, lw = tid >> 5;
  const float* dtb = p.dt_bias + (static_cast<size_t>(b) * p.HV + hv) * K;
  for (int e = tid; e < K; e += kLoadThreads) sm.dtb[e] = dtb[e];
  const float a_coef = expf(p.a_log[static_cast<size_t>(b) * p.HV + hv]);
  LoadChunk<K, NC>(p, sm.raw[0], tid, b, hv, c0, 0);
  for (int c = 0; c < nchunks; ++c) {
    if (c + 1 < nchunks) LoadChunk<K, NC>(p, sm.raw[(c + 1) & 1], tid, b, hv, c0, (c + 1) * TC);
    else CpAsyncCommit();  // an empty group keeps the count: chunk c's group is then the older one
    CpAsyncWait<1>();
    BarSync(kBarLoad, kLoadThreads);  // chunk c (every load thread's copies) and dtb are in
    if (c >= 2) BarSync(kBarEmpty + (c & 1), kF32Threads);
    Preprocess<K, NC>(p, sm.raw[c & 1], sm.ready[c & 1], sm.dtb, a_coef, lw);
    BarArrive(kBarFull + (c & 1), kF32Threads);
    BarSync(kBarLoad, kLoadThreads);  // raw[c % 2] read by every load warp before chunk c + 2's copies
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

// Strides of a state matrix's rows and columns ([K, V], or [V, K] with state_vk), made opaque to the compiler:
// otherwise it hoists the lane's M x 4 x NC element offsets out of the token loop into registers (and spills).
__device__ __forceinline__ void StateStrides(const Params& p, int& rs, int& cs) {
  rs = p.state_vk ? 1 : p.V;
  cs = p.state_vk ? p.K : 1;
  asm volatile("" : "+r"(rs), "+r"(cs));
}

template <int K, int NC>
__global__ void __launch_bounds__(kF32Threads) FwdF32Kernel(const Params p) {
  constexpr int TC = F32Tokens<K, NC>(), M = K / 32, CC = Cols<NC>();  // M float4 row groups per lane
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

  const int nchunks = (p.T + TC - 1) / TC;
  if (warp >= kComputeWarps) {
    LoadWarps<K, NC>(p, sm, b, hv, c0, nchunks);
    return;
  }
  for (int c = 0; c < nchunks; ++c) {
    const int t0 = c * TC;
    BarSync(kBarFull + (c & 1), kF32Threads);
    const F32Ready<K, NC>& rd = sm.ready[c & 1];
    const int n_tok = min(TC, p.T - t0);
    for (int j = 0; j < n_tok; ++j) {
      const int f = rd.flags[j];
      float* orow = o + ((static_cast<size_t>(b) * p.T + t0 + j) * p.HV + hv) * p.V + gc;
      float res[NC];
      if (!(f & kValidTok)) {
#pragma unroll
        for (int n = 0; n < NC; ++n) res[n] = 0.f;
        if (sub == 0) *reinterpret_cast<typename Vec::T*>(orow) = Vec::Make(res);
        continue;
      }
      if (f & kStartTok) {
        const int s = rd.slot[j];
        const float* src = p.init != nullptr && s < p.S_init
                               ? p.init + ((static_cast<size_t>(b) * p.S_init + s) * p.HV + hv) * mat : nullptr;
        int rs, cs;
        StateStrides(p, rs, cs);
        if (src != nullptr) src += RowOf(0, sub) * rs + gc * cs;
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int n = 0; n < NC; ++n) S[m][e][n] = src == nullptr ? 0.f : src[(32 * m + e) * rs + n * cs];
      }
      float kr[M][4], acc[NC];
#pragma unroll
      for (int n = 0; n < NC; ++n) acc[n] = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4 a4 = *reinterpret_cast<const float4*>(&rd.a[j][RowOf(m, sub)]);
        const float4 k4 = *reinterpret_cast<const float4*>(&rd.k[j][RowOf(m, sub)]);
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
      Vec::Get(*reinterpret_cast<const typename Vec::T*>(&rd.v[j][col]), vv);
      const float beta = rd.beta[j];
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        res[n] = (vv[n] - ColumnSum(acc[n])) * beta;  // r
        acc[n] = 0.f;
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4 q4 = *reinterpret_cast<const float4*>(&rd.q[j][RowOf(m, sub)]);
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
      if ((f & kEndTok) && p.final_state != nullptr && rd.slot[j] < p.S_final) {
        int rs, cs;
        StateStrides(p, rs, cs);
        float* dst = p.final_state + ((static_cast<size_t>(b) * p.S_final + rd.slot[j]) * p.HV + hv) * mat +
                     RowOf(0, sub) * rs + gc * cs;
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int n = 0; n < NC; ++n) dst[(32 * m + e) * rs + n * cs] = S[m][e][n];
      }
    }
    if (c + 2 < nchunks) BarArrive(kBarEmpty + (c & 1), kF32Threads);  // the load warps may refill it
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
  if (p.V % Cols<4>() != 0) return cudaErrorInvalidValue;  // the handler's head dims (V in {64, 128, 256}) divide
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
