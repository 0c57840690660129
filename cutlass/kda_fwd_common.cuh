// Shared definitions of the chunked KDA forward on CUDA (flashkda_fwd): parameters, workspace layout and
// the small tensor-core helpers (CuTe SM80 mma / ldmatrix / cp.async atoms) used by every kernel.
//
// Algorithm (DESIGN §2, chunk C = 64, chunks aligned to sequence starts so every chunk holds one sequence):
//   plan     (kda_plan.cu) per tile of tokens and batch row: sequence starts/ends from `slot`, lists of chunk
//            starts (prep work), segment starts (recurrence work) and multi-segment sequences (combine work);
//            zeroes the outputs of padding tokens; then one CTA sorts the segments longest first and flags the
//            state slots that own tokens, and the final state of every other slot is its initial state (or 0).
//   prep     (kda_fwd_prep.cu; bounded gates: kda_fwd_prep_bounded.cu, same outputs)
//            fully parallel over (chunk, value head): gate activation, cumulative gate G, q/k l2norm,
//            beta sigmoid, A_kk / A_qk with every decay formed as exp(G_i - G_j) (j <= i) or as a product
//            of two factors <= 1 around a reference row (never exp(-G)), the WY solve
//            (I + StrictTril(diag(beta) A_kk)) [W | U] = diag(beta) [exp(G) * K | V], and writes
//            Qg = exp(G) * q, Kd = exp(G_last - G) * k, W, U, A_qk (bf16) and gamma = exp(G_last) (f32); with
//            the tensor-core solve also T = (I + A_kk)^{-1} (bf16, next to A_qk: kAqkPitch) for the backward.
//   phase 1  (only where sequences are split into segments to fill the GPU) for each non-last segment,
//            its end state from the true start state (first segment) or the affine map S -> P S + H
//            (later segments: P from the identity with U = 0, H from zero).
//   phase 2  composes the maps in order: start state of every segment.
//   phase 3  per (segment, value head, V block): R = U - W S; O = Qg S + A_qk R; S = gamma * S + Kd^T R.
//            (Phases 1 and 3 form W S and Qg S on wgmma for K in {64, 128}, the rest on mma.sync:
//            kda_fwd_recur.cu.)
//   overlap  (kda_fwd_overlap.h) where the recurrence kernel after the bounded prep (phase 3, or phase 1 when
//            sequences are split) leaves SMs idle, it starts beside the prep's last items (programmatic dependent
//            launch) and waits per chunk for them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kda_gate_math.cuh"

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

