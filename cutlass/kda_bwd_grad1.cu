// flashkda_bwd, stage "grad1": the chunk-state products, fully parallel over (chunk, value head). Two kernels:
// the default, Grad1MmaKernel (bf16 tensor cores, f32 accumulation), and the first version, Grad1Kernel (SIMT f32
// math on bf16 operands; FLASHKDA_BWD_GRAD1=simt).
// See kda_bwd_common.cuh for the algorithm; tests/test_bwd_algorithm.py models every formula here.
#include "kda_bwd_common.cuh"
#include "kda_env.h"
#include "kda_fwd_launch.h"

#include <type_traits>

namespace flashkda {
namespace bwd {
namespace {

using bf16 = __nv_bfloat16;

// ------------------------------------------------------------------------------------------------------
// grad1: R = U - W S, dR = A_qk^T dO + Kd dS_next, then dQg = dO S^T, dKd = R dS_next^T, dW = -dR S^T,
// dU = dR, dA_qk = tril(dO R^T), dgamma = rowsum(S * dS_next). Operands bf16 in shared memory, f32 math.
// ------------------------------------------------------------------------------------------------------
template <int K>
struct Grad1Smem {
  static constexpr int C = kChunk, V = K;
  static constexpr int SP = V + 2;   // bf16 pitch of S, dS_next, dO (odd word pitch)
  static constexpr int RP = V + 1;   // f32 pitch of R, dR
  static constexpr int KP = K + 2;   // bf16 pitch of W, Kd
  static constexpr int AP = C + 2;   // bf16 pitch of A_qk
  static constexpr size_t Bytes() {
    return (2 * static_cast<size_t>(K) * SP + static_cast<size_t>(C) * SP + 2 * static_cast<size_t>(C) * KP +
            static_cast<size_t>(C) * AP) *
               2 +
           2 * static_cast<size_t>(C) * RP * 4;
  }
};

template <int K, typename TIn>
__global__ void __launch_bounds__(kThreads) Grad1Kernel(Params P) {
  using SM = Grad1Smem<K>;
  constexpr int C = kChunk, V = K, SP = SM::SP, RP = SM::RP, KP = SM::KP, AP = SM::AP;
  constexpr int TN = K / 16;  // C x K (and C x V) outputs: 16 x 16 threads, 4 x TN each
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sR = reinterpret_cast<float*>(smem_raw);  // [C][RP]
  float* sdR = sR + C * RP;                         // [C][RP]
  bf16* sS = reinterpret_cast<bf16*>(sdR + C * RP); // [K][SP]
  bf16* sdS = sS + K * SP;                          // [K][SP]
  bf16* sdO = sdS + K * SP;                         // [C][SP]
  bf16* sW = sdO + C * SP;                          // [C][KP]
  bf16* sKd = sW + C * KP;                          // [C][KP]
  bf16* sA = sKd + C * KP;                          // [C][AP]
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int HV = p.HV;
  const int nitems = WindowChunkCount(P) * HV;
  const TIn* gdo = static_cast<const TIn*>(P.d_o);
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int ci = it / HV, hv = it - ci * HV;
    const int4 e = WindowChunk(P, ci);
    const int b = e.x, cs = e.y, se = e.z, s = e.w;
    const int L = min(C, se - cs);
    const bool first = p.seq_start[(size_t)b * p.T + cs] == cs;
    const bool last = cs + C >= se;
    const size_t tb = (size_t)b * p.T + cs;
    const size_t wb = WinRow(P, b, cs);  // scratch rows
    __syncthreads();
    // ---- loads ----
    {
      const float* src = nullptr;
      bool vk = false;
      if (first) {
        if (s < p.S_init) src = p.init + (((size_t)b * p.S_init + s) * HV + hv) * K * V;
        vk = p.state_vk;
      } else {
        src = P.Hs + (((size_t)b * (p.NW + 1) + (cs + C - 1) / C) * HV + hv) * K * V;
      }
      const float* dsrc = nullptr;
      bool dvk = false;
      if (last) {
        if (P.dfin != nullptr && s < P.S_out) dsrc = P.dfin + (((size_t)b * P.S_out + s) * HV + hv) * K * V;
        dvk = p.state_vk;
      } else {
        dsrc = P.dH + DhOffset(P, b, cs, hv);
      }
      for (int idx = tid; idx < K * V; idx += kThreads) {
        const int r = idx / V, c = idx % V;
        sS[r * SP + c] = __float2bfloat16(src ? src[StateAt(vk, K, V, r, c)] : 0.f);
        sdS[r * SP + c] = __float2bfloat16(dsrc ? dsrc[StateAt(dvk, K, V, r, c)] : 0.f);
      }
    }
    for (int idx = tid; idx < C * V; idx += kThreads) {
      const int r = idx / V, c = idx % V;
      const bool ok = r < L;
      const size_t o = ((tb + (ok ? r : 0)) * HV + hv) * V + c;
      sdO[r * SP + c] = __float2bfloat16(ok ? fwd::ToF<TIn>(gdo[o]) : 0.f);
      sR[r * RP + c] = ok ? Bf(p.U[o]) : 0.f;
    }
    for (int idx = tid; idx < C * K; idx += kThreads) {
      const int r = idx / K, c = idx % K;
      const bool ok = r < L;
      const size_t o = ((tb + (ok ? r : 0)) * HV + hv) * K + c;
      sW[r * KP + c] = ok ? p.W[o] : __float2bfloat16(0.f);
      sKd[r * KP + c] = ok ? p.Kd[o] : __float2bfloat16(0.f);
    }
    for (int idx = tid; idx < C * C; idx += kThreads) {
      const int r = idx / C, c = idx % C;
      sA[r * AP + c] = r < L ? p.Aqk[((tb + r) * HV + hv) * fwd::kAqkPitch + c] : __float2bfloat16(0.f);
    }
    __syncthreads();
    // ---- R = U - W S;  dR = A_qk^T dO + Kd dS_next ----
    {
      float acc[4][TN];
      Zero(acc);
      MicroGemm<4, TN>(acc, tm, 16, tn, 16, K, [&](int m, int kk) { return Bf(sW[m * KP + kk]); },
                       [&](int kk, int n) { return Bf(sS[kk * SP + n]); });
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) sR[(tm + 16 * i) * RP + tn + 16 * j] -= acc[i][j];
      Zero(acc);
      MicroGemm<4, TN>(acc, tm, 16, tn, 16, C, [&](int m, int kk) { return Bf(sA[kk * AP + m]); },
                       [&](int kk, int n) { return Bf(sdO[kk * SP + n]); });
      MicroGemm<4, TN>(acc, tm, 16, tn, 16, K, [&](int m, int kk) { return Bf(sKd[m * KP + kk]); },
                       [&](int kk, int n) { return Bf(sdS[kk * SP + n]); });
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) sdR[(tm + 16 * i) * RP + tn + 16 * j] = acc[i][j];
    }
    __syncthreads();
    // ---- outputs (rows < L) ----
    auto store = [&](float* base, const float (&acc)[4][TN]) {  // dQg / dKd (f32, K columns)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = tm + 16 * i;
        if (r < L) {
#pragma unroll
          for (int j = 0; j < TN; ++j) base[((wb + r) * HV + hv) * K + tn + 16 * j] = acc[i][j];
        }
      }
    };
    {
      float acc[4][TN];
      Zero(acc);  // dQg = dO S^T
      MicroGemm<4, TN>(acc, tm, 16, tn, 16, V, [&](int m, int kk) { return Bf(sdO[m * SP + kk]); },
                       [&](int kk, int n) { return Bf(sS[n * SP + kk]); });
      store(P.sQg, acc);
      Zero(acc);  // dKd = R dS_next^T
      MicroGemm<4, TN>(acc, tm, 16, tn, 16, V, [&](int m, int kk) { return sR[m * RP + kk]; },
                       [&](int kk, int n) { return Bf(sdS[n * SP + kk]); });
      store(P.sKd, acc);
      Zero(acc);  // dW = -dR S^T
      MicroGemm<4, TN>(acc, tm, 16, tn, 16, V, [&](int m, int kk) { return sdR[m * RP + kk]; },
                       [&](int kk, int n) { return Bf(sS[n * SP + kk]); });
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // bf16 into the dW half of the dW | dU rows
        const int r = tm + 16 * i;
        if (r < L) {
#pragma unroll
          for (int j = 0; j < TN; ++j) P.sWU[((wb + r) * HV + hv) * (K + V) + tn + 16 * j] = __float2bfloat16(-acc[i][j]);
        }
      }
    }
    {  // dA_qk = tril(dO R^T)
      float acc[4][4];
      Zero(acc);
      MicroGemm<4, 4>(acc, tm, 16, tn, 16, V, [&](int m, int kk) { return Bf(sdO[m * SP + kk]); },
                      [&](int kk, int n) { return sR[n * RP + kk]; });
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = tm + 16 * i;
        if (r < L) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int c = tn + 16 * j;
            P.sA[((wb + r) * HV + hv) * C + c] = c <= r ? acc[i][j] : 0.f;
          }
        }
      }
    }
    for (int idx = tid; idx < L * V; idx += kThreads) {  // dU = dR (bf16, the dU half of the dW | dU rows)
      const int r = idx / V, c = idx % V;
      P.sWU[((wb + r) * HV + hv) * (K + V) + K + c] = __float2bfloat16(sdR[r * RP + c]);
    }
    {
      const int gidx = GammaIndex(p, cs, se, s);
      if (gidx >= 0) {
        for (int r = tid; r < K; r += kThreads) {
          float acc = 0.f;
          for (int c = 0; c < V; ++c) acc = fmaf(Bf(sS[r * SP + c]), Bf(sdS[r * SP + c]), acc);
          P.dgam[(((size_t)b * p.NG + gidx) * HV + hv) * K + r] = acc;
        }
      }
    }
  }
}


