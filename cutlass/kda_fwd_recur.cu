// flashkda_fwd, stages "phase 1" / "phase 3": the chunk recurrence over a segment, one CTA per
// (segment, value head, block of BV state columns), state in registers (fp32, as mma accumulators) with a
// bf16 copy in shared memory, chunk operands through cp.async (loads of the next chunk issued as each buffer
// frees, see RecurSmem); tensor cores through CuTe's SM90 wgmma atom (step 1, K in {64, 128}) and SM80 mma atom.
// Also "phase 2", the in-order composition of segment maps.
#include "kda_env.h"
#include "kda_fwd_common.cuh"
#include "kda_fwd_launch.h"
#include "kda_fwd_overlap.h"

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

namespace flashkda {
namespace fwd {
namespace {

using bf16 = __nv_bfloat16;

// One buffer per chunk operand (two 64-column CTAs per SM overlap each other's latency; a second stage for the
// 128-column CTA, alone on its SM, issuing chunk c + 1's loads a whole step ahead, was 1-3% slower); within a CTA the
// loads of chunk c + 1 are issued as soon as their buffers are free: W | U | Qg after step 1 of chunk c (only step 1
// reads them), A_qk, Kd and gamma after its step 3, each waited for just before its first use (see the loop).
template <int K, int BV, bool kOut>
struct RecurSmem {
  static constexpr int C = kChunk, KP = K + 8, VP = BV + 8, AP = C + 8;
  static constexpr size_t kW = static_cast<size_t>(C) * KP;  // elements per operand
  static constexpr size_t Bytes() {
    return (kW * (kOut ? 3 : 2) + static_cast<size_t>(C) * VP + (kOut ? static_cast<size_t>(C) * AP : 0) +
            static_cast<size_t>(K) * VP + static_cast<size_t>(C) * VP) *
               2 +
           static_cast<size_t>(K) * 4;
  }
};

// kWgmma: step 1 on wgmma where the warp layout allows (kWg below); false: on mma.sync (FLASHKDA_FWD_RECUR_STEP1=mma).
template <int K, int BV, typename TOut, bool kOut, bool kWgmma>
__global__ void __launch_bounds__(RecurThreads(BV), RecurCtasPerSm(K, BV)) RecurKernel(Params p) {
  using SM = RecurSmem<K, BV, kOut>;
  constexpr int C = kChunk, KP = SM::KP, VP = SM::VP, AP = SM::AP;
  constexpr int NTH = RecurThreads(BV), NWARP = NTH / 32;
  constexpr int NT = BV / 8, NTW = NT / (NWARP / 4);  // steps 1/2: 4 warps along rows x NWARP / 4 along columns
  // Step 3's warps: the 16-warp CTA (K = 128) takes 4 x 4 (32 state rows x 32 columns per warp), which reads fewer
  // Kd^T / R fragments from shared memory than 8 x 2 (8 warps at K = 128: 4 x 2 spills at the 128-register cap).
  constexpr int MT3 = K / 16, WM3 = NWARP == 16 ? 4 : (MT3 < 8 ? MT3 : 8), WN3 = NWARP / WM3, MTW3 = MT3 / WM3,
                NTW3 = NT / WN3;
  static_assert(NTW % 2 == 0 && NTW3 % 2 == 0, "column tiles come in pairs");
  // 1024-byte aligned: with the pitches below every tile starts on a 1024-byte boundary, as the swizzled wgmma tiles
  // (sW, sQ, sS when kWg) need (a constant base; aligning a pointer at run time cost registers and spills).
  extern __shared__ __align__(1024) unsigned char smem[];
  bf16* sW = reinterpret_cast<bf16*>(smem);
  bf16* sKd = sW + SM::kW;
  bf16* sQ = sKd + SM::kW;
  bf16* sU = sQ + (kOut ? SM::kW : 0);
  bf16* sA = sU + C * VP;
  bf16* sS = sA + (kOut ? C * AP : 0);
  bf16* sR = sS + K * VP;
  float* sGam = reinterpret_cast<float*>(sR + C * VP);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gr = lane >> 2, t4 = lane & 3;
  const int mt = warp & 3, nt0 = (warp >> 2) * NTW;
  const int wm3 = warp % WM3, wn3 = warp / WM3;
  const int HV = p.HV, V = p.V;
  const int NCB = kOut ? V / BV : (V + K) / BV;
  const int nitems = p.counters[1] * HV * NCB;

  float st[MTW3][NTW3][4];

  // kWg: step 1 on wgmma where each warpgroup's warps hold 16 rows x 32 columns (NTW = 4: warpgroup g = warp / 4
  // owns value columns 32 g .. 32 g + 31, warp % 4 the rows, as steps 2 and 3 expect). Warpgroup g forms W S and
  // Qg S for its columns as m64n32k16 wgmmas from shared memory: W and Qg (token x k) in 128-byte swizzled K-major
  // GMMA tiles (cp.async places each 16-byte piece), S (v x k) in 64-byte swizzled v-major ones (one 32-column atom
  // per warpgroup; the state store writes value pairs), so each warpgroup reads W and Qg once instead of each warp
  // its rows and all of S's columns. The accumulators come back in the mma.sync C layout
  // (value 4 j + 2 h + e at row 16 (warp % 4) + gr + 8 h, column 8 j + 2 t4 + e of the warpgroup's 32), i.e.
  // acc[j][2 h + e], so R's store and steps 2 and 3 keep their fragment code.
  constexpr bool kWg = kWgmma && (K == 64 || K == 128) && NTW == 4;
  using GT = cute::bfloat16_t;  // CuTe's bf16 (the same bits as __nv_bfloat16)
  using GAtom = cute::GMMA::Layout_K_SW128_Atom<GT>;
  constexpr auto LWq = cute::tile_to_shape(GAtom{}, cute::make_shape(cute::Int<C>{}, cute::Int<K>{}));   // W, Qg: (token, k)
  constexpr auto LSt = cute::tile_to_shape(cute::GMMA::Layout_MN_SW64_Atom<GT>{},
                                           cute::make_shape(cute::Int<BV>{}, cute::Int<K>{}));  // S: (v, k), v-major
  // The same layouts as element offsets from the 1024-byte aligned tile base (the GMMA atoms' swizzles act on byte
  // addresses; these recast them to bf16 elements), for the cp.async destinations and the state store.
  const auto LWqE = cute::as_position_independent_swizzle_layout(LWq);
  const auto LStE = cute::as_position_independent_swizzle_layout(LSt);
  const int wg = warp >> 2;
  if (kWg && tid == 0 && (static_cast<uint32_t>(__cvta_generic_to_shared(smem)) & 1023u) != 0) __trap();  // see smem

  // Items are taken as CTAs finish (segments differ in length: a sequence's last one, varlen batches), from a
  // counter per phase; items are independent, so the results do not depend on the order.
  __shared__ int s_next;
  int* const work = p.counters + (kOut ? kPhase3WorkSlot : kPhase1WorkSlot);
  for (int it = TakeItem(work, &s_next); it < nitems; it = TakeItem(work, &s_next)) {
    const int cb = it % NCB;
    const int rest = it / NCB;
    const int hv = rest % HV;
    const int si = rest / HV;
    const int4 e = p.seg_list[si];
    const int b = e.x, t0 = e.y, send = e.z, s = e.w & 0x3fffffff;
    const bool first = (e.w >> 30) & 1;
    const bool last_seg = t0 + p.Lseg >= send;
    const int col0 = cb * BV;
    const bool pcols = col0 >= V;
    if (!kOut && (last_seg || (pcols && first))) continue;
    const int nch = SegmentChunks(p, t0, send);
    const bool write_final = kOut && last_seg && s < p.S_final;

    // ---- start state ----
    {
      const float* src = nullptr;
      bool vk = false;
      if (first) {
        if (s < p.S_init) src = p.init + (((size_t)b * p.S_init + s) * HV + hv) * K * V;
        vk = p.state_vk;
      } else if (kOut) {
        const int pidx = (t0 - 1) / p.Lseg;  // index of the previous (full) segment
        src = p.Sstart + (((size_t)b * p.NSPLIT + pidx) * HV + hv) * K * V;
      }
#pragma unroll
      for (int mi = 0; mi < MTW3; ++mi)
#pragma unroll
        for (int ni = 0; ni < NTW3; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int row = (wm3 + WM3 * mi) * 16 + gr + 8 * (q >> 1);
            const int gc = col0 + (wn3 * NTW3 + ni) * 8 + 2 * t4 + (q & 1);
            float val = 0.f;
            if (kOut || first) {
              if (src) val = vk ? src[(size_t)gc * K + row] : src[(size_t)row * V + gc];
            } else if (pcols) {
              val = (row == gc - V) ? 1.f : 0.f;
            }
            st[mi][ni][q] = val;
          }
    }

    // Chunk c's operands in two cp.async groups (every thread commits both, copies or not): load_wu (W, U and, with
    // outputs, Qg: step 1) and load_rest (Kd, gamma and, with outputs, A_qk: steps 2 and 3). Rows >= L are
    // zero-filled. (A shared row-copy helper for the five tiles cost 8-12 bytes of spills at the 128-register cap;
    // hence the loops.)
    auto load_wu = [&](int c) {
      const int cs = t0 + c * C;
      const int L = min(C, send - cs);
      const size_t tb = (size_t)b * p.T + cs;
      for (int idx = tid; idx < C * (K / 8); idx += NTH) {
        const int r = idx / (K / 8), v8 = idx - r * (K / 8);
        const bool ok = r < L;
        const size_t go = ((tb + (ok ? r : 0)) * HV + hv) * K + v8 * 8;
        const int so = kWg ? static_cast<int>(LWqE(r, v8 * 8)) : r * KP + v8 * 8;
        CpAsync16(sW + so, p.W + go, ok);
        if (kOut) CpAsync16(sQ + so, p.Qg + go, ok);
      }
      if (!pcols) {
        for (int idx = tid; idx < C * (BV / 8); idx += NTH) {
          const int r = idx / (BV / 8), v8 = idx - r * (BV / 8);
          const bool ok = r < L;
          CpAsync16(sU + r * VP + v8 * 8, p.U + ((tb + (ok ? r : 0)) * HV + hv) * V + col0 + v8 * 8, ok);
        }
      }
      CpAsyncCommit();
    };
    auto load_rest = [&](int c) {
      const int cs = t0 + c * C;
      const int L = min(C, send - cs);
      const size_t tb = (size_t)b * p.T + cs;
      for (int idx = tid; idx < C * (K / 8); idx += NTH) {
        const int r = idx / (K / 8), v8 = idx - r * (K / 8);
        const bool ok = r < L;
        const size_t go = ((tb + (ok ? r : 0)) * HV + hv) * K + v8 * 8;
        CpAsync16(sKd + r * KP + v8 * 8, p.Kd + go, ok);
      }
      if (kOut) {
        for (int idx = tid; idx < C * (C / 8); idx += NTH) {
          const int r = idx / (C / 8), v8 = idx - r * (C / 8);
          const bool ok = r < L;
          CpAsync16(sA + r * AP + v8 * 8, p.Aqk + ((tb + (ok ? r : 0)) * HV + hv) * kAqkPitch + v8 * 8, ok);
        }
      }
      const bool lastc = cs + C >= send;
      const int gidx = !lastc ? (cs + C - 1) / C : (s < p.S_final ? p.NW + s : -1);
      if (gidx >= 0) {
        for (int idx = tid; idx < K / 4; idx += NTH) {
          CpAsync16(sGam + idx * 4, p.gamma + (((size_t)b * p.NG + gidx) * HV + hv) * K + idx * 4, true);
        }
      }
      CpAsyncCommit();
    };

    // The state block in bf16, each thread's value pairs (row k, columns v and v + 1) at at(k, v).
    auto store_state_pairs = [&](auto at) {
#pragma unroll
      for (int mi = 0; mi < MTW3; ++mi)
#pragma unroll
        for (int ni = 0; ni < NTW3; ++ni)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = (wm3 + WM3 * mi) * 16 + gr + 8 * hh;
            const int col = (wn3 * NTW3 + ni) * 8 + 2 * t4;
            *reinterpret_cast<uint32_t*>(at(row, col)) = PackBF16(st[mi][ni][2 * hh], st[mi][ni][2 * hh + 1]);
          }
    };
    // ... as a [K][ld] matrix: sS for the mma.sync step 1, or a chunk state of the backward.
    auto store_state_bf16 = [&](bf16* dst, size_t ld) {
      store_state_pairs([&](int row, int col) { return dst + row * ld + col; });
    };
    // The state as step 1's B operand: in the swizzled layout LSt (kWg), else sS as [K][VP].
    auto store_state_smem = [&]() {
      if constexpr (kWg) {
        store_state_pairs([&](int row, int col) { return sS + LStE(col, row); });
      } else {
        store_state_bf16(sS, VP);
      }
    };

    // Overlapped with the prep (kda_fwd_overlap.h; phase 3 of an unsplit call, phase 1 of a split one): each chunk's
    // loads wait until the prep has written all its heads.
    const bool chase = FollowsPrep<kOut>(p);
    if (chase) WaitReady(p.ready, b * p.T + t0, LoadRelaxed(p.ready + b * p.T + t0), HV);
    __syncthreads();  // the previous item is done with shared memory
    load_wu(0);
    load_rest(0);
    store_state_smem();

    // In flight at the top of chunk c: its W | U | Qg group, then its rest group (issued after step 1 / step 3 of
    // c - 1).
    for (int c = 0; c < nch; ++c) {
      CpAsyncWait<1>();  // W | U (and Qg) of chunk c
      if constexpr (kWg) cutlass::arch::fence_view_async_shared();  // those writes, then the wgmma's reads
      __syncthreads();   // A: W, U and sS visible
      const int cs = t0 + c * C;
      const int L = min(C, send - cs);
      const bool lastc = cs + C >= send;
      const bool update = !kOut || !lastc || write_final;
      const int next_key = b * p.T + cs + C;  // chunk c + 1's ready index, its counter read a step ahead
      const int next_seen = chase && c + 1 < nch ? LoadRelaxed(p.ready + next_key) : 0;

      // ---- step 1: R = U - W S and, with outputs, O = Qg S (rows: 16 per warp, columns: NTW tiles per warp); the
      // two products share each S fragment (read once from shared memory) ----
      float acc_o[kOut ? NTW : 1][4];
      float acc[NTW][4];
      if constexpr (kWg) {
        using namespace cute;
        auto mma = make_tiled_mma(SM90_64x32x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>{});
        auto thr = mma.get_thread_slice(tid & 127);
        Tensor sBt = local_tile(make_tensor(make_smem_ptr(reinterpret_cast<GT*>(sS)), LSt),
                                make_shape(Int<32>{}, Int<K>{}), make_coord(wg, 0));  // this warpgroup's 32 columns of S
        Tensor tCrB = thr.make_fragment_B(thr.partition_B(sBt));
        Tensor tCrW = thr.make_fragment_A(thr.partition_A(make_tensor(make_smem_ptr(reinterpret_cast<const GT*>(sW)), LWq)));
        auto cl = partition_fragment_C(mma, make_shape(Int<C>{}, Int<32>{})).layout();
        static_assert(decltype(size(cl))::value == NTW * 4, "16 x 32 per warp");
        Tensor tR = make_tensor(make_rmem_ptr(&acc[0][0]), cl);
        Tensor tO = make_tensor(make_rmem_ptr(&acc_o[0][0]), cl);
        warpgroup_fence_operand(tR);
        if constexpr (kOut) warpgroup_fence_operand(tO);
        warpgroup_arrive();
        mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
          cute::gemm(mma, tCrW(_, _, kk), tCrB(_, _, kk), tR);
          mma.accumulate_ = GMMA::ScaleOut::One;
        }
        if constexpr (kOut) {
          Tensor tCrQ = thr.make_fragment_A(thr.partition_A(make_tensor(make_smem_ptr(reinterpret_cast<const GT*>(sQ)), LWq)));
          mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
          for (int kk = 0; kk < K / 16; ++kk) {
            cute::gemm(mma, tCrQ(_, _, kk), tCrB(_, _, kk), tO);
            mma.accumulate_ = GMMA::ScaleOut::One;
          }
        }
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tR);
        if constexpr (kOut) warpgroup_fence_operand(tO);
      } else {
#pragma unroll
        for (int ni = 0; ni < NTW; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[ni][q] = acc_o[kOut ? ni : 0][q] = 0.f;
        const int a_off = (mt * 16 + (lane & 15)) * KP + (lane >> 4) * 8;
        const bf16* b_base = sS + ((lane & 7) + ((lane >> 3) & 1) * 8) * VP + nt0 * 8 + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
          uint32_t a[4], aq[4];
          Ldsm(sW + a_off + kk * 16, a[0], a[1], a[2], a[3]);
          if constexpr (kOut) Ldsm(sQ + a_off + kk * 16, aq[0], aq[1], aq[2], aq[3]);
#pragma unroll
          for (int np = 0; np < NTW / 2; ++np) {
            uint32_t b0, b1, b2, b3;
            LdsmT(b_base + kk * 16 * VP + np * 16, b0, b1, b2, b3);
            Mma(acc[2 * np], a, b0, b1);
            Mma(acc[2 * np + 1], a, b2, b3);
            if constexpr (kOut) {
              Mma(acc_o[2 * np], aq, b0, b1);
              Mma(acc_o[2 * np + 1], aq, b2, b3);
            }
          }
        }
      }
#pragma unroll
      for (int ni = 0; ni < NTW; ++ni)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = mt * 16 + gr + 8 * hh;
          const int col = (nt0 + ni) * 8 + 2 * t4;
          float u0 = 0.f, u1 = 0.f;
          if (!pcols) {
            const __nv_bfloat162 u = *reinterpret_cast<const __nv_bfloat162*>(sU + row * VP + col);
            u0 = __low2float(u);
            u1 = __high2float(u);
          }
          *reinterpret_cast<uint32_t*>(sR + row * VP + col) = PackBF16(u0 - acc[ni][2 * hh], u1 - acc[ni][2 * hh + 1]);
        }
      CpAsyncWait<0>();  // Kd, gamma (and A_qk) of chunk c
      __syncthreads();   // B: R and the rest of chunk c visible; sW, sU and sQ are free
      if (c + 1 < nch) {
        if (chase) WaitReady(p.ready, next_key, next_seen, HV);
        load_wu(c + 1);
      }

