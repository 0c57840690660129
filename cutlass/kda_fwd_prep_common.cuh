// Device helpers shared by the forward's two prep kernels (kda_fwd_prep.cu: any gate; kda_fwd_prep_bounded.cu:
// bounded gates): vector loads / stores of small row parts, the A_qk / T output row, and the tensor-core WY solve
// (T = (I + A_kk)^{-1}, then [W | U] = T R).
#pragma once

#include "kda_fwd_common.cuh"

namespace flashkda {
namespace fwd {
namespace prep {

using bf16 = __nv_bfloat16;

template <typename T, int N>
__device__ __forceinline__ void LoadVec(const T* p, float (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int E = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      uint4 u = reinterpret_cast<const uint4*>(p)[i];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < E; ++j) out[i * E + j] = ToF<T>(e[j]);
    }
  } else if constexpr (kBytes % 8 == 0) {
    constexpr int E = 8 / sizeof(T);
#pragma unroll
    for (int i = 0; i < kBytes / 8; ++i) {
      uint2 u = reinterpret_cast<const uint2*>(p)[i];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < E; ++j) out[i * E + j] = ToF<T>(e[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToF<T>(p[i]);
  }
}

__device__ __forceinline__ float Bf(bf16 x) { return __bfloat162float(x); }

// Elements c and c + 1 (c even, 4-byte aligned) of a bf16 row in shared memory: one 32-bit load instead of two
// 16-bit ones (the compiler cannot prove the alignment itself).
__device__ __forceinline__ float2 Bf2(const bf16* p) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p)); }

// Eight bf16 (16-byte aligned) of a shared-memory row as floats: one 128-bit load.
__device__ __forceinline__ void Bf8(const bf16* p, float (&out)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// N lane-parts of a row of bf16 (f32) in shared memory, from floats: one vector store (N = 2, 4 or 8).
template <int N>
__device__ __forceinline__ void StoreRowBf16(bf16* p, const float (&v)[N]) {
  static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 elements");
  uint32_t w[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) w[i] = PackBF16(v[2 * i], v[2 * i + 1]);
  if constexpr (N == 2) *reinterpret_cast<uint32_t*>(p) = w[0];
  if constexpr (N == 4) *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  if constexpr (N == 8) *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
template <int N>
__device__ __forceinline__ void StoreRowF32(float* p, const float (&v)[N]) {
  static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 elements");
  if constexpr (N == 2) *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
#pragma unroll
  for (int i = 0; i < N / 4; ++i) reinterpret_cast<float4*>(p)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

// WarpSum of N independent values, their shuffles interleaved (the same butterfly per value).
template <int N>
__device__ __forceinline__ void WarpSumRows(float (&x)[N]) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int u = 0; u < N; ++u) x[u] += __shfl_xor_sync(0xffffffffu, x[u], o);
}

// Token t's row of the prep's A_qk output (kAqkPitch: its A_qk row, then its row of T).
__device__ __forceinline__ bf16* AqkRow(const Params& p, int b, int t, int hv) {
  return p.Aqk + (((size_t)b * p.T + t) * p.HV + hv) * kAqkPitch;
}

// ---- WY solve, tensor cores (FLASHKDA_FWD_SOLVE=mma): T = (I + A_kk)^{-1} in fp32, then
// [W | U] = T (beta [exp(G) k | v]) with bf16 operands and fp32 accumulation. ----
//
// sAkk (pitch AP) holds A_kk transposed in its strict upper triangle: sAkk[j * AP + i] = A_ij, i > j. T is
// unit lower triangular and is written, untransposed, into the strict lower triangle, which is zero
// until then: sAkk[i * AP + j] = T_ij, i > j (the two never overlap, so no step reads what it writes).
// Blocks of 16: T_II = (I + A_II)^{-1} by substitution (InvertDiagBlocks), then, in order of distance
// d = I - J = 1, 2, 3, T_IJ = -T_II P with P = sum_{M=J}^{I-1} A_IM T_MJ (InvertOffDiagBlocks).

// T_II, I = 0..3: thread (I, j) of the first 64 forms column j of T_II in registers (no barrier: it
// reads only A). Writes fp32 T below the diagonal of sAkk. Column m of A_II is read as 16-byte pieces of its row
// of sAkk (from the piece holding element m + 1 on; the elements at or before m, which this step does not use, may
// be T values that other threads of the block are writing).
__device__ __forceinline__ void InvertDiagBlocks(float* sAkk, int tid) {
  constexpr int AP = kChunk + 4;
  static_assert(AP % 4 == 0, "16-byte aligned rows");
  if (tid < 64) {
    const int I = tid >> 4, j = tid & 15;
    float* blk = sAkk + 16 * I * AP + 16 * I;  // blk[m * AP + i] = A_II[i][m] (i > m); blk[i * AP + m] = T_II[i][m]
    float x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = i == j ? 1.f : 0.f;  // x[i] stays 0 for i < j
#pragma unroll
    for (int m = 0; m < 15; ++m) {
      float a[16];
#pragma unroll
      for (int q = (m + 1) / 4; q < 4; ++q) {
        const float4 v = *reinterpret_cast<const float4*>(blk + m * AP + 4 * q);
        a[4 * q] = v.x;
        a[4 * q + 1] = v.y;
        a[4 * q + 2] = v.z;
        a[4 * q + 3] = v.w;
      }
      const float xm = x[m];
#pragma unroll
      for (int i = m + 1; i < 16; ++i) x[i] -= a[i] * xm;
    }
#pragma unroll
    for (int i = 1; i < 16; ++i)
      if (i > j) blk[i * AP + j] = x[i];
  }
}

// T_ij of the fp32 T in sAkk for rows / columns of the blocks formed so far: below the diagonal from sAkk's
// lower triangle, 1 on it, 0 above (where sAkk holds A_kk transposed).
__device__ __forceinline__ float TAt(const float* sAkk, int i, int j) {
  constexpr int AP = kChunk + 4;
  return i > j ? sAkk[i * AP + j] : (i == j ? 1.f : 0.f);
}

// Mma3xTF32Parts accumulators, one set of three per k-step parity: cleared, and element e of their sum.
__device__ __forceinline__ void ClearParts(float (&d)[2][3][4]) {
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int y = 0; y < 3; ++y)
#pragma unroll
      for (int q = 0; q < 4; ++q) d[x][y][q] = 0.f;
}
__device__ __forceinline__ float SumParts(const float (&d)[2][3][4], int e) {
  return ((d[0][0][e] + d[1][0][e]) + (d[0][1][e] + d[1][1][e])) + (d[0][2][e] + d[1][2][e]);
}

