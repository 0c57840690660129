// flashkda_bwd, stages "states" and "reverse": the two sequential passes over the chunks of each sequence,
// one CTA per (sequence, value head, kBV state columns), state block in shared memory (f32), chunk operands
// from the prep workspace. See kda_bwd_common.cuh for the algorithm. The tensor-core versions further
// down (StatesKernelV2 / ReverseKernelV2) are the default; FLASHKDA_BWD_RECUR=v1 selects the first ones.
#include "kda_bwd_common.cuh"
#include "kda_env.h"
#include "kda_fwd_launch.h"

#include <type_traits>

namespace flashkda {
namespace bwd {
namespace {

using bf16 = __nv_bfloat16;

template <int K>
struct StatesSmem {
  static constexpr int C = kChunk, SP = kBV + 1, KP = K + 1;
  static constexpr size_t Bytes() {
    return (static_cast<size_t>(K) * SP + 2 * static_cast<size_t>(C) * KP + static_cast<size_t>(C) * SP + K) * 4;
  }
};

// Forward pass: S_{c+1} = diag(gamma) S_c + Kd^T (U - W S_c); stores the start state of every chunk but the
// first of its sequence at index ceil(cs / C).
template <int K>
__global__ void __launch_bounds__(kThreads) StatesKernel(Params P) {
  using SM = StatesSmem<K>;
  constexpr int C = kChunk, BV = kBV, SP = SM::SP, KP = SM::KP, TM = K / 16;
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) float smem[];
  float* sS = smem;           // [K][SP]
  float* sW = sS + K * SP;    // [C][KP]
  float* sKd = sW + C * KP;   // [C][KP]
  float* sR = sKd + C * KP;   // [C][SP]
  float* sGam = sR + C * SP;  // [K]
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int V = p.V, HV = p.HV, NCB = V / BV;
  const int nitems = p.counters[1] * HV * NCB;
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int cb = it % NCB, hv = (it / NCB) % HV, si = it / NCB / HV;
    const int4 e = P.seq_list[si];
    const int b = e.x, ss = e.y, se = e.z, s = e.w;
    const int col0 = cb * BV;
    const int nch = (se - ss + C - 1) / C;
    if (nch <= 1) continue;
    __syncthreads();  // the previous item is done with shared memory
    {
      const float* src = s < p.S_init ? p.init + (((size_t)b * p.S_init + s) * HV + hv) * K * V : nullptr;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sS[r * SP + c] = src ? src[StateAt(p.state_vk, K, V, r, col0 + c)] : 0.f;
      }
    }
    for (int m = 0; m + 1 < nch; ++m) {
      const int cs = ss + m * C;  // a full chunk (it has a successor)
      const size_t tb = (size_t)b * p.T + cs;
      __syncthreads();
      for (int idx = tid; idx < C * K; idx += kThreads) {
        const int r = idx / K, c = idx % K;
        const size_t o = ((tb + r) * HV + hv) * K + c;
        sW[r * KP + c] = Bf(p.W[o]);
        sKd[r * KP + c] = Bf(p.Kd[o]);
      }
      for (int idx = tid; idx < C * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sR[r * SP + c] = Bf(p.U[((tb + r) * HV + hv) * V + col0 + c]);
      }
      {
        const int gidx = (cs + C - 1) / C;
        for (int c = tid; c < K; c += kThreads) sGam[c] = p.gamma[(((size_t)b * p.NG + gidx) * HV + hv) * K + c];
      }
      __syncthreads();
      {  // R = U - W S
        float acc[4][4];
        Zero(acc);
        MicroGemm<4, 4>(acc, tm, 16, tn, 16, K, [&](int mm, int kk) { return sW[mm * KP + kk]; },
                        [&](int kk, int n) { return sS[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sR[(tm + 16 * i) * SP + tn + 16 * j] -= acc[i][j];
      }
      __syncthreads();
      {  // S = diag(gamma) S + Kd^T R
        float acc[TM][4];
        Zero(acc);
        MicroGemm<TM, 4>(acc, tm, 16, tn, 16, C, [&](int mm, int kk) { return sKd[kk * KP + mm]; },
                         [&](int kk, int n) { return sR[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = tm + 16 * i, c = tn + 16 * j;
            sS[r * SP + c] = sGam[r] * sS[r * SP + c] + acc[i][j];
          }
      }
      __syncthreads();
      float* dst = P.Hs + (((size_t)b * (p.NW + 1) + (cs + 2 * C - 1) / C) * HV + hv) * K * V;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        dst[(size_t)r * V + col0 + c] = sS[r * SP + c];
      }
    }
  }
}

template <int K>
struct ReverseSmem {
  static constexpr int C = kChunk, SP = kBV + 1, KP = K + 1, AP = C + 1;
  static constexpr size_t Bytes() {
    return (static_cast<size_t>(K) * SP + 3 * static_cast<size_t>(C) * KP + static_cast<size_t>(C) * AP +
            2 * static_cast<size_t>(C) * SP + K) *
           4;
  }
};

// Backward pass over the chunks of a sequence, last to first:
//   dR = A_qk^T dO + Kd dS,   dS <- Qg^T dO - W^T dR + diag(gamma) dS.
template <int K, typename TIn>
__global__ void __launch_bounds__(kThreads) ReverseKernel(Params P) {
  using SM = ReverseSmem<K>;
  constexpr int C = kChunk, BV = kBV, SP = SM::SP, KP = SM::KP, AP = SM::AP, TM = K / 16;
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) float smem[];
  float* sdS = smem;            // [K][SP]
  float* sQg = sdS + K * SP;    // [C][KP]
  float* sKd = sQg + C * KP;    // [C][KP]
  float* sW = sKd + C * KP;     // [C][KP]
  float* sA = sW + C * KP;      // [C][AP]
  float* sdO = sA + C * AP;     // [C][SP]
  float* sdR = sdO + C * SP;    // [C][SP]
  float* sGam = sdR + C * SP;   // [K]
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int V = p.V, HV = p.HV, NCB = V / BV;
  const int nitems = p.counters[1] * HV * NCB;
  const TIn* gdo = static_cast<const TIn*>(P.d_o);
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int cb = it % NCB, hv = (it / NCB) % HV, si = it / NCB / HV;
    const int4 e = P.seq_list[si];
    const int b = e.x, ss = e.y, se = e.z, s = e.w;
    const int col0 = cb * BV;
    const int nch = (se - ss + C - 1) / C;
    __syncthreads();
    {
      const float* src = (P.dfin != nullptr && s < P.S_out) ? P.dfin + (((size_t)b * P.S_out + s) * HV + hv) * K * V
                                                             : nullptr;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sdS[r * SP + c] = src ? src[StateAt(p.state_vk, K, V, r, col0 + c)] : 0.f;
      }
    }
    for (int m = nch - 1; m >= 0; --m) {
      const int cs = ss + m * C;
      const int L = min(C, se - cs);
      const size_t tb = (size_t)b * p.T + cs;
      __syncthreads();  // sdS final for this chunk; operands free
      if (m + 1 < nch) {  // dS_next of this chunk = gradient w.r.t. the start state of the next one
        float* dst = P.dH + DhOffset(P, b, cs, hv);  // (never windowed: Windows)
        for (int idx = tid; idx < K * BV; idx += kThreads) {
          const int r = idx / BV, c = idx % BV;
          dst[(size_t)r * V + col0 + c] = sdS[r * SP + c];
        }
      }
      for (int idx = tid; idx < C * K; idx += kThreads) {
        const int r = idx / K, c = idx % K;
        const bool ok = r < L;
        const size_t o = ((tb + (ok ? r : 0)) * HV + hv) * K + c;
        sQg[r * KP + c] = ok ? Bf(p.Qg[o]) : 0.f;
        sKd[r * KP + c] = ok ? Bf(p.Kd[o]) : 0.f;
        sW[r * KP + c] = ok ? Bf(p.W[o]) : 0.f;
      }
      for (int idx = tid; idx < C * C; idx += kThreads) {
        const int r = idx / C, c = idx % C;
        sA[r * AP + c] = r < L ? Bf(p.Aqk[((tb + r) * HV + hv) * fwd::kAqkPitch + c]) : 0.f;
      }
      for (int idx = tid; idx < C * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sdO[r * SP + c] = r < L ? fwd::ToF<TIn>(gdo[((tb + r) * HV + hv) * V + col0 + c]) : 0.f;
      }
      {
        const int gidx = GammaIndex(p, cs, se, s);
        for (int c = tid; c < K; c += kThreads)
          sGam[c] = gidx >= 0 ? p.gamma[(((size_t)b * p.NG + gidx) * HV + hv) * K + c] : 0.f;
      }
      __syncthreads();
      {  // dR = A_qk^T dO + Kd dS
        float acc[4][4];
        Zero(acc);
        MicroGemm<4, 4>(acc, tm, 16, tn, 16, C, [&](int mm, int kk) { return sA[kk * AP + mm]; },
                        [&](int kk, int n) { return sdO[kk * SP + n]; });
        MicroGemm<4, 4>(acc, tm, 16, tn, 16, K, [&](int mm, int kk) { return sKd[mm * KP + kk]; },
                        [&](int kk, int n) { return sdS[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sdR[(tm + 16 * i) * SP + tn + 16 * j] = acc[i][j];
      }
      __syncthreads();
      {  // dS = Qg^T dO - W^T dR + diag(gamma) dS
        float acc[TM][4], acw[TM][4];
        Zero(acc);
        Zero(acw);
        MicroGemm<TM, 4>(acc, tm, 16, tn, 16, C, [&](int mm, int kk) { return sQg[kk * KP + mm]; },
                         [&](int kk, int n) { return sdO[kk * SP + n]; });
        MicroGemm<TM, 4>(acw, tm, 16, tn, 16, C, [&](int mm, int kk) { return sW[kk * KP + mm]; },
                         [&](int kk, int n) { return sdR[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = tm + 16 * i, c = tn + 16 * j;
            sdS[r * SP + c] = acc[i][j] - acw[i][j] + sGam[r] * sdS[r * SP + c];
          }
      }
    }
    __syncthreads();
    if (P.dinit != nullptr && s < p.S_init) {
      float* dst = P.dinit + (((size_t)b * p.S_init + s) * HV + hv) * K * V;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        dst[StateAt(p.state_vk, K, V, r, col0 + c)] = sdS[r * SP + c];
      }
    }
  }
}


// ---------------------------------------------------------------------------------------------------------
// v2 (the default): both passes on tensor cores in the style of the forward's RecurKernel. One CTA
// per (sequence, value head, BV state columns), BV in {16, 32, 64} chosen on the host so that the items fill
// the SMs; the state (S or dS) lives in registers as fp32 mma accumulators, with a bf16 copy in shared memory
// as the B operand of the next chunk's products; chunk operands (bf16, prep workspace) are double-buffered
// with cp.async, the next chunk's load being issued right after barrier A (two barriers per chunk).
// Workspace indices are those of the default kernels above:
//   Hs[b, ceil(cs_next / C), hv, k, v]    after the update of chunk cs (every chunk but a sequence's last;
//                                         (cs + 2C - 1) / C = ceil((cs + C) / C) is the next chunk's index)
//   dH[b, ceil(cs_next / C), hv, k, v]    dS_next of chunk cs (the state before its update), same condition
//   dinit[b, s, hv, StateAt(vk)]          dS after the sequence's first chunk, s < S_init
//   start states: init[b, s, hv, StateAt(vk)] (s < S_init, else 0); dfin[b, s, hv, StateAt(vk)] (dfin and
//   s < S_out, else 0); gamma of the reverse's chunk from GammaIndex (zero where it is -1), of the states'
//   (full) chunk at (cs + C - 1) / C.
// ---------------------------------------------------------------------------------------------------------

// Warp tiling of the 8 warps. C x BV products (R, dR): 4 warps along the rows, 2 along the columns, NTW tiles
// of 8 columns each. K x BV state: WM3 warps along the K / 16 row tiles (MTW3 each), WN3 along the columns.
template <int K, int BV>
struct TilesV2 {
  static constexpr int NT = BV / 8, NTW = NT / 2;
  static constexpr int MT3 = K / 16, WM3 = MT3 < 8 ? MT3 : 8, WN3 = 8 / WM3, MTW3 = MT3 / WM3, NTW3 = NT / WN3;
  static_assert(NTW >= 1 && NTW3 >= 1 && MT3 % WM3 == 0 && NT % WN3 == 0, "tiling");
};

// Lane addresses for ldmatrix (16-row x 16-column bf16 fragments at kk = 0):
//   A (rows m0.., k) of a row-major [m][k] block;  A = X^T of an [k][m] block (.trans);  B (k, columns n0..)
//   of a [k][n] block (.trans).
__device__ __forceinline__ const bf16* ABase(const bf16* s, int ld, int m0, int lane) {
  return s + (m0 + (lane & 15)) * ld + (lane >> 4) * 8;
}
__device__ __forceinline__ const bf16* ATBase(const bf16* s, int ld, int lane) {
  return s + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8;
}
__device__ __forceinline__ const bf16* BBase(const bf16* s, int ld, int n0, int lane) {
  return s + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

// B fragments of N consecutive 8-column tiles: .x4 per pair, .x2 for an odd last one (BV = 16 layouts).
template <int N>
__device__ __forceinline__ void LoadB(const bf16* base, uint32_t (&b)[N][2]) {
#pragma unroll
  for (int np = 0; np < N / 2; ++np)
    fwd::LdsmT(base + np * 16, b[2 * np][0], b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1]);
  if constexpr (N % 2 == 1) {
    cute::SM75_U16x4_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(base + (N - 1) * 8), b[N - 1][0],
                                  b[N - 1][1]);
  }
}

// acc[n] += A B over K16 steps of 16: A rows of a row-major [m][k] block (a_base from ABase), B of N column
// tiles (b_base from BBase, b_step: elements per 16 k rows).
template <int N, int K16>
__device__ __forceinline__ void MmaRow(float (&acc)[N][4], const bf16* a_base, const bf16* b_base, int b_step) {
#pragma unroll
  for (int kk = 0; kk < K16; ++kk) {
    uint32_t a[4], bb[N][2];
    fwd::Ldsm(a_base + kk * 16, a[0], a[1], a[2], a[3]);
    LoadB<N>(b_base + kk * b_step, bb);
#pragma unroll
    for (int n = 0; n < N; ++n) fwd::Mma(acc[n], a, bb[n][0], bb[n][1]);
  }
}

// The state tile of this thread: element (mi, ni, q) is (row, col) of the K x BV block.
template <int K, int BV>
struct StateTile {
  using TL = TilesV2<K, BV>;
  int wm3, wn3, gr, t4;
  __device__ __forceinline__ int Row(int mi, int q) const { return (wm3 + TL::WM3 * mi) * 16 + gr + 8 * (q >> 1); }
  __device__ __forceinline__ int Col(int ni, int q) const { return (wn3 * TL::NTW3 + ni) * 8 + 2 * t4 + (q & 1); }
};

// Reads a start state (f32 [K, V] or, vk, [V, K]) or zeros.
template <int K, int BV>
__device__ __forceinline__ void LoadState(float (&st)[TilesV2<K, BV>::MTW3][TilesV2<K, BV>::NTW3][4],
                                          const StateTile<K, BV>& tt, const float* src, bool vk, int V, int col0) {
#pragma unroll
  for (int mi = 0; mi < TilesV2<K, BV>::MTW3; ++mi)
#pragma unroll
    for (int ni = 0; ni < TilesV2<K, BV>::NTW3; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        st[mi][ni][q] = src ? src[StateAt(vk, K, V, tt.Row(mi, q), col0 + tt.Col(ni, q))] : 0.f;
}

// Writes the state block to a [K, V] (ld = V) f32 matrix, two adjacent columns at once.
template <int K, int BV>
__device__ __forceinline__ void StoreStateKV(const float (&st)[TilesV2<K, BV>::MTW3][TilesV2<K, BV>::NTW3][4],
                                             const StateTile<K, BV>& tt, float* dst, int V, int col0) {
#pragma unroll
  for (int mi = 0; mi < TilesV2<K, BV>::MTW3; ++mi)
#pragma unroll
    for (int ni = 0; ni < TilesV2<K, BV>::NTW3; ++ni)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        *reinterpret_cast<float2*>(dst + (size_t)tt.Row(mi, 2 * hh) * V + col0 + tt.Col(ni, 0)) =
            make_float2(st[mi][ni][2 * hh], st[mi][ni][2 * hh + 1]);
}

// bf16 copy of the state block as a [K][ld] matrix: the shared-memory operand of the next chunk, or (ld = V, s at
// column col0 of a chunk state) a bf16 chunk state in global memory.
template <int K, int BV>
__device__ __forceinline__ void StoreStateBf16(const float (&st)[TilesV2<K, BV>::MTW3][TilesV2<K, BV>::NTW3][4],
                                               const StateTile<K, BV>& tt, bf16* s, int ld) {
#pragma unroll
  for (int mi = 0; mi < TilesV2<K, BV>::MTW3; ++mi)
#pragma unroll
    for (int ni = 0; ni < TilesV2<K, BV>::NTW3; ++ni)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        *reinterpret_cast<uint32_t*>(s + tt.Row(mi, 2 * hh) * ld + tt.Col(ni, 0)) =
            fwd::PackBF16(st[mi][ni][2 * hh], st[mi][ni][2 * hh + 1]);
}

// Stores the state block as chunk state `idx` of Hs / dH (`base`), in bf16 or f32 as Params::states_bf16 says.
template <int K, int BV>
__device__ __forceinline__ void StoreChunkState(const float (&st)[TilesV2<K, BV>::MTW3][TilesV2<K, BV>::NTW3][4],
                                                const StateTile<K, BV>& tt, const Params& P, float* base, size_t idx,
                                                int V, int col0) {
  if (P.states_bf16) {
    StoreStateBf16<K, BV>(st, tt, reinterpret_cast<bf16*>(base) + idx + col0, V);
  } else {
    StoreStateKV<K, BV>(st, tt, base + idx, V, col0);
  }
}

// st = diag(gamma) st (gamma: the chunk's K values in shared memory).
template <int K, int BV>
__device__ __forceinline__ void ScaleRows(float (&st)[TilesV2<K, BV>::MTW3][TilesV2<K, BV>::NTW3][4],
                                          const StateTile<K, BV>& tt, const float* gam) {
#pragma unroll
  for (int mi = 0; mi < TilesV2<K, BV>::MTW3; ++mi)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float gm = gam[tt.Row(mi, 2 * hh)];
#pragma unroll
      for (int ni = 0; ni < TilesV2<K, BV>::NTW3; ++ni) {
        st[mi][ni][2 * hh] *= gm;
        st[mi][ni][2 * hh + 1] *= gm;
      }
    }
}

// st += X^T Y over the C rows of a chunk: X [C][ldx] (bf16, K columns), Y [C][ldy] (bf16, BV columns).
template <int K, int BV>
__device__ __forceinline__ void AccXtY(float (&st)[TilesV2<K, BV>::MTW3][TilesV2<K, BV>::NTW3][4],
                                       const StateTile<K, BV>& tt, const bf16* x, int ldx, const bf16* y, int ldy,
                                       int lane) {
  using TL = TilesV2<K, BV>;
  const bf16* xa = ATBase(x, ldx, lane);
  const bf16* yb = BBase(y, ldy, tt.wn3 * TL::NTW3 * 8, lane);
#pragma unroll
  for (int kk = 0; kk < kChunk / 16; ++kk) {
    uint32_t a[TL::MTW3][4], bb[TL::NTW3][2];
#pragma unroll
    for (int mi = 0; mi < TL::MTW3; ++mi)
      fwd::LdsmT(xa + kk * 16 * ldx + (tt.wm3 + TL::WM3 * mi) * 16, a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
    LoadB<TL::NTW3>(yb + kk * 16 * ldy, bb);
#pragma unroll
    for (int mi = 0; mi < TL::MTW3; ++mi)
#pragma unroll
      for (int ni = 0; ni < TL::NTW3; ++ni) fwd::Mma(st[mi][ni], a[mi], bb[ni][0], bb[ni][1]);
  }
}

// Chunk-operand stages of the v2 passes: 3 (loads issued two chunks ahead) where they fit in shared memory, i.e.
// narrow column blocks (the b1 shapes, whose per-chunk latency is the pass's time); else 2.
constexpr int OperandStages(int BV) { return BV <= 32 ? 3 : 2; }

template <int K, int BV>
struct StatesV2Smem {
  static constexpr int C = kChunk, KP = K + 8, VP = BV + 8;  // +8: conflict-free ldmatrix rows
  static constexpr int NS = OperandStages(BV);
  static constexpr size_t Bytes() {
    return (NS * (2 * static_cast<size_t>(C) * KP + static_cast<size_t>(C) * VP) + static_cast<size_t>(K) * VP +
            static_cast<size_t>(C) * VP) *
               2 +
           NS * static_cast<size_t>(K) * 4;
  }
};

// S_{c+1} = diag(gamma_c) S_c + Kd_c^T (U_c - W_c S_c) over the chunks of a sequence but its last.
template <int K, int BV>
__global__ void __launch_bounds__(kThreads, 1) StatesKernelV2(Params P) {
  using SM = StatesV2Smem<K, BV>;
  using TL = TilesV2<K, BV>;
  constexpr int C = kChunk, KP = SM::KP, VP = SM::VP, NTW = TL::NTW, NS = SM::NS;
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) float smem[];  // (one declaration per TU: float as in the default kernels)
  bf16* sW = reinterpret_cast<bf16*>(smem);  // [NS][C][KP]
  bf16* sKd = sW + NS * C * KP;              // [NS][C][KP]
  bf16* sU = sKd + NS * C * KP;              // [NS][C][VP]
  bf16* sS = sU + NS * C * VP;               // [K][VP]  bf16 copy of the state
  bf16* sR = sS + K * VP;                    // [C][VP]
  float* sGam = reinterpret_cast<float*>(sR + C * VP);  // [NS][K]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gr = lane >> 2, t4 = lane & 3, mt = warp & 3, nt0 = (warp >> 2) * NTW;
  const StateTile<K, BV> tt{warp % TL::WM3, warp / TL::WM3, gr, t4};
  const int V = p.V, HV = p.HV, NCB = V / BV;
  const int nitems = p.counters[1] * HV * NCB;
  float st[TL::MTW3][TL::NTW3][4];
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int cb = it % NCB, hv = (it / NCB) % HV, si = it / NCB / HV;
    const int4 e = P.seq_list[si];
    const int b = e.x, ss = e.y, se = e.z, s = e.w;
    const int col0 = cb * BV;
    const int nch = (se - ss + C - 1) / C;
    if (nch <= 1) continue;
    const int nst = nch - 1;  // updates: chunks 0 .. nch - 2, all full

    LoadState<K, BV>(st, tt, s < p.S_init ? p.init + (((size_t)b * p.S_init + s) * HV + hv) * K * V : nullptr,
                     p.state_vk, V, col0);

    auto load_chunk = [&](int m, int stg) {
      const int cs = ss + m * C;
      const size_t tb = (size_t)b * p.T + cs;
      for (int idx = tid; idx < C * (K / 8); idx += kThreads) {
        const int r = idx / (K / 8), v8 = idx - r * (K / 8);
        const size_t go = ((tb + r) * HV + hv) * K + v8 * 8;
        const int so = (stg * C + r) * KP + v8 * 8;
        fwd::CpAsync16(sW + so, p.W + go, true);
        fwd::CpAsync16(sKd + so, p.Kd + go, true);
      }
      for (int idx = tid; idx < C * (BV / 8); idx += kThreads) {
        const int r = idx / (BV / 8), v8 = idx - r * (BV / 8);
        fwd::CpAsync16(sU + (stg * C + r) * VP + v8 * 8, p.U + ((tb + r) * HV + hv) * V + col0 + v8 * 8, true);
      }
      const int gidx = (cs + C - 1) / C;
      for (int idx = tid; idx < K / 4; idx += kThreads)
        fwd::CpAsync16(sGam + stg * K + idx * 4, p.gamma + (((size_t)b * p.NG + gidx) * HV + hv) * K + idx * 4, true);
      fwd::CpAsyncCommit();
    };

    __syncthreads();  // the previous item is done with shared memory
    load_chunk(0, 0);
    if constexpr (NS == 3) {  // one cp.async group per chunk, empty past the last: a fixed count in flight
      if (nst > 1) {
        load_chunk(1, 1);
      } else {
        fwd::CpAsyncCommit();
      }
    }
    StoreStateBf16<K, BV>(st, tt, sS, VP);
    for (int m = 0; m < nst; ++m) {
      const int stg = m % NS;
      const int cs = ss + m * C;
      fwd::CpAsyncWait<NS - 2>();  // chunk m's group (NS = 3: chunk m + 1's may stay in flight)
      __syncthreads();  // A: chunk m and sS visible; everyone is done with chunk m - 1 (its stage, sR)
      if constexpr (NS == 3) {  // chunk m + 2 into chunk m - 1's stage
        if (m + 2 < nst) {
          load_chunk(m + 2, (stg + 2) % 3);
        } else {
          fwd::CpAsyncCommit();
        }
      } else {
        if (m + 1 < nst) load_chunk(m + 1, stg ^ 1);
      }
      {  // R = U - W S  (rows mt * 16.., columns nt0 * 8..)
        float acc[NTW][4] = {};
        MmaRow<NTW, K / 16>(acc, ABase(sW + stg * C * KP, KP, mt * 16, lane), BBase(sS, VP, nt0 * 8, lane), 16 * VP);
#pragma unroll
        for (int ni = 0; ni < NTW; ++ni)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = mt * 16 + gr + 8 * hh, col = (nt0 + ni) * 8 + 2 * t4;
            const __nv_bfloat162 u = *reinterpret_cast<const __nv_bfloat162*>(sU + (stg * C + row) * VP + col);
            *reinterpret_cast<uint32_t*>(sR + row * VP + col) =
                fwd::PackBF16(__low2float(u) - acc[ni][2 * hh], __high2float(u) - acc[ni][2 * hh + 1]);
          }
      }
      __syncthreads();  // B: R visible; everyone is done reading sS
      ScaleRows<K, BV>(st, tt, sGam + stg * K);
      AccXtY<K, BV>(st, tt, sKd + stg * C * KP, KP, sR, VP, lane);
      StoreChunkState<K, BV>(st, tt, P, P.Hs, (((size_t)b * (p.NW + 1) + (cs + 2 * C - 1) / C) * HV + hv) * K * V, V,
                             col0);
      if (m + 1 < nst) StoreStateBf16<K, BV>(st, tt, sS, VP);
    }
  }
}

// dO of a chunk (C x BV of TIn) for the reverse: bf16 by cp.async; fp16 / fp32 through registers, loaded right
// after barrier A and converted into the other stage at the end of the chunk (latency hidden by the chunk).
template <typename TIn>
struct DoVec {  // 4 elements
  using T = uint2;
};
template <>
struct DoVec<float> {
  using T = float4;
};
__device__ __forceinline__ uint2 ToBf4(const float4& x) {
  return make_uint2(fwd::PackBF16(x.x, x.y), fwd::PackBF16(x.z, x.w));
}
__device__ __forceinline__ uint2 ToBf4(const uint2& x) {  // 4 halves
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&x.x));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&x.y));
  return make_uint2(fwd::PackBF16(lo.x, lo.y), fwd::PackBF16(hi.x, hi.y));
}

