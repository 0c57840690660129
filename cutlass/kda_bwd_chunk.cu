// flashkda_bwd, stage "grad2": the fully parallel per-(chunk, value head) gradients of the raw inputs (grad1,
// the chunk-state products, is kda_bwd_grad1.cu).
// See kda_bwd_common.cuh for the algorithm; tests/test_bwd_algorithm.py models every formula here.
#include <type_traits>

#include "kda_bwd_common.cuh"
#include "kda_env.h"
#include "kda_fwd_launch.h"


namespace flashkda {
namespace bwd {
namespace {

using bf16 = __nv_bfloat16;

using fwd::Sigmoid;
using fwd::Softplus;

// ------------------------------------------------------------------------------------------------------
// grad2: everything else of the chunk, recomputed in f32 from the raw inputs (see kda_bwd_common.cuh).
// ------------------------------------------------------------------------------------------------------
// sX also holds, with the tensor-core solve, two bf16 [C][WP] tiles from the item's start to stage 5: W | U and
// dW | dU (staged by cp.async while stages 1-3 run); WP = K + V + 8 keeps 16-byte rows and spreads the rows of
// the solve's fragment loads over the banks. sKdp's region holds, from the item's start to stage 4, the prep's
// T rows (bf16 [C][C], staged by cp.async) when grad2 takes T from the prep.
template <int K>
struct Grad2Smem {
  static constexpr int C = kChunk, V = K;
  static constexpr int GP = K + 1, BP = C + 1, XP = K + V + 1, WP = K + V + 8;
  static constexpr size_t XBytes() {
    const size_t f32 = static_cast<size_t>(C) * XP * 4, staged = 2 * static_cast<size_t>(C) * WP * 2;
    return f32 > staged ? f32 : staged;
  }
  static constexpr int kMaxWarps = 16;  // sKdp rows: one per warp of the widest variant
  static constexpr size_t KdpBytes() {
    const size_t kdp = static_cast<size_t>(kMaxWarps) * K * 4, t = static_cast<size_t>(C) * C * 2;
    return kdp > t ? kdp : t;
  }
  static constexpr int kGroups = kMaxWarps / 4;  // sDbp rows: DecayGradV2's channel groups of the widest variant
  static constexpr size_t Bytes() {
    return (2 * static_cast<size_t>(C) * GP + static_cast<size_t>(C) * BP + static_cast<size_t>(C) * XP + 2 * C) * 4 +
           KdpBytes() + XBytes() + static_cast<size_t>(kGroups) * C * 4;
  }
};

// ------------------------------------------------------------------------------------------------------
// grad2 v2 (the default; FLASHKDA_BWD_GRAD2=v1 selects the first version): grad2 with the decay products
// factored by 16x16 blocks, as in the forward
// prep's A_kk / A_qk (tests/test_bwd_algorithm.py: decay_product_factored / decay_product_grad_factored).
// Block (I, J), J <= I, takes a reference row r (off-diagonal: the last row of J, both factors <= 1;
// diagonal: row 7 of the block when max_c (G_first - G_last) <= 80, else exact pairwise decays), so that
//   M_IJ = Xr_I Yr_J^T,  dx_I += exp(G_I - G_r) o (dM_IJ Yr_J),  dy_J += exp(G_r - G_J) o (dM_IJ^T Xr_I)
// with Xr = x exp(G - G_r), Yr = y exp(G_r - G): bf16 tensor-core products, fp32 accumulation and scaling.
// The decay products' share of dG (x o dx - y o dy) is formed from the same bf16-rounded factors as the
// products themselves: dG_I += Xr~_I o (dM~_IJ Yr~_J), dG_J -= Yr~_J o (dM~_IJ^T Xr~_I) (~: bf16 as in the
// mma operands). In exact arithmetic dG sums to zero over a chunk (the reverse cumsum dg_t keeps only the
// pairs i >= t > j); with the same rounded values on both sides the pairs that do not straddle t still
// cancel to f32 accuracy. Forming it as x o dx - y o dy instead leaves their bf16 rounding (~2^-9 of every
// term, diagonal i = j included) in dg: with strong decays (bounded gates) dg is small next to those terms,
// and its error reached 0.13 (tests/test_bwd_precision_model.py models both).
// Grad2Kernel<K, TIn, kFactored = true, *> runs these in stages 3, 7a and 7b; everything else is shared with the
// default. Keep the factor expression x * __expf(G - G_r) (then bf16) the same on the operand side and in the
// dG epilogue: the cancellation above depends on both sides producing the same bits.
// ------------------------------------------------------------------------------------------------------

// k order of the bf16 m16n8k16 products over a 16-row block (DecayGradV2, Grad2SolveMma): the mma's k pair
// 2 t4 + 8 h (+1) of lane (gr, t4) takes rows 4 t4 + 2 h (+1) of the block, the same map for A and B (any
// permutation of k leaves the product unchanged). With the odd pitches (row stride = 1 bank) fragment loads of
// element (gr + .., k) hit bank gr + 4 t4 + .. (2-way) instead of gr + 2 t4 + .. (4-way).
__device__ __forceinline__ int KPerm16(int t4, int h) { return 4 * t4 + 2 * h; }

// Whether diagonal block I takes the factored path: its decay range stays within e^80 (whole warp).
template <int K>
__device__ __forceinline__ bool DiagFastV2(const float* sG, int GP, int I, int lane) {
  float m = 0.f;
  for (int c = lane; c < K; c += 32) m = fmaxf(m, sG[(16 * I) * GP + c] - sG[(16 * I + 15) * GP + c]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m <= 80.f;
}

// Gradients of the decay products M = sum_c x_ic y_jc exp(G_ic - G_jc) (j <= i) from dM (sB, f32, pitch BP;
// zero where j > i, and on the diagonal when strict): dx and dy, handed per element with their shares of dG
// to onx(i, c, dx, gx) (dG_i += gx, gx ~ x_i dx_i) and ony(j, c, dy, gy) (dG_j -= gy, gy ~ y_j dy_j; both
// from the rounded factors, see above; exact diagonal blocks: x_i dx_i, y_j dy_j in f32). Of the NW warps, warp
// w owns the rows of block Q = w & 3 and the channels of group w >> 2 of the NW / 4 groups of K, for dx (over
// J <= Q) and for dy (over I >= Q): no two warps touch the same (row, channel).
// kRowScale (7a without B_kk, see Grad2Kernel's kTPrep): sB holds dA and dM = diag(s) dA with s = rowscale
// (beta): the dx products take dA and scale their sums by s_i; the dy products take s_i x_i as their factor (so
// that both sides of the dG cancellation round the same values, s_i x_i exp(G_i - G_r)); onx's fifth argument is
// then x_ic D_ic, D the unscaled dx (sum_c of it over a row: sum_j dA_ij M_ij, the d beta_i of M = B_kk).
template <int K, int BP, int NW, bool kRowScale = false, typename FX, typename FY>
__device__ __forceinline__ void DecayGradV2(const float* sB, const float* sG, int GP, const float* x, int xp,
                                            const float* y, int yp, int warp, int lane, FX onx, FY ony,
                                            const float* rowscale = nullptr) {
  constexpr int NQ = NW / 4;         // channel groups
  constexpr int NT = K / (8 * NQ);   // n-tiles of 8 channels in a group
  static_assert(NW % 4 == 0 && NT >= 1, "four row blocks per channel group");
  const int Q = warp & 3, c0 = (warp >> 2) * (K / NQ);
  const int gr = lane >> 2, t4 = lane & 3;
  const bool dfast = DiagFastV2<K>(sG, GP, Q, lane);
  float acc[NT][4], accg[NT][4];  // dx (dy), and its share of dG
  // ---- dx of rows in block Q: sum over column blocks J <= Q ----
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = accg[n][e] = 0.f;
  for (int J = 0; J <= Q; ++J) {
    const bool diag = J == Q;
    if (diag && !dfast) {  // exact pairwise decays
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 16 * Q + gr + 8 * (e >> 1), c = c0 + 8 * n + 2 * t4 + (e & 1);
          const float gi = sG[i * GP + c];
          float s = 0.f;
          for (int j = 16 * Q; j <= i; ++j) s = fmaf(sB[i * BP + j] * y[j * yp + c], __expf(gi - sG[j * GP + c]), s);
          acc[n][e] += s;
          accg[n][e] = fmaf(kRowScale ? rowscale[i] * x[i * xp + c] : x[i * xp + c], s, accg[n][e]);
        }
      continue;
    }
    const int r = diag ? 16 * Q + 7 : 16 * J + 15;
    uint32_t a[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int i = 16 * Q + gr + 8 * (m & 1), j = 16 * J + KPerm16(t4, m >> 1);
      a[m] = fwd::PackBF16(sB[i * BP + j], sB[i * BP + j + 1]);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      uint32_t bb[2];
      {
        const int c = c0 + 8 * n + gr;
        const float grc = sG[r * GP + c];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int j = 16 * J + KPerm16(t4, hh);
          bb[hh] = fwd::PackBF16(y[j * yp + c] * __expf(grc - sG[j * GP + c]),
                                 y[(j + 1) * yp + c] * __expf(grc - sG[(j + 1) * GP + c]));
        }
      }
      float t[4] = {0.f, 0.f, 0.f, 0.f};
      fwd::Mma(t, a, bb[0], bb[1]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * Q + gr + 8 * (e >> 1), c = c0 + 8 * n + 2 * t4 + (e & 1);
        const float ei = __expf(sG[i * GP + c] - sG[r * GP + c]);
        acc[n][e] = fmaf(ei, t[e], acc[n][e]);
        // Xr~_ic: the bf16 value the dy products (below, other warps) take for this (i, c, r)
        const float xr = x[i * xp + c] * ei;
        accg[n][e] = fmaf(__bfloat162float(__float2bfloat16_rn(kRowScale ? xr * rowscale[i] : xr)), t[e], accg[n][e]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 16 * Q + gr + 8 * (e >> 1), c = c0 + 8 * n + 2 * t4 + (e & 1);
      if constexpr (kRowScale) {
        onx(i, c, rowscale[i] * acc[n][e], accg[n][e], x[i * xp + c] * acc[n][e]);
      } else {
        onx(i, c, acc[n][e], accg[n][e], 0.f);
      }
    }
  // ---- dy of rows (columns of M) in block Q: sum over row blocks I >= Q ----
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = accg[n][e] = 0.f;
  for (int I = Q; I < 4; ++I) {
    const bool diag = I == Q;
    if (diag && !dfast) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = 16 * Q + gr + 8 * (e >> 1), c = c0 + 8 * n + 2 * t4 + (e & 1);
          const float gj = sG[j * GP + c];
          float s = 0.f;
          for (int i = j; i < 16 * Q + 16; ++i) {
            const float xi = kRowScale ? rowscale[i] * x[i * xp + c] : x[i * xp + c];
            s = fmaf(sB[i * BP + j] * xi, __expf(sG[i * GP + c] - gj), s);
          }
          acc[n][e] += s;
          accg[n][e] = fmaf(y[j * yp + c], s, accg[n][e]);
        }
      continue;
    }
    const int r = diag ? 16 * Q + 7 : 16 * Q + 15;
    uint32_t a[4];  // dM^T: rows j of block Q, k = rows i of block I
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int j = 16 * Q + gr + 8 * (m & 1), i = 16 * I + KPerm16(t4, m >> 1);
      a[m] = fwd::PackBF16(sB[i * BP + j], sB[(i + 1) * BP + j]);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      uint32_t bb[2];
      {
        const int c = c0 + 8 * n + gr;
        const float grc = sG[r * GP + c];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = 16 * I + KPerm16(t4, hh);
          const float x0 = x[i * xp + c] * __expf(sG[i * GP + c] - grc);
          const float x1 = x[(i + 1) * xp + c] * __expf(sG[(i + 1) * GP + c] - grc);
          bb[hh] = kRowScale ? fwd::PackBF16(x0 * rowscale[i], x1 * rowscale[i + 1]) : fwd::PackBF16(x0, x1);
        }
      }
      float t[4] = {0.f, 0.f, 0.f, 0.f};
      fwd::Mma(t, a, bb[0], bb[1]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = 16 * Q + gr + 8 * (e >> 1), c = c0 + 8 * n + 2 * t4 + (e & 1);
        const float ej = __expf(sG[r * GP + c] - sG[j * GP + c]);
        acc[n][e] = fmaf(ej, t[e], acc[n][e]);
        // Yr~_jc: the bf16 value the dx products (above, other warps) take for this (j, c, r)
        accg[n][e] = fmaf(__bfloat162float(__float2bfloat16_rn(y[j * yp + c] * ej)), t[e], accg[n][e]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) ony(16 * Q + gr + 8 * (e >> 1), c0 + 8 * n + 2 * t4 + (e & 1), acc[n][e], accg[n][e]);
}

// B_kk[i][j] = sum_c k_ic k_jc exp(G_ic - G_jc) for j < i, 0 for j >= i inside the lower blocks (upper blocks
// are not written: nothing reads them). Ten 16x16 block tasks over the NW warps, as in the forward prep.
template <int K, int BP, int NW>
__device__ __forceinline__ void BkkV2(float* sB, const float* sG, const float* sK, int GP, int warp, int lane) {
  // Off-diagonal task t < 6 is block (I, J) = ({1, 2, 3, 2, 3, 3}[t], {0, 0, 0, 1, 1, 2}[t]), read as nibbles of
  // two constants (an indexed array would live in local memory).
  const int gr = lane >> 2, t4 = lane & 3;
  for (int task = warp; task < 10; task += NW) {
    const bool diag = task >= 6;
    const int I = diag ? task - 6 : (0x332321 >> (4 * task)) & 0xf;
    const int J = diag ? I : (0x211000 >> (4 * task)) & 0xf;
    const int r = diag ? 16 * I + 7 : 16 * J + 15;
    const bool fast = !diag || DiagFastV2<K>(sG, GP, I, lane);
    if (fast) {
      float acc[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll 2
      for (int kk = 0; kk < K / 16; ++kk) {
        // k order (a sum over channels): in the 32-channel step kk >> 1 lane (gr, t4) takes channels 8 t4 .. 8 t4 + 7,
        // the half kk & 1 of them in this k step (k = 2 t4 + 8 h (+1) -> cb + 2 h (+1)): conflict-free loads, GP odd.
        const int cb = (kk >> 1) * 32 + 8 * t4 + 4 * (kk & 1);
        uint32_t a[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const int i = 16 * I + gr + 8 * (m & 1);
          const int c = cb + 2 * (m >> 1);
          a[m] = fwd::PackBF16(sK[i * GP + c] * __expf(sG[i * GP + c] - sG[r * GP + c]),
                               sK[i * GP + c + 1] * __expf(sG[i * GP + c + 1] - sG[r * GP + c + 1]));
        }
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int j = 16 * J + 8 * n + gr;
          uint32_t bb[2];
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int c = cb + 2 * hh;
            bb[hh] = fwd::PackBF16(sK[j * GP + c] * __expf(sG[r * GP + c] - sG[j * GP + c]),
                                   sK[j * GP + c + 1] * __expf(sG[r * GP + c + 1] - sG[j * GP + c + 1]));
          }
          fwd::Mma(acc[n], a, bb[0], bb[1]);
        }
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * I + gr + 8 * (e >> 1), col = 16 * J + 8 * n + 2 * t4 + (e & 1);
          sB[row * BP + col] = (!diag || col < row) ? acc[n][e] : 0.f;
        }
    } else {
      // Exact pairwise decays (strong gates): the 136 pairs j <= i of the block, one per warp step.
      for (int q = 0; q < 136; ++q) {
        int li = static_cast<int>((sqrtf(8.f * q + 1.f) - 1.f) * 0.5f);
        while ((li + 1) * (li + 2) / 2 <= q) ++li;
        while (li * (li + 1) / 2 > q) --li;
        const int lj = q - li * (li + 1) / 2;
        const int i = 16 * I + li, j = 16 * I + lj;
        float s = 0.f;
        if (i > j) {
          for (int c = lane; c < K; c += 32) s = fmaf(sK[i * GP + c] * sK[j * GP + c], __expf(sG[i * GP + c] - sG[j * GP + c]), s);
          s = fwd::WarpSum(s);
        }
        if (lane == 0) sB[i * BP + j] = s;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// grad2's WY solve on tensor cores (the default; FLASHKDA_BWD_GRAD2_SOLVE=simt selects the substitutions;
// tests/test_grad2_solve_model.py models it):
// T = (I + A)^{-1}, A = diag(beta) B_kk, once per chunk in fp32 by 16x16 blocks, then
//   W | U = bf16(T) bf16(diag(beta) [e^G k | v]),   [dKb | dVb] = bf16(T)^T bf16([dW | dU])
// (fp32 accumulation) instead of the forward and back substitutions. T is formed by the forward prep's blocks and
// rounds (InvertDiagBlocks / InvertOffDiagBlocks, kda_fwd_prep_common.cuh), in fp32 FMAs where the forward's
// off-diagonal rounds use 3xTF32 mmas (so the two agree to ~fp32 rounding, not bit for bit), replicated here for
// grad2's layout: the forward's sAkk holds A^T in its strict upper and T in its strict lower
// triangle; grad2's sB holds B_kk (without beta) in its strict lower triangle, sB[i * BP + j] = B_ij (i > j), so
// T goes transposed into the strict upper one, sB[j * BP + i] = T_ij (i > j), A_ij = fp32(beta_i B_ij) as the
// substitution forms it. sB's diagonal is neither read nor written (T's unit diagonal is implied); stage 5 zeroes
// the upper triangle again once the products are done (7a of grad2 v2 reads the diagonal blocks whole).
// ------------------------------------------------------------------------------------------------------

// T_II, I = 0..3: thread (I, j) of the first 64 forms column j of T_II by substitution (reads only B, beta).
template <int BP>
__device__ __forceinline__ void Grad2InvertDiag(float* sB, const float* sBeta, int tid) {
  if (tid < 64) {
    const int I = tid >> 4, j = tid & 15;
    float* blk = sB + 16 * I * BP + 16 * I;  // blk[i * BP + m] = B_II[i][m] (i > m); blk[m * BP + i] = T_II[i][m]
    const float* bt = sBeta + 16 * I;
    float x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = i == j ? 1.f : 0.f;  // x[i] stays 0 for i < j
#pragma unroll
    for (int m = 0; m < 15; ++m) {
      const float xm = x[m];
#pragma unroll
      for (int i = m + 1; i < 16; ++i) x[i] -= (bt[i] * blk[i * BP + m]) * xm;
    }
#pragma unroll
    for (int i = 1; i < 16; ++i)
      if (i > j) blk[j * BP + i] = x[i];
  }
}

// Off-diagonal blocks of T (after a barrier behind Grad2InvertDiag), by distance d = I - J = 1, 2, 3:
// T_IJ = -T_II P, P = sum_{M=J}^{I-1} A_IM T_MJ. The blocks of one distance are independent: each group of
// 256 threads (NW / 8 groups) takes every (NW / 8)-th of them. Thread (r, c) = (tid & 15, (tid >> 4) & 15) of
// a group: a half warp holds one column c of P, and T_II P is formed with shuffles. Ends with a barrier.
template <int BP, int NW>
__device__ __forceinline__ void Grad2InvertOffDiag(float* sB, const float* sBeta, int tid) {
  constexpr int NG = NW / 8;
  static_assert(NW % 8 == 0, "groups of 256 threads");
  const int r = tid & 15, c = (tid >> 4) & 15, grp = tid >> 8;
#pragma unroll
  for (int d = 1; d < 4; ++d) {
    for (int I = d + grp; I < 4; I += NG) {
      const int J = I - d;
      const float br = sBeta[16 * I + r];
      const float* brow = sB + (16 * I + r) * BP;  // B_ij, i = 16 I + r, j < 16 I
      float* tcol = sB + (16 * J + c) * BP;        // T_ij, j = 16 J + c, i > j
      float pv = 0.f;                              // P[r][c]
#pragma unroll
      for (int s = 0; s < 16; ++s) {  // M = J: T_JJ[s][c] is 1 at s = c and 0 above
        const float t = s > c ? tcol[16 * J + s] : (s == c ? 1.f : 0.f);
        pv += (br * brow[16 * J + s]) * t;
      }
#pragma unroll
      for (int M = J + 1; M < I; ++M)
#pragma unroll
        for (int s = 0; s < 16; ++s) pv += (br * brow[16 * M + s]) * tcol[16 * M + s];
      float out = pv;  // (T_II P)[r][c] = P[r][c] + sum_{s < r} T_II[r][s] P[s][c]
#pragma unroll
      for (int s = 0; s < 15; ++s) {
        const float ps = __shfl_sync(0xffffffffu, pv, s, 16);
        if (s < r) out += sB[(16 * I + s) * BP + 16 * I + r] * ps;
      }
      tcol[16 * I + r] = -out;
    }
    __syncthreads();
  }
}

// T from the prep instead (kTPrep): the staged bf16 rows sTs[i * C + j] = T_ij (zero for j >= i) into
// sB's strict upper triangle as the inversion leaves it, sB[j * BP + i] = T_ij (i > j). The forward's T is the
// one its W | U came from; from the same A_kk the inversion above forms the same values to ~fp32 rounding, which
// the solve rounds to bf16 anyway.
template <int BP, int NT>
__device__ __forceinline__ void Grad2TFromStaged(float* sB, const bf16* sTs, int tid) {
  constexpr int C = kChunk;
  for (int idx = tid; idx < C * C / 2; idx += NT) {
    const int i = idx / (C / 2), j = 2 * (idx - i * (C / 2));
    if (j >= i) continue;
    const __nv_bfloat162 t = *reinterpret_cast<const __nv_bfloat162*>(sTs + i * C + j);
    sB[j * BP + i] = __low2float(t);
    if (j + 1 < i) sB[(j + 1) * BP + i] = __high2float(t);
  }
}

// Element (i, j) of T (kTrans: of T^T) from sB (see above): unit diagonal, zero above (below) it.
template <int BP, bool kTrans>
__device__ __forceinline__ float Grad2TAt(const float* sB, int i, int j) {
  const int a = kTrans ? j : i, b = kTrans ? i : j;  // T[a][b]
  return a > b ? sB[b * BP + a] : (a == b ? 1.f : 0.f);
}

// out(i, col, x) for the 64 x (K + V) product X = T R (kTrans: T^T R), rhs2(i, col) = R(i, col) | R(i + 1, col)
// as a bf16 pair (low half: row i; rows >= L are 0), T rounded to bf16, fp32 accumulation. Of the NW warps, warp w takes the 16-column strips
// 16 w, 16 (w + NW), ... (4 m tiles; the k blocks of T / T^T that are zero are skipped); A fragments are packed
// from T in f32.
template <int K, int BP, int NW, bool kTrans, typename FR, typename FO>
__device__ __forceinline__ void Grad2SolveMma(const float* sB, int warp, int lane, FR rhs2, FO out) {
  const int gr = lane >> 2, t4 = lane & 3;
  for (int n0 = warp * 16; n0 < 2 * K; n0 += NW * 16) {  // K + V = 2 K columns
    float acc[4][2][4];
#pragma unroll
    for (int I = 0; I < 4; ++I)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[I][n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t bb[2][2];  // R rows 16 kk + 2 t4 (+1) and + 8 (+9), column n0 + 8 n + gr
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          bb[n][hh] = rhs2(16 * kk + KPerm16(t4, hh), n0 + 8 * n + gr);
        }
#pragma unroll
      for (int I = 0; I < 4; ++I) {
        if (kTrans ? I > kk : I < kk) continue;  // T is lower block triangular, T^T upper
        uint32_t a[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const int i = 16 * I + gr + 8 * (m & 1), j = 16 * kk + KPerm16(t4, m >> 1);
          a[m] = fwd::PackBF16(Grad2TAt<BP, kTrans>(sB, i, j), Grad2TAt<BP, kTrans>(sB, i, j + 1));
        }
        fwd::Mma(acc[I][0], a, bb[0][0], bb[0][1]);
        fwd::Mma(acc[I][1], a, bb[1][0], bb[1][1]);
      }
    }
#pragma unroll
    for (int I = 0; I < 4; ++I)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) out(16 * I + gr + 8 * (e >> 1), n0 + 8 * n + 2 * t4 + (e & 1), acc[I][n][e]);
  }
}

// ---- stage 5 on tensor cores (kFactored): tf32 m16n8k8 mma (fwd::MmaTF32), fp32 accumulation ----
using fwd::MmaTF32;
using fwd::ToTF32;

// Stage 5 of the factored kernel: dA = -strict_tril(sY sX^T) (64 x 64 x (K + V), sX = W | U (f32; or bf16 with the
// tensor-core solve: exact in tf32), sY = dKb | dVb (f32, pitch YP), rounded to tf32 as mma operands: 2^-11 relative per operand; tests/test_grad2_stage5_model.py), then,
// for j < i,
//   sB[i][j] = beta_i dA_ij,   sB[j][i] = dA_ij B_ij   (B_ij = sB[i][j] before; the strict upper triangle of sB is
// dead here: T of the mma solve, or unused),
// and after a barrier thread i (< 64) sums row i's products from sB's strict upper column i in a fixed order (four
// running sums over j mod 4) into sDb[i] and zeroes them (the upper triangle ends 0, as 7a needs).
// Tasks: the ten lower 16x16 blocks (J <= I) split in two 8-column halves, 20 tasks over the NW warps.
// The mma's k index is mapped to columns so that the fragment loads are conflict-free with the odd pitch XP
// (bank = row + column mod 32): in a 32-column step, lane (gr, t4) takes columns 8 t4 + s and 8 t4 + 4 + s of
// the step for k = t4 and t4 + 4 of mma s (s = 0..3): every column once, the same map for A and B.
// !kWithB (Grad2Kernel's kTPrep: no B_kk in sB): sB[i][j] = dA_ij, sB[j][i] = 0 and sB[i][i] = 0, no d beta here
// (7a forms it).
template <int K, int BP, int XP, int YP, int NW, bool kWithB, typename TX>
__device__ __forceinline__ void Grad2DaMma(float* sB, const TX* sX, const float* sY, const float* sBeta,
                                           float* sDb, int warp, int lane, int tid) {
  const int gr = lane >> 2, t4 = lane & 3;
  for (int task = warp; task < 20; task += NW) {
    const int blk = task >> 1, n = task & 1;
    const bool diag = blk >= 6;
    // off-diagonal blocks 0..5: (I, J) = (1,0) (2,0) (3,0) (2,1) (3,1) (3,2), as BkkV2 (nibble tables, no local array)
    const int I = diag ? blk - 6 : (0x332321 >> (4 * blk)) & 15;
    const int J = diag ? I : (0x211000 >> (4 * blk)) & 15;
    const float* ya = sY + (16 * I + gr) * YP + 8 * t4;      // rows gr, gr + 8 of block I
    const TX* xb = sX + (16 * J + 8 * n + gr) * XP + 8 * t4;  // row (column of dA) gr of half n of block J
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
    for (int c0 = 0; c0 < 2 * K; c0 += 32) {  // K + V = 2 K columns
      float av[2][8], bv[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        av[0][u] = ya[c0 + u];
        av[1][u] = ya[8 * YP + c0 + u];
      }
      if constexpr (std::is_same_v<TX, bf16>) {  // 8 bf16 in one 16-byte load, widened exactly
        const uint4 w = *reinterpret_cast<const uint4*>(xb + c0);
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          bv[2 * u] = __uint_as_float(ws[u] << 16);
          bv[2 * u + 1] = __uint_as_float(ws[u] & 0xffff0000u);
        }
      } else {
#pragma unroll
        for (int u = 0; u < 8; ++u) bv[u] = xb[c0 + u];
      }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint32_t a[4];
        a[0] = ToTF32(av[0][s]);
        a[1] = ToTF32(av[1][s]);
        a[2] = ToTF32(av[0][s + 4]);
        a[3] = ToTF32(av[1][s + 4]);
        MmaTF32(acc, a, ToTF32(bv[s]), ToTF32(bv[s + 4]));
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 16 * I + gr + 8 * (e >> 1), j = 16 * J + 8 * n + 2 * t4 + (e & 1);
      if constexpr (kWithB) {
        if (j < i) {
          const float da = -acc[e];
          sB[j * BP + i] = da * sB[i * BP + j];
          sB[i * BP + j] = sBeta[i] * da;
        }
      } else if (j <= i) {
        sB[j * BP + i] = 0.f;
        sB[i * BP + j] = j < i ? -acc[e] : 0.f;
      }
    }
  }
  if constexpr (!kWithB) return;
  __syncthreads();
  if (tid < kChunk) {  // fixed order: four running sums over j mod 4, then (s0 + s1) + (s2 + s3)
    const int i = tid;
    float d4[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j0 = 0; j0 < i; j0 += 4) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int j = j0 + q;
        if (j < i) {
          d4[q] += sB[j * BP + i];
          sB[j * BP + i] = 0.f;
        }
      }
    }
    sDb[i] += (d4[0] + d4[1]) + (d4[2] + d4[3]);
  }
}

// Threads of a grad2 CTA: the default (kFactored and kMmaSolve) runs 16 warps on one item (one CTA per SM: its
// 214 KB of shared memory), twice the warps of the first versions to hide the latency of its stages; that caps
// it at 128 registers per thread. The other variants keep 8 warps (stages 3 and 5 of the first version map
// 256 threads onto the chunk's rows).
constexpr int Grad2Threads(bool factored, bool mma_solve) { return factored && mma_solve ? 512 : kThreads; }

// kFactored selects the v2 stages (3: BkkV2; 7a / 7b: DecayGradV2); kMmaSolve the tensor-core WY solve of stage 4
// (Grad2InvertDiag / Grad2InvertOffDiag / Grad2SolveMma); both true is the default, both false the first version.
// kTPrep (with kMmaSolve): T from the prep's rows (Grad2TFromStaged) instead of the inversion, whose code the
// default kernel then does not carry; B_kk is then not needed either (only d beta read it, rowsum(dA o B_kk)):
// stage 3 is skipped, stage 5 leaves dA itself in sB, and 7a takes diag(beta) dA as its dM (DecayGradV2's
// kRowScale), which also yields d beta's B_kk term, sum_c k_ic D_ic (per channel group into sDbp, then in order).
template <int K, typename TIn, bool kFactored, bool kMmaSolve, bool kTPrep = false>
__global__ void __launch_bounds__(Grad2Threads(kFactored, kMmaSolve), 1) Grad2Kernel(Params P) {
  static_assert(kMmaSolve || !kTPrep, "T from the prep feeds the tensor-core solve");
  constexpr int kNT = Grad2Threads(kFactored, kMmaSolve), kNW = kNT / 32;
  static_assert(!kTPrep || (kFactored && kNW == 4 * Grad2Smem<K>::kGroups), "7a's row scale: sDbp groups");
  using SM = Grad2Smem<K>;
  constexpr int C = kChunk, V = K, GP = SM::GP, BP = SM::BP, XP = SM::XP, WP = SM::WP;
  constexpr int PL = K / 32;  // channels per lane in row-per-warp steps
  constexpr int kRS = kNW;  // row stride of the row-per-warp steps (they take rows r0 and r0 + kRS)
  static_assert(C % (2 * kRS) == 0, "row-per-warp steps take two rows");
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) float smem[];
  float* sG = smem;            // [C][GP] cumulative log-decay
  float* sK = sG + C * GP;     // [C][GP] k (normalised)
  float* sB = sK + C * GP;     // [C][BP] B_kk, then dB, then dA_qk
  float* sX = sB + C * BP;     // [C][XP] W | U (kMmaSolve: sWUs, sDWUs), then q (scaled, normalised) | dq
  float* sY = sX + SM::XBytes() / 4;  // [C][XP] dKb | dVb, then dk | dG
  bf16* sWUs = reinterpret_cast<bf16*>(sX);  // kMmaSolve, item start to stage 5: [C][WP] W | U (bf16)
  bf16* sDWUs = sWUs + C * WP;               // kMmaSolve, item start to stage 4: [C][WP] dW | dU (bf16)
  float* sBeta = sY + C * XP;  // [C]
  float* sDb = sBeta + C;      // [C] d beta (effective)
  float* sKdp = sDb + C;       // [kNW][K] per warp: sum over its rows of Kd dKd (stage 6 -> stage 9)
  bf16* sTs = reinterpret_cast<bf16*>(sKdp);  // kTPrep, item start to stage 4: [C][C] the prep's T rows (bf16)
  float* sDbp = sKdp + SM::KdpBytes() / 4;     // kTPrep, 7a: [kGroups][C] per channel group: d beta of B_kk by row
  static_assert(kNW <= SM::kMaxWarps, "sKdp rows");
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int HV = p.HV, H = p.H;
  const int nitems = WindowChunkCount(P) * HV;
  const TIn* gq = static_cast<const TIn*>(p.q);
  const TIn* gk = static_cast<const TIn*>(p.k);
  const TIn* gv = static_cast<const TIn*>(p.v);
  const TIn* gg = static_cast<const TIn*>(p.g);
  const TIn* gb = static_cast<const TIn*>(p.beta);
  TIn* odv = static_cast<TIn*>(P.dv);
  TIn* odg = static_cast<TIn*>(P.dg);
  TIn* odb = static_cast<TIn*>(P.dbeta);
  TIn* odq = static_cast<TIn*>(P.dq);
  TIn* odk = static_cast<TIn*>(P.dk);
  const bool fin = FinishInGrad2(p);  // h == hv: dq / dk out of stage 10 (scale, l2norm), no finish pass
  const bool wu_prep = P.grad2_wu_prep;  // kMmaSolve: W | U from the prep workspace instead of solved again
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int ci = it / HV, hv = it - ci * HV;
    const int4 e = WindowChunk(P, ci);
    const int b = e.x, cs = e.y, se = e.z, s = e.w;
    const int L = min(C, se - cs);
    const int h = hv / p.group;
    const size_t tb = (size_t)b * p.T + cs;
    const size_t wb = WinRow(P, b, cs);  // scratch rows
    // a_log and dt_bias are loaded here and first used in stage 1, after its row loads are issued (a load
    // consumed right away would stall every warp at the start of each item).
    const bool has_a = p.gate_mode == 1 || (p.gate_mode == 2 && p.use_a_log);
    const float a_raw = has_a ? p.a_log[(size_t)b * HV + hv] : 0.f;
    float a_coef = 1.f;  // exp(a_raw), set in stage 1
    const float* dtb = p.dt_bias + ((size_t)b * HV + hv) * K;
    float dt1[PL];  // dt_bias of this lane's channels lane + 32 u
#pragma unroll
    for (int u = 0; u < PL; ++u) dt1[u] = p.gate_mode != 0 ? dtb[lane + 32 * u] : 0.f;
    __syncthreads();
    if constexpr (kMmaSolve) {
      // Stage 4's bf16 operands by cp.async, waited for after the diagonal inversion: dW | dU (grad1) and, with
      // wu_prep, W | U (prep). Rows >= L are zero-filled.
      constexpr int N8 = 2 * K / 8;  // 16-byte pieces of a row
      for (int idx = wu_prep ? tid : C * N8 + tid; idx < 2 * C * N8; idx += kNT) {
        const int dwu = idx >= C * N8;
        const int rem = idx - dwu * C * N8, r = rem / N8, c8 = (rem - r * N8) * 8;
        const size_t row = (tb + (r < L ? r : 0)) * HV + hv, wrow = (wb + (r < L ? r : 0)) * HV + hv;
        const bf16* src = dwu ? P.sWU + wrow * 2 * K + c8 : (c8 < K ? p.W + row * K + c8 : p.U + row * V + (c8 - K));
        fwd::CpAsync16((dwu ? sDWUs : sWUs) + r * WP + c8, src, r < L);
      }
      if constexpr (kTPrep) {  // T rows (bf16, after the A_qk row: fwd::kAqkPitch); rows >= L zero, as T's there
        for (int idx = tid; idx < C * (C / 8); idx += kNT) {
          const int r = idx / (C / 8), c8 = (idx - r * (C / 8)) * 8;
          const size_t row = (tb + (r < L ? r : 0)) * HV + hv;
          fwd::CpAsync16(sTs + r * C + c8, p.Aqk + row * fwd::kAqkPitch + C + c8, r < L);
        }
      }
      fwd::CpAsyncCommit();
    }
    // ---- 1. rows: k (l2norm), effective gate, effective beta ----
    // Two rows per warp step (r0, r0 + kRS): both rows' global loads are issued before either row is reduced.
    for (int r0 = warp; r0 < C; r0 += 2 * kRS) {
      float kv[2][PL], graw[2][PL], braw[2];
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int r = r0 + h2 * kRS;
        const bool ok = r < L;
#pragma unroll
        for (int u = 0; u < PL; ++u) {
          const int c = lane + 32 * u;
          kv[h2][u] = ok ? fwd::ToF<TIn>(gk[((tb + r) * H + h) * K + c]) : 0.f;
          graw[h2][u] = ok ? fwd::ToF<TIn>(gg[((tb + r) * HV + hv) * K + c]) : 0.f;
        }
        braw[h2] = (ok && lane == 0) ? fwd::ToF<TIn>(gb[(tb + r) * HV + hv]) : 0.f;
      }
      a_coef = has_a ? __expf(a_raw) : 1.f;
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int r = r0 + h2 * kRS;
        const bool ok = r < L;
        float ss = 0.f;
#pragma unroll
        for (int u = 0; u < PL; ++u) ss += kv[h2][u] * kv[h2][u];
        const float ks = p.qk_l2norm ? rsqrtf(fwd::WarpSum(ss) + 1e-6f) : 1.f;
#pragma unroll
        for (int u = 0; u < PL; ++u) {
          const int c = lane + 32 * u;
          sK[r * GP + c] = kv[h2][u] * ks;
          sG[r * GP + c] = ok ? fwd::GateActivation(p, graw[h2][u], dt1[u], a_coef) : 0.f;
        }
        if (lane == 0) {
          sBeta[r] = fwd::ActivateBeta(p, braw[h2], ok);
          sDb[r] = 0.f;
        }
      }
    }
    __syncthreads();
    // ---- 2. G = inclusive cumsum (rows >= L have g = 0: G stays at G_{L-1}) ----
    for (int c = tid; c < K; c += kNT) {
      float run = 0.f;
      for (int r = 0; r < C; ++r) {
        run += sG[r * GP + c];
        sG[r * GP + c] = run;
      }
    }
    __syncthreads();
    // ---- 3. B_kk[i][j] = sum_c k_ic k_jc exp(G_ic - G_jc), j < i (factored 16x16 blocks: BkkV2) ----
    if constexpr (kFactored) {
      if constexpr (!kTPrep) BkkV2<K, BP, kNW>(sB, sG, sK, GP, warp, lane);
    } else {
      const int i = tid >> 2, q4 = tid & 3;
      for (int j = q4; j < C; j += 4) {
        float acc = 0.f;
        if (j < i) {
          for (int c = 0; c < K; ++c) acc = fmaf(sK[i * GP + c] * sK[j * GP + c], __expf(sG[i * GP + c] - sG[j * GP + c]), acc);
        }
        sB[i * BP + j] = acc;
      }
    }
    __syncthreads();
    // ---- 4. W | U by forward substitution; dKb | dVb by back substitution (one column per thread); kMmaSolve:
    // T = (I + diag(beta) B_kk)^{-1} into sB's upper triangle, W | U = T R and dKb | dVb = T^T [dW | dU] ----
    if constexpr (kMmaSolve) {
      if constexpr (!kTPrep) Grad2InvertDiag<BP>(sB, sBeta, tid);
      fwd::CpAsyncWait<0>();  // the staged W | U, dW | dU (and T)
      __syncthreads();
      if constexpr (kTPrep) {
        Grad2TFromStaged<BP, kNT>(sB, sTs, tid);
        __syncthreads();
      } else {
        Grad2InvertOffDiag<BP, kNW>(sB, sBeta, tid);  // ends with a barrier
      }
      if (!wu_prep) {
        // W | U solved again (FLASHKDA_BWD_GRAD2_WU=solve): R = diag(beta) [e^G k | v] (rows >= L: 0), formed as the
        // substitution forms it; the fp32 results are rounded to bf16 like the prep's W | U (which wu_prep staged).
        auto rhs = [&](int i, int col) {
          float x = 0.f;
          if (i < L) {
            x = col < K ? __expf(sG[i * GP + col]) * sK[i * GP + col] : fwd::ToF<TIn>(gv[((tb + i) * HV + hv) * V + col - K]);
          }
          return sBeta[i] * x;
        };
        Grad2SolveMma<K, BP, kNW, false>(
            sB, warp, lane, [&](int i, int col) { return fwd::PackBF16(rhs(i, col), rhs(i + 1, col)); },
            [&](int i, int col, float x) { sWUs[i * WP + col] = __float2bfloat16(x); });
      }
      Grad2SolveMma<K, BP, kNW, true>(
          sB, warp, lane,
          [&](int i, int col) {  // rows i, i + 1 of the staged dW | dU
            const bf16* s2 = sDWUs + i * WP + col;
            return static_cast<uint32_t>(__bfloat16_as_ushort(s2[0])) |
                   (static_cast<uint32_t>(__bfloat16_as_ushort(s2[WP])) << 16);
          },
          [&](int i, int col, float x) { sY[i * XP + col] = x; });
    } else {
      for (int col = tid; col < K + V; col += kNT) {
        float x[C];
#pragma unroll
        for (int i = 0; i < C; ++i) {
          float rhs = 0.f;
          if (i < L) {
            rhs = col < K ? __expf(sG[i * GP + col]) * sK[i * GP + col]
                          : fwd::ToF<TIn>(gv[((tb + i) * HV + hv) * V + col - K]);
          }
          x[i] = sBeta[i] * rhs;
        }
        // Right-looking: x_i -= beta_i B_ij x_j for i > j, once x_j is final.
#pragma unroll
        for (int j = 0; j < C - 1; ++j) {
          const float xj = x[j];
#pragma unroll
          for (int i = j + 1; i < C; ++i) x[i] = fmaf(-sBeta[i] * sB[i * BP + j], xj, x[i]);
        }
#pragma unroll
        for (int i = 0; i < C; ++i) sX[i * XP + col] = x[i];
#pragma unroll
        for (int i = 0; i < C; ++i) x[i] = i < L ? __bfloat162float(P.sWU[((wb + i) * HV + hv) * (K + V) + col]) : 0.f;
        // Right-looking back substitution: y_i -= beta_j B_ji y_j for i < j, once y_j is final.
#pragma unroll
        for (int j = C - 1; j > 0; --j) {
          const float yj = x[j] * sBeta[j];
#pragma unroll
          for (int i = 0; i < j; ++i) x[i] = fmaf(-sB[j * BP + i], yj, x[i]);
        }
#pragma unroll
        for (int i = 0; i < C; ++i) sY[i * XP + col] = x[i];
      }
    }
    __syncthreads();
    // ---- 5. dA = -strict_tril(dKb W^T + dVb U^T); dbeta += rowsum(dA * B); dB = diag(beta) dA (in place) ----
    if constexpr (kFactored) {
      if constexpr (kMmaSolve) {
        Grad2DaMma<K, BP, WP, XP, kNW, !kTPrep>(sB, sWUs, sY, sBeta, sDb, warp, lane, tid);
      } else {
        Grad2DaMma<K, BP, XP, XP, kNW, true>(sB, sX, sY, sBeta, sDb, warp, lane, tid);
      }
    } else {
      const int i = tid >> 2, q4 = tid & 3;
      float db = 0.f;
      for (int j = q4; j < i; j += 4) {
        float acc = 0.f;
        for (int c = 0; c < K + V; ++c) {
          const float wu = kMmaSolve ? __bfloat162float(sWUs[j * WP + c]) : sX[j * XP + c];
          acc = fmaf(sY[i * XP + c], wu, acc);
        }
        const float da = -acc;
        db = fmaf(da, sB[i * BP + j], db);
        sB[i * BP + j] = sBeta[i] * da;
      }
      db += __shfl_xor_sync(0xffffffffu, db, 1);
      db += __shfl_xor_sync(0xffffffffu, db, 2);
      if (q4 == 0) sDb[i] += db;
      if constexpr (kMmaSolve) {  // T out of the upper triangle (v2's 7a reads the diagonal blocks whole)
        for (int j = i + 1 + q4; j < C; j += 4) sB[i * BP + j] = 0.f;
      }
    }
    __syncthreads();
    // ---- 6. Vb = beta v, Kb = beta e^G k terms, and the chunk-state terms of Qg = e^G q and Kd = e^(G_last - G) k
    // (grad1's dQg, dKd; stage 8 until session 7, hence no stage 8 below); q and dq into sX; dk | dG into sY.
    // Lane c (+ 32 u) also sums Kd dKd over its warp's rows for stage 9's G_last term (sKdp). Two rows per warp
    // step (r0, r0 + kRS): both rows' global loads first.
    const int gidx = GammaIndex(p, cs, se, s);
    // stage 9's dgamma of channel tid (tid < K), loaded here so that its latency overlaps stages 6-7
    const float dgam_c = (tid < K && gidx >= 0) ? P.dgam[(((size_t)b * p.NG + gidx) * HV + hv) * K + tid] : 0.f;
    {
      float glc[PL], kdp[PL];  // G_last of this lane's channels; the Kd dKd sums
#pragma unroll
      for (int u = 0; u < PL; ++u) {
        glc[u] = sG[(C - 1) * GP + lane + 32 * u];
        kdp[u] = 0.f;
      }
      for (int r0 = warp; r0 < C; r0 += 2 * kRS) {
        float vv[2][PL], qv[2][PL], dqg[2][PL], dkd[2][PL];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const int r = r0 + h2 * kRS;
          const bool ok = r < L;
#pragma unroll
          for (int u = 0; u < PL; ++u) {
            const int c = lane + 32 * u;
            const size_t o = ((wb + r) * HV + hv) * K + c;
            vv[h2][u] = ok ? fwd::ToF<TIn>(gv[((tb + r) * HV + hv) * V + c]) : 0.f;
            qv[h2][u] = ok ? fwd::ToF<TIn>(gq[((tb + r) * H + h) * K + c]) : 0.f;
            dqg[h2][u] = ok ? P.sQg[o] : 0.f;
            dkd[h2][u] = ok ? P.sKd[o] : 0.f;
          }
        }
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const int r = r0 + h2 * kRS;
          const bool ok = r < L;
          const float bt = sBeta[r];
          float db = 0.f, sq = 0.f;
#pragma unroll
          for (int u = 0; u < PL; ++u) sq += qv[h2][u] * qv[h2][u];
          const float qs = p.scale * (p.qk_l2norm ? rsqrtf(fwd::WarpSum(sq) + 1e-6f) : 1.f);
#pragma unroll
          for (int u = 0; u < PL; ++u) {
            const int c = lane + 32 * u;
            const float dvb = sY[r * XP + K + c];
            const float dkb = sY[r * XP + c];
            const float g = sG[r * GP + c];
            const float eg = __expf(g), dec = __expf(glc[u] - g);
            const float kc = sK[r * GP + c], qc = qv[h2][u] * qs, kdec = dec * kc;
            if (ok) {
              const size_t o = ((tb + r) * HV + hv) * V + c;
              db = fmaf(vv[h2][u], dvb, db);
              odv[o] = fwd::FromF<TIn>(bt * dvb);
            }
            db = fmaf(eg * kc, dkb, db);
            sY[r * XP + c] = bt * eg * dkb + dec * dkd[h2][u];                                  // dk
            sY[r * XP + K + c] = bt * eg * kc * dkb + eg * qc * dqg[h2][u] - kdec * dkd[h2][u];  // dG
            sX[r * XP + c] = qc;                   // q
            sX[r * XP + K + c] = eg * dqg[h2][u];  // dq
            kdp[u] = fmaf(kdec, dkd[h2][u], kdp[u]);
          }
          db = fwd::WarpSum(db);
          if (lane == 0) sDb[r] += db;
        }
      }