namespace flashkda {
namespace fwd {

constexpr int kChunk = 64;          // tokens per chunk
// Row pitch of the prep's A_qk output (elements): the chunk's A_qk row (C, lower triangle incl. the diagonal),
// then, where the prep solved on tensor cores, the same row of T = (I + A_kk)^{-1} (C, bf16, strictly lower part;
// zeros with the SIMT solve), which the backward's grad2 reads instead of inverting I + A_kk again.
constexpr int kAqkPitch = 2 * kChunk;
constexpr int kSegMinChunks = 8;    // shortest segment a sequence is split into (chunks)
constexpr int kSms = 132;           // SMs assumed by ChooseSeglen (H100/H200)
constexpr int kThreads = 256;       // compute kernels run 8 warps (the K = 128 recurrence: 16)
// Column block of the recurrence kernel (per CTA). K = 128 with at least 64 (row, value head) chains takes all 128
// value columns (16 warps, one CTA per SM), so that each chunk's W, Kd, Qg and A_qk rows are read once; with fewer
// chains two 64-column CTAs of 8 warps per SM hide each other's latency better (H100, session 13: b1-t8k-h64 -4%,
// varlen-32k-h16 +5% at 128 columns).
inline constexpr int BlockV(int K, int64_t B, int64_t HV) { return K >= 256 ? 32 : (K == 128 && B * HV >= 64 ? 128 : 64); }
// Threads of a recurrence CTA: 16 warps for 128 columns, else 8.
inline constexpr int RecurThreads(int BV) { return BV == 128 ? 512 : kThreads; }
// Recurrence CTAs per SM: two for K <= 128 with 64 columns (single stage, <= 128 registers), else one.
inline constexpr int RecurCtasPerSm(int K, int BV) { return K <= 128 && BV <= 64 ? 2 : 1; }
constexpr int kCounterInts = 16;    // Params::counters (the workspace keeps 64 bytes: _workspace.py)
constexpr int kPhase1WorkSlot = 4;  // Params::counters slots: next item of phase 1 / phase 3 (dynamic scheduling)
constexpr int kPhase3WorkSlot = 5;
constexpr int kPrepWorkSlot = 6;    // next item of the bounded prep (dynamic scheduling)

struct Params {
  // problem
  int B, T, H, HV, K, V, group;
  int S_init;    // initial state slots (0 = none)
  int S_final;   // final state slots (0 = not wanted)
  int seglen;    // chunks per segment
  int Lseg;      // tokens per segment (seglen * kChunk)
  int NW, NG, NSPLIT;
  int split;     // 1 if some sequence may be split into several segments
  // options
  float scale, lower_bound;
  int gate_mode, use_a_log, qk_l2norm, beta_sigmoid, allow_neg, state_vk;
  int skip_t;    // 1: the prep leaves the T half of each A_qk row unwritten (no backward will read it)
  // operands
  const void* q;
  const void* k;
  const void* v;
  const void* g;
  const void* beta;
  const float* a_log;
  const float* dt_bias;
  const int* slot;
  const float* init;
  void* o;
  float* final_state;
  // [B, NW + 1, HV, K, V] bf16 or null: the start state of every chunk but a sequence's first, at index
  // ceil(cs / C) of its row, saved for the CUDA backward (its Hs, kda_bwd_common.cuh); written by phase 3
  __nv_bfloat16* chunk_states;
  // workspace
  __nv_bfloat16* Qg;   // [B, T, HV, K]
  __nv_bfloat16* Kd;   // [B, T, HV, K]
  __nv_bfloat16* W;    // [B, T, HV, K]
  __nv_bfloat16* U;    // [B, T, HV, V]
  __nv_bfloat16* Aqk;  // [B, T, HV, kAqkPitch]: A_qk row | T row (see kAqkPitch)
  float* gamma;        // [B, NG, HV, K]
  float* HP;           // [B, NSPLIT, HV, K, V + K]
  float* Sstart;       // [B, NSPLIT, HV, K, V]
  int* seq_start;      // [B, T] scratch of the plan kernel
  int* seq_end;        // [B, T]
  int4* chunk_list;    // [B * T]  (b, t, seq_end, slot)
  int4* seg_list;      // [B * T]  (b, t, seq_end, slot | first << 30)
  int4* multi_list;    // [B * T]  (b, t, seq_end, slot)
  int* counters;       // [kCounterInts]: the plan's list lengths (0-2), the recurrence's item counters
                       // (kPhase*WorkSlot); cleared by PlanScan, the first kernel of every call
  // Prep / recurrence overlap (kda_fwd_overlap.h; null ready = off): the recurrence runs beside the prep's last
  // items and waits, per chunk, until the prep has written every head of it.
  int* ready;          // [B * T]: at each chunk start, heads of that chunk the prep has finished (plan zeroes it)
  int* tile_chunks;    // [ceil(T / 1024) * B]: chunk starts per plan tile, tile-major (PlanFix), for the list order
  int overlap_nsm;     // SMs of the device (the prep checks %nsmid against it)
  int overlap_occ;     // recurrence CTAs per SM
  int overlap_ncb;     // recurrence column blocks per head
  float overlap_tail;  // the prep's tail share, per idle SM per recurrence SM (see kda_fwd_overlap.h)
};

// Workspace layout; mirrored by flashkda_jax/_workspace.py (keep both in sync).
struct Layout {
  size_t qg, kd, w, u, aqk, gamma, hp, sstart, seq_start, seq_end, chunks, segs, multi, counters, total;
  int NW, NG, NSPLIT, seglen, split;
};

inline size_t Align256(size_t x) { return (x + 255) / 256 * 256; }

// Chunks per segment. Splitting a sequence into n segments runs phase 1 (segment maps: V columns for the
// first segment, V + K for the middle ones) and phase 3 (outputs) over chunks of n-times shorter
// segments; pick n minimising (rounds of the resident recurrence CTAs) x (chunks per segment + 2), a phase-1 round
// counted as half a phase-3 one (H100, b1-t32k-h16: 3.4 vs 8.5 us per chunk step; no outputs, fewer operands).
inline int ChooseSeglen(int64_t B, int64_t T, int64_t HV, int64_t K, int64_t V) {
  const int64_t nw = (T + kChunk - 1) / kChunk;
  const int bv = BlockV(static_cast<int>(K), B, HV);
  const int64_t chains = B * HV * (V / bv);
  // K = 256 is supported, not tuned: its sequences are never split (the split path is tested for K <= 128).
  if (chains <= 0 || nw <= kSegMinChunks || K > 128) return static_cast<int>(nw > 0 ? nw : 1);
  int64_t best_len = nw, best_cost = -1;
  for (int64_t n = 1; n <= 64; ++n) {
    int64_t len = (nw + n - 1) / n;
    if (len < kSegMinChunks) len = kSegMinChunks;
    const int64_t ns = (nw + len - 1) / len;
    if (n > 1 && ns < 2) break;
    const int64_t items3 = ns * chains;
    const int64_t items1 = ns > 1 ? chains + (ns - 2) * chains * 2 : 0;
    const int64_t slots = static_cast<int64_t>(RecurCtasPerSm(static_cast<int>(K), bv)) * kSms;
    const int64_t half_rounds = 2 * ((items3 + slots - 1) / slots) + (items1 + slots - 1) / slots;
    const int64_t cost = half_rounds * (len + 2);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_len = ns > 1 ? len : nw;
    }
  }
  return static_cast<int>(best_len);
}

// no_split: one segment per sequence (the smallest layout; used when the buffer was sized for fewer rows,
// e.g. under vmap, and the preferred split does not fit).
// prep_external: the prep outputs (Qg .. gamma) live in buffers of their own (the saved_* results / operands of
// the FFI ops), so their regions here are empty.
inline Layout MakeLayout(int64_t B, int64_t T, int64_t HV, int64_t K, int64_t V, int64_t S, bool no_split = false,
                         bool prep_external = false) {
  Layout l{};
  l.NW = static_cast<int>((T + kChunk - 1) / kChunk);
  l.NG = l.NW + static_cast<int>(S);
  l.seglen = no_split ? (l.NW > 0 ? l.NW : 1) : ChooseSeglen(B, T, HV, K, V);
  l.split = l.seglen < l.NW ? 1 : 0;
  const int64_t lseg = static_cast<int64_t>(l.seglen) * kChunk;
  l.NSPLIT = l.split ? static_cast<int>((T + lseg - 1) / lseg + 1) : 0;
  const size_t tok = static_cast<size_t>(B * T * HV);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    size_t at = off;
    off += Align256(bytes);
    return at;
  };
  const size_t px = prep_external ? 0 : 1;
  l.qg = take(px * tok * K * 2);
  l.kd = take(px * tok * K * 2);
  l.w = take(px * tok * K * 2);
  l.u = take(px * tok * V * 2);
  l.aqk = take(px * tok * kAqkPitch * 2);
  l.gamma = take(px * static_cast<size_t>(B) * l.NG * HV * K * 4);
  l.hp = take(static_cast<size_t>(B) * l.NSPLIT * HV * K * (V + K) * 4);
  l.sstart = take(static_cast<size_t>(B) * l.NSPLIT * HV * K * V * 4);
  l.seq_start = take(static_cast<size_t>(B * T) * 4);
  l.seq_end = take(static_cast<size_t>(B * T) * 4);
  l.chunks = take(static_cast<size_t>(B * T) * 16);
  l.segs = take(static_cast<size_t>(B * T) * 16);
  l.multi = take(static_cast<size_t>(B * T) * 16);
  l.counters = take(kCounterInts * sizeof(int));
  l.total = off;
  return l;
}