// The reverse pass's stages: OperandStages where dO comes by cp.async (bf16); the register dO path (fp16 / fp32)
// loads one chunk ahead, so 2.
template <int BV, typename TIn>
constexpr int ReverseStages() {
  return std::is_same<TIn, bf16>::value ? OperandStages(BV) : 2;
}

template <int K, int BV, int NS>
struct ReverseV2Smem {
  static constexpr int C = kChunk, KP = K + 8, VP = BV + 8, AP = C + 8;
  static constexpr size_t Bytes() {
    return (NS * (3 * static_cast<size_t>(C) * KP + static_cast<size_t>(C) * AP + static_cast<size_t>(C) * VP) +
            static_cast<size_t>(K) * VP + static_cast<size_t>(C) * VP) *
               2 +
           NS * static_cast<size_t>(K) * 4;
  }
};

// Chunks last to first: dR = A_qk^T dO + Kd dS,  dS <- diag(gamma) dS + Qg^T dO - W^T dR.
template <int K, int BV, typename TIn>
__global__ void __launch_bounds__(kThreads, 1) ReverseKernelV2(Params P) {
  constexpr int NS = ReverseStages<BV, TIn>();
  using SM = ReverseV2Smem<K, BV, NS>;
  using TL = TilesV2<K, BV>;
  constexpr int C = kChunk, KP = SM::KP, VP = SM::VP, AP = SM::AP, NTW = TL::NTW;
  constexpr bool kBfDo = std::is_same<TIn, bf16>::value;
  constexpr int NU = C * (BV / 4) / kThreads;  // 4-element dO pieces per thread (register path)
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) float smem[];  // (one declaration per TU: float as in the default kernels)
  bf16* sQg = reinterpret_cast<bf16*>(smem);  // [NS][C][KP]
  bf16* sKd = sQg + NS * C * KP;              // [NS][C][KP]
  bf16* sW = sKd + NS * C * KP;               // [NS][C][KP]
  bf16* sA = sW + NS * C * KP;                // [NS][C][AP]
  bf16* sdO = sA + NS * C * AP;               // [NS][C][VP]
  bf16* sdS = sdO + NS * C * VP;              // [K][VP]  bf16 copy of dS_next
  bf16* sdR = sdS + K * VP;                   // [C][VP]  -dR
  float* sGam = reinterpret_cast<float*>(sdR + C * VP);  // [NS][K]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gr = lane >> 2, t4 = lane & 3, mt = warp & 3, nt0 = (warp >> 2) * NTW;
  const StateTile<K, BV> tt{warp % TL::WM3, warp / TL::WM3, gr, t4};
  const int V = p.V, HV = p.HV, NCB = V / BV;
  const int nitems = WindowSeqCount(P) * HV * NCB;
  const TIn* gdo = static_cast<const TIn*>(P.d_o);
  float st[TL::MTW3][TL::NTW3][4];
  typename DoVec<TIn>::T dreg[kBfDo ? 1 : NU];
  // Picked mode: only the launch of the picked column block runs, and its CTAs take items as they finish
  // (sequences of different lengths); otherwise a fixed stride. Items are independent: same results either way.
  if (P.reverse_pick && p.counters[kReversePickSlot] != BV) return;
  __shared__ int s_next;
  auto next_item = [&](int it) {
    if (!P.reverse_pick) return it < 0 ? static_cast<int>(blockIdx.x) : it + static_cast<int>(gridDim.x);
    return fwd::TakeItem(p.counters + kReverseWorkSlot, &s_next);
  };
  for (int it = next_item(-1); it < nitems; it = next_item(it)) {
    const int cb = it % NCB, hv = (it / NCB) % HV, si = it / NCB / HV;
    const int4 e = WindowSeq(P, si);
    const int b = e.x, ss = e.y, se = e.z, s = e.w;
    const int col0 = cb * BV;
    const int nch = (se - ss + C - 1) / C;
    // The window's chunks m_lo .. m_hi - 1 (starts in [win_lo, win_hi); WindowLists lists only sequences with
    // some). A sequence that goes on past the window starts from the later window's dS (bnd_in); one that began
    // before it leaves its dS in bnd_out.
    int m_lo, m_hi;
    WindowChunkRange(P, ss, se, &m_lo, &m_hi);
    const size_t bnd = ((size_t)b * HV + hv) * K * V;

    if (m_hi < nch) {
      LoadState<K, BV>(st, tt, P.bnd_in + bnd, false, V, col0);
    } else {
      LoadState<K, BV>(st, tt,
                       (P.dfin != nullptr && s < P.S_out) ? P.dfin + (((size_t)b * P.S_out + s) * HV + hv) * K * V
                                                          : nullptr,
                       p.state_vk, V, col0);
    }

    // Rows >= L of a partial last chunk are zero-filled (as the default kernel's zeros).
    auto load_chunk = [&](int m, int stg) {
      const int cs = ss + m * C;
      const int L = min(C, se - cs);
      const size_t tb = (size_t)b * p.T + cs;
      for (int idx = tid; idx < C * (K / 8); idx += kThreads) {
        const int r = idx / (K / 8), v8 = idx - r * (K / 8);
        const bool ok = r < L;
        const size_t go = ((tb + (ok ? r : 0)) * HV + hv) * K + v8 * 8;
        const int so = (stg * C + r) * KP + v8 * 8;
        fwd::CpAsync16(sQg + so, p.Qg + go, ok);
        fwd::CpAsync16(sKd + so, p.Kd + go, ok);
        fwd::CpAsync16(sW + so, p.W + go, ok);
      }
      for (int idx = tid; idx < C * (C / 8); idx += kThreads) {
        const int r = idx / (C / 8), v8 = idx - r * (C / 8);
        const bool ok = r < L;
        fwd::CpAsync16(sA + (stg * C + r) * AP + v8 * 8, p.Aqk + ((tb + (ok ? r : 0)) * HV + hv) * fwd::kAqkPitch + v8 * 8, ok);
      }
      if constexpr (kBfDo) {
        for (int idx = tid; idx < C * (BV / 8); idx += kThreads) {
          const int r = idx / (BV / 8), v8 = idx - r * (BV / 8);
          const bool ok = r < L;
          fwd::CpAsync16(sdO + (stg * C + r) * VP + v8 * 8, gdo + ((tb + (ok ? r : 0)) * HV + hv) * V + col0 + v8 * 8,
                         ok);
        }
      } else {
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const int idx = tid + u * kThreads, r = idx / (BV / 4), c4 = idx - r * (BV / 4);
          dreg[u] = {};
          if (r < L)
            dreg[u] = *reinterpret_cast<const typename DoVec<TIn>::T*>(gdo + ((tb + r) * HV + hv) * V + col0 + c4 * 4);
        }
      }
      const int gidx = GammaIndex(p, cs, se, s);  // -1: zeros (no final-state cotangent: dS is 0 there)
      const float* gsrc = p.gamma + (((size_t)b * p.NG + (gidx >= 0 ? gidx : 0)) * HV + hv) * K;
      for (int idx = tid; idx < K / 4; idx += kThreads)
        fwd::CpAsync16(sGam + stg * K + idx * 4, gsrc + idx * 4, gidx >= 0);
      fwd::CpAsyncCommit();
    };
    auto store_do = [&](int stg) {  // register path: dO pieces -> bf16 stage
      if constexpr (!kBfDo) {
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const int idx = tid + u * kThreads, r = idx / (BV / 4), c4 = idx - r * (BV / 4);
          *reinterpret_cast<uint2*>(sdO + (stg * C + r) * VP + c4 * 4) = ToBf4(dreg[u]);
        }
      }
    };

    __syncthreads();  // the previous item is done with shared memory
    load_chunk(m_hi - 1, 0);
    if constexpr (NS == 3) {  // one cp.async group per chunk, empty past the first: a fixed count in flight
      if (m_hi - 1 > m_lo) {
        load_chunk(m_hi - 2, 1);
      } else {
        fwd::CpAsyncCommit();
      }
    }
    store_do(0);
    StoreStateBf16<K, BV>(st, tt, sdS, VP);
    for (int m = m_hi - 1; m >= m_lo; --m) {
      const int stg = (m_hi - 1 - m) % NS;
      const int cs = ss + m * C;
      fwd::CpAsyncWait<NS - 2>();  // chunk m's group (NS = 3: chunk m - 1's may stay in flight)
      __syncthreads();  // A: chunk m and sdS visible; everyone is done with chunk m + 1 (its stage, sdR)
      if constexpr (NS == 3) {  // chunk m - 2 into chunk m + 1's stage
        if (m > m_lo + 1) {
          load_chunk(m - 2, (stg + 2) % 3);
        } else {
          fwd::CpAsyncCommit();
        }
      } else {
        if (m > m_lo) load_chunk(m - 1, stg ^ 1);
      }
      if (m + 1 < nch)  // dS_next of this chunk = gradient w.r.t. the start state of the next one
        StoreChunkState<K, BV>(st, tt, P, P.dH, DhOffset(P, b, cs, hv), V, col0);
      {  // dR = A_qk^T dO + Kd dS  (rows mt * 16.., columns nt0 * 8..); A_qk is lower triangular: i >= j only
        float acc[NTW][4] = {};
        const bf16* aa = ATBase(sA + stg * C * AP, AP, lane) + mt * 16;
        const bf16* ob = BBase(sdO + stg * C * VP, VP, nt0 * 8, lane);
#pragma unroll
        for (int kk = 0; kk < C / 16; ++kk) {
          if (kk >= mt) {
            uint32_t a[4], bb[NTW][2];
            fwd::LdsmT(aa + kk * 16 * AP, a[0], a[1], a[2], a[3]);
            LoadB<NTW>(ob + kk * 16 * VP, bb);
#pragma unroll
            for (int n = 0; n < NTW; ++n) fwd::Mma(acc[n], a, bb[n][0], bb[n][1]);
          }
        }
        MmaRow<NTW, K / 16>(acc, ABase(sKd + stg * C * KP, KP, mt * 16, lane), BBase(sdS, VP, nt0 * 8, lane),
                            16 * VP);
#pragma unroll
        for (int ni = 0; ni < NTW; ++ni)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = mt * 16 + gr + 8 * hh, col = (nt0 + ni) * 8 + 2 * t4;
            *reinterpret_cast<uint32_t*>(sdR + row * VP + col) = fwd::PackBF16(-acc[ni][2 * hh], -acc[ni][2 * hh + 1]);
          }
      }
      __syncthreads();  // B: -dR visible; everyone is done reading sdS
      ScaleRows<K, BV>(st, tt, sGam + stg * K);
      AccXtY<K, BV>(st, tt, sQg + stg * C * KP, KP, sdO + stg * C * VP, VP, lane);
      AccXtY<K, BV>(st, tt, sW + stg * C * KP, KP, sdR, VP, lane);
      if (m > m_lo) {
        StoreStateBf16<K, BV>(st, tt, sdS, VP);
        store_do((stg + 1) % NS);
      }
    }
    if (m_lo > 0) {  // the sequence began in an earlier window: its dS here (f32, exact) carries on there
      StoreStateKV<K, BV>(st, tt, P.bnd_out + bnd, V, col0);
    } else if (P.dinit != nullptr && s < p.S_init) {
      float* dst = P.dinit + (((size_t)b * p.S_init + s) * HV + hv) * K * V;
#pragma unroll
      for (int mi = 0; mi < TL::MTW3; ++mi)
#pragma unroll
        for (int ni = 0; ni < TL::NTW3; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q)
            dst[StateAt(p.state_vk, K, V, tt.Row(mi, q), col0 + tt.Col(ni, q))] = st[mi][ni][q];
    }
  }
}