// ------------------------------------------------------------------------------------------------------
// grad1 on tensor cores (the default; FLASHKDA_BWD_GRAD1=simt selects Grad1Kernel): the same products with bf16
// operands (S, dS_next and dO
// rounded to bf16, as the default kernel rounds them; R and dR rounded to bf16 where they are operands) and
// f32 accumulation. Warps 0-3 own the rows 16m..16m+15 (m = warp & 3) of R, warps 4-7 those of dR, both kept
// in registers (all V columns): their accumulators re-packed as bf16 are the A operands of dKd = R dS_next^T
// and dW = -dR S^T and the B operands of dA_qk = dO R^T, so neither goes through shared memory. Shared memory
// holds only what several warps read (S, dS_next, dO, A_qk); W, Kd and U rows are used by one warp each and
// come straight from global memory (16-byte loads re-distributed by QuadTranspose). 94 KiB of shared memory at
// K = 128 (36 KiB at K = 64), <= 128 registers: two CTAs per SM; one barrier per item.
// ------------------------------------------------------------------------------------------------------
template <int K>
struct Grad1MmaSmem {
  static constexpr int C = kChunk, V = K;
  static constexpr int SP = V + 8;  // bf16 pitch of S, dS_next, dO: an odd number of 16-byte units, so that
  static constexpr int AP = C + 8;  // ldmatrix rows fall in distinct banks (A_qk likewise)
  static constexpr size_t Bytes() {
    return (2 * static_cast<size_t>(K) * SP + static_cast<size_t>(C) * SP + static_cast<size_t>(C) * AP) * 2;
  }
};

