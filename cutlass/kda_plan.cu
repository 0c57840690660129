// Plan kernels of flashkda_fwd and flashkda_bwd (kda_fwd_common.cuh, kda_bwd_common.cuh): the sequence
// start and end of every token from `slot`, then the work lists. Graph safe, like their callers.
#include <cuda_runtime.h>

#include "kda_fwd_common.cuh"
#include "kda_fwd_launch.h"
#include "kda_fwd_overlap.h"

namespace flashkda {
namespace fwd {
namespace {

constexpr int kPlanThreads = 1024;
static_assert(kPlanThreads == kPlanTile, "the overlap's tile count (SetUpOverlap) assumes one tile per plan CTA");

// Inclusive block-wide scan (1024 threads) with op max or sum; *total receives the block's reduction.
template <bool kMax>
__device__ __forceinline__ int BlockScan(int v, int* s_warp, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v = kMax ? max(v, n) : v + n;
  }
  if (lane == 31) s_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = s_warp[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w = kMax ? max(w, n) : w + n;
    }
    s_warp[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v = kMax ? max(v, s_warp[warp - 1]) : v + s_warp[warp - 1];
  *total = s_warp[31];
  __syncthreads();
  return v;
}

// Plan, three launches over (tile of 1024 tokens, batch row), fully parallel:
//   PlanScan    running max of sequence-start positions inside the tile -> seq_start (tile-local)
//   PlanFix     adds the carry of the previous tiles (max of their last entries), records each sequence's
//               end at its start position; kZeroPad (forward): zeroes the outputs of padding tokens
//   PlanLists   work lists (chunk starts, segment starts, split sequences), compacted with one atomic per tile
//               (forward; with the prep / recurrence overlap the chunk list in time order instead, from PlanFix's
//               per-tile counts, and the ready counters zeroed: kda_fwd_overlap.h); PlanSeqLists: chunk starts
//               and sequences (backward)
// and, for the forward, PlanOrder (one CTA): the segment list sorted longest first; FinalOfEmptySlots.
__global__ void __launch_bounds__(kPlanThreads) PlanScan(Params p) {
  __shared__ int s_warp[32];
  const int b = blockIdx.y, t = blockIdx.x * kPlanThreads + threadIdx.x, T = p.T;
  // The call's counters (kCounterInts ints: list sizes, work counters) start at zero: the first kernel of every
  // plan clears them (no kernel of this call reads or writes them before; one launch fewer than a memset).
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x < kCounterInts) p.counters[threadIdx.x] = 0;
  const int* slot = p.slot + (size_t)b * T;
  const int s = t < T ? slot[t] : -1;
  const int prev = (t > 0 && t < T) ? slot[t - 1] : -1;
  int total;
  const int ss = BlockScan<true>((s >= 0 && s != prev) ? t : -1, s_warp, &total);
  if (t < T) p.seq_start[(size_t)b * T + t] = ss;
}

template <bool kZeroPad>
__global__ void __launch_bounds__(kPlanThreads) PlanFix(Params p, int out_token_bytes) {
  __shared__ int s_carry;
  __shared__ unsigned char s_pad[kPlanThreads];
  const int b = blockIdx.y, tile = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T = p.T, t = tile * kPlanThreads + tid;
  int* seq_start = p.seq_start + (size_t)b * T;
  if (warp == 0) {
    int c = -1;
    for (int tt = lane; tt < tile; tt += 32) c = max(c, seq_start[tt * kPlanThreads + kPlanThreads - 1]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c = max(c, __shfl_xor_sync(0xffffffffu, c, o));
    if (lane == 0) s_carry = c;
  }
  const int* slot = p.slot + (size_t)b * T;
  const int s = t < T ? slot[t] : -1;
  const int nxt = t + 1 < T ? slot[t + 1] : -1;
  const int local = t < T ? seq_start[t] : -1;
  __syncthreads();
  const int ss = max(local, s_carry);
  if (t < T) seq_start[t] = ss;  // also for padding: later tiles read the running max from here
  if (s >= 0 && nxt != s) p.seq_end[(size_t)b * T + ss] = t + 1;
  if (p.ready != nullptr) {  // the overlap's time-ordered chunk list: this tile's chunk starts (PlanLists)
    const int n = __syncthreads_count(s >= 0 && (t - ss) % kChunk == 0);
    if (tid == 0) p.tile_chunks[tile * gridDim.y + b] = n;
  }
  if constexpr (kZeroPad) {
    s_pad[tid] = (t < T && s < 0) ? 1 : 0;
    __syncthreads();
    const int n16 = out_token_bytes / 16;
    for (int i = warp; i < kPlanThreads; i += kPlanThreads / 32) {
      if (s_pad[i]) {
        uint4* dst = reinterpret_cast<uint4*>(static_cast<unsigned char*>(p.o) +
                                              ((size_t)b * T + tile * kPlanThreads + i) * out_token_bytes);
        for (int j = lane; j < n16; j += 32) dst[j] = make_uint4(0, 0, 0, 0);
      }
    }
  }
}

__global__ void __launch_bounds__(kPlanThreads) PlanLists(Params p) {
  __shared__ int s_warp[32];
  __shared__ int s_base[3];
  const int b = blockIdx.y, tid = threadIdx.x;
  const int T = p.T, t = blockIdx.x * kPlanThreads + tid;
  const int s = t < T ? p.slot[(size_t)b * T + t] : -1;
  int fc = 0, fs = 0, fm = 0, ss = -1, se = -1;
  if (s >= 0) {
    ss = p.seq_start[(size_t)b * T + t];
    se = p.seq_end[(size_t)b * T + ss];
    const int off = t - ss;
    fc = (off % kChunk) == 0;
    fs = (off % p.Lseg) == 0;
    fm = (off == 0) && (se - ss > p.Lseg);
  }
  const int packed = fc | (fs << 11) | (fm << 22);
  // With the overlap (p.ready), the chunk list in time order: tile-major, then batch row (the prep takes its items
  // in list order, the recurrence walks each sequence forward), at the sum of the earlier tiles' counts.
  int before = 0;
  if (p.ready != nullptr && tid < 32) {
    const int mine = blockIdx.x * gridDim.y + b;
    for (int i = tid; i < mine; i += 32) before += p.tile_chunks[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) before += __shfl_xor_sync(0xffffffffu, before, o);
  }
  int total;
  const int excl = BlockScan<false>(packed, s_warp, &total) - packed;
  if (tid == 0) {
    s_base[0] = atomicAdd(&p.counters[0], total & 0x7ff);
    if (p.ready != nullptr) s_base[0] = before;
    s_base[1] = atomicAdd(&p.counters[1], (total >> 11) & 0x7ff);
    s_base[2] = atomicAdd(&p.counters[2], (total >> 22) & 0x3ff);
  }
  __syncthreads();
  if (fc) p.chunk_list[s_base[0] + (excl & 0x7ff)] = make_int4(b, t, se, s);
  if (fc && p.ready != nullptr) p.ready[(size_t)b * T + t] = 0;
  if (fs) p.seg_list[s_base[1] + ((excl >> 11) & 0x7ff)] = make_int4(b, t, se, s | ((t == ss) ? (1 << 30) : 0));
  if (fm) p.multi_list[s_base[2] + ((excl >> 22) & 0x3ff)] = make_int4(b, t, se, s);
}

// Longest segments first: the recurrence's CTAs take segments in list order as they finish, so a long segment late
// in the list (a varlen batch's longest sequence at its end) would run alone at the end (H100, varlen-8k-h64: 89
// chunk steps per SM instead of 67 by a greedy model). One CTA sorts the segment list in place by length in chunks,
// descending (a counting sort through shared memory; ties in any order: items are independent, so the results do
// not depend on it). Longer lists (more than kOrderCap segments: many short sequences, whose order matters little)
// keep the plan's order. With mark_slots (PlanWritesEmptyFinalStates) it first flags, in p.seq_start (free once the
// lists are made) as [B][S_final], every state slot that owns a token: FinalOfEmptySlots fills the others.
constexpr int kOrderCap = 4096;                    // segments sorted (16 bytes each in shared memory)
constexpr int kOrderBuckets = kPlanThreads;        // lengths in chunks, the last bucket holding longer ones
constexpr size_t kOrderSmem = kOrderCap * sizeof(int4);

__global__ void __launch_bounds__(kPlanThreads) PlanOrder(Params p, bool mark_slots) {
  extern __shared__ int4 s_list[];  // [kOrderCap]
  __shared__ int s_warp[32];
  __shared__ int s_start[kOrderBuckets];
  const int n = p.counters[1], tid = threadIdx.x;
  if (mark_slots) {
    int* seen = p.seq_start;
    for (int i = tid; i < p.B * p.S_final; i += kPlanThreads) seen[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kPlanThreads) {
      const int4 e = p.seg_list[i];
      const int slot = e.w & 0x3fffffff;
      if (slot < p.S_final) seen[e.x * p.S_final + slot] = 1;
    }
  }
  if (p.ready != nullptr && p.split) {
    // The overlap with phase 1 (kda_fwd_overlap.h): phase 1's items that do work (segments but a sequence's last;
    // a first segment only its value columns), whose SMs the prep's CTAs leave to it.
    __shared__ int s_items;
    if (tid == 0) s_items = 0;
    __syncthreads();
    const int bv = BlockV(p.K, p.B, p.HV);
    int mine = 0;
    for (int i = tid; i < n; i += kPlanThreads) {
      const int4 e = p.seg_list[i];
      if (e.y + p.Lseg < e.z) mine += ((e.w >> 30) & 1) ? p.V / bv : (p.V + p.K) / bv;
    }
    if (mine) atomicAdd(&s_items, mine);
    __syncthreads();
    if (tid == 0) p.counters[kPhase1ItemsSlot] = s_items * p.HV;
  }
  if (n > kOrderCap || n < 2) return;
  auto bucket = [&](const int4& e) {  // kOrderBuckets - 1 - length in chunks (clamped): longest first
    return kOrderBuckets - 1 - min(SegmentChunks(p, e.y, e.z), kOrderBuckets - 1);
  };
  s_start[tid] = 0;
  for (int i = tid; i < n; i += kPlanThreads) s_list[i] = p.seg_list[i];
  __syncthreads();
  for (int i = tid; i < n; i += kPlanThreads) atomicAdd(&s_start[bucket(s_list[i])], 1);
  __syncthreads();
  const int count = s_start[tid];
  int total;
  const int excl = BlockScan<false>(count, s_warp, &total) - count;  // its first barrier orders the read above
  s_start[tid] = excl;
  __syncthreads();
  for (int i = tid; i < n; i += kPlanThreads) {
    const int4 e = s_list[i];
    p.seg_list[atomicAdd(&s_start[bucket(e)], 1)] = e;
  }
}

// The final state of every slot that owns no token (PlanOrder's flags): its initial state, or zeros without one.
// The recurrence writes the others. One CTA per (slot, batch row).
__global__ void __launch_bounds__(256) FinalOfEmptySlots(Params p) {
  const int s = blockIdx.x, b = blockIdx.y;
  if (p.seq_start[b * p.S_final + s]) return;
  const size_t n4 = static_cast<size_t>(p.HV) * p.K * p.V / 4;  // float4 per slot
  float4* dst = reinterpret_cast<float4*>(p.final_state) + ((size_t)b * p.S_final + s) * n4;
  const float4* src = p.S_init > 0 ? reinterpret_cast<const float4*>(p.init) + ((size_t)b * p.S_init + s) * n4 : nullptr;
  for (size_t i = threadIdx.x; i < n4; i += blockDim.x) dst[i] = src ? src[i] : make_float4(0.f, 0.f, 0.f, 0.f);
}

__global__ void __launch_bounds__(kPlanThreads) PlanSeqLists(Params p, int4* seq_list) {
  __shared__ int s_warp[32];
  __shared__ int s_base[2];
  const int b = blockIdx.y, tid = threadIdx.x;
  const int T = p.T, t = blockIdx.x * kPlanThreads + tid;
  const int s = t < T ? p.slot[(size_t)b * T + t] : -1;
  int fc = 0, fs = 0, ss = -1, se = -1;
  if (s >= 0) {
    ss = p.seq_start[(size_t)b * T + t];
    se = p.seq_end[(size_t)b * T + ss];
    fc = ((t - ss) % kChunk) == 0;
    fs = t == ss;
  }
  const int packed = fc | (fs << 16);
  int total;
  const int excl = BlockScan<false>(packed, s_warp, &total) - packed;
  if (tid == 0) {
    s_base[0] = atomicAdd(&p.counters[0], total & 0xffff);
    s_base[1] = atomicAdd(&p.counters[1], total >> 16);
  }
  __syncthreads();
  if (fc) p.chunk_list[s_base[0] + (excl & 0xffff)] = make_int4(b, t, se, s);
  if (fs) seq_list[s_base[1] + (excl >> 16)] = make_int4(b, t, se, s);
}

dim3 PlanGrid(const Params& p) { return dim3((p.T + kPlanThreads - 1) / kPlanThreads, p.B); }

}  // namespace

cudaError_t LaunchPlan(const Params& p, int out_token_bytes, cudaStream_t stream) {
  const dim3 pgrid = PlanGrid(p);
  PlanScan<<<pgrid, kPlanThreads, 0, stream>>>(p);
  PlanFix<true><<<pgrid, kPlanThreads, 0, stream>>>(p, out_token_bytes);
  PlanLists<<<pgrid, kPlanThreads, 0, stream>>>(p);
  cudaError_t err = cudaFuncSetAttribute(PlanOrder, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kOrderSmem));
  if (err != cudaSuccess) return err;
  const bool empty_finals = PlanWritesEmptyFinalStates(p);
  PlanOrder<<<1, kPlanThreads, kOrderSmem, stream>>>(p, empty_finals);
  if (empty_finals) FinalOfEmptySlots<<<dim3(p.S_final, p.B), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchPlanSeqs(const Params& p, int4* seq_list, cudaStream_t stream) {
  const dim3 pgrid = PlanGrid(p);
  PlanScan<<<pgrid, kPlanThreads, 0, stream>>>(p);
  PlanFix<false><<<pgrid, kPlanThreads, 0, stream>>>(p, 0);
  PlanSeqLists<<<pgrid, kPlanThreads, 0, stream>>>(p, seq_list);
  return cudaGetLastError();
}

}  // namespace fwd
}  // namespace flashkda