// FLASHKDA_BWD_RECUR_BV=16|32|64 forces the column block of the v2 kernels (for tuning; read once), 0 if unset.
int ForcedBV(const fwd::Params& p) {
  static const int forced = EnvColumnBlock("FLASHKDA_BWD_RECUR_BV");
  return forced != 0 && p.V % forced == 0 ? forced : 0;
}

// Columns per CTA of the states pass: the widest block whose items still cover the SMs (the per-chunk latency
// shrinks with the block; W, Kd, ... are re-read per block). The host does not know the sequence count, so
// one sequence per batch row is assumed (more sequences only make more items). The reverse pass picks on the
// device instead (PickReverseBlock).
int ChooseBV(const fwd::Params& p, int nsm) {
  if (const int forced = ForcedBV(p)) return forced;
  const long long heads = static_cast<long long>(p.B) * p.HV;
  if (p.V % 64 == 0 && heads * (p.V / 64) >= nsm) return 64;
  if (p.V % 32 == 0 && heads * (p.V / 32) >= nsm) return 32;
  return 16;
}

template <int K, int BV>
cudaError_t LaunchStatesV2(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV * (p.f.V / BV);
  return fwd::LaunchGrid(StatesKernelV2<K, BV>, StatesV2Smem<K, BV>::Bytes(), items, 1, p, stream, nsm);
}