// 4 x 4 transpose of 32-bit words across the lanes of a quad (t = lane & 3): lane t holds words x[0..3] and
// gets y[n] = word t of lane n. A quad that loads 16 bytes per lane of one row (lane t: columns 8t..8t+7 of
// a 32-column block, bf16) then holds the mma fragment pairs: y[n] = columns 8n + 2t, 8n + 2t + 1.
__device__ __forceinline__ void QuadTranspose(uint4& v, int lane) {
  const bool o1 = lane & 1, o2 = lane & 2;
  uint32_t r0 = __shfl_xor_sync(0xffffffffu, o1 ? v.x : v.y, 1);  // 2 x 2 blocks along bit 0
  uint32_t r1 = __shfl_xor_sync(0xffffffffu, o1 ? v.z : v.w, 1);
  const uint32_t z0 = o1 ? r0 : v.x, z1 = o1 ? v.y : r0, z2 = o1 ? r1 : v.z, z3 = o1 ? v.w : r1;
  r0 = __shfl_xor_sync(0xffffffffu, o2 ? z0 : z2, 2);  // then along bit 1
  r1 = __shfl_xor_sync(0xffffffffu, o2 ? z1 : z3, 2);
  v.x = o2 ? r0 : z0;
  v.y = o2 ? r1 : z1;
  v.z = o2 ? z2 : r0;
  v.w = o2 ? z3 : r1;
}

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ float2 Unpack(uint32_t w) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
}

