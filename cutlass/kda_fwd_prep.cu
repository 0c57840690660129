// flashkda_fwd, stage "prep": everything inside a chunk, fully parallel over (chunk, value head).
// See kda_fwd_common.cuh for the algorithm and the workspace it writes.
#include <type_traits>

#include "kda_fwd_common.cuh"
#include "kda_env.h"
#include "kda_fwd_launch.h"
#include "kda_fwd_prep_common.cuh"

namespace flashkda {
namespace fwd {
namespace {

using bf16 = __nv_bfloat16;
using namespace prep;

// Off-diagonal 16x16 blocks (I, J), I > J, handled by warps 0..5.
__constant__ int kPairI[6] = {1, 2, 3, 2, 3, 3};
__constant__ int kPairJ[6] = {0, 0, 0, 1, 1, 2};

// Shared memory of PrepKernel. The mma solve reuses it: T (fp32) in the free lower triangle of sAkk, T
// (bf16) in sAqk once A_qk is written out, beta exp(G) k in sQ once Qg is, beta v in place in sV.
template <int K>
struct PrepSmem {
  static constexpr int C = kChunk;
  static constexpr int KP = K + 8;   // bf16 row pitch of q, k
  static constexpr int GP = K + 4;   // f32 row pitch of G
  static constexpr int AP = C + 4;   // f32 row pitch of A_kk^T (16-byte rows)
  static constexpr int QP = C + 8;   // bf16 row pitch of A_qk
  static size_t Bytes(int V) {
    return static_cast<size_t>(2 * C * KP) * 2 + static_cast<size_t>(C * GP) * 4 + static_cast<size_t>(C * AP) * 4 +
           static_cast<size_t>(C * QP) * 2 + C * 4 + 256 * 4 + static_cast<size_t>(C * (V + 8)) * 2;
  }
};

// ---- WY solve, SIMT: one column of [W | U] per thread, (I + A_kk) x = beta * [exp(G) k | v] by
// right-looking substitution (A_kk is stored transposed so that column j is 16-byte loads). x: the column's
// registers, declared by the caller (declared here, the kernel's PTX numbers its registers differently and
// ptxas schedules it differently; declared there, the SASS is that of the code before this was a function).
template <int K>
__device__ __forceinline__ void SolveSimt(const Params& p, const bf16* sK, const float* sG, const float* sAkk,
                                          const float* sBeta, const bf16* sV, int V, int VP, int HV, int b, int cs,
                                          int L, int hv, int tid, float (&x)[kChunk]) {
  constexpr int C = kChunk, KP = PrepSmem<K>::KP, GP = PrepSmem<K>::GP, AP = PrepSmem<K>::AP;
  for (int col = tid; col < K + V; col += kThreads) {
    const bool isW = col < K;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const float rhs = isW ? Bf(sK[i * KP + col]) * __expf(sG[i * GP + col]) : Bf(sV[i * VP + col - K]);
      x[i] = sBeta[i] * rhs;
    }
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const float xj = x[j];
#pragma unroll
      for (int i4 = (j + 1) / 4 * 4; i4 < C; i4 += 4) {
        const float4 a = *reinterpret_cast<const float4*>(sAkk + j * AP + i4);
        if (i4 + 0 > j) x[i4 + 0] -= a.x * xj;
        if (i4 + 1 > j) x[i4 + 1] -= a.y * xj;
        if (i4 + 2 > j) x[i4 + 2] -= a.z * xj;
        if (i4 + 3 > j) x[i4 + 3] -= a.w * xj;
      }
    }
    bf16* dst = isW ? p.W : p.U;
    const int dim = isW ? K : V;
    const int cc = isW ? col : col - K;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      if (i < L) dst[(((size_t)b * p.T + cs + i) * HV + hv) * dim + cc] = __float2bfloat16(x[i]);
    }
  }
}


// Where PrepKernel's raw g tile lives (kAsync): the upper half of each f32 row of sG (TIn elements K .. 2K - 1; row
// pitch 2 GP TIn elements), overwritten by the row's G once pre-processed.
template <int K, typename TIn>
__device__ __forceinline__ TIn* RawG(float* sG) {
  return reinterpret_cast<TIn*>(sG) + K;
}