// Dynamic shared memory of ReverseKernelV2<K, BV, TIn>.
template <int K, int BV, typename TIn>
constexpr size_t ReverseV2Bytes() {
  return ReverseV2Smem<K, BV, ReverseStages<BV, TIn>()>::Bytes();
}

template <int K, int BV, typename TIn>
cudaError_t LaunchReverseV2(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV * (p.f.V / BV);
  return fwd::LaunchGrid(ReverseKernelV2<K, BV, TIn>, ReverseV2Bytes<K, BV, TIn>(), items, 1, p, stream, nsm);
}

template <int K>
cudaError_t LaunchStatesV2K(const Params& p, cudaStream_t stream, int nsm) {
  switch (ChooseBV(p.f, nsm)) {
    case 64: return LaunchStatesV2<K, 64>(p, stream, nsm);
    case 32: return LaunchStatesV2<K, 32>(p, stream, nsm);
    default: return LaunchStatesV2<K, 16>(p, stream, nsm);
  }
}

// The reverse pass's column block, picked on the device from the sequences' chunk counts (graph safe): the
// least of step(BV) x max(longest sequence, chunks per CTA slot), the second term assuming the dynamic item
// scheduling of the picked mode. step(BV): H100 per-chunk times of ReverseKernelV2<128, BV> at one CTA per SM
// (benchmarks/NOTES.md, sessions 7-9: 2.15 / 2.45 / 3.9 us; relative values are what matters). One CTA.
constexpr int kPickThreads = 256;
__global__ void __launch_bounds__(kPickThreads) PickReverseBlock(Params P, int slots16, int slots32, int slots64) {
  const fwd::Params& p = P.f;
  __shared__ long long s_sum[kPickThreads / 32];
  __shared__ int s_max[kPickThreads / 32];
  const int tid = threadIdx.x, n = p.counters[1];
  long long sum = 0;
  int mx = 0;
  for (int i = tid; i < n; i += kPickThreads) {
    const int4 e = P.seq_list[i];
    const int nch = (e.z - e.y + kChunk - 1) / kChunk;
    sum += nch;
    mx = max(mx, nch);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  if ((tid & 31) == 0) {
    s_sum[tid >> 5] = sum;
    s_max[tid >> 5] = mx;
  }
  __syncthreads();
  if (tid != 0) return;
  for (int w = 1; w < kPickThreads / 32; ++w) {
    sum += s_sum[w];
    mx = max(mx, s_max[w]);
  }
  const int bvs[3] = {16, 32, 64}, slots[3] = {slots16, slots32, slots64};
  const double step[3] = {2.15, 2.45, 3.9};
  int best = 0;
  double best_cost = -1.0;
  for (int i = 0; i < 3; ++i) {
    if (p.V % bvs[i] != 0 || slots[i] <= 0) continue;
    const long long items = sum * p.HV * (p.V / bvs[i]);
    const long long per_slot = (items + slots[i] - 1) / slots[i];
    const double cost = step[i] * static_cast<double>(per_slot > mx ? per_slot : mx);
    if (best_cost < 0.0 || cost < best_cost) {
      best_cost = cost;
      best = bvs[i];
    }
  }
  p.counters[kReversePickSlot] = best;
  p.counters[kReverseWorkSlot] = 0;  // the reverse launches after this pick (one per token window) take items anew
}

// CTA slots of ReverseKernelV2<K, BV, TIn> (SMs x resident CTAs), or 0 where V is not a multiple of BV.
template <int K, int BV, typename TIn>
int ReverseSlots(const Params& p, int nsm) {
  if (p.f.V % BV != 0) return 0;
  int occ = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, ReverseKernelV2<K, BV, TIn>, kThreads,
                                                ReverseV2Bytes<K, BV, TIn>());
  return nsm * (occ < 1 ? 1 : occ);
}