// A state (f32, [K][V] or state_vk [V][K]; null = zero) -> bf16 [K][SP] in shared memory.
template <int K, int SP>
__device__ __forceinline__ void StateToSmem(bf16* dst, const float* src, bool vk, int tid) {
  constexpr int V = K, N8 = K * V / 8, NI = N8 / kThreads, NB = NI < 2 ? NI : 2;
  static_assert(N8 % kThreads == 0 && NI % NB == 0, "whole rounds");
  if (src == nullptr) {
#pragma unroll 1
    for (int idx = tid; idx < N8; idx += kThreads) {
      const int r = idx / (V / 8), c8 = idx - r * (V / 8);
      *reinterpret_cast<uint4*>(dst + r * SP + 8 * c8) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else if (!vk) {
#pragma unroll 1
    for (int i0 = 0; i0 < NI; i0 += NB) {
      float4 x[NB][2];  // NB rounds of loads in flight before the stores
#pragma unroll
      for (int u = 0; u < NB; ++u) {
        const int idx = tid + (i0 + u) * kThreads;
        const float4* g = reinterpret_cast<const float4*>(src + static_cast<size_t>(idx) * 8);
        x[u][0] = __ldg(g);
        x[u][1] = __ldg(g + 1);
      }
#pragma unroll
      for (int u = 0; u < NB; ++u) {
        const int idx = tid + (i0 + u) * kThreads;
        const int r = idx / (V / 8), c8 = idx - r * (V / 8);
        *reinterpret_cast<uint4*>(dst + r * SP + 8 * c8) =
            make_uint4(fwd::PackBF16(x[u][0].x, x[u][0].y), fwd::PackBF16(x[u][0].z, x[u][0].w),
                       fwd::PackBF16(x[u][1].x, x[u][1].y), fwd::PackBF16(x[u][1].z, x[u][1].w));
      }
    }
  } else {  // [V][K] in global memory (initial / final states with state_vk): element by element
#pragma unroll 1
    for (int idx = tid; idx < K * V; idx += kThreads) {
      const int c = idx / K, r = idx - c * K;
      dst[r * SP + c] = __float2bfloat16(src[StateAt(true, K, V, r, c)]);
    }
  }
}

// The same from a bf16 [K, V] chunk state (Params::states_bf16): 16-byte cp.async copies, committed as one
// group (the caller waits for it).
template <int K, int SP>
__device__ __forceinline__ void StateToSmemBf16(bf16* dst, const bf16* src, int tid) {
  constexpr int V = K, N8 = K * V / 8;
#pragma unroll 1
  for (int idx = tid; idx < N8; idx += kThreads) {
    const int r = idx / (V / 8), c8 = idx - r * (V / 8);
    fwd::CpAsync16(dst + r * SP + 8 * c8, src + static_cast<size_t>(idx) * 8, true);
  }
  fwd::CpAsyncCommit();
}

// Eight consecutive dO elements -> bf16 (16 bytes).
template <typename TIn>
__device__ __forceinline__ uint4 LoadBf16x8(const TIn* g);
template <>
__device__ __forceinline__ uint4 LoadBf16x8<__half>(const __half* g) {
  uint4 u = __ldg(reinterpret_cast<const uint4*>(g));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  uint32_t o[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[e]));
    o[e] = fwd::PackBF16(f.x, f.y);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}
template <>
__device__ __forceinline__ uint4 LoadBf16x8<float>(const float* g) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(g)), b = __ldg(reinterpret_cast<const float4*>(g) + 1);
  return make_uint4(fwd::PackBF16(a.x, a.y), fwd::PackBF16(a.z, a.w), fwd::PackBF16(b.x, b.y),
                    fwd::PackBF16(b.z, b.w));
}