#pragma unroll
      for (int u = 0; u < PL; ++u) sKdp[warp * K + lane + 32 * u] = kdp[u];
    }
    __syncthreads();
    // ---- 7a. B_kk = decay product (k, k), strict: dk += dx + dy, dG += k dx - k dy ----
    if constexpr (kFactored) {
      float dbr[2] = {0.f, 0.f};  // kTPrep: this lane's share of d beta for rows 16 Q + gr (+ 8)
      DecayGradV2<K, BP, kNW, kTPrep>(
          sB, sG, GP, sK, GP, sK, GP, warp, lane,
          [&](int i, int c, float dx, float gx, float db) {
            sY[i * XP + c] += dx;
            sY[i * XP + K + c] += gx;
            dbr[(i >> 3) & 1] += db;
          },
          [&](int j, int c, float dy, float gy) {
            sY[j * XP + c] += dy;
            sY[j * XP + K + c] -= gy;
          },
          sBeta);
      if constexpr (kTPrep) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          dbr[h] += __shfl_xor_sync(0xffffffffu, dbr[h], 1);
          dbr[h] += __shfl_xor_sync(0xffffffffu, dbr[h], 2);
          if ((lane & 3) == 0) sDbp[(warp >> 2) * C + 16 * (warp & 3) + (lane >> 2) + 8 * h] = dbr[h];
        }
      }
    } else {
      for (int idx = tid; idx < C * K; idx += kNT) {
        const int r = idx / K, c = idx % K;
        const float gr = sG[r * GP + c], kr = sK[r * GP + c];
        float dx = 0.f, dy = 0.f;
        for (int j = 0; j < r; ++j) dx = fmaf(sB[r * BP + j] * sK[j * GP + c], __expf(gr - sG[j * GP + c]), dx);
        for (int i = r + 1; i < C; ++i) dy = fmaf(sB[i * BP + r] * sK[i * GP + c], __expf(sG[i * GP + c] - gr), dy);
        sY[r * XP + c] += dx + dy;
        sY[r * XP + K + c] += kr * (dx - dy);
      }
    }
    __syncthreads();
    if constexpr (kTPrep) {  // d beta's B_kk term: the channel groups' sums in order
      if (tid < C) {
        float s = 0.f;
#pragma unroll
        for (int g = 0; g < Grad2Smem<K>::kGroups; ++g) s += sDbp[g * C + tid];
        sDb[tid] += s;
      }
    }
    {  // dA_qk into sB: all of a thread's global loads first, then the smem stores
      constexpr int kN = C * C / kNT;
      static_assert(C * C % kNT == 0, "");
      float va[kN];
#pragma unroll
      for (int u = 0; u < kN; ++u) {
        const int idx = tid + u * kNT, r = idx / C, c = idx % C;
        va[u] = r < L ? P.sA[((wb + r) * HV + hv) * C + c] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kN; ++u) {
        const int idx = tid + u * kNT, r = idx / C, c = idx % C;
        sB[r * BP + c] = va[u];
      }
    }
    __syncthreads();
    // ---- 7b. A_qk = decay product (q, k), lower incl. diagonal: dq += dx, dk += dy, dG += q dx - k dy ----
    if constexpr (kFactored) {
      DecayGradV2<K, BP, kNW>(
          sB, sG, GP, sX, XP, sK, GP, warp, lane,
          [&](int i, int c, float dx, float gx, float) {
            sX[i * XP + K + c] += dx;
            sY[i * XP + K + c] += gx;
          },
          [&](int j, int c, float dy, float gy) {
            sY[j * XP + c] += dy;
            sY[j * XP + K + c] -= gy;
          });
    } else {
      for (int idx = tid; idx < C * K; idx += kNT) {
        const int r = idx / K, c = idx % K;
        const float gr = sG[r * GP + c], kr = sK[r * GP + c], qr = sX[r * XP + c];
        float dx = 0.f, dy = 0.f;
        for (int j = 0; j <= r; ++j) dx = fmaf(sB[r * BP + j] * sK[j * GP + c], __expf(gr - sG[j * GP + c]), dx);
        for (int i = r; i < C; ++i) dy = fmaf(sB[i * BP + r] * sX[i * XP + c], __expf(sG[i * GP + c] - gr), dy);
        sX[r * XP + K + c] += dx;
        sY[r * XP + c] += dy;
        sY[r * XP + K + c] += qr * dx - kr * dy;
      }
    }
    __syncthreads();
    // G_last collects sum_i Kd_i dKd_i + gamma dgamma: stage 6's per-warp partials of channel c in warp order.
    if (tid < K) {
      const int c = tid;
      float acc = gidx >= 0 ? __expf(sG[(C - 1) * GP + c]) * dgam_c : 0.f;
#pragma unroll
      for (int w = 0; w < kNW; ++w) acc += sKdp[w * K + c];
      // ---- 9. reverse cumsum of dG inside the chunk (this thread owns channel c) ----
      float run = acc;
      for (int r = L - 1; r >= 0; --r) {
        run += sY[r * XP + K + c];
        sY[r * XP + K + c] = run;
      }
    }
    __syncthreads();
    // ---- 10. outputs: dg (gate chain), gate-parameter terms, dbeta, dq / dk (effective; fin: final) ----
    // Two rows per warp step (r0, r0 + kRS): both rows' global loads (raw gate, raw beta; fin with l2norm:
    // raw q, k) first.
    const bool fin_l2 = fin && p.qk_l2norm;
    for (int r0 = warp; r0 < L; r0 += 2 * kRS) {
      float graw[2][PL], braw[2], dtv[PL], qraw[2][PL], kraw[2][PL];
#pragma unroll
      for (int u = 0; u < PL; ++u) dtv[u] = p.gate_mode != 0 ? dtb[lane + 32 * u] : 0.f;
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int r = r0 + h2 * kRS;
        const bool ok = r < L;
        const size_t tok = tb + r;
#pragma unroll
        for (int u = 0; u < PL; ++u) {
          const int c = lane + 32 * u;
          graw[h2][u] = (ok && p.gate_mode != 0) ? fwd::ToF<TIn>(gg[(tok * HV + hv) * K + c]) : 0.f;
          qraw[h2][u] = (ok && fin_l2) ? fwd::ToF<TIn>(gq[(tok * H + h) * K + c]) : 0.f;
          kraw[h2][u] = (ok && fin_l2) ? fwd::ToF<TIn>(gk[(tok * H + h) * K + c]) : 0.f;
        }
        braw[h2] = (ok && lane == 0 && p.beta_sigmoid) ? fwd::ToF<TIn>(gb[tok * HV + hv]) : 0.f;
      }
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int r = r0 + h2 * kRS;
        if (r >= L) break;  // warp-uniform
        const size_t tok = tb + r;
        float da = 0.f;
