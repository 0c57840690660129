// Shared definitions of the chunked KDA backward on CUDA (flashkda_bwd): parameters, workspace layout and
// small block-level helpers. The algorithm is modelled in float64 by tests/test_bwd_algorithm.py (same stages,
// same formulas, same decay forms); keep both in step.
//
// Stages (chunk C = 64, chunks aligned to sequence starts as in the forward, kda_fwd_common.cuh):
//   plan     sequence starts/ends from `slot`; lists of chunks and of sequences; zero padding gradients
//   prep     the forward's prep kernel (LaunchPrep): Qg, Kd, W, U, A_qk (bf16) and gamma (f32) per chunk
//   states   one CTA per (sequence, value head, BV columns): the start state S_c of every chunk but a
//            sequence's first (f32, at index ceil(cs / C) of its row; first chunks read initial_state[slot]).
//            Skipped when the forward saved them (its chunk_states, bf16; the backward's operand of that name)
//   (the stages below run per token window, last window first, when the workspace is windowed: Windows)
//   reverse  one CTA per (sequence, value head, BV columns), chunks last to first:
//              dR = A_qk^T dO + Kd dS_next,   dS = Qg^T dO - W^T dR + diag(gamma) dS_next
//            dS_next of every chunk but the last is stored at the index of the next chunk (f32); a last
//            chunk starts from dfinal_state[slot] (or 0); the first chunk's dS goes to dinitial_state[slot]
//   grad1    fully parallel over (chunk, value head): R = U - W S, dR, dQg = dO S^T, dKd = R dS_next^T,
//            dW = -dR S^T, dU = dR, dA_qk = tril(dO R^T), dgamma = rowsum(S * dS_next)  (scratch: dW | dU bf16,
//            dQg, dKd, dA_qk and dgamma f32)
//   grad2    fully parallel over (chunk, value head), recomputed in f32 from the raw inputs: G, l2norm, beta;
//            W | U and T = (I + diag(beta) B_kk)^{-1} from the prep (the default kernel; the first versions
//            recompute B_kk = sum_c k_i k_j exp(G_i - G_j) (j < i) and solve / invert again);
//            [dKb | dVb] = T^T [dW | dU]; dA = -strict_tril(dKb W^T + dVb U^T); dbeta's B_kk term
//            rowsum(dA o B_kk) (by default out of the B_kk decay product's gradient, without B_kk itself);
//            gradients of the decay products (only exp(G_i - G_j), j <= i); elementwise terms of Qg, Kd,
//            gamma, Kb = beta e^G k, Vb = beta v; dg = reverse cumsum of dG; gate and beta-sigmoid chains.
//            Writes dv, dg, dbeta and f32 per-(token, value head) dq, dk (w.r.t. the scaled, normalised
//            q/k; GVA only) and each chunk's sums of the gate-parameter terms
//   finish   per (token, q/k head): sum over the value heads of the group in order, scale, l2norm; without
//            GVA (one value head per q/k head) grad2 does this itself and writes dq / dk (FinishInGrad2)
//   reduce   per (batch row, value head): da_log_partial and ddt_bias_partial, sums over chunks in order:
//            per tile of kReduceTile tokens in parallel (gred; the chunk-start tokens), then over the tiles
// No float atomics: every result element has one writer and a fixed summation order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kda_fwd_common.cuh"

