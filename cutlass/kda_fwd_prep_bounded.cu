// flashkda_fwd, stage "prep" for bounded gates (gate "bounded", lower_bound >= kBoundedPrepMinBound) and 2-byte
// inputs, K in {64, 128}: the same outputs as PrepKernel (kda_fwd_prep.cu), with every decay factor formed once
// per element instead of once per A task.
//
// Warp w owns rows 8w .. 8w + 7 of the chunk, lane l channels CPL l .. CPL l + CPL - 1 (CPL = K / 32). Each thread
// keeps the cumulative gate G of its 8 x CPL elements in registers (row-group totals through shared memory), so
// G is never stored. With m(I) = 16 I + 7 and e(I) = 16 I + 15 the middle and last rows of 16-row block I, one pass
// writes, for row i of block I:
//   KA_i = k_i exp(G_i - G_m(I)),  QA_i = q_i exp(G_i - G_m(I)),  KB_i = k_i exp(G_e(I) - G_i)
// in place of the raw k, q and g tiles, and Qg = QA exp(G_m(I)), Kd = KB exp(G_63 - G_e(I)) to memory, and keeps
// W's right-hand side beta KA exp(G_m(I)) in registers. A_kk and A_qk are then bf16 tensor-core products of those
// tiles, with one per-channel factor table per block (I, J <= I) applied to the B fragments only:
//   A_IJ = KA_I (KB_J exp(G_m(I) - G_e(J)))^T        (factor <= 1 for J < I, >= 1 for J = I)
// Every factor spans at most 8 rows (the A side's exp(G_i - G_m) for the rows before m, the diagonal factor): with
// g >= lower_bound >= -8 per token they stay below e^64, so none overflows for any input this path accepts (the
// general kernel handles unbounded gates). The rest (T, the WY product, outputs) is PrepKernel's:
// kda_fwd_prep_common.cuh.
#include "kda_env.h"
#include "kda_fwd_common.cuh"
#include "kda_fwd_launch.h"
#include "kda_fwd_overlap.h"
#include "kda_fwd_prep_common.cuh"