      // ---- step 2: O += A_qk R ----
      if constexpr (kOut) {
        float (&acc)[NTW][4] = acc_o;
        const bf16* aa_base = sA + (mt * 16 + (lane & 15)) * AP + (lane >> 4) * 8;
        const bf16* rb_base = sR + ((lane & 7) + ((lane >> 3) & 1) * 8) * VP + nt0 * 8 + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (kk <= mt) {
            uint32_t a[4];
            Ldsm(aa_base + kk * 16, a[0], a[1], a[2], a[3]);
#pragma unroll
            for (int np = 0; np < NTW / 2; ++np) {
              uint32_t b0, b1, b2, b3;
              LdsmT(rb_base + kk * 16 * VP + np * 16, b0, b1, b2, b3);
              Mma(acc[2 * np], a, b0, b1);
              Mma(acc[2 * np + 1], a, b2, b3);
            }
          }
        }
        TOut* out = static_cast<TOut*>(p.o);
#pragma unroll
        for (int ni = 0; ni < NTW; ++ni)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = mt * 16 + gr + 8 * hh;
            const int col = (nt0 + ni) * 8 + 2 * t4;
            if (row < L) {
              Store2<TOut>(out + (((size_t)b * p.T + cs + row) * HV + hv) * V + col0 + col, acc[ni][2 * hh],
                           acc[ni][2 * hh + 1]);
            }
          }
      }

      // ---- step 3: S = gamma * S + Kd^T R ----
      if (update) {
#pragma unroll
        for (int mi = 0; mi < MTW3; ++mi)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const float gm = sGam[(wm3 + WM3 * mi) * 16 + gr + 8 * hh];
#pragma unroll
            for (int ni = 0; ni < NTW3; ++ni) {
              st[mi][ni][2 * hh] *= gm;
              st[mi][ni][2 * hh + 1] *= gm;
            }
          }
        const bf16* ka_base = sKd + ((lane & 7) + (lane >> 4) * 8) * KP + ((lane >> 3) & 1) * 8;
        const bf16* rb_base = sR + ((lane & 7) + ((lane >> 3) & 1) * 8) * VP + wn3 * NTW3 * 8 + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < C / 16; ++kk) {
          uint32_t a[MTW3][4];
#pragma unroll
          for (int mi = 0; mi < MTW3; ++mi) {
            LdsmT(ka_base + kk * 16 * KP + (wm3 + WM3 * mi) * 16, a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
          }
#pragma unroll
          for (int np = 0; np < NTW3 / 2; ++np) {
            uint32_t b0, b1, b2, b3;
            LdsmT(rb_base + kk * 16 * VP + np * 16, b0, b1, b2, b3);
#pragma unroll
            for (int mi = 0; mi < MTW3; ++mi) {
              Mma(st[mi][2 * np], a[mi], b0, b1);
              Mma(st[mi][2 * np + 1], a[mi], b2, b3);
            }
          }
        }
      }
      // The backward's chunk state: the start state of the next chunk of this sequence (bf16, as sS holds it).
      if (kOut && p.chunk_states != nullptr && !lastc) {
        store_state_bf16(p.chunk_states + (((size_t)b * (p.NW + 1) + (cs + 2 * C - 1) / C) * HV + hv) * K * V + col0, V);
      }
      __syncthreads();  // C: everyone is done with sS, sR, sQ, sA, sKd and sGam
      if (c + 1 < nch) load_rest(c + 1);
      if (update && c + 1 < nch) store_state_smem();
    }

    // ---- end state ----
    float* dst = nullptr;
    size_t ld = 0;
    bool vk = false;
    if (kOut) {
      if (write_final) {
        dst = p.final_state + (((size_t)b * p.S_final + s) * HV + hv) * K * V;
        ld = V;
        vk = p.state_vk;
      }
    } else {
      const int idx = (t0 + p.Lseg - 1) / p.Lseg;
      if (first) {
        dst = p.Sstart + (((size_t)b * p.NSPLIT + idx) * HV + hv) * K * V;
        ld = V;
      } else {
        dst = p.HP + (((size_t)b * p.NSPLIT + idx) * HV + hv) * K * (V + K);
        ld = V + K;
      }
    }
    if (dst) {
#pragma unroll
      for (int mi = 0; mi < MTW3; ++mi)
#pragma unroll
        for (int ni = 0; ni < NTW3; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int row = (wm3 + WM3 * mi) * 16 + gr + 8 * (q >> 1);
            const int gc = col0 + (wn3 * NTW3 + ni) * 8 + 2 * t4 + (q & 1);
            if (vk) {
              dst[(size_t)gc * K + row] = st[mi][ni][q];
            } else {
              dst[(size_t)row * ld + gc] = st[mi][ni][q];
            }
          }
    }
  }
  if (FollowsPrep<kOut>(p)) WaitPrimaryGrid();  // the call's kernels end with the prep's grid
}