namespace flashkda {
namespace bwd {

constexpr int kChunk = fwd::kChunk;
constexpr int kThreads = 256;
// Slots of fwd::Params::counters (16 ints, zeroed per call; 0 and 1 are the plan's chunk and sequence counts).
constexpr int kReverseWorkSlot = 4;  // next reverse-pass item (dynamic scheduling)
constexpr int kReversePickSlot = 5;  // the reverse pass's column block
constexpr int kWinChunkSlot = 6;     // chunks of the current token window (WindowLists)
constexpr int kWinSeqSlot = 7;       // sequences with a chunk in the current token window (WindowLists)
constexpr int kBV = 64;  // state columns per CTA of the states / reverse kernels
constexpr int kReduceTile = 64;  // tokens per CTA of the gate-parameter reduction's first pass

struct Params {
  fwd::Params f;  // problem, options, inputs and the prep workspace (f.S_final = dfinal_state slots)
  int S_out;      // dfinal_state slots (0 = none)
  const void* d_o;
  const float* dfin;
  void* dq;
  void* dk;
  void* dv;
  void* dg;
  void* dbeta;
  float* da_log;   // [B, HV]
  float* ddt;      // [B, HV, K]
  float* dinit;    // [B, S_init, HV, K, V] or null
  // workspace
  float* Hs;       // [B, NW + 1, HV, K, V] chunk start states (bf16 when states_bf16)
  float* dH;       // [B, NW + 1, HV, K, V] gradients w.r.t. chunk start states (bf16 when states_bf16)
  int states_bf16; // Hs / dH hold bf16 (StatesInBf16()), else f32
  int grad2_wu_prep;  // grad2 (tensor-core solve) reads W | U from the prep workspace (set by LaunchGrad2)
  float* dgam;     // [B, NG, HV, K]       dgamma per chunk (indexed like gamma)
  // [B, T, HV, K] f32: grad1's dQg (dKd), then grad2's dq (dk) (effective; GVA only). bf16 rows (session 7) took
  // 0.24 ms off b1-t32k-h16 fwd+bwd but doubled the fp16 dA_log error (test_defaults_vs_oracle): dg is a small
  // difference of the terms these feed.
  float* sQg;
  float* sKd;
  // [B, T, HV, K + V] bf16 rows dW | dU (grad1; grad2's tensor-core solve rounds them to bf16 operands anyway).
  // grad2 then writes, at the row of each chunk's first token, the chunk's sum of d(gate input) (for ddt_bias) as
  // K f32 (sDgr, same bytes since K == V), after reading that row: a row belongs to one grad2 item, so no other
  // item reads it afterwards. The other rows keep their dW | dU.
  __nv_bfloat16* sWU;
  float* sDgr;     // [B, T, HV, K] f32, aliases sWU (see above)
  // [B, T, HV, C] dA_qk rows (f32: grad2's exact pairwise diagonal blocks read them in f32; bf16 rows moved
  // tests/test_cuda_bwd_variants.py's fp16 dA_log past its bound, session 7)
  float* sA;
  float* sDa;      // [B, T, HV]     d a_log summed over each chunk, at the chunk's first token (other rows unset)
  int4* seq_list;  // [B * T] (b, start, end, slot)
  // 1: the reverse kernels are launched for every column block, run only if f.counters[kReversePickSlot] (set by
  // PickReverseBlock from the sequence lengths) names theirs, and take items from f.counters[kReverseWorkSlot]
  int reverse_pick;
  float* gred;     // [B, HV, ceil(T / kReduceTile), K + 1] per-tile sums of d(gate input) (K) and d a_log (1)
  // Token window of this launch (SetWindow, per window by the handler): the reverse, grad1, grad2, finish and
  // gate-tile stages of one window handle the chunks starting in [win_lo, win_hi) of every batch row; the
  // per-token scratch (sQg, sKd, sWU, sA, sDa) holds win_T rows per batch row from win_lo, dH holds win_nw
  // chunk states per batch row from index win_dh0. One window: 0, T, T, NW + 1, 0 (the unwindowed layout).
  int win_lo, win_hi, win_T, win_nw, win_dh0;
  int windowed;    // more than one window: the stages take their items from win_chunks / win_seqs
  // f32 dS crossing the window's end (read: written by the later window) and its start (written), [B, HV, K, V]
  // each; null with one window.
  float* bnd_in;
  float* bnd_out;
  int* win_chunks;  // [B * T] the window's chunks (indices into f.chunk_list), counters[kWinChunkSlot] of them
  int* win_seqs;    // [B * T] the window's sequences (indices into seq_list), counters[kWinSeqSlot] of them
};

// The backward's token windows (docs/ffi.md, "CUDA backward workspace"): the stages after the states pass run
// window by window, last to first, so the per-token scratch and dH are a window's size. `len` tokens per window
// (a multiple of kChunk), `count` windows; count == 1: the whole sequence, unwindowed. Python picks the length
// (flashkda_jax/_workspace.py:cuda_bwd_window) and passes it as the op's bwd_window attribute.
struct Windows {
  int64_t len, count;
  int64_t rows;   // per-token scratch rows per batch row (Params::win_T)
  int64_t slots;  // dH chunk states per batch row (Params::win_nw)
};

// NW: the problem's chunk count (ceil(T / kChunk)).
inline Windows MakeWindows(int64_t T, int64_t NW, int64_t window) {
  if (window <= 0 || window >= T) return Windows{T, 1, T, NW + 1};
  // A chunk starting before a window's end ends before end + kChunk - 1; a chunk starting at cs >= lo has its
  // dS_next at dH index (cs + 2 kChunk - 1) / kChunk >= lo / kChunk + 1, at most window / kChunk + 1 indices in all.
  const int64_t rows = window + kChunk - 1 < T ? window + kChunk - 1 : T;
  return Windows{window, (T + window - 1) / window, rows, window / kChunk + 1};
}

// Per-window values of Params (win_*), for window w of `win` (0 = the first tokens).
__host__ __forceinline__ void SetWindow(Params& P, const Windows& win, int64_t w) {
  const int64_t T = P.f.T;
  const bool windowed = win.count > 1;
  const int64_t lo = windowed ? w * win.len : 0, hi = windowed && lo + win.len < T ? lo + win.len : T;
  P.windowed = windowed ? 1 : 0;
  P.win_lo = static_cast<int>(lo);
  P.win_hi = static_cast<int>(hi);
  P.win_T = static_cast<int>(win.rows);
  P.win_nw = static_cast<int>(win.slots);
  P.win_dh0 = windowed ? static_cast<int>(lo / kChunk + 1) : 0;
}

// Whether a chunk starting at cs belongs to the current window.
__device__ __forceinline__ bool InWindow(const Params& P, int cs) { return cs >= P.win_lo && cs < P.win_hi; }

// The chunks m_lo .. m_hi - 1 (0 = first) of the sequence [ss, se) that start in the current window.
__device__ __forceinline__ void WindowChunkRange(const Params& P, int ss, int se, int* m_lo, int* m_hi) {
  const int nch = (se - ss + kChunk - 1) / kChunk;
  *m_lo = P.win_lo > ss ? (P.win_lo - ss + kChunk - 1) / kChunk : 0;
  *m_hi = P.win_hi > ss ? min(nch, (P.win_hi - ss + kChunk - 1) / kChunk) : 0;
}

// Work items of the per-window stages: the window's chunks / sequences (WindowLists), or all of them.
__device__ __forceinline__ int WindowChunkCount(const Params& P) {
  return P.f.counters[P.windowed ? kWinChunkSlot : 0];
}
__device__ __forceinline__ int4 WindowChunk(const Params& P, int i) {
  return P.f.chunk_list[P.windowed ? P.win_chunks[i] : i];
}
__device__ __forceinline__ int WindowSeqCount(const Params& P) { return P.f.counters[P.windowed ? kWinSeqSlot : 1]; }
__device__ __forceinline__ int4 WindowSeq(const Params& P, int i) { return P.seq_list[P.windowed ? P.win_seqs[i] : i]; }

// Scratch row of token cs + r of batch row b (cs a chunk start in the window).
__device__ __forceinline__ size_t WinRow(const Params& P, int b, int cs) {
  return static_cast<size_t>(b) * P.win_T + (cs - P.win_lo);
}

// Offset in dH of the state dS_next of the chunk starting at cs (index (cs + 2 kChunk - 1) / kChunk).
__device__ __forceinline__ size_t DhOffset(const Params& P, int b, int cs, int hv) {
  const fwd::Params& p = P.f;
  return ((static_cast<size_t>(b) * P.win_nw + (cs + 2 * kChunk - 1) / kChunk - P.win_dh0) * p.HV + hv) *
         p.K * p.V;
}

struct Layout {
  fwd::Layout f;  // the prep workspace (only qg..gamma, seq_start, seq_end, chunks, counters are used)
  Windows win;
  size_t hs, dh, dgam, sqg, skd, swu, sa, sda, seqs, gred, bnd, wlists, total;
};

// Whether the chunk states Hs / dH are stored in bf16: with the default kernels (v2 states / reverse passes and
// the tensor-core grad1), whose only reader rounds them to bf16 mma operands anyway, so the values used are the
// same and the states' traffic and workspace halve. The first versions (FLASHKDA_BWD_RECUR=v1 or
// FLASHKDA_BWD_GRAD1=simt) keep f32. Host only; flashkda_jax/_workspace.py reads the same switches.
bool StatesInBf16();

// Workspace layout; mirrored by flashkda_jax/_workspace.py:cuda_bwd_workspace_bytes (keep both in sync).
// states_given: the forward saved the chunk states (its chunk_states result, passed back as an operand), so
// the workspace holds no Hs.
// prep_given: the forward's prep outputs come as operands (saved_*), so the embedded forward layout has no prep
// regions; S_out is then the slots of the saved gamma (its NG - NW), which dgamma shares.
// window: tokens per window (bwd_window; 0 = none).
inline Layout MakeLayout(int64_t B, int64_t T, int64_t HV, int64_t K, int64_t V, int64_t S_out, bool states_bf16,
                         bool states_given = false, bool prep_given = false, int64_t window = 0) {
  Layout l{};
  // The forward's layout without splitting (its HP / Sstart blocks are then empty).
  l.f = fwd::MakeLayout(B, T, HV, K, V, S_out, /*no_split=*/true, prep_given);
  size_t off = l.f.total;
  auto take = [&](size_t bytes) {
    size_t at = off;
    off += fwd::Align256(bytes);
    return at;
  };
  l.win = MakeWindows(T, l.f.NW, window);
  const bool windowed = l.win.count > 1;
  // Per-token scratch and dH: one window's rows and chunk states.
  const size_t tok = static_cast<size_t>(B * l.win.rows * HV);
  const size_t sbytes = static_cast<size_t>(HV) * K * V * (states_bf16 ? 2 : 4);
  l.hs = take(states_given ? 0 : static_cast<size_t>(B) * (l.f.NW + 1) * sbytes);
  l.dh = take(static_cast<size_t>(B) * l.win.slots * sbytes);
  l.dgam = take(static_cast<size_t>(B) * l.f.NG * HV * K * 4);
  l.sqg = take(tok * K * 4);
  l.skd = take(tok * K * 4);
  l.swu = take(tok * (K + V) * 2);
  l.sa = take(tok * kChunk * 4);
  l.sda = take(tok * 4);
  l.seqs = take(static_cast<size_t>(B * T) * 16);
  l.gred = take(static_cast<size_t>(B) * HV * ((T + kReduceTile - 1) / kReduceTile) * (K + 1) * 4);
  l.bnd = take(windowed ? 2 * static_cast<size_t>(B) * HV * K * V * 4 : 0);
  l.wlists = take(windowed ? static_cast<size_t>(B * T) * 8 : 0);
  l.total = off;
  return l;
}

// Index of a chunk in the gamma / dgamma arrays: full chunks by position, a sequence's last chunk by slot
// (only when that slot has a final state / its cotangent), else -1.
__device__ __forceinline__ int GammaIndex(const fwd::Params& p, int cs, int send, int s) {
  const bool last = cs + kChunk >= send;
  return !last ? (cs + kChunk - 1) / kChunk : (s < p.S_final ? p.NW + s : -1);
}

// Element (k, v) of a [K, V] (or, state_vk, [V, K]) state matrix.
__device__ __forceinline__ size_t StateAt(bool vk, int K, int V, int k, int v) {
  return vk ? static_cast<size_t>(v) * K + k : static_cast<size_t>(k) * V + v;
}

// acc[i][j] += sum_{kk < kd} a(m(i), kk) * b(kk, n(j)) with m(i) = m0 + i * ms, n(j) = n0 + j * ns: a
// register micro-tile whose rows and columns are interleaved across threads (conflict-free shared reads).
template <int TM, int TN, typename FA, typename FB>
__device__ __forceinline__ void MicroGemm(float (&acc)[TM][TN], int m0, int ms, int n0, int ns, int kd, FA a,
                                          FB b) {
#pragma unroll 4
  for (int kk = 0; kk < kd; ++kk) {
    float av[TM], bv[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = a(m0 + i * ms, kk);
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = b(kk, n0 + j * ns);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
}

template <int TM, int TN>
__device__ __forceinline__ void Zero(float (&acc)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
}

__device__ __forceinline__ float Bf(__nv_bfloat16 x) { return __bfloat162float(x); }

// Without GVA grad2 writes dq / dk itself (the finish pass has one value head to sum); PadZero then zeroes them
// on padding tokens.
__host__ __device__ __forceinline__ bool FinishInGrad2(const fwd::Params& p) { return p.group == 1; }

// Backward of the fused l2norm y = x r, r = rsqrt(|x|^2 + 1e-6), for one row held by a warp (PL channels per
// lane, lane + 32 u): dy <- r (dy - x r (dy . x r)). Shared by Finish and grad2 (same operations, same order).
template <int PL>
__device__ __forceinline__ void L2NormBackwardRow(float (&dy)[PL], const float (&x)[PL]) {
  float ss = 0.f;
#pragma unroll
  for (int u = 0; u < PL; ++u) ss += x[u] * x[u];
  const float r = rsqrtf(fwd::WarpSum(ss) + 1e-6f);
  float dot = 0.f;
#pragma unroll
  for (int u = 0; u < PL; ++u) dot += dy[u] * x[u] * r;
  dot = fwd::WarpSum(dot);
#pragma unroll
  for (int u = 0; u < PL; ++u) dy[u] = r * (dy[u] - x[u] * r * dot);
}

// Launchers (one translation unit per kernel family).
bool RecurV2Selected();   // kda_bwd_recur.cu
bool Grad1MmaSelected();  // kda_bwd_grad1.cu
cudaError_t LaunchStates(const Params& p, cudaStream_t stream, int nsm);
template <typename TIn>
cudaError_t LaunchReverse(const Params& p, cudaStream_t stream, int nsm);
template <typename TIn>
cudaError_t LaunchGrad1(const Params& p, cudaStream_t stream, int nsm);
template <typename TIn>
cudaError_t LaunchGrad2(const Params& p, cudaStream_t stream, int nsm);

}  // namespace bwd
}  // namespace flashkda
