// flashkda_bwd, stages "states" and "reverse": the two sequential passes over the chunks of each sequence,
// one CTA per (sequence, value head, kBV state columns), state block in shared memory (f32), chunk operands
// from the prep workspace. See kda_bwd_common.cuh for the algorithm.
#include "kda_bwd_common.cuh"
#include "kda_fwd_launch.h"

namespace flashkda {
namespace bwd {
namespace {

using bf16 = __nv_bfloat16;

template <int K>
struct StatesSmem {
  static constexpr int C = kChunk, SP = kBV + 1, KP = K + 1;
  static constexpr size_t Bytes() {
    return (static_cast<size_t>(K) * SP + 2 * static_cast<size_t>(C) * KP + static_cast<size_t>(C) * SP + K) * 4;
  }
};

// Forward pass: S_{c+1} = diag(gamma) S_c + Kd^T (U - W S_c); stores the start state of every chunk but the
// first of its sequence at index ceil(cs / C).
template <int K>
__global__ void __launch_bounds__(kThreads) StatesKernel(Params P) {
  using SM = StatesSmem<K>;
  constexpr int C = kChunk, BV = kBV, SP = SM::SP, KP = SM::KP, TM = K / 16;
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) float smem[];
  float* sS = smem;           // [K][SP]
  float* sW = sS + K * SP;    // [C][KP]
  float* sKd = sW + C * KP;   // [C][KP]
  float* sR = sKd + C * KP;   // [C][SP]
  float* sGam = sR + C * SP;  // [K]
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int V = p.V, HV = p.HV, NCB = V / BV;
  const int nitems = p.counters[1] * HV * NCB;
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int cb = it % NCB, hv = (it / NCB) % HV, si = it / NCB / HV;
    const int4 e = P.seq_list[si];
    const int b = e.x, ss = e.y, se = e.z, s = e.w;
    const int col0 = cb * BV;
    const int nch = (se - ss + C - 1) / C;
    if (nch <= 1) continue;
    __syncthreads();  // the previous item is done with shared memory
    {
      const float* src = s < p.S_init ? p.init + (((size_t)b * p.S_init + s) * HV + hv) * K * V : nullptr;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sS[r * SP + c] = src ? src[StateAt(p.state_vk, K, V, r, col0 + c)] : 0.f;
      }
    }
    for (int m = 0; m + 1 < nch; ++m) {
      const int cs = ss + m * C;  // a full chunk (it has a successor)
      const size_t tb = (size_t)b * p.T + cs;
      __syncthreads();
      for (int idx = tid; idx < C * K; idx += kThreads) {
        const int r = idx / K, c = idx % K;
        const size_t o = ((tb + r) * HV + hv) * K + c;
        sW[r * KP + c] = Bf(p.W[o]);
        sKd[r * KP + c] = Bf(p.Kd[o]);
      }
      for (int idx = tid; idx < C * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sR[r * SP + c] = Bf(p.U[((tb + r) * HV + hv) * V + col0 + c]);
      }
      {
        const int gidx = (cs + C - 1) / C;
        for (int c = tid; c < K; c += kThreads) sGam[c] = p.gamma[(((size_t)b * p.NG + gidx) * HV + hv) * K + c];
      }
      __syncthreads();
      {  // R = U - W S
        float acc[4][4];
        Zero(acc);
        MicroGemm<4, 4>(acc, tm, 16, tn, 16, K, [&](int mm, int kk) { return sW[mm * KP + kk]; },
                        [&](int kk, int n) { return sS[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sR[(tm + 16 * i) * SP + tn + 16 * j] -= acc[i][j];
      }
      __syncthreads();
      {  // S = diag(gamma) S + Kd^T R
        float acc[TM][4];
        Zero(acc);
        MicroGemm<TM, 4>(acc, tm, 16, tn, 16, C, [&](int mm, int kk) { return sKd[kk * KP + mm]; },
                         [&](int kk, int n) { return sR[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = tm + 16 * i, c = tn + 16 * j;
            sS[r * SP + c] = sGam[r] * sS[r * SP + c] + acc[i][j];
          }
      }
      __syncthreads();
      float* dst = P.Hs + (((size_t)b * (p.NW + 1) + (cs + 2 * C - 1) / C) * HV + hv) * K * V;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        dst[(size_t)r * V + col0 + c] = sS[r * SP + c];
      }
    }
  }
}

template <int K>
struct ReverseSmem {
  static constexpr int C = kChunk, SP = kBV + 1, KP = K + 1, AP = C + 1;
  static constexpr size_t Bytes() {
    return (static_cast<size_t>(K) * SP + 3 * static_cast<size_t>(C) * KP + static_cast<size_t>(C) * AP +
            2 * static_cast<size_t>(C) * SP + K) *
           4;
  }
};

// Backward pass over the chunks of a sequence, last to first:
//   dR = A_qk^T dO + Kd dS,   dS <- Qg^T dO - W^T dR + diag(gamma) dS.
template <int K, typename TIn>
__global__ void __launch_bounds__(kThreads) ReverseKernel(Params P) {
  using SM = ReverseSmem<K>;
  constexpr int C = kChunk, BV = kBV, SP = SM::SP, KP = SM::KP, AP = SM::AP, TM = K / 16;
  const fwd::Params& p = P.f;
  extern __shared__ __align__(16) float smem[];
  float* sdS = smem;            // [K][SP]
  float* sQg = sdS + K * SP;    // [C][KP]
  float* sKd = sQg + C * KP;    // [C][KP]
  float* sW = sKd + C * KP;     // [C][KP]
  float* sA = sW + C * KP;      // [C][AP]
  float* sdO = sA + C * AP;     // [C][SP]
  float* sdR = sdO + C * SP;    // [C][SP]
  float* sGam = sdR + C * SP;   // [K]
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int V = p.V, HV = p.HV, NCB = V / BV;
  const int nitems = p.counters[1] * HV * NCB;
  const TIn* gdo = static_cast<const TIn*>(P.d_o);
  for (int it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int cb = it % NCB, hv = (it / NCB) % HV, si = it / NCB / HV;
    const int4 e = P.seq_list[si];
    const int b = e.x, ss = e.y, se = e.z, s = e.w;
    const int col0 = cb * BV;
    const int nch = (se - ss + C - 1) / C;
    __syncthreads();
    {
      const float* src = (P.dfin != nullptr && s < P.S_out) ? P.dfin + (((size_t)b * P.S_out + s) * HV + hv) * K * V
                                                             : nullptr;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sdS[r * SP + c] = src ? src[StateAt(p.state_vk, K, V, r, col0 + c)] : 0.f;
      }
    }
    for (int m = nch - 1; m >= 0; --m) {
      const int cs = ss + m * C;
      const int L = min(C, se - cs);
      const size_t tb = (size_t)b * p.T + cs;
      __syncthreads();  // sdS final for this chunk; operands free
      if (m + 1 < nch) {  // dS_next of this chunk = gradient w.r.t. the start state of the next one
        float* dst = P.dH + (((size_t)b * (p.NW + 1) + (cs + 2 * C - 1) / C) * HV + hv) * K * V;
        for (int idx = tid; idx < K * BV; idx += kThreads) {
          const int r = idx / BV, c = idx % BV;
          dst[(size_t)r * V + col0 + c] = sdS[r * SP + c];
        }
      }
      for (int idx = tid; idx < C * K; idx += kThreads) {
        const int r = idx / K, c = idx % K;
        const bool ok = r < L;
        const size_t o = ((tb + (ok ? r : 0)) * HV + hv) * K + c;
        sQg[r * KP + c] = ok ? Bf(p.Qg[o]) : 0.f;
        sKd[r * KP + c] = ok ? Bf(p.Kd[o]) : 0.f;
        sW[r * KP + c] = ok ? Bf(p.W[o]) : 0.f;
      }
      for (int idx = tid; idx < C * C; idx += kThreads) {
        const int r = idx / C, c = idx % C;
        sA[r * AP + c] = r < L ? Bf(p.Aqk[((tb + r) * HV + hv) * C + c]) : 0.f;
      }
      for (int idx = tid; idx < C * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        sdO[r * SP + c] = r < L ? fwd::ToF<TIn>(gdo[((tb + r) * HV + hv) * V + col0 + c]) : 0.f;
      }
      {
        const int gidx = GammaIndex(p, cs, se, s);
        for (int c = tid; c < K; c += kThreads)
          sGam[c] = gidx >= 0 ? p.gamma[(((size_t)b * p.NG + gidx) * HV + hv) * K + c] : 0.f;
      }
      __syncthreads();
      {  // dR = A_qk^T dO + Kd dS
        float acc[4][4];
        Zero(acc);
        MicroGemm<4, 4>(acc, tm, 16, tn, 16, C, [&](int mm, int kk) { return sA[kk * AP + mm]; },
                        [&](int kk, int n) { return sdO[kk * SP + n]; });
        MicroGemm<4, 4>(acc, tm, 16, tn, 16, K, [&](int mm, int kk) { return sKd[mm * KP + kk]; },
                        [&](int kk, int n) { return sdS[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sdR[(tm + 16 * i) * SP + tn + 16 * j] = acc[i][j];
      }
      __syncthreads();
      {  // dS = Qg^T dO - W^T dR + diag(gamma) dS
        float acc[TM][4], acw[TM][4];
        Zero(acc);
        Zero(acw);
        MicroGemm<TM, 4>(acc, tm, 16, tn, 16, C, [&](int mm, int kk) { return sQg[kk * KP + mm]; },
                         [&](int kk, int n) { return sdO[kk * SP + n]; });
        MicroGemm<TM, 4>(acw, tm, 16, tn, 16, C, [&](int mm, int kk) { return sW[kk * KP + mm]; },
                         [&](int kk, int n) { return sdR[kk * SP + n]; });
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = tm + 16 * i, c = tn + 16 * j;
            sdS[r * SP + c] = acc[i][j] - acw[i][j] + sGam[r] * sdS[r * SP + c];
          }
      }
    }
    __syncthreads();
    if (P.dinit != nullptr && s < p.S_init) {
      float* dst = P.dinit + (((size_t)b * p.S_init + s) * HV + hv) * K * V;
      for (int idx = tid; idx < K * BV; idx += kThreads) {
        const int r = idx / BV, c = idx % BV;
        dst[StateAt(p.state_vk, K, V, r, col0 + c)] = sdS[r * SP + c];
      }
    }
  }
}

}  // namespace

cudaError_t LaunchStates(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV * (p.f.V / kBV);
  switch (p.f.K) {
    case 64: return fwd::LaunchGrid(StatesKernel<64>, StatesSmem<64>::Bytes(), items, 1, p, stream, nsm);
    case 128: return fwd::LaunchGrid(StatesKernel<128>, StatesSmem<128>::Bytes(), items, 1, p, stream, nsm);
    default: return cudaErrorInvalidValue;
  }
}

template <typename TIn>
cudaError_t LaunchReverse(const Params& p, cudaStream_t stream, int nsm) {
  const long long items = static_cast<long long>(p.f.B) * p.f.T * p.f.HV * (p.f.V / kBV);
  switch (p.f.K) {
    case 64: return fwd::LaunchGrid(ReverseKernel<64, TIn>, ReverseSmem<64>::Bytes(), items, 1, p, stream, nsm);
    case 128: return fwd::LaunchGrid(ReverseKernel<128, TIn>, ReverseSmem<128>::Bytes(), items, 1, p, stream, nsm);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t LaunchReverse<__nv_bfloat16>(const Params&, cudaStream_t, int);
template cudaError_t LaunchReverse<__half>(const Params&, cudaStream_t, int);
template cudaError_t LaunchReverse<float>(const Params&, cudaStream_t, int);

}  // namespace bwd
}  // namespace flashkda