template <int K, typename TIn>
__global__ void __launch_bounds__(kThreads, 2) Grad1MmaKernel(Params P) {
  using SM = Grad1MmaSmem<K>;
  constexpr int C = kChunk, V = K, SP = SM::SP, AP = SM::AP;
  constexpr int NT = V / 8;   // n-tiles of a row block of R / dR (V columns; K columns of dKd / dW / dQg alike)
  constexpr int NQ = K / 32;  // 32-column blocks of a W / Kd / U row (one 16-byte load per lane of a quad)
  static_assert(K == V && K % 64 == 0, "K = V, a multiple of 64");
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sS = reinterpret_cast<bf16*>(smem_raw);  // [K][SP] S (chunk start state)
  bf16* sdS = sS + K * SP;                        // [K][SP] dS_next
  bf16* sdO = sdS + K * SP;                       // [C][SP] dO (rows >= L zero)
  bf16* sA = sdO + C * SP;                        // [C][AP] A_qk (rows >= L zero)
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gr = lane >> 2, t4 = lane & 3;
  const bool rwarp = warp < 4;  // warps 0-3: R; 4-7: dR
  const int m = warp & 3;       // row block 16m..16m+15
  const int HV = p.HV;
  const int nitems = WindowChunkCount(P) * HV;
  const TIn* gdo = static_cast<const TIn*>(P.d_o);
  // ldmatrix lane offsets (rows x pitch + columns) of the three operand shapes, as in the forward recurrence:
  const int offA = (lane & 15) * SP + (lane >> 4) * 8;                     // A operand, row-major [m][k]
  const int offT = ((lane & 7) + ((lane >> 3) & 1) * 8) * SP + (lane >> 4) * 8;  // B operand [k][n] (.trans)
  const int offN = ((lane & 7) + (lane >> 4) * 8) * SP + ((lane >> 3) & 1) * 8;  // B operand stored [n][k]
  const int offAT = ((lane & 7) + (lane >> 4) * 8) * AP + ((lane >> 3) & 1) * 8;  // A^T operand of A_qk (.trans)
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int ci = it / HV, hv = it - ci * HV;
    const int4 e = WindowChunk(P, ci);
    const int b = e.x, cs = e.y, se = e.z, s = e.w;
    const int L = min(C, se - cs);
    const bool first = p.seq_start[(size_t)b * p.T + cs] == cs;
    const bool last = cs + C >= se;
    const size_t tb = (size_t)b * p.T + cs;
    const size_t wb = WinRow(P, b, cs);  // scratch rows
    __syncthreads();  // the previous item is done with shared memory
    // ---- A_qk and (bf16) dO by cp.async ----
    for (int idx = tid; idx < C * (C / 8); idx += kThreads) {
      const int r = idx / (C / 8), c8 = idx - r * (C / 8);
      const bool ok = r < L;
      fwd::CpAsync16(sA + r * AP + 8 * c8, p.Aqk + ((tb + (ok ? r : 0)) * HV + hv) * fwd::kAqkPitch + 8 * c8, ok);
    }
    if constexpr (std::is_same<TIn, bf16>::value) {
      for (int idx = tid; idx < C * (V / 8); idx += kThreads) {
        const int r = idx / (V / 8), c8 = idx - r * (V / 8);
        const bool ok = r < L;
        fwd::CpAsync16(sdO + r * SP + 8 * c8, gdo + ((tb + (ok ? r : 0)) * HV + hv) * V + 8 * c8, ok);
      }
    }
    fwd::CpAsyncCommit();
    if constexpr (!std::is_same<TIn, bf16>::value) {  // (before the fragment loads below: fewer live registers)
#pragma unroll 1
      for (int idx = tid; idx < C * (V / 8); idx += kThreads) {
        const int r = idx / (V / 8), c8 = idx - r * (V / 8);
        *reinterpret_cast<uint4*>(sdO + r * SP + 8 * c8) =
            r < L ? LoadBf16x8<TIn>(gdo + ((tb + r) * HV + hv) * V + 8 * c8) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
    // ---- this warp's rows 16m + gr (+8) of W and U (R warps) or Kd (dR warps): lane t4 of a quad loads
    // columns 32q + 8 t4 .. + 7 (rows >= L zero) ----
    uint4 fa[2][NQ], fu[2][NQ];
    {
      const bf16* ga = rwarp ? p.W : p.Kd;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = 16 * m + gr + 8 * hh;
        const bool ok = row < L;
        const size_t o = ((tb + (ok ? row : 0)) * HV + hv) * K + 8 * t4;
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
          fa[hh][q] = ok ? __ldg(reinterpret_cast<const uint4*>(ga + o + 32 * q)) : make_uint4(0u, 0u, 0u, 0u);
          fu[hh][q] = (ok && rwarp) ? __ldg(reinterpret_cast<const uint4*>(p.U + o + 32 * q))
                                    : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    // ---- S and dS_next (bf16 in shared memory), as the default kernel picks them: the Hs / dH chunk states as
    // stored (bf16 with states_bf16, else f32 rounded here), initial / final states (f32) rounded here ----
    {
      const size_t hidx = (((size_t)b * (p.NW + 1) + (cs + C - 1) / C) * HV + hv) * K * V;
      const size_t didx = DhOffset(P, b, cs, hv);
      if (first) {
        const float* src = s < p.S_init ? p.init + (((size_t)b * p.S_init + s) * HV + hv) * K * V : nullptr;
        StateToSmem<K, SP>(sS, src, p.state_vk, tid);
      } else if (P.states_bf16) {
        StateToSmemBf16<K, SP>(sS, reinterpret_cast<const bf16*>(P.Hs) + hidx, tid);
      } else {
        StateToSmem<K, SP>(sS, P.Hs + hidx, false, tid);
      }
      if (last) {
        const float* dsrc = (P.dfin != nullptr && s < P.S_out) ? P.dfin + (((size_t)b * P.S_out + s) * HV + hv) * K * V
                                                               : nullptr;
        StateToSmem<K, SP>(sdS, dsrc, p.state_vk, tid);
      } else if (P.states_bf16) {
        StateToSmemBf16<K, SP>(sdS, reinterpret_cast<const bf16*>(P.dH) + didx, tid);
      } else {
        StateToSmem<K, SP>(sdS, P.dH + didx, false, tid);
      }
    }
    fwd::CpAsyncWait<0>();
    __syncthreads();  // shared memory is read-only from here to the end of the item

#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int q = 0; q < NQ; ++q) QuadTranspose(fa[hh][q], lane);  // y[n]: columns 32q + 8n + 2 t4, +1
    // Products by halves of their output columns (32 f32 accumulators per thread at K = 128) to fit 128
    // registers (two CTAs per SM). NH n-tiles per half, for R / dR (V columns) and for dKd / dW / dQg (K columns) alike.
    constexpr int NH = NT / 2;
    // X[16m.., :] Y[:, n0 .. n0 + V/2) into acc (X = W or Kd: fragments fa; Y = S or dS_next, [K][V] in smem).
    auto rows_times_state = [&](float (&acc)[NH][4], const bf16* sY, int n0) {
#pragma unroll
      for (int ks = 0; ks < K / 16; ++ks) {
        const int q = ks >> 1, j2 = 2 * (ks & 1);
        const uint32_t a[4] = {Word(fa[0][q], j2), Word(fa[1][q], j2), Word(fa[0][q], j2 + 1),
                               Word(fa[1][q], j2 + 1)};
#pragma unroll
        for (int np = 0; np < NH / 2; ++np) {
          uint32_t b0, b1, b2, b3;
          fwd::LdsmT(sY + offT + ks * 16 * SP + n0 + np * 16, b0, b1, b2, b3);
          fwd::Mma(acc[2 * np], a, b0, b1);
          fwd::Mma(acc[2 * np + 1], a, b2, b3);
        }
      }
    };
    // Z[16m.., :] Y[c0 .. c0 + K/2, :]^T into acc (Z: bf16 A fragments ra over V; Y [K][V] in smem).
    auto rows_times_state_t = [&](float (&acc)[NH][4], const uint32_t (&ra)[NT / 2][4], const bf16* sY, int c0) {
#pragma unroll
      for (int kv = 0; kv < V / 16; ++kv)
#pragma unroll
        for (int np = 0; np < NH / 2; ++np) {
          uint32_t b0, b1, b2, b3;
          fwd::Ldsm(sY + offN + (c0 + np * 16) * SP + kv * 16, b0, b1, b2, b3);
          fwd::Mma(acc[2 * np], ra[kv], b0, b1);
          fwd::Mma(acc[2 * np + 1], ra[kv], b2, b3);
        }
    };
    // Accumulators of column half hs (rows 16m + gr (+8), columns 8n + 2 t4, +1) -> A fragments of the next
    // product over V: ra[kv] covers columns 16 kv .. 16 kv + 15.
    auto pack = [&](uint32_t (&ra)[NT / 2][4], const float (&acc)[NH][4], int hs) {
#pragma unroll
      for (int kv = 0; kv < NH / 2; ++kv) {
        ra[hs * NH / 2 + kv][0] = fwd::PackBF16(acc[2 * kv][0], acc[2 * kv][1]);
        ra[hs * NH / 2 + kv][1] = fwd::PackBF16(acc[2 * kv][2], acc[2 * kv][3]);
        ra[hs * NH / 2 + kv][2] = fwd::PackBF16(acc[2 * kv + 1][0], acc[2 * kv + 1][1]);
        ra[hs * NH / 2 + kv][3] = fwd::PackBF16(acc[2 * kv + 1][2], acc[2 * kv + 1][3]);
      }
    };
    // Columns c0 + 8n + 2 t4, +1 of rows 16m + gr (+8) < L of the bf16 dW | dU rows (c0 < K: dW, else dU).
    auto store_wu = [&](int c0, const float (&acc)[NH][4], float sign) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = 16 * m + gr + 8 * hh;
        if (r < L) {
          bf16* dst = P.sWU + ((wb + r) * HV + hv) * (K + V) + c0 + 2 * t4;
#pragma unroll
          for (int n = 0; n < NH; ++n)
            *reinterpret_cast<uint32_t*>(dst + 8 * n) = fwd::PackBF16(sign * acc[n][2 * hh], sign * acc[n][2 * hh + 1]);
        }
      }
    };
    // Rows 16m + gr (+8) < L of dQg / dKd (f32, K columns) from accumulators over columns c0 + 8n + 2 t4, +1.
    auto store_rows = [&](float* base, int c0, const float (&acc)[NH][4]) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = 16 * m + gr + 8 * hh;
        if (r < L) {
          float* dst = base + ((wb + r) * HV + hv) * K + c0 + 2 * t4;
#pragma unroll
          for (int n = 0; n < NH; ++n) *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(acc[n][2 * hh], acc[n][2 * hh + 1]);
        }
      }
    };
    uint32_t ra[NT / 2][4];  // bf16 R (R warps) or dR (dR warps), rows 16m..16m+15, all V columns
    if (rwarp) {
      // ---- R = U - W S: the accumulators start at U, W enters negated (exact in bf16) ----
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
          fa[hh][q].x ^= 0x80008000u;
          fa[hh][q].y ^= 0x80008000u;
          fa[hh][q].z ^= 0x80008000u;
          fa[hh][q].w ^= 0x80008000u;
        }
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {
        float acc[NH][4];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
          for (int qq = 0; qq < NQ / 2; ++qq) {
            uint4& u4 = fu[hh][hs * NQ / 2 + qq];
            QuadTranspose(u4, lane);  // y[n]: U columns 32q + 8n + 2 t4, +1 = n-tile 4q + n
#pragma unroll
            for (int n = 0; n < 4; ++n) {
              const float2 u = Unpack(Word(u4, n));
              acc[4 * qq + n][2 * hh] = u.x;
              acc[4 * qq + n][2 * hh + 1] = u.y;
            }
          }
        rows_times_state(acc, sS, hs * (V / 2));
        pack(ra, acc, hs);
      }
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {  // ---- dKd = R dS_next^T ----
        float acc[NH][4];
        Zero(acc);
        rows_times_state_t(acc, ra, sdS, hs * (K / 2));
        store_rows(P.sKd, hs * (K / 2), acc);
      }
      // ---- dA_qk[:, 16m..16m+15] = tril(dO R^T); row blocks I < m are zero ----
      for (int I = 0; I < 4; ++I) {
        float acc[2][4];
        Zero(acc);
        if (I >= m) {
#pragma unroll
          for (int kv = 0; kv < V / 16; ++kv) {
            uint32_t a[4];
            fwd::Ldsm(sdO + offA + 16 * I * SP + kv * 16, a[0], a[1], a[2], a[3]);
            fwd::Mma(acc[0], a, ra[kv][0], ra[kv][2]);  // R rows 16m + gr
            fwd::Mma(acc[1], a, ra[kv][1], ra[kv][3]);  // R rows 16m + 8 + gr
          }
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = 16 * I + gr + 8 * hh;
          if (r < L) {
#pragma unroll
            for (int nh = 0; nh < 2; ++nh) {
              const int c = 16 * m + 8 * nh + 2 * t4;
              *reinterpret_cast<float2*>(P.sA + ((wb + r) * HV + hv) * C + c) =
                  make_float2(c <= r ? acc[nh][2 * hh] : 0.f, c + 1 <= r ? acc[nh][2 * hh + 1] : 0.f);
            }
          }
        }
      }
    } else {
      // ---- dR = A_qk^T dO + Kd dS_next (A_qk is lower triangular, its upper blocks zero: k blocks J >= m) ----
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {
        float acc[NH][4];
        Zero(acc);
        for (int J = m; J < 4; ++J) {
          uint32_t a[4];
          fwd::LdsmT(sA + offAT + 16 * J * AP + 16 * m, a[0], a[1], a[2], a[3]);
#pragma unroll
          for (int np = 0; np < NH / 2; ++np) {
            uint32_t b0, b1, b2, b3;
            fwd::LdsmT(sdO + offT + 16 * J * SP + hs * (V / 2) + np * 16, b0, b1, b2, b3);
            fwd::Mma(acc[2 * np], a, b0, b1);
            fwd::Mma(acc[2 * np + 1], a, b2, b3);
          }
        }
        rows_times_state(acc, sdS, hs * (V / 2));
        store_wu(K + hs * (V / 2), acc, 1.f);  // dU = dR
        pack(ra, acc, hs);
      }
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {  // ---- dW = -dR S^T ----
        float acc[NH][4];
        Zero(acc);
        rows_times_state_t(acc, ra, sS, hs * (K / 2));
        store_wu(hs * (K / 2), acc, -1.f);
      }
      // ---- dgamma = rowsum(S * dS_next) (bf16 values, f32 sums in column order, as the default kernel) ----
      const int gidx = GammaIndex(p, cs, se, s);
      const int r = tid - 128;
      if (gidx >= 0 && r < K) {
        float acc1 = 0.f;
#pragma unroll 4
        for (int c8 = 0; c8 < V / 8; ++c8) {
          const uint4 x = *reinterpret_cast<const uint4*>(sS + r * SP + 8 * c8);
          const uint4 y = *reinterpret_cast<const uint4*>(sdS + r * SP + 8 * c8);
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const float2 xs = Unpack(Word(x, w)), ys = Unpack(Word(y, w));
            acc1 = fmaf(xs.x, ys.x, acc1);
            acc1 = fmaf(xs.y, ys.y, acc1);
          }
        }
        P.dgam[(((size_t)b * p.NG + gidx) * HV + hv) * K + r] = acc1;
      }
    }
    {  // ---- dQg = dO S^T: rows 16m, column half warp >> 2 of K ----
      const int c0 = (warp >> 2) * (K / 2);
      float acc[NH][4];
      Zero(acc);
#pragma unroll
      for (int kv = 0; kv < V / 16; ++kv) {
        uint32_t a[4];
        fwd::Ldsm(sdO + offA + 16 * m * SP + kv * 16, a[0], a[1], a[2], a[3]);
#pragma unroll
        for (int np = 0; np < NH / 2; ++np) {
          uint32_t b0, b1, b2, b3;
          fwd::Ldsm(sS + offN + (c0 + np * 16) * SP + kv * 16, b0, b1, b2, b3);
          fwd::Mma(acc[2 * np], a, b0, b1);
          fwd::Mma(acc[2 * np + 1], a, b2, b3);
        }
      }
      store_rows(P.sQg, c0, acc);
    }
  }
}

}  // namespace