#pragma unroll
        for (int u = 0; u < PL; ++u) {
          const int c = lane + 32 * u;
          const size_t o = (tok * HV + hv) * K + c;
          const float dge = sY[r * XP + K + c];
          float dgr = dge;
          if (p.gate_mode != 0) {
            const float x = graw[h2][u] + dtv[u];
            if (p.gate_mode == 1) {
              dgr = -a_coef * Sigmoid(x) * dge;
              da = fmaf(dge, -a_coef * Softplus(x), da);
            } else {
              const float z = p.use_a_log ? a_coef * x : x;
              const float sg = Sigmoid(z);
              const float dz = p.lower_bound * sg * (1.f - sg) * dge;
              dgr = p.use_a_log ? a_coef * dz : dz;
              if (p.use_a_log) da = fmaf(dz, z, da);
            }
            sK[r * GP + c] = dgr;  // summed over the chunk below (sK is free after stage 7b)
          }
          odg[o] = fwd::FromF<TIn>(dgr);
          if (!fin) {
            const size_t ow = ((wb + r) * HV + hv) * K + c;
            P.sQg[ow] = sX[r * XP + K + c];
            P.sKd[ow] = sY[r * XP + c];
          }
        }
        if (fin) {  // as Finish with one value head: dq = scale dq_eff, then both through the l2norm
          float dqv[PL], dkv[PL];
#pragma unroll
          for (int u = 0; u < PL; ++u) {
            dqv[u] = sX[r * XP + K + lane + 32 * u] * p.scale;
            dkv[u] = sY[r * XP + lane + 32 * u];
          }
          if (fin_l2) {
            L2NormBackwardRow<PL>(dqv, qraw[h2]);
            L2NormBackwardRow<PL>(dkv, kraw[h2]);
          }
#pragma unroll
          for (int u = 0; u < PL; ++u) {
            const size_t o = (tok * H + h) * K + lane + 32 * u;
            odq[o] = fwd::FromF<TIn>(dqv[u]);
            odk[o] = fwd::FromF<TIn>(dkv[u]);
          }
        }
        da = fwd::WarpSum(da);
        if (lane == 0) {
          sBeta[r] = da;  // summed over the chunk below (sBeta is free after stage 6)
          float db = sDb[r];
          if (p.beta_sigmoid) {
            const float sg = Sigmoid(braw[h2]);
            db *= (p.allow_neg ? 2.f : 1.f) * sg * (1.f - sg);
          }
          odb[tok * HV + hv] = fwd::FromF<TIn>(db);
        }
      }
    }
    if (p.gate_mode != 0) {
      // The chunk's sums of d(gate input) per channel and of d a_log, rows in order, to the row of its first
      // token (sDgr over that row's dW | dU, read in stage 4; sDa): ReduceGateTiles adds the chunk-start rows.
      __syncthreads();
      if (tid <= K) {
        float sum = 0.f;
        if (tid < K) {
          for (int r = 0; r < L; ++r) sum += sK[r * GP + tid];
          P.sDgr[(wb * HV + hv) * K + tid] = sum;
        } else {
          for (int r = 0; r < L; ++r) sum += sBeta[r];
          P.sDa[wb * HV + hv] = sum;
        }
      }
    }
  }
}


}  // namespace