namespace flashkda {
namespace fwd {
namespace {

using bf16 = __nv_bfloat16;
using namespace prep;

constexpr int kRowsPerWarp = 8;  // kThreads / 32 warps x 8 rows = one chunk
static_assert(kThreads / 32 * kRowsPerWarp == kChunk, "one row group per warp");
constexpr int kFactorTables = 10;  // one per block (I, J <= I), in task order: exp(G_m(I) - G_e(J))

// The 16x16 blocks (I, J <= I) of A: task t (0-5 off the diagonal, 6-9 on it) and its factor table t.
__constant__ int kTaskI[kFactorTables] = {1, 2, 3, 2, 3, 3, 0, 1, 2, 3};
__constant__ int kTaskJ[kFactorTables] = {0, 0, 0, 1, 1, 2, 0, 1, 2, 3};
// The tasks of each warp (-1: none); every task costs the same (one operand scaled), so 10 tasks on 8 warps.
__constant__ int kWarpTasks[kThreads / 32][2] = {{6, 0}, {7, 1}, {8, -1}, {9, -1}, {2, -1}, {3, -1}, {4, -1}, {5, -1}};

template <int K>
struct BoundedSmem {
  static constexpr int C = kChunk;
  static constexpr int KP = K + 8;  // bf16 row pitch of the q / k / g tiles
  static constexpr int AP = C + 4;  // f32 row pitch of A_kk^T
  static constexpr int QP = C + 8;  // bf16 row pitch of A_qk (then T)
  static size_t Bytes(int V) {
    return static_cast<size_t>(3 * C * KP) * 2 + static_cast<size_t>(C * (V + 8)) * 2 +
           static_cast<size_t>(C * AP) * 4 + static_cast<size_t>(C * QP) * 2 + C * 4 +
           static_cast<size_t>(kThreads / 32 + kFactorTables) * K * 4 + kThreads * 4;
  }
};

// Sum over the 32 lanes of each of 8 per-lane values (x[r]: this lane's part of row r), by halving exchanges: 9
// shuffles instead of 40. Returns the total of row (lane >> 2) & 7.
__device__ __forceinline__ float ReduceRows8(const float (&x)[8], int lane) {
  const bool u16 = lane & 16, u8 = lane & 8, u4 = lane & 4;
  float y[4], z[2];
#pragma unroll
  for (int j = 0; j < 4; ++j) y[j] = (u16 ? x[j + 4] : x[j]) + __shfl_xor_sync(0xffffffffu, u16 ? x[j] : x[j + 4], 16);
#pragma unroll
  for (int j = 0; j < 2; ++j) z[j] = (u8 ? y[j + 2] : y[j]) + __shfl_xor_sync(0xffffffffu, u8 ? y[j] : y[j + 2], 8);
  float s = (u4 ? z[1] : z[0]) + __shfl_xor_sync(0xffffffffu, u4 ? z[0] : z[1], 4);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  return s;
}

// The scalars an item reads from global memory besides its tiles, loaded one item ahead (one per thread, as raw bits
// into a register, converted and stored to shared memory later, so that neither this load nor the next item's start
// waits on global memory): threads kThreads - C .. kThreads - 1 the raw beta of the chunk's tokens (0 past L; TIn
// bits), threads 0 .. K - 1 dt_bias, thread K A_log (0 without A_log), as floats (ItemScalar converts).
template <int K, typename TIn>
__device__ __forceinline__ uint32_t LoadItemScalarBits(const Params& p, const PrepItem& m, int tid) {
  static_assert(K + 1 <= kThreads - kChunk, "disjoint thread ranges");
  const size_t bh = (size_t)m.b * p.HV + m.hv;
  if (tid >= kThreads - kChunk) {
    const int r = tid - (kThreads - kChunk);
    const unsigned short* beta = static_cast<const unsigned short*>(p.beta);
    return r < m.L ? beta[((size_t)m.b * p.T + m.cs + r) * p.HV + m.hv] : 0u;
  }
  if (tid < K) return __float_as_uint(p.dt_bias[bh * K + tid]);
  if (tid == K && p.use_a_log) return __float_as_uint(p.a_log[bh]);
  return 0u;
}
template <typename TIn>
__device__ __forceinline__ float ItemScalar(uint32_t bits, int tid) {
  if (tid < kThreads - kChunk) return __uint_as_float(bits);
  if constexpr (std::is_same_v<TIn, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  } else {
    return __uint_as_float(bits << 16);  // bf16: the high half of a float
  }
}

// bf16 pair x times (f.x, f.y), rounded to bf16 again.
__device__ __forceinline__ uint32_t ScaleBf2(uint32_t x, float2 f) {
  const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
  return PackBF16(v.x * f.x, v.y * f.y);
}

// CPL bf16 from floats, one vector store (CPL = 2 or 4).
template <int CPL>
__device__ __forceinline__ void StoreBf16(bf16* p, const float (&v)[CPL]) {
  if constexpr (CPL == 2) {
    *reinterpret_cast<uint32_t*>(p) = PackBF16(v[0], v[1]);
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(PackBF16(v[0], v[1]), PackBF16(v[2], v[3]));
  }
}

template <int K, typename TIn>
__global__ void __launch_bounds__(kThreads, 2) PrepBoundedKernel(Params p) {
  static_assert(K == 64 || K == 128, "K = 64 or 128");
  static_assert(sizeof(TIn) == 2, "bf16 / fp16 inputs");
  using SM = BoundedSmem<K>;
  constexpr int C = kChunk, KP = SM::KP, AP = SM::AP, QP = SM::QP;
  constexpr int CPL = K / 32;  // channels per lane
  constexpr int R = kRowsPerWarp;
  extern __shared__ __align__(16) unsigned char smem[];
  const int V = p.V, VP = V + 8;
  bf16* sQ = reinterpret_cast<bf16*>(smem);  // raw q -> QA -> W's right-hand side
  bf16* sK = sQ + C * KP;                    // raw k -> KA
  bf16* sG = sK + C * KP;                    // raw g -> KB
  bf16* sV = sG + C * KP;                    // raw v -> beta v (bf16)
  float* sAkk = reinterpret_cast<float*>(sV + C * VP);
  bf16* sAqk = reinterpret_cast<bf16*>(sAkk + C * AP);
  float* sBeta = reinterpret_cast<float*>(sAqk + C * QP);
  float* sTot = sBeta + C;                // [8][K]: each warp's sum of g over its 8 rows
  float* sFac = sTot + (kThreads / 32) * K;  // [kFactorTables][K]
  float* sScal = sFac + kFactorTables * K;   // [kThreads]: the next item's scalars (LoadItemScalarBits)
  __shared__ PrepItem s_item;                // the next item
  __shared__ __align__(16) int4 s_next_entry;  // its chunk-list entry (cp.async with the current item's q)
  __shared__ int s_next_it;                    // its index

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int t4 = lane & 3;
  const int HV = p.HV;
  const int nitems = p.counters[0] * HV;
  const int c0 = lane * CPL;     // this lane's first channel
  const int row0 = warp * R;     // this warp's first row
  const int blk = warp >> 1;     // its 16-row block

  // Items in list order: each CTA's first is blockIdx.x, the others come from a counter (in the order CTAs ask), so
  // that the items done form a growing prefix of the list (the overlapped recurrence follows it, kda_fwd_overlap.h).
  // Thread 0 takes them one item ahead (`ahead`: the atomic's latency hides behind a whole item). A CTA on an SM the
  // overlapped recurrence will use takes none from `stop` on.
  if (p.ready != nullptr) LaunchDependents();
  int* const work = p.counters + kPrepWorkSlot;
  const int stop = PrepStopAt(p, nitems);
  int ahead = nitems;
  int stopping = 0;  // 0: not asked yet, 1: stops, 2: goes on (MayStop said no)
  auto take = [&](int taken) {
    if (taken >= nitems) return nitems;
    if (taken >= stop && stopping == 0) stopping = MayStop(p) ? 1 : 2;
    return stopping == 1 ? nitems : (int)gridDim.x + atomicAdd(work, 1);
  };
  if (blockIdx.x < nitems) {
    const PrepItem m0 = DecodePrepItem(p, blockIdx.x);
    IssueRawKG<K, TIn, true>(p, m0, sK, reinterpret_cast<TIn*>(sG), KP, tid);
    if (tid == 0) {
      s_item = m0;
      ahead = take(blockIdx.x);
    }
    sScal[tid] = ItemScalar<TIn>(LoadItemScalarBits<K, TIn>(p, m0, tid), tid);
  }
  __syncthreads();

  int done_key = -1;  // ready index of the previous item (thread 0), signalled one barrier into this one
  for (int it = blockIdx.x; it < nitems;) {
    const PrepItem m = s_item;  // written one item ahead, behind the previous item's last barrier
    const int b = m.b, cs = m.cs, send = m.send, s = m.s, L = m.L, hv = m.hv;
    const size_t tok0 = (size_t)b * p.T + cs;

    if (tid == 0) {
      const int nx = ahead;
      ahead = take(nx);
      s_next_it = nx;  // read after the first barrier below
      if (nx < nitems) CpAsync16(&s_next_entry, p.chunk_list + nx / HV, true);  // joins q's group
    }
    IssueRawQV<K, TIn, true>(p, m, sQ, sV, tid);  // k and g were issued by the previous item
    const float braw = tid < C ? sScal[kThreads - C + tid] : 0.f;
    static_assert((C * AP) % 4 == 0 && (C * QP) % 8 == 0, "16-byte pieces");
    for (int i = tid; i < C * AP / 4; i += kThreads) reinterpret_cast<float4*>(sAkk)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i = tid; i < C * QP / 8; i += kThreads) reinterpret_cast<uint4*>(sAqk)[i] = make_uint4(0u, 0u, 0u, 0u);
    const float a_coef = p.use_a_log ? __expf(sScal[K]) : 1.f;
    const float lb = p.lower_bound;
    float dtb[CPL];
#pragma unroll
    for (int i = 0; i < CPL; ++i) dtb[i] = sScal[c0 + i];

    CpAsyncWait<2>();  // k, g
    __syncthreads();
    const int next = s_next_it;
    const bool has_next = next < nitems;
    if (done_key >= 0) ReleaseAdd(p.ready + done_key, 1);  // the previous item, behind a barrier of this one
    // ---- pass 1: G of this thread's elements (within the row group), k's sums of squares ----
    float G[R][CPL];
    float ks;  // k's norm factor of row row0 + (lane >> 2) & 7
    {
      float run[CPL], sq[R];
#pragma unroll
      for (int i = 0; i < CPL; ++i) run[i] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = row0 + r;
        float gx[CPL], kx[CPL];
        LoadVec<TIn, CPL>(reinterpret_cast<const TIn*>(sG + row * KP) + c0, gx);
        LoadVec<TIn, CPL>(reinterpret_cast<const TIn*>(sK + row * KP) + c0, kx);
        sq[r] = 0.f;
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
          run[i] += row < L ? BoundedGate(lb, gx[i], dtb[i], a_coef) : 0.f;  // GateActivation's mode 2; rows >= L: no decay
          G[r][i] = run[i];
          sq[r] += kx[i] * kx[i];
        }
      }
#pragma unroll
      for (int i = 0; i < CPL; ++i) sTot[warp * K + c0 + i] = run[i];
      ks = p.qk_l2norm ? rsqrtf(ReduceRows8(sq, lane) + 1e-6f) : 1.f;
    }
    if (tid < C) sBeta[tid] = ActivateBeta(p, braw, tid < L);
    CpAsyncWait<1>();  // q
    __syncthreads();   // q, sTot, sBeta visible
    float qs;          // q's factor (scale and norm) of row row0 + (lane >> 2) & 7
    {
      float sq[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float qx[CPL];
        LoadVec<TIn, CPL>(reinterpret_cast<const TIn*>(sQ + (row0 + r) * KP) + c0, qx);
        sq[r] = 0.f;
#pragma unroll
        for (int i = 0; i < CPL; ++i) sq[r] += qx[i] * qx[i];
      }
      qs = p.qk_l2norm ? p.scale * rsqrtf(ReduceRows8(sq, lane) + 1e-6f) : p.scale;
    }
    // ---- G at the row-group boundaries of this lane's channels: Gb(j) = G_{8j-1} (Gb(0) = 0) ----
    float off[CPL], gm[CPL], ge[CPL], eGm[CPL], eTail[CPL];
    {
      float run[CPL];
#pragma unroll
      for (int i = 0; i < CPL; ++i) run[i] = 0.f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) {
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
          if (w == warp) off[i] = run[i];
          run[i] += sTot[w * K + c0 + i];
          if (w == 2 * blk) gm[i] = run[i];
          if (w == 2 * blk + 1) ge[i] = run[i];
        }
      }
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        eGm[i] = __expf(gm[i]);
        eTail[i] = __expf(run[i] - ge[i]);
      }
      // gamma = exp(G_last) by the warp holding row 63 (rows >= L carry no decay)
      const bool last = cs + C >= send;
      const int gidx = !last ? (cs + C - 1) / C : (s < p.S_final ? p.NW + s : -1);
      if (warp == kThreads / 32 - 1 && gidx >= 0) {
#pragma unroll
        for (int i = 0; i < CPL; ++i) p.gamma[(((size_t)b * p.NG + gidx) * HV + hv) * K + c0 + i] = __expf(run[i]);
      }
      // Factor tables (warp w: tables w and w + 8): table t = exp(Gb(x) - Gb(y)) with Gb(j) = G_{8j-1} the G at
      // the end of row group j - 1 (G_m(I) = Gb(2 I + 1), G_e(J) = Gb(2 J + 2)), summed from the row-group totals.
      for (int t = warp; t < kFactorTables; t += kThreads / 32) {
        const int x = 2 * kTaskI[t] + 1, y = 2 * kTaskJ[t] + 2;
        float gx[CPL], gy[CPL];
#pragma unroll
        for (int i = 0; i < CPL; ++i) gx[i] = gy[i] = 0.f;
        for (int w = 0; w < (x > y ? x : y); ++w) {
#pragma unroll
          for (int i = 0; i < CPL; ++i) {
            const float gw = sTot[w * K + c0 + i];
            if (w < x) gx[i] += gw;
            if (w < y) gy[i] += gw;
          }
        }
#pragma unroll
        for (int i = 0; i < CPL; ++i) sFac[t * K + c0 + i] = __expf(gx[i] - gy[i]);
      }
    }
    // ---- pass 2: the decayed tiles, Qg, Kd ----
    uint32_t wr[R][CPL / 2];  // W's right-hand side, written into sQ once the A tasks are done with QA
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = row0 + r;
      const float kf = __shfl_sync(0xffffffffu, ks, 4 * r), qf = __shfl_sync(0xffffffffu, qs, 4 * r);
      const float bb = sBeta[row];
      float kx[CPL], qx[CPL], ka[CPL], qa[CPL], kb[CPL], qg[CPL], kd[CPL];
      LoadVec<TIn, CPL>(reinterpret_cast<const TIn*>(sK + row * KP) + c0, kx);
      LoadVec<TIn, CPL>(reinterpret_cast<const TIn*>(sQ + row * KP) + c0, qx);
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const float g = G[r][i] + off[i];
        const float ea = __expf(g - gm[i]), eb = __expf(ge[i] - g);
        const float kn = kx[i] * kf, qn = qx[i] * qf;
        ka[i] = kn * ea;
        qa[i] = qn * ea;
        kb[i] = kn * eb;
        qg[i] = qa[i] * eGm[i];
        kd[i] = kb[i] * eTail[i];
      }