// kMmaSolve: the WY solve on tensor cores (SolveMma) instead of the SIMT substitution (SolveSimt).
template <int K, typename TIn, bool kMmaSolve>
__global__ void __launch_bounds__(kThreads, K <= 128 ? 2 : 1) PrepKernel(Params p) {
  using SM = PrepSmem<K>;
  constexpr int C = kChunk, KP = SM::KP, GP = SM::GP, AP = SM::AP, QP = SM::QP;
  constexpr int PL = K / 32;  // channels per lane
  constexpr int VPL = 8;      // v elements per lane (V <= 256)
  constexpr int kRows = 4;    // kAsync: rows per warp pre-processed together
  // kAsync: raw q / k / v / g tiles by cp.async for 2-byte inputs (in place in the bf16 tiles; raw g in sG),
  // k and g of the next item prefetched during this one's solve. K = 256 (1 CTA/SM), fp32 inputs and the SIMT
  // solve (its x[64] spills more with it) keep the register path.
  constexpr bool kAsync = sizeof(TIn) == 2 && K <= 128 && kMmaSolve;
  static_assert(!kAsync || sizeof(TIn) * 2 == sizeof(float), "raw g must fit in the upper half of a row of sG");
  extern __shared__ __align__(16) unsigned char smem[];
  const int V = p.V, VP = V + 8;
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sK = sQ + C * KP;
  float* sG = reinterpret_cast<float*>(sK + C * KP);
  float* sAkk = sG + C * GP;
  bf16* sAqk = reinterpret_cast<bf16*>(sAkk + C * AP);
  float* sBeta = reinterpret_cast<float*>(sAqk + C * QP);
  float* sTot = sBeta + C;
  bf16* sV = reinterpret_cast<bf16*>(sTot + 256);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int HV = p.HV;
  const int nitems = p.counters[0] * HV;
  const TIn* gq = static_cast<const TIn*>(p.q);
  const TIn* gk = static_cast<const TIn*>(p.k);
  const TIn* gv = static_cast<const TIn*>(p.v);
  const TIn* gg = static_cast<const TIn*>(p.g);
  const TIn* gb = static_cast<const TIn*>(p.beta);

  if constexpr (kAsync) {
    if (blockIdx.x < nitems) IssueRawKG<K, TIn>(p, DecodePrepItem(p, blockIdx.x), sK, RawG<K, TIn>(sG), 2 * GP, tid);
  }

  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const PrepItem m = DecodePrepItem(p, it);
    const int b = m.b, cs = m.cs, send = m.send, s = m.s, L = m.L, hv = m.hv, h = m.h;

    // kAsync: the raw q, k, v, g tiles of all 64 rows are in flight at once (cp.async, zero-filled past L):
    // k and g (issued by the previous item, see IssueRawKG), q straight into sQ, v into sV; then k, g, and
    // then q are pre-processed in place. Same float operations on the same values as the register path below
    // (the q and k sums of squares were independent there too).
    float braw = 0.f;  // kAsync: raw beta of row tid (tid < C)
    if constexpr (kAsync) {
      const size_t tok0 = (size_t)b * p.T + cs;
      IssueRawQV<K, TIn>(p, m, sQ, sV, tid);
      if (tid < L) braw = ToF<TIn>(gb[(tok0 + tid) * HV + hv]);
    }
    for (int i = tid; i < C * AP; i += kThreads) sAkk[i] = 0.f;
    for (int i = tid; i < C * QP / 2; i += kThreads) reinterpret_cast<uint32_t*>(sAqk)[i] = 0u;
    // ---- load + pre-process one row per warp step ----
    float a_coef = 1.f;
    if (p.gate_mode != 0 && (p.gate_mode == 1 || p.use_a_log)) a_coef = __expf(p.a_log[(size_t)b * HV + hv]);
    float dtb[PL];
#pragma unroll
    for (int i = 0; i < PL; ++i) dtb[i] = p.gate_mode != 0 ? p.dt_bias[((size_t)b * HV + hv) * K + lane * PL + i] : 0.f;
    if constexpr (kAsync) {
      // k and g first (their group was issued one item earlier) while q and v are still in flight.
      CpAsyncWait<2>();
      __syncthreads();
      // kRows rows per warp in flight (their loads and warp sums interleaved), stored with one vector store per
      // row and lane.
#pragma unroll 1
      for (int r0 = warp; r0 < C; r0 += kRows * (kThreads / 32)) {
        float kv[kRows][PL], gvv[kRows][PL];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          const int r = r0 + u * (kThreads / 32);
          LoadVec<TIn, PL>(reinterpret_cast<const TIn*>(sK + r * KP) + lane * PL, kv[u]);
          LoadVec<TIn, PL>(reinterpret_cast<const TIn*>(sG + r * GP) + K + lane * PL, gvv[u]);
        }
        __syncwarp();  // the rows' raw g (read by the whole warp) are overwritten by their f32 G below
        float ks[kRows];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          float sk = 0.f;
#pragma unroll
          for (int i = 0; i < PL; ++i) sk += kv[u][i] * kv[u][i];
          ks[u] = sk;
        }
        if (p.qk_l2norm) {
          WarpSumRows<kRows>(ks);
#pragma unroll
          for (int u = 0; u < kRows; ++u) ks[u] = rsqrtf(ks[u] + 1e-6f);
        } else {
#pragma unroll
          for (int u = 0; u < kRows; ++u) ks[u] = 1.f;
        }
        // Each lane rewrites only the k elements it read.
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          const int r = r0 + u * (kThreads / 32);
          const bool valid = r < L;
          float kn[PL], gn[PL];
#pragma unroll
          for (int i = 0; i < PL; ++i) {
            kn[i] = kv[u][i] * ks[u];
            gn[i] = valid ? GateActivation(p, gvv[u][i], dtb[i], a_coef) : 0.f;
          }
          StoreRowBf16<PL>(sK + r * KP + lane * PL, kn);
          StoreRowF32<PL>(sG + r * GP + lane * PL, gn);
        }
      }
      // q (and, fp16, v: converted in place; bf16 v needs no conversion, so its group may still be in flight).
      if constexpr (std::is_same<TIn, bf16>::value) CpAsyncWait<1>();
      else CpAsyncWait<0>();
      __syncthreads();