template <int K, int BV, typename TOut, bool kOut>
cudaError_t LaunchRecurK(const Params& p, cudaStream_t stream, int nsm) {
  // FLASHKDA_FWD_RECUR_STEP1=mma: step 1 on mma.sync everywhere (A/B timing, tests). Read once per process.
  static const bool mma_step1 = EnvEquals("FLASHKDA_FWD_RECUR_STEP1", "mma");
  constexpr size_t smem = RecurSmem<K, BV, kOut>::Bytes();
  const int ncb = kOut ? p.V / BV : (p.V + K) / BV;
  const long long items = static_cast<long long>(p.B) * p.T * p.HV * ncb;  // bound on (segment, head, block) items
  const bool pdl = FollowsPrep<kOut>(p);  // the prep's programmatic dependent (kda_fwd_overlap.h)
  if (mma_step1) return LaunchGrid<RecurThreads(BV)>(RecurKernel<K, BV, TOut, kOut, false>, smem, items, 1, p, stream, nsm, pdl);
  return LaunchGrid<RecurThreads(BV)>(RecurKernel<K, BV, TOut, kOut, true>, smem, items, 1, p, stream, nsm, pdl);
}

template <int K, int BV, typename TOut>
cudaError_t LaunchRecurK2(const Params& p, bool phase3, cudaStream_t stream, int nsm) {
  return phase3 ? LaunchRecurK<K, BV, TOut, true>(p, stream, nsm)
                : LaunchRecurK<K, BV, float, false>(p, stream, nsm);  // no outputs: one instance
}

