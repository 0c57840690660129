// The bounded prep and the recurrence of one forward call, overlapped (Hopper's programmatic dependent launch).
//
// Where the recurrence has fewer CTAs than the device has SMs (b1-t8k-h96: 96 value heads, one CTA of 128 columns
// each, on 132 SMs), running the two kernels one after the other leaves the other SMs idle for the whole
// recurrence. Instead:
//   - the plan orders the chunk list by time (tile-major, PlanLists) and zeroes a ready counter per chunk start;
//   - the prep takes its (chunk, head) items in that order from a counter; after each item, one release-add on
//     the chunk's counter (issued one barrier into the next item, when its stores have long landed);
//   - on the SMs the recurrence will occupy, the prep's CTAs stop taking items once a tail share of them is left
//     (below), and exit; the recurrence, launched as the prep's programmatic dependent, fills those SMs while the
//     prep's remaining CTAs finish its last items on the others;
//   - before loading a chunk, every recurrence thread waits until the chunk's counter reaches HV (its value is
//     fetched one step ahead, so that a ready chunk costs no round trip).
// The kernel after the prep is phase 3 in an unsplit call, phase 1 (segment maps) in a split one.
// The prep's tail share: phase 3, started with a share f of the prep done, finishes with the prep's last chunk when
// (1 - f) = tail * (SMs - R) / R, where R is its SMs and tail is (recurrence time per chunk step) / (prep SM-time
// per item) (H100: ~4.3 / 8.9 us; measured best at b1-t8k-h96: 0.55, session 16; FLASHKDA_FWD_OVERLAP_TAIL).
// Phase 1 needs only the chunks of a sequence's non-last segments, which the prep's time order delivers early: the
// prep's rest should take as long as phase 1 itself, a smaller share (default 0.15, FLASHKDA_FWD_OVERLAP_TAIL1).
// FLASHKDA_FWD_OVERLAP=0 turns it off (A/B timing, tests): the kernels then run one after the other as before.
#pragma once

#include <cuda_runtime.h>

#include "kda_fwd_common.cuh"

namespace flashkda {
namespace fwd {

constexpr int kPlanTile = 1024;        // tokens per plan CTA (kda_plan.cu)
constexpr int kOverlapMaxTiles = 4096;  // PlanLists sums the earlier tiles' counts: bounded work per CTA
constexpr int kPrepStopSlot = 7;        // Params::counters slot: the bounded prep's CTAs that stopped early
constexpr int kPhase1ItemsSlot = 8;     // Params::counters slot: phase 1's working items (PlanOrder, split calls)
// The most SMs the recurrence may fill for the overlap to pay: it needs an eighth of them idle (H100, b8-t4k-h16:
// 128 recurrence CTAs on 132 SMs, 0.883 ms one after the other, 0.902 overlapped).
__host__ __device__ constexpr int OverlapMaxSms(int nsm) { return nsm - nsm / 8; }

// Whether the recurrence phase kOut (true: phase 3, false: phase 1) is the one launched right after the prep and
// overlapped with it: phase 3 without a split, phase 1 with one.
template <bool kOut>
__host__ __device__ __forceinline__ bool FollowsPrep(const Params& p) {
  return p.ready != nullptr && kOut == (p.split == 0);
}

// ---- device side ----

__device__ __forceinline__ int LoadRelaxed(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// The prep's "item done" signal: every thread's stores of the item are ordered before it by the CTA barrier that
// precedes this call (the release is cumulative).
__device__ __forceinline__ void ReleaseAdd(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// The recurrence's wait for chunk `key` (ready index), given a value of its counter read earlier.
__device__ __forceinline__ void WaitReady(const int* ready, int key, int seen, int need) {
  while (seen < need) {
    __nanosleep(200);
    seen = LoadRelaxed(ready + key);
  }
}

// Programmatic dependent launch: the prep lets its dependent grid launch; the recurrence, before it exits,
// waits for the prep grid to complete (so that the call's kernels end with it, as without the overlap).
__device__ __forceinline__ void LaunchDependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void WaitPrimaryGrid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ unsigned SmId() {
  unsigned v;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(v));
  return v;
}
__device__ __forceinline__ unsigned SmCountReg() {
  unsigned v;
  asm volatile("mov.u32 %0, %%nsmid;" : "=r"(v));
  return v;
}

// SMs the overlapped recurrence fills: its working items (unsplit, phase 3: the plan's segments x heads x column
// blocks; split, phase 1: PlanOrder's count) over its CTAs per SM.
__device__ __forceinline__ long long OverlapRecurSms(const Params& p) {
  const long long rec = p.split ? static_cast<long long>(p.counters[kPhase1ItemsSlot])
                                : static_cast<long long>(p.counters[1]) * p.HV * p.overlap_ncb;
  return (rec + p.overlap_occ - 1) / p.overlap_occ;
}

// The prep's early stop for this CTA: the item index from which it takes no more (nitems: never). The recurrence
// fills R SMs (OverlapRecurSms); CTAs on SMs below R stop.
__device__ __forceinline__ int PrepStopAt(const Params& p, int nitems) {
  if (p.ready == nullptr) return nitems;
  const int nsm = p.overlap_nsm;
  const long long r = OverlapRecurSms(p);
  if (r <= 0 || r > OverlapMaxSms(nsm) || SmCountReg() != static_cast<unsigned>(nsm) || SmId() >= r) return nitems;
  const float share = fminf(1.f, p.overlap_tail * static_cast<float>(nsm - r) / static_cast<float>(r));
  return nitems - static_cast<int>(ceilf(share * static_cast<float>(nitems)));
}

// Whether a CTA past its stop index may stop: at most gridDim.x * R / SMs of them do (the CTA slots of R SMs), so
// that some CTAs always go on taking items, wherever the prep's CTAs were placed (the recurrence waits for all).
__device__ __forceinline__ bool MayStop(const Params& p) {
  const long long r = OverlapRecurSms(p);
  const long long cap = static_cast<long long>(gridDim.x) * r / p.overlap_nsm;
  return atomicAdd(p.counters + kPrepStopSlot, 1) < cap;
}

// ---- host side ----

// Where the overlap applies (the bounded prep, the one kernel that signals its items; few enough plan tiles; the
// recurrence not sure to fill more than OverlapMaxSms; not turned off), points p at its scratch (the upper half of
// the multi-segment list's region) and fills its launch parameters; elsewhere leaves p.ready null.
void SetUpOverlap(Params& p, bool bounded_prep, int nsm);

}  // namespace fwd
}  // namespace flashkda