#pragma unroll 1
      for (int r0 = warp; r0 < C; r0 += kRows * (kThreads / 32)) {
        float qv[kRows][PL], qs[kRows];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          LoadVec<TIn, PL>(reinterpret_cast<const TIn*>(sQ + (r0 + u * (kThreads / 32)) * KP) + lane * PL, qv[u]);
          float sq = 0.f;
#pragma unroll
          for (int i = 0; i < PL; ++i) sq += qv[u][i] * qv[u][i];
          qs[u] = sq;
        }
        if (p.qk_l2norm) {
          WarpSumRows<kRows>(qs);
#pragma unroll
          for (int u = 0; u < kRows; ++u) qs[u] = p.scale * rsqrtf(qs[u] + 1e-6f);
        } else {
#pragma unroll
          for (int u = 0; u < kRows; ++u) qs[u] = p.scale;
        }
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          const int r = r0 + u * (kThreads / 32);
          // Each lane rewrites only the q elements it read.
          float qn[PL];
#pragma unroll
          for (int i = 0; i < PL; ++i) qn[i] = qv[u][i] * qs[u];
          StoreRowBf16<PL>(sQ + r * KP + lane * PL, qn);
          if constexpr (!std::is_same<TIn, bf16>::value) {
            const TIn* rv = reinterpret_cast<const TIn*>(sV + r * VP);
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
              const int c = lane + 32 * i;
              if (c < V) {
                const float x = ToF<TIn>(rv[c]);
                sV[r * VP + c] = __float2bfloat16(x);
              }
            }
          }
        }
      }
      if (tid < C) sBeta[tid] = ActivateBeta(p, braw, tid < L);
      CpAsyncWait<0>();  // bf16 v; visible after the barrier below
    }
    constexpr int RB = 4;                 // rows per warp whose loads are in flight together