template <int K, typename TOut>
cudaError_t LaunchRecurK2(const Params& p, bool phase3, cudaStream_t stream, int nsm) {
  // The column block ChooseSeglen planned with (MakeLayout). (Phase 1 on 64-column CTAs at b1-t8k-h64, 128 of them
  // for 132 SMs instead of 64 of 128 columns, took 212 instead of 195 us on an H100: a lone 8-warp CTA is no faster
  // per chunk step.)
  if constexpr (K == 128) {
    if (BlockV(K, p.B, p.HV) == 128) return LaunchRecurK2<K, 128, TOut>(p, phase3, stream, nsm);
    return LaunchRecurK2<K, 64, TOut>(p, phase3, stream, nsm);
  } else {
    return LaunchRecurK2<K, BlockV(K, 1, 1), TOut>(p, phase3, stream, nsm);
  }
}

// ---- phase 2: S_{j+1} = P_j S_j + H_j over the segments of each split sequence, fp32 ----
// One CTA per (split sequence, head, 16 state columns); P_j streams through shared memory in column tiles.
template <int K>
struct CombineSmem {
  static constexpr int CB = 16, MT = 64, MP = MT + 4;
  static constexpr size_t Bytes() { return (static_cast<size_t>(K) * CB + static_cast<size_t>(K) * MP) * 4; }
};