namespace {
// Grad2Kernel<K, TIn, true, .> (factored decay products on tensor cores) is the default; FLASHKDA_BWD_GRAD2=v1
// selects Grad2Kernel<K, TIn, false, .> (pairwise exponentials, SIMT: the first version, kept as a reference for
// the tests). Read once per process, at the first launch.
bool Grad2V2Selected() {
  static const bool on = !EnvEquals("FLASHKDA_BWD_GRAD2", "v1");
  return on;
}

// With the tensor-core solve, stage 4 takes W | U from the prep workspace (bf16, what the forward used) by
// default; FLASHKDA_BWD_GRAD2_WU=solve solves them again from the raw inputs (fp32 results of bf16 products, the
// session-4 default). Read once per process, at the first launch.
bool Grad2WuFromPrep() {
  static const bool on = !EnvEquals("FLASHKDA_BWD_GRAD2_WU", "solve");
  return on;
}

// Grad2Kernel<K, TIn, ., true> (the WY solve of stage 4 on tensor cores, bf16 operands) is the default;
// FLASHKDA_BWD_GRAD2_SOLVE=simt selects the fp32 substitutions. Read once per process, at the first launch.
bool Grad2MmaSolveSelected() {
  static const bool on = !EnvEquals("FLASHKDA_BWD_GRAD2_SOLVE", "simt");
  return on;
}

// With the tensor-core solve, stage 4 takes T from the prep's A_qk rows (fwd::kAqkPitch) where the prep solved on
// tensor cores (bf16 / fp16 inputs by default); FLASHKDA_BWD_GRAD2_T=invert inverts I + A_kk again (the session-9
// default). Read once per process, at the first launch.
bool Grad2TFromPrep() {
  static const bool on = !EnvEquals("FLASHKDA_BWD_GRAD2_T", "invert");
  return on;
}

template <int K, typename TIn>
cudaError_t LaunchGrad2K(const Params& p, cudaStream_t stream, int nsm, long long items) {
  const bool v2 = Grad2V2Selected(), mma = Grad2MmaSolveSelected();
  Params q = p;
  q.grad2_wu_prep = mma && Grad2WuFromPrep() ? 1 : 0;
  const bool t_prep = mma && Grad2TFromPrep() && fwd::PrepSolvesOnTensorCores<TIn>();
  constexpr size_t smem = Grad2Smem<K>::Bytes();
  if (v2 && mma) {
    constexpr int kNT = Grad2Threads(true, true);
    return t_prep ? fwd::LaunchGrid<kNT>(Grad2Kernel<K, TIn, true, true, true>, smem, items, 4, q, stream, nsm)
                  : fwd::LaunchGrid<kNT>(Grad2Kernel<K, TIn, true, true, false>, smem, items, 4, q, stream, nsm);
  }
  auto kernel = v2 ? Grad2Kernel<K, TIn, true, false>
                   : (mma ? Grad2Kernel<K, TIn, false, true> : Grad2Kernel<K, TIn, false, false>);
  return fwd::LaunchGrid(kernel, smem, items, 4, q, stream, nsm);
}
}  // namespace

template <typename TIn>
cudaError_t LaunchGrad2(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV;
  switch (p.f.K) {
    case 64: return LaunchGrad2K<64, TIn>(p, stream, nsm, items);
    case 128: return LaunchGrad2K<128, TIn>(p, stream, nsm, items);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t LaunchGrad2<__nv_bfloat16>(const Params&, cudaStream_t, int);
template cudaError_t LaunchGrad2<__half>(const Params&, cudaStream_t, int);
template cudaError_t LaunchGrad2<float>(const Params&, cudaStream_t, int);

}  // namespace bwd
}  // namespace flashkda