#pragma unroll 1
    for (int r0 = warp; r0 < (kAsync ? 0 : C); r0 += RB * (kThreads / 32)) {
      float qv[RB][PL], kv[RB][PL], gvv[RB][PL], vv[RB][VPL], bt[RB];
#pragma unroll
      for (int u = 0; u < RB; ++u) {
        const int r = r0 + u * (kThreads / 32);
        const bool valid = r < L;
        const size_t tok = (size_t)b * p.T + cs + (valid ? r : 0);
        if (valid) {
          LoadVec<TIn, PL>(gq + (tok * p.H + h) * K + lane * PL, qv[u]);
          LoadVec<TIn, PL>(gk + (tok * p.H + h) * K + lane * PL, kv[u]);
          LoadVec<TIn, PL>(gg + (tok * HV + hv) * K + lane * PL, gvv[u]);
#pragma unroll
          for (int i = 0; i < VPL; ++i) {
            const int c = lane + 32 * i;
            vv[u][i] = c < V ? ToF<TIn>(gv[(tok * HV + hv) * V + c]) : 0.f;
          }
          bt[u] = ToF<TIn>(gb[tok * HV + hv]);
        } else {
#pragma unroll
          for (int i = 0; i < PL; ++i) qv[u][i] = kv[u][i] = gvv[u][i] = 0.f;
#pragma unroll
          for (int i = 0; i < VPL; ++i) vv[u][i] = 0.f;
          bt[u] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < RB; ++u) {
        const int r = r0 + u * (kThreads / 32);
        const bool valid = r < L;
        float qs = p.scale, ks = 1.f;
        if (p.qk_l2norm) {
          float sq = 0.f, sk = 0.f;
#pragma unroll
          for (int i = 0; i < PL; ++i) {
            sq += qv[u][i] * qv[u][i];
            sk += kv[u][i] * kv[u][i];
          }
          sq = WarpSum(sq);
          sk = WarpSum(sk);
          qs *= rsqrtf(sq + 1e-6f);
          ks = rsqrtf(sk + 1e-6f);
        }
#pragma unroll
        for (int i = 0; i < PL; ++i) {
          const int c = lane * PL + i;
          sQ[r * KP + c] = __float2bfloat16(qv[u][i] * qs);
          sK[r * KP + c] = __float2bfloat16(kv[u][i] * ks);
          sG[r * GP + c] = valid ? GateActivation(p, gvv[u][i], dtb[i], a_coef) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
          const int c = lane + 32 * i;
          if (c < V) sV[r * VP + c] = __float2bfloat16(vv[u][i]);
        }
        if (lane == 0) sBeta[r] = ActivateBeta(p, bt[u], valid);
      }
    }
    __syncthreads();
    // ---- cumulative gate G (inclusive) per channel ----
    {
      constexpr int P = kThreads / K, RP = C / P;
      const int c = tid % K, part = tid / K;
      float acc[RP];
      float run = 0.f;
#pragma unroll
      for (int i = 0; i < RP; ++i) {
        run += sG[(part * RP + i) * GP + c];
        acc[i] = run;
      }
      sTot[part * K + c] = run;
      __syncthreads();
      float off = 0.f;
      for (int pp = 0; pp < part; ++pp) off += sTot[pp * K + c];
#pragma unroll
      for (int i = 0; i < RP; ++i) sG[(part * RP + i) * GP + c] = acc[i] + off;
    }
    __syncthreads();
    // ---- A_kk (beta-scaled, strictly lower, stored transposed) and A_qk (lower incl. diagonal) ----
    // Ten 16x16 block tasks: 6 off-diagonal (I > J) with reference row r = last row of J (both decay
    // factors <= 1), 4 diagonal with r = row 7 of the block when the block's total decay stays below e^80
    // (factors within bf16/fp32 range); else, when the decay over each 8-row half does, r = the last row of
    // each 8-column half (row 7 / row 15: "split"); else exact pairwise decays (strong gates; before the split
    // path, strong softplus gates sent many blocks to this slow path: tests/test_prep_decay_model.py).
    for (int task = warp; task < 10; task += kThreads / 32) {
      const bool diag = task >= 6;
      const int I = diag ? task - 6 : kPairI[task];
      const int J = diag ? I : kPairJ[task];
      bool fast = true, split = false;
      if (diag) {
        float m = 0.f, mh = 0.f;
        for (int c = lane; c < K; c += 32) {
          const float g0 = sG[(16 * I) * GP + c], g7 = sG[(16 * I + 7) * GP + c];
          const float g8 = sG[(16 * I + 8) * GP + c], g15 = sG[(16 * I + 15) * GP + c];
          m = fmaxf(m, g0 - g15);
          mh = fmaxf(mh, fmaxf(g0 - g7, g8 - g15));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
          mh = fmaxf(mh, __shfl_xor_sync(0xffffffffu, mh, o));
        }
        split = m > 80.f;
        fast = mh <= 80.f;
      }
      if (fast) {
        const int gr = lane >> 2, t4 = lane & 3;
        float akk[2][4], aqk[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int q = 0; q < 4; ++q) akk[n][q] = aqk[n][q] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < K / 16; ++kk) {
          uint32_t ak[4], aq[4];
          // Row factors x_i exp(G_i - G_r); the exponent is capped at 80, which changes nothing but rows 0-7 of
          // a split diagonal block against its second half (r = row 15; j > i there, masked below).
          auto row_factors = [&](int r) {
#pragma unroll
            for (int m = 0; m < 4; ++m) {
              const int i = 16 * I + gr + 8 * (m & 1);
              const int c = kk * 16 + 2 * t4 + 8 * (m >> 1);
              const float e0 = __expf(fminf(sG[i * GP + c] - sG[r * GP + c], 80.f));
              const float e1 = __expf(fminf(sG[i * GP + c + 1] - sG[r * GP + c + 1], 80.f));
              const float2 kk2 = Bf2(sK + i * KP + c), qq2 = Bf2(sQ + i * KP + c);
              ak[m] = PackBF16(kk2.x * e0, kk2.y * e1);
              aq[m] = PackBF16(qq2.x * e0, qq2.y * e1);
            }
          };
          row_factors(diag ? 16 * I + 7 : 16 * J + 15);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const int r = diag ? 16 * I + (split ? 8 * n : 0) + 7 : 16 * J + 15;
            if (split && n == 1) row_factors(r);
            const int j = 16 * J + 8 * n + gr;
            uint32_t bb[2];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              const int c = kk * 16 + 2 * t4 + 8 * hh;
              const float e0 = __expf(sG[r * GP + c] - sG[j * GP + c]);
              const float e1 = __expf(sG[r * GP + c + 1] - sG[j * GP + c + 1]);
              const float2 kj2 = Bf2(sK + j * KP + c);
              bb[hh] = PackBF16(kj2.x * e0, kj2.y * e1);
            }
            Mma(akk[n], ak, bb[0], bb[1]);
            Mma(aqk[n], aq, bb[0], bb[1]);
          }
        }
        StoreABlock(sAkk, sAqk, sBeta, akk, aqk, I, J, diag, lane);
      } else {
        // Exact pairwise decays exp(G_i - G_j), j <= i (strong gates).
        for (int q = 0; q < 136; ++q) {
          int li = static_cast<int>((sqrtf(8.f * q + 1.f) - 1.f) * 0.5f);
          while ((li + 1) * (li + 2) / 2 <= q) ++li;
          while (li * (li + 1) / 2 > q) --li;
          const int lj = q - li * (li + 1) / 2;
          const int i = 16 * I + li, j = 16 * I + lj;
          float skk = 0.f, sqk = 0.f;
#pragma unroll
          for (int c = lane; c < K; c += 32) {
            const float kj = Bf(sK[j * KP + c]) * __expf(sG[i * GP + c] - sG[j * GP + c]);
            skk += Bf(sK[i * KP + c]) * kj;
            sqk += Bf(sQ[i * KP + c]) * kj;
          }
          skk = WarpSum(skk);
          sqk = WarpSum(sqk);
          if (lane == 0) {
            if (i > j) sAkk[j * AP + i] = sBeta[i] * skk;
            sAqk[i * QP + j] = __float2bfloat16(sqk);
          }
        }
      }
    }
    // ---- Qg = exp(G) q, Kd = exp(G_last - G) k ----
    // by the warps with one task above, while the first kTaskWarps run their second: none of it writes what the
    // tasks read.
    constexpr int kTaskWarps = 10 - kThreads / 32;  // warps with two tasks
    static_assert(kThreads / 32 >= 5 && kThreads / 32 < 10, "each warp runs one or two of the ten A tasks");
    const float* gl = sG + (C - 1) * GP;  // rows >= L carry g = 0, so row C-1 holds G_last
    if (warp >= kTaskWarps) {
      const int t0 = tid - 32 * kTaskWarps, nt = kThreads - 32 * kTaskWarps;
#pragma unroll 1
      for (int idx = t0; idx < L * (K / 8); idx += nt) {
        const int r = idx / (K / 8), c0 = (idx - r * (K / 8)) * 8;
        uint32_t qw[4], kw[4];
        float q8[8], k8[8];
        Bf8(sQ + r * KP + c0, q8);
        Bf8(sK + r * KP + c0, k8);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = c0 + 2 * u;
          const float g0 = sG[r * GP + c], g1 = sG[r * GP + c + 1];
          qw[u] = PackBF16(q8[2 * u] * __expf(g0), q8[2 * u + 1] * __expf(g1));
          kw[u] = PackBF16(k8[2 * u] * __expf(gl[c] - g0), k8[2 * u + 1] * __expf(gl[c + 1] - g1));
        }
        const size_t o = (((size_t)b * p.T + cs + r) * HV + hv) * K + c0;
        *reinterpret_cast<uint4*>(p.Qg + o) = make_uint4(qw[0], qw[1], qw[2], qw[3]);
        *reinterpret_cast<uint4*>(p.Kd + o) = make_uint4(kw[0], kw[1], kw[2], kw[3]);
      }
    }
    __syncthreads();
    // ---- WY solve ----
    if constexpr (!kMmaSolve) {
      float x[kChunk];
      SolveSimt<K>(p, sK, sG, sAkk, sBeta, sV, V, VP, HV, b, cs, L, hv, tid, x);
    }
    // mma: the diagonal blocks of T now (warps 0-1), W's right-hand side beta * exp(G) k (as SolveSimt forms it)
    // in place of q (written out above), then the rest of T and the product once A_qk is written out (sAqk then
    // holds bf16 T).
    if constexpr (kMmaSolve) {
      InvertDiagBlocks(sAkk, tid);
      for (int idx = tid; idx < L * (K / 8); idx += kThreads) {
        const int r = idx / (K / 8), c0 = (idx - r * (K / 8)) * 8;
        const float bb = sBeta[r];
        float k8[8];
        Bf8(sK + r * KP + c0, k8);
        uint32_t ww[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = c0 + 2 * u;
          ww[u] = PackBF16(bb * (k8[2 * u] * __expf(sG[r * GP + c])), bb * (k8[2 * u + 1] * __expf(sG[r * GP + c + 1])));
        }
        *reinterpret_cast<uint4*>(sQ + r * KP + c0) = make_uint4(ww[0], ww[1], ww[2], ww[3]);
      }
      // U's right-hand side beta * v, in place (rows >= L of sV are zero already).
      for (int idx = tid; idx < L * (V / 8); idx += kThreads) {
        const int r = idx / (V / 8), c0 = (idx - r * (V / 8)) * 8;
        const float bb = sBeta[r];
        uint4 u = *reinterpret_cast<const uint4*>(sV + r * VP + c0);
        uint32_t* w = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162*>(&w[e]);
          w[e] = PackBF16(bb * __low2float(x), bb * __high2float(x));
        }
        *reinterpret_cast<uint4*>(sV + r * VP + c0) = u;
      }
    }
    // A_qk rows; without the tensor-core solve also zeros over the T half of each row (see kAqkPitch).
    for (int idx = tid; idx < L * (C / 8); idx += kThreads) {
      const int r = idx / (C / 8), c0 = (idx - r * (C / 8)) * 8;
      bf16* row = AqkRow(p, b, cs + r, hv);
      *reinterpret_cast<uint4*>(row + c0) = *reinterpret_cast<const uint4*>(sAqk + r * QP + c0);
      if constexpr (!kMmaSolve) *reinterpret_cast<uint4*>(row + C + c0) = make_uint4(0u, 0u, 0u, 0u);
    }
    const bool last = cs + C >= send;
    const int gidx = !last ? (cs + C - 1) / C : (s < p.S_final ? p.NW + s : -1);
    if (gidx >= 0) {
      for (int c = tid; c < K; c += kThreads) p.gamma[(((size_t)b * p.NG + gidx) * HV + hv) * K + c] = __expf(gl[c]);
    }
    if constexpr (kMmaSolve) {
      __syncthreads();  // A_qk written out (sAqk free for T), T_II, right-hand sides
      if constexpr (kAsync) {
        if (it + (int)gridDim.x < nitems) IssueRawKG<K, TIn>(p, DecodePrepItem(p, it + gridDim.x), sK, RawG<K, TIn>(sG), 2 * GP, tid);
      }
      InvertOffDiagBlocks(sAkk, sAqk, tid);
      // T's rows (bf16, zero above the diagonal: sAqk was zeroed at the item start) after the A_qk rows, for the
      // backward's grad2 (kAqkPitch)
      if (!p.skip_t) StoreAqkHalf(p, sAqk, b, cs, L, hv, C, tid);
      SolveMma<K>(p, sAqk, sQ, sV, b, cs, L, hv, warp, lane, tid);
    }
    __syncthreads();
  }
}

