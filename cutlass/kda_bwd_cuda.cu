// CUDA handler of flashkda_bwd: decodes the operands, lays out the workspace and enqueues the plan, the
// forward's prep kernel, and the backward stages (kda_bwd_common.cuh). Graph safe: no allocation, no host
// synchronisation, no host read of device data; every size is a static bound.
#include <cuda_runtime.h>

#include <string>

#include "kda_bindings.h"
#include "kda_bwd_common.cuh"
#include "kda_fwd_launch.h"
#include "kda_fwd_params.h"

namespace ffi = xla::ffi;

namespace flashkda {
namespace bwd {
namespace {

// Zero dv, dg, dbeta (and, FinishInGrad2, dq, dk) of padding tokens (one warp per token).
template <typename TIn>
__global__ void __launch_bounds__(256) PadZero(Params P) {
  const fwd::Params& p = P.f;
  const int lane = threadIdx.x & 31;
  const long long ntok = static_cast<long long>(p.B) * p.T;
  const TIn z = fwd::FromF<TIn>(0.f);
  for (long long tok = (blockIdx.x * 256ll + threadIdx.x) / 32; tok < ntok; tok += gridDim.x * 8ll) {
    if (p.slot[tok] >= 0) continue;
    TIn* dv = static_cast<TIn*>(P.dv) + tok * p.HV * p.V;
    TIn* dg = static_cast<TIn*>(P.dg) + tok * p.HV * p.K;
    TIn* db = static_cast<TIn*>(P.dbeta) + tok * p.HV;
    for (int i = lane; i < p.HV * p.V; i += 32) dv[i] = z;
    for (int i = lane; i < p.HV * p.K; i += 32) dg[i] = z;
    for (int i = lane; i < p.HV; i += 32) db[i] = z;
    if (FinishInGrad2(p)) {
      TIn* dq = static_cast<TIn*>(P.dq) + tok * p.H * p.K;
      TIn* dk = static_cast<TIn*>(P.dk) + tok * p.H * p.K;
      for (int i = lane; i < p.H * p.K; i += 32) dq[i] = dk[i] = z;
    }
  }
}

// Tokens the window's finish pass may see, per batch row: [win_lo, win_lo + FinishSpan) (a chunk starting
// before win_hi ends before win_hi + kChunk - 1).
__host__ __device__ __forceinline__ int FinishSpan(const Params& P) {
  return min(P.win_hi + kChunk - 1, P.f.T) - P.win_lo;
}

// dq, dk per (token, q/k head), one warp each: sum over the value heads of the group in order, scale,
// l2norm. Padding tokens get zeros. The tokens of the window's chunks (padding tokens: those in
// [win_lo, win_hi)).
template <int K, typename TIn>
__global__ void __launch_bounds__(256) Finish(Params P) {
  constexpr int PL = K / 32;
  const fwd::Params& p = P.f;
  const int lane = threadIdx.x & 31;
  const int span = FinishSpan(P);
  const long long n = static_cast<long long>(p.B) * span * p.H;
  const TIn* gq = static_cast<const TIn*>(p.q);
  const TIn* gk = static_cast<const TIn*>(p.k);
  TIn* oq = static_cast<TIn*>(P.dq);
  TIn* ok = static_cast<TIn*>(P.dk);
  for (long long w = (blockIdx.x * 256ll + threadIdx.x) / 32; w < n; w += gridDim.x * 8ll) {
    const long long bt = w / p.H;
    const int h = static_cast<int>(w - bt * p.H);
    const int b = static_cast<int>(bt / span), t = P.win_lo + static_cast<int>(bt - static_cast<long long>(b) * span);
    const long long tok = static_cast<long long>(b) * p.T + t;
    const bool valid = p.slot[tok] >= 0;
    const int cs = valid ? t - (t - p.seq_start[tok]) % kChunk : t;  // the token's chunk start (padding: itself)
    if (!InWindow(P, cs)) continue;  // (warp-uniform)
    const size_t wrow = WinRow(P, b, t);  // scratch row of the token
    for (int which = 0; which < 2; ++which) {
      const float* src = which == 0 ? P.sQg : P.sKd;
      const TIn* x = which == 0 ? gq : gk;
      TIn* out = which == 0 ? oq : ok;
      float dy[PL], xv[PL];
#pragma unroll
      for (int u = 0; u < PL; ++u) dy[u] = 0.f;
      if (valid) {
        for (int j = 0; j < p.group; ++j) {
          const size_t o = (wrow * p.HV + h * p.group + j) * K;
#pragma unroll
          for (int u = 0; u < PL; ++u) dy[u] += src[o + lane + 32 * u];
        }
        if (which == 0) {
#pragma unroll
          for (int u = 0; u < PL; ++u) dy[u] *= p.scale;
        }
        if (p.qk_l2norm) {
#pragma unroll
          for (int u = 0; u < PL; ++u) xv[u] = fwd::ToF<TIn>(x[((size_t)tok * p.H + h) * K + lane + 32 * u]);
          L2NormBackwardRow<PL>(dy, xv);
        }
      }
#pragma unroll
      for (int u = 0; u < PL; ++u) out[((size_t)tok * p.H + h) * K + lane + 32 * u] = fwd::FromF<TIn>(dy[u]);
    }
  }
}

// Whether token t (tok = b T + t) starts a chunk of its sequence: where grad2 left the chunk's gate sums.
__device__ __forceinline__ bool ChunkStartToken(const fwd::Params& p, size_t tok, int t) {
  return p.slot[tok] >= 0 && (t - p.seq_start[tok]) % kChunk == 0;
}

// da_log_partial and ddt_bias_partial per (batch row, value head): sums over chunks in order.
// Gate-parameter gradients, deterministic in two passes (no atomics). Pass 1, one CTA per (batch row, value
// head, tile of kReduceTile tokens): the tile's sums of d(gate input) per column (-> ddt_bias) and of d a_log,
// in a fixed order, to gred. Pass 2, one CTA per (row, value head): the tiles' sums in tile order.
template <int K>
__global__ void __launch_bounds__(256) ReduceGateTiles(Params P) {
  constexpr int NP = 256 / K;  // token phases
  __shared__ float s_part[256];
  __shared__ float s_da[kReduceTile];
  __shared__ int s_start[kReduceTile];  // which of the tile's tokens start a chunk
  const fwd::Params& p = P.f;
  const int tid = threadIdx.x, c = tid % K, part = tid / K;
  const int ntile = (p.T + kReduceTile - 1) / kReduceTile;
  // The window's tiles (its bounds are multiples of kReduceTile, or T): the chunk starts in [win_lo, win_hi).
  const int tile0 = P.win_lo / kReduceTile, wtiles = (P.win_hi + kReduceTile - 1) / kReduceTile - tile0;
  const long long nitems = static_cast<long long>(p.B) * p.HV * wtiles;
  for (long long wit = blockIdx.x; wit < nitems; wit += gridDim.x) {
    const int tile = tile0 + static_cast<int>(wit % wtiles);
    const long long bh = wit / wtiles;  // b * HV + hv
    const long long it = bh * ntile + tile;  // gred's item
    const int b = static_cast<int>(bh / p.HV), hv = static_cast<int>(bh % p.HV);
    const int t0 = tile * kReduceTile, t1 = min(t0 + kReduceTile, p.T);
    const size_t wb = WinRow(P, b, t0);  // scratch row of t0
    __syncthreads();  // the previous item is done with shared memory
    if (tid < kReduceTile) {
      const int t = t0 + tid;
      s_start[tid] = p.gate_mode != 0 && t < t1 && ChunkStartToken(p, (size_t)b * p.T + t, t);
    }
    __syncthreads();
    float acc = 0.f, da = 0.f;
    for (int i = part; i < t1 - t0; i += NP) {
      if (s_start[i]) acc += P.sDgr[((wb + i) * p.HV + hv) * K + c];
    }
    if (tid < kReduceTile && s_start[tid]) da = P.sDa[(wb + tid) * p.HV + hv];
    s_part[tid] = acc;
    if (tid < kReduceTile) s_da[tid] = da;
    __syncthreads();
    float* dst = P.gred + it * (K + 1);
    if (tid < K) {
      float sum = 0.f;
      for (int q = 0; q < NP; ++q) sum += s_part[q * K + tid];
      dst[tid] = sum;
    } else if (tid == K) {
      float sum = 0.f;
      for (int q = 0; q < kReduceTile; ++q) sum += s_da[q];
      dst[K] = sum;
    }
  }
}

// Second pass: the tile sums of each (row, head) added up. An item is (row, head, group of 32 of the K + 1
// columns); warp q of its CTA sums the tiles q, q + 8, ... in order, then lane c of warp 0 adds the 8 partial
// sums in order: a fixed order whatever the grid (few rows with long sequences get 5 CTAs per (row, head)).
constexpr int ReduceGroups(int K) { return (K + 1 + 31) / 32; }  // 32-column groups of the K + 1 columns

template <int K>
__global__ void __launch_bounds__(256) ReduceGate(Params P) {
  constexpr int NG = ReduceGroups(K);
  __shared__ float s_part[8][32];
  const fwd::Params& p = P.f;
  const int ntile = (p.T + kReduceTile - 1) / kReduceTile;
  const long long nitems = static_cast<long long>(p.B) * p.HV * NG;
  const int lane = threadIdx.x & 31, q = threadIdx.x >> 5;
  for (long long it = blockIdx.x; it < nitems; it += gridDim.x) {
    const long long bh = it / NG;
    const int c = static_cast<int>(it - bh * NG) * 32 + lane;
    const float* src = P.gred + bh * ntile * (K + 1) + c;
    float sum = 0.f;
    if (c <= K) {
#pragma unroll 4
      for (int t = q; t < ntile; t += 8) sum += src[(size_t)t * (K + 1)];
    }
    __syncthreads();  // the previous item is done with s_part
    s_part[q][lane] = sum;
    __syncthreads();
    if (q == 0 && c <= K) {
      float total = 0.f;
#pragma unroll
      for (int u = 0; u < 8; ++u) total += s_part[u][lane];
      if (c < K) {
        P.ddt[bh * K + c] = total;
      } else {
        P.da_log[bh] = total;
      }
    }
  }
}

// The current window's work lists (one CTA of 1024 threads): the indices of the chunks that start in it (into
// f.chunk_list) and of the sequences with such a chunk (into seq_list), in list order, and their counts
// (counters[kWinChunkSlot], counters[kWinSeqSlot]). The per-window stages iterate these instead of every item.
constexpr int kListThreads = 1024;
__global__ void __launch_bounds__(kListThreads) WindowLists(Params P) {
  __shared__ int s_warp[kListThreads / 32];
  __shared__ int s_base;
  const fwd::Params& p = P.f;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int which = 0; which < 2; ++which) {  // 0: chunks, 1: sequences
    const int n = p.counters[which];
    int* out = which == 0 ? P.win_chunks : P.win_seqs;
    if (tid == 0) s_base = 0;
    __syncthreads();
    for (int i0 = 0; i0 < n; i0 += kListThreads) {
      const int i = i0 + tid;
      bool take = false;
      if (i < n) {
        if (which == 0) {
          take = InWindow(P, p.chunk_list[i].y);
        } else {
          const int4 e = P.seq_list[i];
          int m_lo, m_hi;
          WindowChunkRange(P, e.y, e.z, &m_lo, &m_hi);
          take = m_lo < m_hi;
        }
      }
      const unsigned mask = __ballot_sync(0xffffffffu, take);
      if (lane == 0) s_warp[warp] = __popc(mask);
      __syncthreads();
      int before = 0, total = 0;
      for (int w = 0; w < kListThreads / 32; ++w) {
        before += w < warp ? s_warp[w] : 0;
        total += s_warp[w];
      }
      if (take) out[s_base + before + __popc(mask & ((1u << lane) - 1u))] = i;
      __syncthreads();  // everyone has read s_base and s_warp
      if (tid == 0) s_base += total;
      __syncthreads();
    }
    if (tid == 0) p.counters[which == 0 ? kWinChunkSlot : kWinSeqSlot] = s_base;
  }
}

ffi::Error CudaError(cudaError_t err, const char* where) {
  return ffi::Error::Internal(std::string("flashkda_bwd: ") + where + ": " + cudaGetErrorString(err));
}

// bnd: the windows' boundary states (two [B, HV, K, V] f32 blocks of bnd_elems each; null with one window).
template <typename TIn>
ffi::Error Run(cudaStream_t stream, Params& P, const Windows& win, float* bnd, size_t bnd_elems, bool state_only,
               bool states_given, bool prep_given) {
  const fwd::Params& p = P.f;
  const int nsm = fwd::SmCount();
  cudaError_t err;
  if ((err = fwd::LaunchPlanSeqs(p, P.seq_list, stream)) != cudaSuccess) return CudaError(err, "plan kernels");
  if (!state_only) {
    const long long ntok = static_cast<long long>(p.B) * p.T;
    long long grid = (ntok + 7) / 8;
    if (grid > 4ll * nsm * 8) grid = 4ll * nsm * 8;
    PadZero<TIn><<<static_cast<int>(grid), 256, 0, stream>>>(P);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return CudaError(err, "plan kernels");
  if (!prep_given && (err = fwd::LaunchPrep<TIn>(p, stream, nsm)) != cudaSuccess) return CudaError(err, "prep kernel");
  if (!state_only && !states_given && (err = LaunchStates(P, stream, nsm)) != cudaSuccess) return CudaError(err, "states kernel");
  // The per-window stages, last window first (the reverse pass carries dS across windows through bnd).
  const long long rows = static_cast<long long>(p.B) * p.HV;
  const bool finish = !FinishInGrad2(p);
  for (int64_t w = win.count - 1; w >= 0; --w) {
    SetWindow(P, win, w);
    if (win.count > 1) {  // ping-pong: a window reads its successor's boundary states while writing its own
      P.bnd_in = bnd + ((w + 1) & 1) * bnd_elems;
      P.bnd_out = bnd + (w & 1) * bnd_elems;
      WindowLists<<<1, kListThreads, 0, stream>>>(P);
    }
    if ((err = LaunchReverse<TIn>(P, stream, nsm)) != cudaSuccess) return CudaError(err, "reverse kernel");
    if (state_only) continue;  // the reverse pass needs no chunk states
    if ((err = LaunchGrad1<TIn>(P, stream, nsm)) != cudaSuccess) return CudaError(err, "grad1 kernel");
    if ((err = LaunchGrad2<TIn>(P, stream, nsm)) != cudaSuccess) return CudaError(err, "grad2 kernel");
    const long long n = static_cast<long long>(p.B) * FinishSpan(P) * p.H;
    long long grid = (n + 7) / 8;
    if (grid > 4ll * nsm * 8) grid = 4ll * nsm * 8;
    const long long tiles = rows * ((P.win_hi + kReduceTile - 1) / kReduceTile - P.win_lo / kReduceTile);
    const int gt = static_cast<int>(tiles < 16ll * nsm ? tiles : 16ll * nsm);
    if (p.K == 64) {
      if (finish) Finish<64, TIn><<<static_cast<int>(grid), 256, 0, stream>>>(P);
      if (gt > 0) ReduceGateTiles<64><<<gt, 256, 0, stream>>>(P);
    } else {
      if (finish) Finish<128, TIn><<<static_cast<int>(grid), 256, 0, stream>>>(P);
      if (gt > 0) ReduceGateTiles<128><<<gt, 256, 0, stream>>>(P);
    }
  }
  if (!state_only) {
    const long long ritems = rows * ReduceGroups(p.K);  // ReduceGate's items: (row, head, column group)
    const int gr = static_cast<int>(ritems < 4ll * nsm ? ritems : 4ll * nsm);
    if (p.K == 64) {
      if (gr > 0) ReduceGate<64><<<gr, 256, 0, stream>>>(P);
    } else {
      if (gr > 0) ReduceGate<128><<<gr, 256, 0, stream>>>(P);
    }
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return CudaError(err, "finish kernels");
  return ffi::Error::Success();
}

ffi::Error Check(ffi::Result<ffi::AnyBuffer>& r, size_t n, ffi::DataType dt, const char* what) {
  if (r->element_count() != n || r->element_type() != dt) {
    return ffi::Error::InvalidArgument(std::string("flashkda_bwd (CUDA): bad ") + what + " buffer");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace bwd
}  // namespace flashkda

static ffi::Error KdaCudaBwdImpl(cudaStream_t stream, FLASHKDA_BWD_PARAMS) {
  using namespace flashkda;
  using namespace flashkda::bwd;
  KdaOptions opt;
  if (auto err = FLASHKDA_DECODE_OPTIONS(opt); err.failure()) return err;
  KdaShape s;
  if (auto err = DecodeShape(q, k, v, g, beta, a_log, dt_bias, slot, initial_state, opt, &s); err.failure()) return err;
  const auto dt = s.dtype;
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16 && dt != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): inputs must be bfloat16, float16 or float32");
  }
  if (s.K != s.V || (s.K != 64 && s.K != 128)) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): head dims must satisfy K == V in {64, 128}");
  }
  const size_t nq = static_cast<size_t>(s.B * s.T * s.H * s.K), nv = static_cast<size_t>(s.B * s.T * s.HV * s.V);
  const size_t ng = static_cast<size_t>(s.B * s.T * s.HV * s.K), nb = static_cast<size_t>(s.B * s.T * s.HV);
  if (q.element_count() != nq) return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): bad q shape");
  if (d_o.element_count() != nv || d_o.element_type() != dt) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): do must have v's shape and dtype");
  }
  const int64_t s_out = StateSlots(dfinal_state, s);
  if (dfinal_state.element_count() > 0 &&
      (dfinal_state.element_count() != static_cast<size_t>(s.B * s_out * s.HV * s.K * s.V) ||
       dfinal_state.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): dfinal_state has a bad size or dtype");
  }
  if (s.has_initial_state && s_out > 0 && s_out != s.S) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): initial state and dfinal_state must have the same slots");
  }
  // State-only mode (docs/ffi.md): every input-gradient result empty -> only the reverse pass runs, for
  // dinitial_state.
  const size_t nrow = static_cast<size_t>(s.B * s.HV);
  const bool state_only = StateOnlyRequested(s, *dq, *dk, *dv, *dg, *dbeta, *da_log_partial, *ddt_bias_partial);
  if (state_only && !s.has_initial_state) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): the state-only backward needs an initial_state");
  }
  if (!state_only) {
    if (auto e = Check(dq, nq, dt, "dq"); e.failure()) return e;
    if (auto e = Check(dk, nq, dt, "dk"); e.failure()) return e;
    if (auto e = Check(dv, nv, dt, "dv"); e.failure()) return e;
    if (auto e = Check(dg, ng, dt, "dg"); e.failure()) return e;
    if (auto e = Check(dbeta, nb, dt, "dbeta"); e.failure()) return e;
    if (auto e = Check(da_log_partial, nrow, ffi::DataType::F32, "da_log_partial"); e.failure()) return e;
    if (auto e = Check(ddt_bias_partial, nrow * s.K, ffi::DataType::F32, "ddt_bias_partial"); e.failure()) return e;
  }
  if (auto e = Check(dinitial_state, initial_state.element_count(), ffi::DataType::F32, "dinitial_state");
      e.failure()) {
    return e;
  }
  const bool states_bf16 = StatesInBf16();
  // The forward's chunk states (bf16 [B, ceil(T / 64) + 1, HV, K, V]), or empty: the states pass recomputes them.
  const bool states_given = chunk_states.element_count() > 0;
  if (states_given) {
    if (!fwd::ChunkStatesWellFormed(s, chunk_states)) {
      return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): chunk_states must be bfloat16 [B, ceil(T / 64) + 1, HV, K, V]");
    }
    if (!states_bf16) {
      return ffi::Error::InvalidArgument(
          "flashkda_bwd (CUDA): chunk_states need the default backward kernels (bf16 chunk states); "
          "FLASHKDA_BWD_RECUR=v1 / FLASHKDA_BWD_GRAD1=simt keep f32 states");
    }
  }
  // The forward's prep outputs (saved_*), or empty: the backward runs the prep again. With them, gamma's slots
  // (its NG - NW) set the layout's S, which dgamma shares.
  int64_t s_lay = s_out;
  bool prep_ok = true;
  const ffi::AnyBuffer* const saved[6] = {&saved_qg, &saved_kd, &saved_w, &saved_u, &saved_aqk, &saved_gamma};
  const bool prep_given = fwd::SavedPrepGiven(s, saved, s_out, &s_lay, &prep_ok);
  if (!prep_ok) {
    return ffi::Error::InvalidArgument(
        "flashkda_bwd (CUDA): saved_qg / kd / w / u / aqk / gamma must be all empty or the forward's (bf16 [B, T, HV, "
        "K] (x4), bf16 [B, T, HV, 128], f32 [B, ceil(T / 64) + S, HV, K] with S >= the dfinal_state slots)");
  }
  if (bwd_window < 0 || bwd_window % kChunk != 0 || (bwd_window > 0 && !states_bf16)) {
    return ffi::Error::InvalidArgument(
        "flashkda_bwd (CUDA): bwd_window must be 0 or a positive multiple of 64 (tokens), and 0 with the "
        "first-version kernels (FLASHKDA_BWD_RECUR=v1 / FLASHKDA_BWD_GRAD1=simt)");
  }
  const Layout lay =
      MakeLayout(s.B, s.T, s.HV, s.K, s.V, s_lay, states_bf16, states_given, prep_given, bwd_window);
  if (workspace->size_bytes() < lay.total) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CUDA): workspace too small: " +
                                       std::to_string(workspace->size_bytes()) + " < " + std::to_string(lay.total) +
                                       " bytes");
  }
  // dinitial_state: slots no sequence reaches pass dfinal_state through; the reverse kernel overwrites the
  // others (stream order).
  if (s.has_initial_state) {
    cudaError_t err = s_out > 0 ? cudaMemcpyAsync(dinitial_state->untyped_data(), dfinal_state.untyped_data(),
                                                  dinitial_state->size_bytes(), cudaMemcpyDeviceToDevice, stream)
                                : cudaMemsetAsync(dinitial_state->untyped_data(), 0, dinitial_state->size_bytes(), stream);
    if (err != cudaSuccess) return CudaError(err, "dinitial_state init");
  }
  if (s.B == 0 || s.T == 0 || s.HV == 0) {
    for (ffi::Result<ffi::AnyBuffer>* r : {&dq, &dk, &dv, &dg, &dbeta, &da_log_partial, &ddt_bias_partial}) {
      if ((*r)->size_bytes() > 0) {
        cudaError_t err = cudaMemsetAsync((*r)->untyped_data(), 0, (*r)->size_bytes(), stream);
        if (err != cudaSuccess) return CudaError(err, "memset");
      }
    }
    return ffi::Error::Success();
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace->untyped_data());
  Params P{};
  // The forward's problem on the unsplit prep layout (no outputs: the backward only runs its prep).
  P.f = fwd::MakeParams(s, opt, lay.f, ws, s_out, q, k, v, g, beta, a_log, dt_bias, slot, initial_state, nullptr,
                        nullptr);
  if (prep_given) {
    void* const src[6] = {saved_qg.untyped_data(), saved_kd.untyped_data(), saved_w.untyped_data(),
                          saved_u.untyped_data(), saved_aqk.untyped_data(), saved_gamma.untyped_data()};
    fwd::UseSavedPrep(P.f, src);
  }
  P.S_out = static_cast<int>(s_out);
  P.d_o = d_o.untyped_data();
  P.dfin = s_out > 0 ? static_cast<const float*>(dfinal_state.untyped_data()) : nullptr;
  P.dq = dq->untyped_data();
  P.dk = dk->untyped_data();
  P.dv = dv->untyped_data();
  P.dg = dg->untyped_data();
  P.dbeta = dbeta->untyped_data();
  P.da_log = static_cast<float*>(da_log_partial->untyped_data());
  P.ddt = static_cast<float*>(ddt_bias_partial->untyped_data());
  P.dinit = s.has_initial_state ? static_cast<float*>(dinitial_state->untyped_data()) : nullptr;
  P.Hs = states_given ? const_cast<float*>(static_cast<const float*>(chunk_states.untyped_data()))
                      : reinterpret_cast<float*>(ws + lay.hs);
  P.dH = reinterpret_cast<float*>(ws + lay.dh);
  P.states_bf16 = states_bf16 ? 1 : 0;
  P.dgam = reinterpret_cast<float*>(ws + lay.dgam);
  P.sQg = reinterpret_cast<float*>(ws + lay.sqg);
  P.sKd = reinterpret_cast<float*>(ws + lay.skd);
  P.sWU = reinterpret_cast<__nv_bfloat16*>(ws + lay.swu);
  P.sDgr = reinterpret_cast<float*>(ws + lay.swu);
  P.sA = reinterpret_cast<float*>(ws + lay.sa);
  P.sDa = reinterpret_cast<float*>(ws + lay.sda);
  P.seq_list = reinterpret_cast<int4*>(ws + lay.seqs);
  P.gred = reinterpret_cast<float*>(ws + lay.gred);
  float* bnd = lay.win.count > 1 ? reinterpret_cast<float*>(ws + lay.bnd) : nullptr;
  P.win_chunks = reinterpret_cast<int*>(ws + lay.wlists);
  P.win_seqs = P.win_chunks + s.B * s.T;
  const size_t bnd_elems = static_cast<size_t>(s.B * s.HV * s.K * s.V);
  switch (dt) {
    case ffi::DataType::BF16:
      return Run<__nv_bfloat16>(stream, P, lay.win, bnd, bnd_elems, state_only, states_given, prep_given);
    case ffi::DataType::F16: return Run<__half>(stream, P, lay.win, bnd, bnd_elems, state_only, states_given, prep_given);
    default: return Run<float>(stream, P, lay.win, bnd, bnd_elems, state_only, states_given, prep_given);
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaBwdCuda, KdaCudaBwdImpl,
                              FLASHKDA_BWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                              {ffi::Traits::kCmdBufferCompatible});