template <int K>
__global__ void __launch_bounds__(kThreads) CombineKernel(Params p) {
  using SM = CombineSmem<K>;
  constexpr int CB = SM::CB, MT = SM::MT, MP = SM::MP;
  constexpr int G = kThreads / K;    // column groups
  constexpr int CPT = CB / G;        // columns per thread
  extern __shared__ __align__(16) unsigned char comb_smem[];  // (RecurKernel's smem is 1024-byte aligned)
  float* sS = reinterpret_cast<float*>(comb_smem);  // [K][CB]
  float* sP = sS + K * CB;                     // [K][MP]
  const int tid = threadIdx.x;
  const int r = tid % K, cg = tid / K;
  const int HV = p.HV, V = p.V;
  const int NCB = V / CB;
  const int nitems = p.counters[2] * HV * NCB;
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int cb = it % NCB;
    const int hv = (it / NCB) % HV;
    const int mi = it / NCB / HV;
    const int4 e = p.multi_list[mi];
    const int b = e.x, ss = e.y, send = e.z;
    const int c0 = cb * CB + cg * CPT;
    __syncthreads();
    {
      const float* s1 = p.Sstart + (((size_t)b * p.NSPLIT + (ss + p.Lseg - 1) / p.Lseg) * HV + hv) * K * V;
#pragma unroll
      for (int c = 0; c < CPT; ++c) sS[r * CB + cg * CPT + c] = s1[(size_t)r * V + c0 + c];
    }
    __syncthreads();
    for (int tj = ss + p.Lseg; tj + p.Lseg < send; tj += p.Lseg) {
      const int idx = (tj + p.Lseg - 1) / p.Lseg;
      const float* hp = p.HP + (((size_t)b * p.NSPLIT + idx) * HV + hv) * K * (V + K);
      float acc[CPT];
#pragma unroll
      for (int c = 0; c < CPT; ++c) acc[c] = hp[(size_t)r * (V + K) + c0 + c];
      for (int m0 = 0; m0 < K; m0 += MT) {
        // P[:, m0:m0+MT] -> sP
        for (int v = tid; v < K * (MT / 4); v += kThreads) {
          const int rr = v / (MT / 4), q4 = v - rr * (MT / 4);
          CpAsync16(sP + rr * MP + q4 * 4, hp + (size_t)rr * (V + K) + V + m0 + q4 * 4, true);
        }
        CpAsyncCommit();
        CpAsyncWait<0>();
        __syncthreads();
#pragma unroll 4
        for (int m = 0; m < MT; m += 4) {
          const float4 pm = *reinterpret_cast<const float4*>(sP + r * MP + m);
#pragma unroll
          for (int c = 0; c < CPT; ++c) {
            const int col = cg * CPT + c;
            acc[c] += pm.x * sS[(m0 + m) * CB + col];
            acc[c] += pm.y * sS[(m0 + m + 1) * CB + col];
            acc[c] += pm.z * sS[(m0 + m + 2) * CB + col];
            acc[c] += pm.w * sS[(m0 + m + 3) * CB + col];
          }
        }
        __syncthreads();
      }
      float* dst = p.Sstart + (((size_t)b * p.NSPLIT + idx) * HV + hv) * K * V + (size_t)r * V;
#pragma unroll
      for (int c = 0; c < CPT; ++c) dst[c0 + c] = acc[c];
#pragma unroll
      for (int c = 0; c < CPT; ++c) sS[r * CB + cg * CPT + c] = acc[c];
      __syncthreads();
    }
  }
}

