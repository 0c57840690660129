// CUDA handler of flashkda_fwd: decodes the operands, lays out the workspace, and enqueues the plan, prep
// and recurrence kernels (kda_fwd_common.cuh describes the algorithm). Graph safe: no allocation, no host
// synchronisation, no host read of device data; every size is a static bound.
#include <cuda_runtime.h>

#include <string>

#include "kda_bindings.h"
#include "kda_fwd_common.cuh"
#include "kda_fwd_launch.h"

namespace ffi = xla::ffi;

namespace flashkda {
namespace fwd {
namespace {

constexpr int kPlanThreads = 1024;

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
//               end at its start position, zeroes the outputs of padding tokens
//   PlanLists   work lists (chunk starts, segment starts, split sequences), compacted with one atomic per tile
__global__ void __launch_bounds__(kPlanThreads) PlanScan(Params p) {
  __shared__ int s_warp[32];
  const int b = blockIdx.y, t = blockIdx.x * kPlanThreads + threadIdx.x, T = p.T;
  const int* slot = p.slot + (size_t)b * T;
  const int s = t < T ? slot[t] : -1;
  const int prev = (t > 0 && t < T) ? slot[t - 1] : -1;
  int total;
  const int ss = BlockScan<true>((s >= 0 && s != prev) ? t : -1, s_warp, &total);
  if (t < T) p.seq_start[(size_t)b * T + t] = ss;
}

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
  int total;
  const int excl = BlockScan<false>(packed, s_warp, &total) - packed;
  if (tid == 0) {
    s_base[0] = atomicAdd(&p.counters[0], total & 0x7ff);
    s_base[1] = atomicAdd(&p.counters[1], (total >> 11) & 0x7ff);
    s_base[2] = atomicAdd(&p.counters[2], (total >> 22) & 0x3ff);
  }
  __syncthreads();
  if (fc) p.chunk_list[s_base[0] + (excl & 0x7ff)] = make_int4(b, t, se, s);
  if (fs) p.seg_list[s_base[1] + ((excl >> 11) & 0x7ff)] = make_int4(b, t, se, s | ((t == ss) ? (1 << 30) : 0));
  if (fm) p.multi_list[s_base[2] + ((excl >> 22) & 0x3ff)] = make_int4(b, t, se, s);
}

int SmCount() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  static int cached[64] = {0};
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int n = 132;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  if (dev >= 0 && dev < 64) cached[dev] = n;
  return n;
}

ffi::Error CudaError(cudaError_t err, const char* where) {
  return ffi::Error::Internal(std::string("flashkda_fwd: ") + where + ": " + cudaGetErrorString(err));
}

template <typename TIn>
ffi::Error Run(cudaStream_t stream, Params& p, const Layout& lay, int64_t init_bytes, int64_t final_bytes) {
  const int nsm = SmCount();
  cudaError_t err;
  if (p.S_final > 0) {
    err = p.S_init > 0 ? cudaMemcpyAsync(p.final_state, p.init, final_bytes, cudaMemcpyDeviceToDevice, stream)
                       : cudaMemsetAsync(p.final_state, 0, final_bytes, stream);
    if (err != cudaSuccess) return CudaError(err, "final state copy");
  }
  (void)init_bytes;
  if (p.B == 0 || p.T == 0 || p.HV == 0) return ffi::Error::Success();
  err = cudaMemsetAsync(p.counters, 0, 64, stream);
  if (err != cudaSuccess) return CudaError(err, "memset");
  const dim3 pgrid((p.T + kPlanThreads - 1) / kPlanThreads, p.B);
  PlanScan<<<pgrid, kPlanThreads, 0, stream>>>(p);
  PlanFix<<<pgrid, kPlanThreads, 0, stream>>>(p, p.HV * p.V * static_cast<int>(sizeof(TIn)));
  PlanLists<<<pgrid, kPlanThreads, 0, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return CudaError(err, "plan kernels");
  if ((err = LaunchPrep<TIn>(p, stream, nsm)) != cudaSuccess) return CudaError(err, "prep kernel");
  if (p.split) {
    if ((err = LaunchRecur<TIn>(p, false, stream, nsm)) != cudaSuccess) return CudaError(err, "segment kernel");
    if ((err = LaunchCombine(p, stream, nsm)) != cudaSuccess) return CudaError(err, "combine kernel");
  }
  if ((err = LaunchRecur<TIn>(p, true, stream, nsm)) != cudaSuccess) return CudaError(err, "recurrence kernel");
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fwd
}  // namespace flashkda

static ffi::Error KdaCudaFwdImpl(cudaStream_t stream, FLASHKDA_FWD_PARAMS) {
  using namespace flashkda;
  using namespace flashkda::fwd;
  KdaOptions opt;
  if (auto err = FLASHKDA_DECODE_OPTIONS(opt); err.failure()) return err;
  KdaShape s;
  if (auto err = DecodeShape(q, k, v, g, beta, a_log, dt_bias, slot, initial_state, opt, &s); err.failure()) return err;
  const auto dt = s.dtype;
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16 && dt != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): inputs must be bfloat16, float16 or float32");
  }
  if (s.K != s.V || (s.K != 64 && s.K != 128 && s.K != 256)) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): head dims must satisfy K == V in {64, 128, 256}");
  }
  if (s.H * s.K != 0 && q.element_count() != static_cast<size_t>(s.B * s.T * s.H * s.K)) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): bad q shape");
  }
  const int64_t s_final = StateSlots(*final_state, s);
  if (final_state->element_count() > 0 &&
      final_state->element_count() != static_cast<size_t>(s.B * s_final * s.HV * s.K * s.V)) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): final_state has a bad size");
  }
  if (s.has_initial_state && s_final > 0 && s_final != s.S) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): initial and final state must have the same slots");
  }
  if (o->element_count() != static_cast<size_t>(s.B * s.T * s.HV * s.V) || o->element_type() != dt) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): bad output buffer");
  }
  const int64_t S = s.S > s_final ? s.S : s_final;
  Layout lay = MakeLayout(s.B, s.T, s.HV, s.K, s.V, S);
  if (workspace->size_bytes() < lay.total) lay = MakeLayout(s.B, s.T, s.HV, s.K, s.V, S, /*no_split=*/true);
  if (workspace->size_bytes() < lay.total) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): workspace too small: " + std::to_string(workspace->size_bytes()) +
                                       " < " + std::to_string(lay.total) + " bytes");
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace->untyped_data());
  Params p{};
  p.B = static_cast<int>(s.B);
  p.T = static_cast<int>(s.T);
  p.H = static_cast<int>(s.H);
  p.HV = static_cast<int>(s.HV);
  p.K = static_cast<int>(s.K);
  p.V = static_cast<int>(s.V);
  p.group = static_cast<int>(s.HV / s.H);
  p.S_init = s.has_initial_state ? static_cast<int>(s.S) : 0;
  p.S_final = static_cast<int>(s_final);
  p.seglen = lay.seglen;
  p.Lseg = lay.seglen * kChunk;
  p.NW = lay.NW;
  p.NG = lay.NG;
  p.NSPLIT = lay.NSPLIT;
  p.split = lay.split;
  p.scale = opt.scale;
  p.lower_bound = opt.lower_bound;
  p.gate_mode = static_cast<int>(opt.gate);
  p.use_a_log = opt.use_a_log;
  p.qk_l2norm = opt.qk_l2norm;
  p.beta_sigmoid = opt.beta_sigmoid;
  p.allow_neg = opt.allow_neg_eigval;
  p.state_vk = opt.state_vk;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.beta = beta.untyped_data();
  p.a_log = static_cast<const float*>(a_log.untyped_data());
  p.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  p.slot = static_cast<const int*>(slot.untyped_data());
  p.init = s.has_initial_state ? static_cast<const float*>(initial_state.untyped_data()) : nullptr;
  p.o = o->untyped_data();
  p.final_state = s_final > 0 ? static_cast<float*>(final_state->untyped_data()) : nullptr;
  p.Qg = reinterpret_cast<__nv_bfloat16*>(ws + lay.qg);
  p.Kd = reinterpret_cast<__nv_bfloat16*>(ws + lay.kd);
  p.W = reinterpret_cast<__nv_bfloat16*>(ws + lay.w);
  p.U = reinterpret_cast<__nv_bfloat16*>(ws + lay.u);
  p.Aqk = reinterpret_cast<__nv_bfloat16*>(ws + lay.aqk);
  p.gamma = reinterpret_cast<float*>(ws + lay.gamma);
  p.HP = reinterpret_cast<float*>(ws + lay.hp);
  p.Sstart = reinterpret_cast<float*>(ws + lay.sstart);
  p.seq_start = reinterpret_cast<int*>(ws + lay.seq_start);
  p.seq_end = reinterpret_cast<int*>(ws + lay.seq_end);
  p.chunk_list = reinterpret_cast<int4*>(ws + lay.chunks);
  p.seg_list = reinterpret_cast<int4*>(ws + lay.segs);
  p.multi_list = reinterpret_cast<int4*>(ws + lay.multi);
  p.counters = reinterpret_cast<int*>(ws + lay.counters);
  const int64_t init_bytes = s.has_initial_state ? static_cast<int64_t>(initial_state.size_bytes()) : 0;
  const int64_t final_bytes = static_cast<int64_t>(final_state->size_bytes());
  switch (dt) {
    case ffi::DataType::BF16: return Run<__nv_bfloat16>(stream, p, lay, init_bytes, final_bytes);
    case ffi::DataType::F16: return Run<__half>(stream, p, lay, init_bytes, final_bytes);
    default: return Run<float>(stream, p, lay, init_bytes, final_bytes);
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaFwdCuda, KdaCudaFwdImpl,
                              FLASHKDA_FWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                              {ffi::Traits::kCmdBufferCompatible});