// Default: PickReverseBlock, then one launch per column block (the unpicked ones return at once). With
// FLASHKDA_BWD_RECUR_BV: that block only, fixed-stride items.
template <int K, typename TIn>
cudaError_t LaunchReverseV2K(const Params& p, cudaStream_t stream, int nsm) {
  Params q = p;
  q.reverse_pick = 0;
  switch (ForcedBV(p.f)) {
    case 64: return LaunchReverseV2<K, 64, TIn>(q, stream, nsm);
    case 32: return LaunchReverseV2<K, 32, TIn>(q, stream, nsm);
    case 16: return LaunchReverseV2<K, 16, TIn>(q, stream, nsm);
    default: break;
  }
  const int s16 = ReverseSlots<K, 16, TIn>(p, nsm), s32 = ReverseSlots<K, 32, TIn>(p, nsm),
            s64 = ReverseSlots<K, 64, TIn>(p, nsm);
  PickReverseBlock<<<1, kPickThreads, 0, stream>>>(p, s16, s32, s64);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  q.reverse_pick = 1;
  if (s16 > 0 && (err = LaunchReverseV2<K, 16, TIn>(q, stream, nsm)) != cudaSuccess) return err;
  if (s32 > 0 && (err = LaunchReverseV2<K, 32, TIn>(q, stream, nsm)) != cudaSuccess) return err;
  if (s64 > 0 && (err = LaunchReverseV2<K, 64, TIn>(q, stream, nsm)) != cudaSuccess) return err;
  return cudaSuccess;
}

}  // namespace