template <int K>
cudaError_t LaunchCombineK(const Params& p, cudaStream_t stream, int nsm) {
  constexpr size_t smem = CombineSmem<K>::Bytes();
  auto kernel = CombineKernel<K>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  long long items = static_cast<long long>(p.B) * (p.T / p.Lseg + 1) * p.HV * (p.V / 16);
  long long grid = static_cast<long long>(nsm) * 4;
  if (grid > items) grid = items;
  if (grid < 1) grid = 1;
  kernel<<<static_cast<int>(grid), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename TOut>
cudaError_t LaunchRecur(const Params& p, bool phase3, cudaStream_t stream, int nsm) {
  switch (p.K) {
    case 64: return LaunchRecurK2<64, TOut>(p, phase3, stream, nsm);
    case 128: return LaunchRecurK2<128, TOut>(p, phase3, stream, nsm);
    case 256: return LaunchRecurK2<256, TOut>(p, phase3, stream, nsm);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t LaunchRecur<__nv_bfloat16>(const Params&, bool, cudaStream_t, int);
template cudaError_t LaunchRecur<__half>(const Params&, bool, cudaStream_t, int);
template cudaError_t LaunchRecur<float>(const Params&, bool, cudaStream_t, int);

cudaError_t LaunchCombine(const Params& p, cudaStream_t stream, int nsm) {
  switch (p.K) {
    case 64: return LaunchCombineK<64>(p, stream, nsm);
    case 128: return LaunchCombineK<128>(p, stream, nsm);
    case 256: return LaunchCombineK<256>(p, stream, nsm);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fwd
}  // namespace flashkda