// ------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float ToF(T x);
template <>
__device__ __forceinline__ float ToF<float>(float x) { return x; }
template <>
__device__ __forceinline__ float ToF<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float ToF<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T FromF(float x);
template <>
__device__ __forceinline__ float FromF<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half FromF<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ uint32_t PackBF16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Stores two adjacent outputs.
template <typename T>
__device__ __forceinline__ void Store2(T* p, float a, float b) {
  p[0] = FromF<T>(a);
  p[1] = FromF<T>(b);
}
template <>
__device__ __forceinline__ void Store2<__nv_bfloat16>(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
template <>
__device__ __forceinline__ void Store2<__half>(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ void Store2<float>(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

// D += A(16x16, bf16) * B(16x8, bf16), fp32 accumulate: CuTe's SM80 tensor-core atom.
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1],
                                            d[2], d[3]);
}

__device__ __forceinline__ void Ldsm(const void* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}
__device__ __forceinline__ void LdsmT(const void* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}

// tf32 m16n8k8 products, fp32 accumulation.
__device__ __forceinline__ uint32_t ToTF32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
// D += A(16x8, tf32) * B(8x8, tf32). Fragments (gr = lane >> 2, t4 = lane & 3): a0 (gr, t4), a1 (gr + 8, t4),
// a2 (gr, t4 + 4), a3 (gr + 8, t4 + 4); b0 (k = t4, n = gr), b1 (k = t4 + 4, n = gr); d as in the bf16 Mma.
__device__ __forceinline__ void MmaTF32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// The same product of f32 operands to ~f32 accuracy (3xTF32: each operand split into a tf32 head and a tf32 tail,
// D += Al Bh + Ah Bl + Ah Bh; the Al Bl term, ~2^-22 relative, is dropped), each of the three products into its own
// accumulator (d[0] += Al Bh, d[1] += Ah Bl, d[2] += Ah Bh), so that a sum over k-steps is not one chain of dependent
// mmas: callers keep a set per k-step parity and add the sets up at the end.
__device__ __forceinline__ void Mma3xTF32Parts(float (&d)[3][4], const float (&a)[4], float b0, float b1) {
  uint32_t ah[4], al[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ah[i] = ToTF32(a[i]);
    al[i] = ToTF32(a[i] - __uint_as_float(ah[i]));
  }
  const uint32_t bh0 = ToTF32(b0), bh1 = ToTF32(b1);
  const uint32_t bl0 = ToTF32(b0 - __uint_as_float(bh0)), bl1 = ToTF32(b1 - __uint_as_float(bh1));
  MmaTF32(d[0], al, bh0, bh1);
  MmaTF32(d[1], ah, bl0, bl1);
  MmaTF32(d[2], ah, bh0, bh1);
}