// Round d of InvertOffDiagBlocks: warp w < 2 (4 - d) forms the 8-column half w & 1 of T_IJ, I = d + w / 2,
// J = I - d. P = sum_{M=J}^{I-1} A_IM T_MJ (2 d k-steps of 8), then T_IJ = -T_II P, both in 3xTF32; each k-step's
// three products go to their own accumulators, one set per k-step parity, so the mmas of a round are not one
// dependent chain (d = 3 was 24 in a row). P goes through T_IJ's place in sAkk (zero until then, and read by no
// other warp in round d) to become the second product's B operand.
template <int d>
__device__ __forceinline__ void InvertOffDiagRound(float* sAkk, bf16* sT, int warp, int lane) {
  constexpr int AP = kChunk + 4, TP = kChunk + 8;
  if (warp >= 2 * (4 - d)) return;
  const int gr = lane >> 2, t4 = lane & 3;
  const int I = d + (warp >> 1), J = I - d, n0 = 16 * J + 8 * (warp & 1);
  float acc[2][3][4];
  ClearParts(acc);
#pragma unroll
  for (int ks = 0; ks < 2 * d; ++ks) {
    const int m = 16 * J + 8 * ks + t4;  // k rows m and m + 4 of this lane
    // A_IM[i][m] = A_kk[16 I + i][m], stored transposed: sAkk[m * AP + 16 I + i]
    const float a[4] = {sAkk[m * AP + 16 * I + gr], sAkk[m * AP + 16 * I + gr + 8], sAkk[(m + 4) * AP + 16 * I + gr],
                        sAkk[(m + 4) * AP + 16 * I + gr + 8]};
    Mma3xTF32Parts(acc[ks & 1], a, TAt(sAkk, m, n0 + gr), TAt(sAkk, m + 4, n0 + gr));
  }
  float* pb = sAkk + 16 * I * AP + n0;  // T_IJ's 16 x 8 half block: P, then T_IJ
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    pb[(gr + 8 * (e >> 1)) * AP + 2 * t4 + (e & 1)] = SumParts(acc, e);
  }
  __syncwarp();
  float out[2][3][4];
  ClearParts(out);