#pragma unroll
      for (int i = 0; i < CPL / 2; ++i) wr[r][i] = PackBF16(bb * (ka[2 * i] * eGm[2 * i]), bb * (ka[2 * i + 1] * eGm[2 * i + 1]));
      StoreBf16<CPL>(sK + row * KP + c0, ka);
      StoreBf16<CPL>(sQ + row * KP + c0, qa);
      StoreBf16<CPL>(sG + row * KP + c0, kb);
      if (row < L) {
        const size_t o = ((tok0 + row) * HV + hv) * K + c0;
        StoreBf16<CPL>(p.Qg + o, qg);
        StoreBf16<CPL>(p.Kd + o, kd);
      }
    }
    CpAsyncWait<0>();  // v
    __syncthreads();   // the tiles, the factor tables and v visible
    // ---- A_kk (beta-scaled, strictly lower, stored transposed) and A_qk (lower incl. the diagonal) ----
#pragma unroll 1
    for (int j = 0; j < 2; ++j) {
      const int task = kWarpTasks[warp][j];
      if (task < 0) break;
      const int I = kTaskI[task], J = kTaskJ[task];
      const bool diag = I == J;
      const float* fb = sFac + task * K;  // factor table of the B fragments
      float akk[2][4], aqk[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) akk[n][q] = aqk[n][q] = 0.f;
      const int a_off = (16 * I + (lane & 15)) * KP + (lane >> 4) * 8;
      const bf16* kb_base = sG + (16 * J + (lane & 7) + ((lane >> 4) << 3)) * KP + ((lane >> 3) & 1) * 8;
#pragma unroll 4
      for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t ak[4], aq[4], bk[4];
        Ldsm(sK + a_off + kk * 16, ak[0], ak[1], ak[2], ak[3]);
        Ldsm(sQ + a_off + kk * 16, aq[0], aq[1], aq[2], aq[3]);
        Ldsm(kb_base + kk * 16, bk[0], bk[1], bk[2], bk[3]);
        const int c = kk * 16 + 2 * t4;  // channels c, c + 1 (b registers 0, 2) and c + 8, c + 9 (1, 3)
        {
          const float2 f0 = *reinterpret_cast<const float2*>(fb + c), f1 = *reinterpret_cast<const float2*>(fb + c + 8);
          bk[0] = ScaleBf2(bk[0], f0);
          bk[2] = ScaleBf2(bk[2], f0);
          bk[1] = ScaleBf2(bk[1], f1);
          bk[3] = ScaleBf2(bk[3], f1);
        }
        Mma(akk[0], ak, bk[0], bk[1]);
        Mma(akk[1], ak, bk[2], bk[3]);
        Mma(aqk[0], aq, bk[0], bk[1]);
        Mma(aqk[1], aq, bk[2], bk[3]);
      }
      StoreABlock(sAkk, sAqk, sBeta, akk, aqk, I, J, diag, lane);
    }
    __syncthreads();  // A_kk, A_qk formed; sK, sG and sQ free
    uint32_t scal_next = 0u;  // stored to sScal once this item no longer reads it (below)
    if (has_next) {
      const PrepItem mn = DecodePrepItem(p, next, s_next_entry);
      IssueRawKG<K, TIn, true>(p, mn, sK, reinterpret_cast<TIn*>(sG), KP, tid);
      if (tid == 0) s_item = mn;  // read after this item's last barrier
      scal_next = LoadItemScalarBits<K, TIn>(p, mn, tid);
    }
    InvertDiagBlocks(sAkk, tid);
    // W's right-hand side (this thread's elements, kept since pass 2), U's: beta v (fp16 v converted)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if constexpr (CPL == 2) {
        *reinterpret_cast<uint32_t*>(sQ + (row0 + r) * KP + c0) = wr[r][0];
      } else {
        *reinterpret_cast<uint2*>(sQ + (row0 + r) * KP + c0) = make_uint2(wr[r][0], wr[r][1]);
      }
    }
    // Warps 0-1 invert the diagonal blocks meanwhile: the rest form U's right-hand side and write A_qk out.
    constexpr int kInvThreads = 64;
    for (int idx = tid - kInvThreads; idx >= 0 && idx < C * (V / 8); idx += kThreads - kInvThreads) {
      const int r = idx / (V / 8), c8 = (idx - r * (V / 8)) * 8;
      const float bb = sBeta[r];
      float x[8];
      LoadVec<TIn, 8>(reinterpret_cast<const TIn*>(sV + r * VP) + c8, x);
      uint4 u;
      u.x = PackBF16(bb * x[0], bb * x[1]);
      u.y = PackBF16(bb * x[2], bb * x[3]);
      u.z = PackBF16(bb * x[4], bb * x[5]);
      u.w = PackBF16(bb * x[6], bb * x[7]);
      *reinterpret_cast<uint4*>(sV + r * VP + c8) = u;
    }
    if (tid >= kInvThreads) StoreAqkHalf(p, sAqk, b, cs, L, hv, 0, tid - kInvThreads, kThreads - kInvThreads);
    __syncthreads();  // A_qk written out (sAqk free for T), T_II, right-hand sides
    if (has_next) sScal[tid] = ItemScalar<TIn>(scal_next, tid);  // sScal is not read again before the next item
    InvertOffDiagBlocks(sAkk, sAqk, tid);
    if (!p.skip_t) StoreAqkHalf(p, sAqk, b, cs, L, hv, C, tid);
    SolveMma<K>(p, sAqk, sQ, sV, b, cs, L, hv, warp, lane, tid);
    __syncthreads();
    if (p.ready != nullptr && tid == 0) done_key = static_cast<int>(tok0);
    it = next;
  }
  if (done_key >= 0) ReleaseAdd(p.ready + done_key, 1);
}