// The v2 (tensor-core) kernels are the default; FLASHKDA_BWD_RECUR=v1 selects the SIMT ones (the first version,
// kept as a reference for the tests). Read once per process, at the first launch.
bool RecurV2Selected() {
  static const bool on = !EnvEquals("FLASHKDA_BWD_RECUR", "v1");
  return on;
}

cudaError_t LaunchStates(const Params& p, cudaStream_t stream, int nsm) {
  if (RecurV2Selected()) {
    switch (p.f.K) {
      case 64: return LaunchStatesV2K<64>(p, stream, nsm);
      case 128: return LaunchStatesV2K<128>(p, stream, nsm);
      default: return cudaErrorInvalidValue;
    }
  }
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV * (p.f.V / kBV);
  switch (p.f.K) {
    case 64: return fwd::LaunchGrid(StatesKernel<64>, StatesSmem<64>::Bytes(), items, 1, p, stream, nsm);
    case 128: return fwd::LaunchGrid(StatesKernel<128>, StatesSmem<128>::Bytes(), items, 1, p, stream, nsm);
    default: return cudaErrorInvalidValue;
  }
}

template <typename TIn>
cudaError_t LaunchReverse(const Params& p, cudaStream_t stream, int nsm) {
  if (RecurV2Selected()) {
    switch (p.f.K) {
      case 64: return LaunchReverseV2K<64, TIn>(p, stream, nsm);
      case 128: return LaunchReverseV2K<128, TIn>(p, stream, nsm);
      default: return cudaErrorInvalidValue;
    }
  }
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV * (p.f.V / kBV);
  switch (p.f.K) {
    case 64: return fwd::LaunchGrid(ReverseKernel<64, TIn>, ReverseSmem<64>::Bytes(), items, 1, p, stream, nsm);
    case 128: return fwd::LaunchGrid(ReverseKernel<128, TIn>, ReverseSmem<128>::Bytes(), items, 1, p, stream, nsm);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t LaunchReverse<__nv_bfloat16>(const Params&, cudaStream_t, int);
template cudaError_t LaunchReverse<__half>(const Params&, cudaStream_t, int);
template cudaError_t LaunchReverse<float>(const Params&, cudaStream_t, int);

}  // namespace bwd
}  // namespace flashkda