template <int K, typename TIn, bool kMmaSolve>
cudaError_t LaunchPrepK(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.B) * p.T * p.HV;  // bound on (chunk, head) items
  return LaunchGrid(PrepKernel<K, TIn, kMmaSolve>, PrepSmem<K>::Bytes(p.V), items, 4, p, stream, nsm);
}

template <int K, typename TIn>
cudaError_t LaunchPrepK(const Params& p, cudaStream_t stream, int nsm, bool mma) {
  return mma ? LaunchPrepK<K, TIn, true>(p, stream, nsm) : LaunchPrepK<K, TIn, false>(p, stream, nsm);
}

// Which WY solve: the tensor-core one (SolveMma, 1.09-1.15x faster forward on an H100) for bf16 / fp16 inputs,
// whose operands are bf16-rounded anyway; the SIMT substitution for fp32 inputs (T stays fp32). The env var
// FLASHKDA_FWD_SOLVE=mma|simt forces one for every dtype. Read once per process, at the first launch.
int ForcedSolve() {  // 1 = mma, 0 = simt, -1 = by dtype
  static const int forced = EnvEquals("FLASHKDA_FWD_SOLVE", "mma")    ? 1
                            : EnvEquals("FLASHKDA_FWD_SOLVE", "simt") ? 0
                                                                      : -1;
  return forced;
}

}  // namespace