// 16-byte async global->shared copy; zero-fills when !pred.
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t, cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem), *reinterpret_cast<cute::uint128_t*>(smem), pred);
}
__device__ __forceinline__ void CpAsyncCommit() { cute::cp_async_fence(); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  cute::cp_async_wait<N>();
}

// Dynamic scheduling of a persistent kernel's items: the next item for the whole CTA, taken from *counter (zeroed
// per call) by thread 0 and broadcast through s_next. Every thread must call it; its first barrier also ends the
// previous reads of s_next.
__device__ __forceinline__ int TakeItem(int* counter, int* s_next) {
  __syncthreads();
  if (threadIdx.x == 0) *s_next = atomicAdd(counter, 1);
  __syncthreads();
  return *s_next;
}

// Chunks of the segment starting at token t0 of a sequence that ends at send (a seg_list entry: t0 = e.y, send =
// e.z): the recurrence's steps for it, and PlanOrder's sort key.
__device__ __forceinline__ int SegmentChunks(const Params& p, int t0, int send) {
  return (min(t0 + p.Lseg, send) - t0 + kChunk - 1) / kChunk;
}

using ::flashkda::Sigmoid;
using ::flashkda::Softplus;

// Effective log-decay of a raw gate input x with its dt_bias dt: x itself (gate_mode 0), -a softplus(x + dt)
// (1), lower_bound sigmoid(a (x + dt)) with use_a_log, else lower_bound sigmoid(x + dt) (2); a = exp(A_log).
// One definition for the forward's prep and the backward's grad2, so that both see the same bits.
// The bounded gate (gate_mode 2), lower_bound sigmoid(a (g + dt_bias)), a = exp(A_log) or 1 without A_log (a
// product with 1 is exact, so one expression serves both); the bounded prep calls it without GateActivation's
// per-element mode branches.
__device__ __forceinline__ float BoundedGate(float lb, float x, float dt, float a) { return lb * Sigmoid(a * (x + dt)); }

__device__ __forceinline__ float GateActivation(const Params& p, float x, float dt, float a_coef) {
  if (p.gate_mode == 0) return x;
  if (p.gate_mode == 1) return -a_coef * Softplus(x + dt);
  return BoundedGate(p.lower_bound, x, dt, p.use_a_log ? a_coef : 1.f);
}

// beta of a token from its raw input (valid: the token is in the chunk; rows past it keep their zero).
__device__ __forceinline__ float ActivateBeta(const Params& p, float raw, bool valid) {
  if (!valid || !p.beta_sigmoid) return raw;
  const float bb = Sigmoid(raw);
  return p.allow_neg ? 2.f * bb : bb;
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace fwd
}  // namespace flashkda