#pragma unroll
  for (int kb = 0; kb < 2; ++kb) {
    const int i = 16 * I + gr, s = 16 * I + 8 * kb + t4;
    const float a[4] = {TAt(sAkk, i, s), TAt(sAkk, i + 8, s), TAt(sAkk, i, s + 4), TAt(sAkk, i + 8, s + 4)};
    Mma3xTF32Parts(out[kb], a, pb[(8 * kb + t4) * AP + gr], pb[(8 * kb + t4 + 4) * AP + gr]);
  }
  __syncwarp();
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int r = gr + 8 * (e >> 1), c = 2 * t4 + (e & 1);
    const float v = -SumParts(out, e);
    pb[r * AP + c] = v;
    sT[(16 * I + r) * TP + n0 + c] = __float2bfloat16(v);
  }
}

// Off-diagonal blocks of T (after a barrier behind InvertDiagBlocks), and all of T as bf16 into sT
// (pitch TP, 64 x 64; blocks above the diagonal are not written: the product never reads them). In order of
// distance d = I - J = 1, 2, 3 (InvertOffDiagRound), a barrier after each. Ends with a barrier.
__device__ __forceinline__ void InvertOffDiagBlocks(float* sAkk, bf16* sT, int tid) {
  constexpr int AP = kChunk + 4, TP = kChunk + 8;
  {
    const int r = tid & 15, c = tid >> 4;
#pragma unroll
    for (int I = 0; I < 4; ++I) {
      const int i = 16 * I + r, j = 16 * I + c;
      sT[i * TP + j] = __float2bfloat16(r > c ? sAkk[i * AP + j] : (r == c ? 1.f : 0.f));
    }
  }
  const int warp = tid >> 5, lane = tid & 31;
  InvertOffDiagRound<1>(sAkk, sT, warp, lane);
  __syncthreads();
  InvertOffDiagRound<2>(sAkk, sT, warp, lane);
  __syncthreads();
  InvertOffDiagRound<3>(sAkk, sT, warp, lane);
  __syncthreads();
}

// [W | U] = T R with R = [sRw | sRu] (bf16, rows = tokens; rows >= L are zero): each warp takes 16-column
// strips of the K + V columns, all 64 rows (4 m tiles; k blocks above the diagonal skipped), and writes its results
// back over the strip it read (no other warp reads it); after a barrier every thread copies whole rows of W and U out
// in 16-byte pieces (the fragments' 4-byte stores backed up the store queue: long-scoreboard stalls on their
// address registers). Ends with a barrier behind the smem writes, none after the copy.
template <int K>
__device__ __forceinline__ void SolveMma(const Params& p, const bf16* sT, bf16* sRw, bf16* sRu, int b, int cs, int L,
                                         int hv, int warp, int lane, int tid) {
  constexpr int TP = kChunk + 8, KP = K + 8;
  const int V = p.V, VP = V + 8, HV = p.HV;
  const int gr = lane >> 2, t4 = lane & 3;
  const bf16* a_base = sT + (lane & 15) * TP + (lane >> 4) * 8;
  const int b_off = (lane & 7) + ((lane >> 3) & 1) * 8;
  for (int n0 = warp * 16; n0 < K + V; n0 += kThreads / 2) {
    const bool isW = n0 < K;
    const int pitch = isW ? KP : VP;
    bf16* strip = isW ? sRw + n0 : sRu + (n0 - K);
    const bf16* b_base = strip + b_off * pitch + (lane >> 4) * 8;
    float acc[4][2][4];
#pragma unroll
    for (int I = 0; I < 4; ++I)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[I][n][q] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t b0, b1, b2, b3;
      LdsmT(b_base + kk * 16 * pitch, b0, b1, b2, b3);
#pragma unroll
      for (int I = kk; I < 4; ++I) {
        uint32_t a[4];
        Ldsm(a_base + I * 16 * TP + kk * 16, a[0], a[1], a[2], a[3]);
        Mma(acc[I][0], a, b0, b1);
        Mma(acc[I][1], a, b2, b3);
      }
    }
    __syncwarp();  // every lane's reads of the strip are done
#pragma unroll
    for (int I = 0; I < 4; ++I)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int n = 0; n < 2; ++n)
          *reinterpret_cast<uint32_t*>(strip + (16 * I + gr + 8 * hh) * pitch + 8 * n + 2 * t4) =
              PackBF16(acc[I][n][2 * hh], acc[I][n][2 * hh + 1]);
  }
  __syncthreads();
  const int kw = K / 8, nw = L * kw, nu = L * (V / 8);
  for (int idx = tid; idx < nw + nu; idx += kThreads) {
    const bool w = idx < nw;
    const int j = w ? idx : idx - nw, per = w ? kw : V / 8;
    const int r = j / per, c8 = (j - r * per) * 8;
    const uint4 v = *reinterpret_cast<const uint4*>((w ? sRw + r * KP : sRu + r * VP) + c8);
    const size_t row = ((size_t)b * p.T + cs + r) * HV + hv;
    *reinterpret_cast<uint4*>(w ? p.W + row * K + c8 : p.U + row * V + c8) = v;
  }
}