template <typename TIn>
bool PrepSolvesOnTensorCores() {
  const int forced = ForcedSolve();
  return forced >= 0 ? forced == 1 : !std::is_same<TIn, float>::value;
}

template <typename TIn>
cudaError_t LaunchPrep(const Params& p, cudaStream_t stream, int nsm) {
  const bool mma = PrepSolvesOnTensorCores<TIn>();
  if constexpr (sizeof(TIn) == 2) {
    if (PrepBoundedApplies(p, mma)) return LaunchPrepBounded<TIn>(p, stream, nsm);
  }
  switch (p.K) {
    case 64: return LaunchPrepK<64, TIn>(p, stream, nsm, mma);
    case 128: return LaunchPrepK<128, TIn>(p, stream, nsm, mma);
    case 256: return LaunchPrepK<256, TIn>(p, stream, nsm, mma);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t LaunchPrep<__nv_bfloat16>(const Params&, cudaStream_t, int);
template cudaError_t LaunchPrep<__half>(const Params&, cudaStream_t, int);
template cudaError_t LaunchPrep<float>(const Params&, cudaStream_t, int);
template bool PrepSolvesOnTensorCores<__nv_bfloat16>();
template bool PrepSolvesOnTensorCores<__half>();
template bool PrepSolvesOnTensorCores<float>();

}  // namespace fwd
}  // namespace flashkda