// Grad1MmaKernel is the default; FLASHKDA_BWD_GRAD1=simt selects the SIMT Grad1Kernel (the first version, kept
// as a reference for the tests). Read once per process, at the first launch.
bool Grad1MmaSelected() {
  static const bool on = !EnvEquals("FLASHKDA_BWD_GRAD1", "simt");
  return on;
}

bool StatesInBf16() { return RecurV2Selected() && Grad1MmaSelected(); }

template <typename TIn>
cudaError_t LaunchGrad1(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV;  // bound on (chunk, head) items
  if (Grad1MmaSelected()) {
    switch (p.f.K) {
      case 64: return fwd::LaunchGrid(Grad1MmaKernel<64, TIn>, Grad1MmaSmem<64>::Bytes(), items, 4, p, stream, nsm);
      case 128:
        return fwd::LaunchGrid(Grad1MmaKernel<128, TIn>, Grad1MmaSmem<128>::Bytes(), items, 4, p, stream, nsm);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (p.f.K) {
    case 64: return fwd::LaunchGrid(Grad1Kernel<64, TIn>, Grad1Smem<64>::Bytes(), items, 4, p, stream, nsm);
    case 128: return fwd::LaunchGrid(Grad1Kernel<128, TIn>, Grad1Smem<128>::Bytes(), items, 4, p, stream, nsm);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t LaunchGrad1<__nv_bfloat16>(const Params&, cudaStream_t, int);
template cudaError_t LaunchGrad1<__half>(const Params&, cudaStream_t, int);
template cudaError_t LaunchGrad1<float>(const Params&, cudaStream_t, int);

}  // namespace bwd
}  // namespace flashkda