// Prep item `item` = (chunk of the plan's chunk list, value head).
struct PrepItem {
  int b, cs, send, s;  // batch row, chunk start, its sequence's end, state slot
  int L, hv, h;        // valid rows, value head, q / k head
};
// e: the item's chunk-list entry, p.chunk_list[item / p.HV] (fetched ahead by the bounded prep).
__device__ __forceinline__ PrepItem DecodePrepItem(const Params& p, int item, int4 e) {
  const int hv = item - (item / p.HV) * p.HV;
  return PrepItem{e.x, e.y, e.z, e.w, min(kChunk, e.z - e.y), hv, hv / p.group};
}
__device__ __forceinline__ PrepItem DecodePrepItem(const Params& p, int item) {
  return DecodePrepItem(p, item, p.chunk_list[item / p.HV]);
}

// cp.async of rows 0 .. 63 of a raw tile (rows >= L zero-filled) into dst (pitch dst_pitch elements): row r of the
// source at src + r * src_stride, RC 16-byte chunks per row (8 elements each, RC divides kThreads). Each thread copies
// one column chunk of every kThreads / RC-th row from one base address: fewer address instructions than deriving
// every copy's address from its index (kHoist of the Issue* helpers), but more live registers (the general prep
// spilled with it).
template <typename TIn, typename TDst>
__device__ __forceinline__ void CopyRawRows(TDst* dst, int dst_pitch, const TIn* src, size_t src_stride, int RC, int L,
                                            int tid) {
  const int rs = kThreads / RC, r0 = tid / RC, c8 = (tid - r0 * RC) * 8;
  const TIn* s0 = src + c8;
  for (int r = r0; r < kChunk; r += rs) {
    const bool ok = r < L;
    CpAsync16(dst + r * dst_pitch + c8, s0 + (ok ? r : 0) * src_stride, ok);
  }
}

// Raw-tile prefetch of a prep kernel (2-byte inputs): cp.async of the raw k and g tiles of item m (rows >= L
// zero-filled) into sK (pitch K + 8) and g_dst (row r at g_dst + r * g_pitch, TIn elements), one commit group.
// Issued as soon as the current item is done with both tiles, so that they land while its T and [W | U] are formed.
template <int K, typename TIn, bool kHoist = false>
__device__ __forceinline__ void IssueRawKG(const Params& p, const PrepItem& m, bf16* sK, TIn* g_dst, int g_pitch,
                                           int tid) {
  constexpr int C = kChunk, KP = K + 8;
  constexpr int KC = K * static_cast<int>(sizeof(TIn)) / 16;  // 16-byte chunks per row
  const TIn* gk = static_cast<const TIn*>(p.k);
  const TIn* gg = static_cast<const TIn*>(p.g);
  const size_t tok0 = (size_t)m.b * p.T + m.cs;
  if constexpr (kHoist) {
    CopyRawRows(sK, KP, gk + (tok0 * p.H + m.h) * K, (size_t)p.H * K, KC, m.L, tid);
    CopyRawRows(g_dst, g_pitch, gg + (tok0 * p.HV + m.hv) * K, (size_t)p.HV * K, KC, m.L, tid);
  } else {
    for (int idx = tid; idx < C * KC; idx += kThreads) {
      const int r = idx / KC, c8 = (idx - r * KC) * 8;
      const bool ok = r < m.L;
      const size_t tok = tok0 + (ok ? r : 0);
      CpAsync16(sK + r * KP + c8, gk + (tok * p.H + m.h) * K + c8, ok);
      CpAsync16(g_dst + r * g_pitch + c8, gg + (tok * p.HV + m.hv) * K + c8, ok);
    }
  }
  CpAsyncCommit();
}