template <int K, typename TIn>
cudaError_t LaunchK(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.B) * p.T * p.HV;  // bound on (chunk, head) items
  // One wave: every CTA takes items from the counter until none is left (and all run before the overlapped
  // recurrence can start, kda_fwd_overlap.h).
  return LaunchGrid(PrepBoundedKernel<K, TIn>, BoundedSmem<K>::Bytes(p.V), items, 1, p, stream, nsm);
}

}  // namespace

bool PrepBoundedApplies(const Params& p, bool mma_solve) {
  // FLASHKDA_FWD_PREP=general forces the general kernel (A/B timing, tests). Read once per process.
  static const bool forced_general = EnvEquals("FLASHKDA_FWD_PREP", "general");
  return !forced_general && mma_solve && (p.K == 64 || p.K == 128) && p.gate_mode == 2 &&
         p.lower_bound >= kBoundedPrepMinBound;
}

template <typename TIn>
cudaError_t LaunchPrepBounded(const Params& p, cudaStream_t stream, int nsm) {
  return p.K == 64 ? LaunchK<64, TIn>(p, stream, nsm) : LaunchK<128, TIn>(p, stream, nsm);
}

template cudaError_t LaunchPrepBounded<__nv_bfloat16>(const Params&, cudaStream_t, int);
template cudaError_t LaunchPrepBounded<__half>(const Params&, cudaStream_t, int);

}  // namespace fwd
}  // namespace flashkda