// The raw q and v tiles of item m (2-byte inputs, rows >= L zero-filled) into sQ (pitch K + 8) and sV (pitch V + 8,
// TIn elements in place of its bf16 ones), one commit group each: q, then v.
template <int K, typename TIn, bool kHoist = false>
__device__ __forceinline__ void IssueRawQV(const Params& p, const PrepItem& m, bf16* sQ, bf16* sV, int tid) {
  constexpr int C = kChunk, KP = K + 8;
  const TIn* gq = static_cast<const TIn*>(p.q);
  const TIn* gv = static_cast<const TIn*>(p.v);
  const int V = p.V, VP = V + 8;
  const size_t tok0 = (size_t)m.b * p.T + m.cs;
  if constexpr (kHoist) {
    CopyRawRows(sQ, KP, gq + (tok0 * p.H + m.h) * K, (size_t)p.H * K, K / 8, m.L, tid);
  } else {
    for (int idx = tid; idx < C * (K / 8); idx += kThreads) {
      const int r = idx / (K / 8), c8 = (idx - r * (K / 8)) * 8;
      const bool ok = r < m.L;
      CpAsync16(sQ + r * KP + c8, gq + ((tok0 + (ok ? r : 0)) * p.H + m.h) * K + c8, ok);
    }
  }
  CpAsyncCommit();
  if constexpr (kHoist) {
    CopyRawRows(reinterpret_cast<TIn*>(sV), VP, gv + (tok0 * p.HV + m.hv) * V, (size_t)p.HV * V, V / 8, m.L, tid);
  } else {
    for (int idx = tid; idx < C * (V / 8); idx += kThreads) {
      const int r = idx / (V / 8), c8 = (idx - r * (V / 8)) * 8;
      const bool ok = r < m.L;
      CpAsync16(reinterpret_cast<TIn*>(sV + r * VP) + c8, gv + ((tok0 + (ok ? r : 0)) * p.HV + m.hv) * V + c8, ok);
    }
  }
  CpAsyncCommit();
}

// Rows 0 .. L - 1 of a 64 x 64 bf16 tile in shared memory (pitch kChunk + 8) into the A_qk output rows at column
// `col` (0: the A_qk half, kChunk: the T half; kAqkPitch).
// tid / nthreads: this thread's index among the nthreads doing it.
__device__ __forceinline__ void StoreAqkHalf(const Params& p, const bf16* tile, int b, int cs, int L, int hv, int col,
                                             int tid, int nthreads = kThreads) {
  constexpr int C = kChunk, QP = kChunk + 8;
  for (int idx = tid; idx < L * (C / 8); idx += nthreads) {
    const int r = idx / (C / 8), c8 = (idx - r * (C / 8)) * 8;
    *reinterpret_cast<uint4*>(AqkRow(p, b, cs + r, hv) + col + c8) = *reinterpret_cast<const uint4*>(tile + r * QP + c8);
  }
}

// One A task's results (16 x 16 block (I, J) of A_kk and A_qk, as m16n8k16 accumulators of its two 8-column halves)
// into shared memory: A_kk beta-scaled, strictly lower, transposed (sAkk, pitch kChunk + 4; A_kk[i][j] at
// sAkk[j * AP + i]), A_qk lower with the diagonal (sAqk, bf16, pitch kChunk + 8). diag: I == J (mask above).
__device__ __forceinline__ void StoreABlock(float* sAkk, bf16* sAqk, const float* sBeta, const float (&akk)[2][4],
                                            const float (&aqk)[2][4], int I, int J, bool diag, int lane) {
  constexpr int AP = kChunk + 4, QP = kChunk + 8;
  const int gr = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int row = 16 * I + gr + 8 * hh;
        const int col = 16 * J + 8 * n + 2 * t4 + e2;
        if (!diag || col < row) sAkk[col * AP + row] = sBeta[row] * akk[n][2 * hh + e2];
        if (!diag || col <= row) sAqk[row * QP + col] = __float2bfloat16(aqk[n][2 * hh + e2]);
      }
}

}  // namespace prep
}  // namespace fwd
}  // namespace flashkda
