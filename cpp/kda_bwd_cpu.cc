// CPU handler of flashkda_bwd: reverse-mode of the token recurrence with state checkpoints.
//
// Phase 1, one work item per (batch row, value head, V-column range), for each K x VB state block:
//   1. forward sweep over the row, saving the block every kC tokens (checkpoints);
//   2. for each kC-token interval, last to first: recompute its states from the checkpoint (keeping the
//      state before every token, the residual r = v - S'^T k and dq += S_t do), then run the reverse
//      recurrence through it:
//        dS += q do^T;  dr = beta dS^T k;  dv = dr;  dbeta += (dS^T k) . r;
//        dk += beta dS r - S' dr;  dS' = dS - k dr^T;  dg += rowsum(dS' * S');  dS_prev = diag(a) dS'.
//   Gradients w.r.t. the effective q, k (per value head) and log-decay go to scratch buffers, summed over
//   V ranges and (for q, k) over the value heads of a GVA group in a fixed order in phase 2.
// Phase 2, one work item per (batch row, q/k head): sums, then chains through scale / l2norm, the gate
//   (softplus or bounded, with dA_log and ddt_bias per row) and the sigmoid of beta.
// Nothing is accumulated with atomics: every result element has one writer and a fixed summation order.
#include "kda_bindings.h"
#include "kda_cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace flashkda;
using namespace flashkda::cpu;

constexpr int64_t kC = 16;  // tokens between state checkpoints

struct BwdArgs {
  Problem P;
  const void* d_o = nullptr;
  const void* dfin = nullptr;  // dfinal_state (S_out slots) or null
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dg = nullptr;
  void* dbeta = nullptr;
  float* da_log = nullptr;
  float* ddt = nullptr;
  void* dinit = nullptr;  // dinitial_state or null
  // Scratch (Acc): [B, HV, nsplit, T, K] for dq_eff, dk_eff, dg_eff; [B, HV, nsplit, T] for dbeta_eff.
  void* sq = nullptr;
  void* sk = nullptr;
  void* sg = nullptr;
  void* sb = nullptr;
  int64_t nsplit = 1;
  int64_t nvb = 1;
};

// Forward step on a state block without output (checkpoint sweep).
template <class C, class Acc = typename C::Acc>
FKDA_INLINE void StateToken(Acc* FKDA_RESTRICT S, int64_t K, const Acc* FKDA_RESTRICT k,
                            const Acc* FKDA_RESTRICT a, Acc beta, const Acc* FKDA_RESTRICT v) {
  using V = typename C::V;
  constexpr int W = C::W, R = C::R, VB = C::VB;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = S + i * VB;
    const V ai = VSplat<V>(a[i]);
    const V ki = VSplat<V>(k[i]);
    for (int r = 0; r < R; ++r) {
      V x = VLoad<V>(row + r * W) * ai;
      VStore(row + r * W, x);
      acc[r] += ki * x;
    }
  }
  V u[R];
  const V bv = VSplat<V>(beta);
  for (int r = 0; r < R; ++r) u[r] = (VLoad<V>(v + r * W) - acc[r]) * bv;
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = S + i * VB;
    const V ki = VSplat<V>(k[i]);
    for (int r = 0; r < R; ++r) VStore(row + r * W, VLoad<V>(row + r * W) + ki * u[r]);
  }
}

// Recompute step: S (state before the token, also copied to Sprev) -> state after it; writes the residual
// r = v - S'^T k and adds S_t do to dq.
template <class C, class Acc = typename C::Acc>
FKDA_INLINE void RecomputeToken(Acc* FKDA_RESTRICT S, Acc* FKDA_RESTRICT Sprev, int64_t K,
                                const Acc* FKDA_RESTRICT k, const Acc* FKDA_RESTRICT a, Acc beta,
                                const Acc* FKDA_RESTRICT v, const Acc* FKDA_RESTRICT d_o,
                                Acc* FKDA_RESTRICT r_out, Acc* FKDA_RESTRICT dq) {
  using V = typename C::V;
  constexpr int W = C::W, R = C::R, VB = C::VB;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = S + i * VB;
    Acc* prow = Sprev + i * VB;
    const V ai = VSplat<V>(a[i]);
    const V ki = VSplat<V>(k[i]);
    for (int r = 0; r < R; ++r) {
      const V s0 = VLoad<V>(row + r * W);
      VStore(prow + r * W, s0);
      const V x = s0 * ai;
      VStore(row + r * W, x);
      acc[r] += ki * x;
    }
  }
  V u[R], dov[R];
  const V bv = VSplat<V>(beta);
  for (int r = 0; r < R; ++r) {
    const V res = VLoad<V>(v + r * W) - acc[r];
    VStore(r_out + r * W, res);
    u[r] = res * bv;
    dov[r] = VLoad<V>(d_o + r * W);
  }
  for (int64_t i = 0; i < K; i += 2) {
    // Two rows at a time so that their dot products share one horizontal reduction.
    Acc* row0 = S + i * VB;
    const V k0 = VSplat<V>(k[i]);
    V p0 = V{}, p1 = V{};
    for (int r = 0; r < R; ++r) {
      const V x = VLoad<V>(row0 + r * W) + k0 * u[r];
      VStore(row0 + r * W, x);
      p0 += x * dov[r];
    }
    if (i + 1 < K) {
      Acc* row1 = row0 + VB;
      const V k1 = VSplat<V>(k[i + 1]);
      for (int r = 0; r < R; ++r) {
        const V x = VLoad<V>(row1 + r * W) + k1 * u[r];
        VStore(row1 + r * W, x);
        p1 += x * dov[r];
      }
    }
    Acc s0, s1;
    HSum2<Acc, V>(p0, p1, &s0, &s1);
    dq[i] += s0;
    if (i + 1 < K) dq[i + 1] += s1;
  }
}

// Reverse step of one token on a dS block (gradient w.r.t. the state after the token -> before it).
template <class C, class Acc = typename C::Acc>
FKDA_INLINE void ReverseToken(Acc* FKDA_RESTRICT dS, const Acc* FKDA_RESTRICT Sprev, int64_t K,
                              const Acc* FKDA_RESTRICT q, const Acc* FKDA_RESTRICT k,
                              const Acc* FKDA_RESTRICT a, Acc beta, const Acc* FKDA_RESTRICT res,
                              const Acc* FKDA_RESTRICT d_o, Acc* FKDA_RESTRICT dv_out, Acc* FKDA_RESTRICT dk,
                              Acc* FKDA_RESTRICT dg, Acc* FKDA_RESTRICT db) {
  using V = typename C::V;
  constexpr int W = C::W, R = C::R, VB = C::VB;
  V du[R], dov[R];
  for (int r = 0; r < R; ++r) {
    du[r] = V{};
    dov[r] = VLoad<V>(d_o + r * W);
  }
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = dS + i * VB;
    const V qi = VSplat<V>(q[i]);
    const V ki = VSplat<V>(k[i]);
    for (int r = 0; r < R; ++r) {
      const V d = VLoad<V>(row + r * W) + qi * dov[r];
      VStore(row + r * W, d);
      du[r] += ki * d;
    }
  }
  const V bv = VSplat<V>(beta);
  V dr[R], br[R], pb = V{};
  for (int r = 0; r < R; ++r) {
    const V rr = VLoad<V>(res + r * W);
    dr[r] = du[r] * bv;
    br[r] = rr * bv;
    pb += du[r] * rr;
    VStore(dv_out + r * W, dr[r]);
  }
  *db += HSum<Acc, V>(pb);
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = dS + i * VB;
    const Acc* prow = Sprev + i * VB;
    const V ai = VSplat<V>(a[i]);
    const V ki = VSplat<V>(k[i]);
    V pk = V{}, pg = V{};
    for (int r = 0; r < R; ++r) {
      const V d = VLoad<V>(row + r * W);
      const V sp = VLoad<V>(prow + r * W) * ai;
      pk += d * br[r] - sp * dr[r];
      const V dsp = d - ki * dr[r];
      pg += dsp * sp;
      VStore(row + r * W, ai * dsp);
    }
    Acc sk, sg;
    HSum2<Acc, V>(pk, pg, &sk, &sg);
    dk[i] += sk;
    dg[i] += sg;
  }
}

template <class In, class C>
FKDA_INLINE void BwdTask(const BwdArgs& A, int64_t task) {
  using Acc = typename C::Acc;
  const Problem& P = A.P;
  const KdaShape& s = P.s;
  const int64_t T = s.T, HV = s.HV, K = s.K, V = s.V;
  constexpr int VB = C::VB;
  const int64_t split = task % A.nsplit;
  const int64_t bh = task / A.nsplit;
  const int64_t b = bh / HV, hv = bh % HV;
  const int64_t vb0 = split * A.nvb / A.nsplit, vb1 = (split + 1) * A.nvb / A.nsplit;
  const bool vk = P.opt.state_vk;
  const int64_t mat = K * V;

  // Scratch rows of this item.
  const int64_t sidx = (bh * A.nsplit + split);
  Acc* dqe = static_cast<Acc*>(A.sq) + sidx * T * K;
  Acc* dke = static_cast<Acc*>(A.sk) + sidx * T * K;
  Acc* dge = static_cast<Acc*>(A.sg) + sidx * T * K;
  Acc* dbe = static_cast<Acc*>(A.sb) + sidx * T;
  std::memset(dqe, 0, sizeof(Acc) * T * K);
  std::memset(dke, 0, sizeof(Acc) * T * K);
  std::memset(dge, 0, sizeof(Acc) * T * K);
  std::memset(dbe, 0, sizeof(Acc) * T);
  if (vb1 <= vb0) return;
  const int64_t c0 = vb0 * VB, c1 = std::min<int64_t>(V, vb1 * VB);

  const Acc* init = static_cast<const Acc*>(P.init);
  const Acc* dfin = static_cast<const Acc*>(A.dfin);
  Acc* dinit = static_cast<Acc*>(A.dinit);
  auto init_mat = [&](int64_t sl) -> const Acc* {
    return (init != nullptr && sl >= 0 && sl < P.S_in) ? init + ((b * P.S_in + sl) * HV + hv) * mat : nullptr;
  };
  auto dinit_mat = [&](int64_t sl) -> Acc* {
    return (dinit != nullptr && sl >= 0 && sl < P.S_in) ? dinit + ((b * P.S_in + sl) * HV + hv) * mat : nullptr;
  };
  auto dfin_mat = [&](int64_t sl) -> const Acc* {
    return (dfin != nullptr && sl >= 0 && sl < P.S_out) ? dfin + ((b * P.S_out + sl) * HV + hv) * mat : nullptr;
  };

  const int32_t* slot = P.slot + b * T;
  std::vector<uint8_t> flags(T);
  TokenFlags(slot, T, flags.data());

  // dinitial_state: slots no sequence reaches pass dfinal_state straight through (their final state is
  // the initial one); the others accumulate below.
  if (dinit != nullptr) {
    std::vector<char> reached(P.S_in, 0);
    for (int64_t t = 0; t < T; ++t)
      if (slot[t] >= 0 && slot[t] < P.S_in) reached[slot[t]] = 1;
    for (int64_t sl = 0; sl < P.S_in; ++sl)
      CopyStateCols<Acc>(dinit_mat(sl), reached[sl] ? nullptr : dfin_mat(sl), vk, K, V, c0, c1 - c0);
  }

  Buf<Acc> qe(T * K), ke(T * K), ae(T * K), be(T);
  Preprocess<In, Acc>(P, b, hv, 0, T, flags.data(), qe.data(), ke.data(), ae.data(), be.data());

  const int64_t nck = (T + kC - 1) / kC;
  Buf<Acc> vbuf(T * VB), dobuf(T * VB), dvbuf(T * VB), ck(nck * K * VB), sprev(kC * K * VB), resb(kC * VB);
  Buf<Acc> S(K * VB), dS(K * VB);
  std::vector<char> consumed(P.S_out > 0 ? P.S_out : 1);
  const In* vin = static_cast<const In*>(P.v);
  const In* doin = static_cast<const In*>(A.d_o);
  In* dvout = static_cast<In*>(A.dv);

  for (int64_t vb = vb0; vb < vb1; ++vb) {
    const int64_t cb = vb * VB, nc = std::min<int64_t>(VB, V - cb);
    for (int64_t t = 0; t < T; ++t) {
      Acc* vr = vbuf.data() + t * VB;
      Acc* dr = dobuf.data() + t * VB;
      const int64_t off = ((b * T + t) * HV + hv) * V + cb;
      if (flags[t] & kValid) {
        for (int64_t c = 0; c < nc; ++c) vr[c] = Acc(Cvt<In>::Load(vin[off + c]));
        for (int64_t c = 0; c < nc; ++c) dr[c] = Acc(Cvt<In>::Load(doin[off + c]));
      } else {
        std::fill(vr, vr + nc, Acc(0));
        std::fill(dr, dr + nc, Acc(0));
      }
      for (int64_t c = nc; c < VB; ++c) vr[c] = dr[c] = 0;
    }
    std::memset(dvbuf.data(), 0, sizeof(Acc) * T * VB);

    // 1. Checkpoints.
    std::memset(S.data(), 0, sizeof(Acc) * K * VB);
    for (int64_t t = 0; t < T; ++t) {
      if (t % kC == 0) std::memcpy(ck.data() + (t / kC) * K * VB, S.data(), sizeof(Acc) * K * VB);
      const uint8_t f = flags[t];
      if (!(f & kValid)) continue;
      if (f & kStart) LoadStateBlock<Acc>(init_mat(slot[t]), vk, K, V, cb, nc, VB, S.data());
      StateToken<C>(S.data(), K, ke.data() + t * K, ae.data() + t * K, be[t], vbuf.data() + t * VB);
    }

    // 2. Reverse, interval by interval.
    std::memset(dS.data(), 0, sizeof(Acc) * K * VB);
    std::fill(consumed.begin(), consumed.end(), 0);
    for (int64_t c = nck - 1; c >= 0; --c) {
      const int64_t t0 = c * kC, t1 = std::min(T, t0 + kC);
      std::memcpy(S.data(), ck.data() + c * K * VB, sizeof(Acc) * K * VB);
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t f = flags[t];
        if (!(f & kValid)) continue;
        if (f & kStart) LoadStateBlock<Acc>(init_mat(slot[t]), vk, K, V, cb, nc, VB, S.data());
        RecomputeToken<C>(S.data(), sprev.data() + (t - t0) * K * VB, K, ke.data() + t * K, ae.data() + t * K,
                            be[t], vbuf.data() + t * VB, dobuf.data() + t * VB, resb.data() + (t - t0) * VB,
                            dqe + t * K);
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const uint8_t f = flags[t];
        if (!(f & kValid)) continue;
        const int32_t sl = slot[t];
        if (f & kEnd) {
          const Acc* src = dfin_mat(sl);
          if (src != nullptr && !consumed[sl]) {
            consumed[sl] = 1;
            LoadStateBlock<Acc>(src, vk, K, V, cb, nc, VB, dS.data());
          } else {
            std::memset(dS.data(), 0, sizeof(Acc) * K * VB);
          }
        }
        ReverseToken<C>(dS.data(), sprev.data() + (t - t0) * K * VB, K, qe.data() + t * K, ke.data() + t * K,
                          ae.data() + t * K, be[t], resb.data() + (t - t0) * VB, dobuf.data() + t * VB,
                          dvbuf.data() + t * VB, dke + t * K, dge + t * K, dbe + t);
        if (f & kStart) {
          if (Acc* dst = dinit_mat(sl)) StoreStateBlock<Acc>(dst, vk, K, V, cb, nc, VB, dS.data(), true);
        }
      }
    }

    for (int64_t t = 0; t < T; ++t) {
      const Acc* src = dvbuf.data() + t * VB;
      In* dst = dvout + ((b * T + t) * HV + hv) * V + cb;
      for (int64_t c = 0; c < nc; ++c) dst[c] = Cvt<In>::Store(src[c]);
    }
  }
}

// Phase 2 for (b, h): sums the scratch, chains through the pre-processing, writes dq, dk, dg, dbeta,
// da_log_partial and ddt_bias_partial.
template <class In, class Acc>
FKDA_INLINE void FinishTask(const BwdArgs& A, int64_t task) {
  const Problem& P = A.P;
  const KdaShape& s = P.s;
  const KdaOptions& opt = P.opt;
  const int64_t T = s.T, H = s.H, HV = s.HV, K = s.K, G = s.group(), NS = A.nsplit;
  const int64_t b = task / H, h = task % H;
  const int32_t* slot = P.slot + b * T;
  const In* qin = static_cast<const In*>(P.q);
  const In* kin = static_cast<const In*>(P.k);
  const In* gin = static_cast<const In*>(P.g);
  const In* bin = static_cast<const In*>(P.beta);
  In* dqo = static_cast<In*>(A.dq);
  In* dko = static_cast<In*>(A.dk);
  In* dgo = static_cast<In*>(A.dg);
  In* dbo = static_cast<In*>(A.dbeta);
  const Acc* sq = static_cast<const Acc*>(A.sq);
  const Acc* sk = static_cast<const Acc*>(A.sk);
  const Acc* sg = static_cast<const Acc*>(A.sg);
  const Acc* sb = static_cast<const Acc*>(A.sb);
  const Acc scale = Acc(opt.scale);
  const Acc lb = Acc(opt.lower_bound);

  std::vector<Acc> x(K), y(K), dq(K), dk(K), dg(K), ddt(K);

  // Gate and beta, per value head of the group.
  for (int64_t hv = h * G; hv < (h + 1) * G; ++hv) {
    const int64_t bh = b * HV + hv;
    const float* dtb = P.dt_bias + bh * K;
    const Acc Aexp = std::exp(Acc(P.a_log[bh]));
    Acc da = 0;
    std::fill(ddt.begin(), ddt.end(), Acc(0));
    for (int64_t t = 0; t < T; ++t) {
      In* dgrow = dgo + ((b * T + t) * HV + hv) * K;
      In* dbrow = dbo + (b * T + t) * HV + hv;
      if (slot[t] < 0) {
        for (int64_t i = 0; i < K; ++i) dgrow[i] = Cvt<In>::Store(Acc(0));
        *dbrow = Cvt<In>::Store(Acc(0));
        continue;
      }
      // Sum over V ranges.
      const Acc* g0 = sg + ((bh * NS) * T + t) * K;
      for (int64_t i = 0; i < K; ++i) dg[i] = g0[i];
      Acc dbeta = sb[(bh * NS) * T + t];
      for (int64_t sp = 1; sp < NS; ++sp) {
        const Acc* gs = sg + ((bh * NS + sp) * T + t) * K;
        for (int64_t i = 0; i < K; ++i) dg[i] += gs[i];
        dbeta += sb[(bh * NS + sp) * T + t];
      }
      // Gate.
      if (opt.gate != GateMode::kPrecomputed) {
        LoadRow<In, Acc>(gin + ((b * T + t) * HV + hv) * K, x.data(), K);
        for (int64_t i = 0; i < K; ++i) x[i] += Acc(dtb[i]);
        if (opt.gate == GateMode::kSoftplus) {
          // g = -A softplus(x): dx = -A sigmoid(x) dg, dA_log = sum dg * g.
          for (int64_t i = 0; i < K; ++i) {
            const Acc ge = -Aexp * Softplus<Acc>(x[i]);
            const Acc dx = -Aexp * Sigmoid<Acc>(x[i]) * dg[i];
            da += dg[i] * ge;
            dg[i] = dx;
            ddt[i] += dx;
          }
        } else {
          // g = lb sigmoid(z), z = A x (or x): dz = lb s (1 - s) dg.
          for (int64_t i = 0; i < K; ++i) {
            const Acc z = opt.use_a_log ? Aexp * x[i] : x[i];
            const Acc sgm = Sigmoid<Acc>(z);
            const Acc dz = lb * sgm * (Acc(1) - sgm) * dg[i];
            if (opt.use_a_log) {
              da += dz * z;
              dg[i] = dz * Aexp;
            } else {
              dg[i] = dz;
            }
            ddt[i] += dg[i];
          }
        }
      }
      for (int64_t i = 0; i < K; ++i) dgrow[i] = Cvt<In>::Store(dg[i]);
      // Beta.
      if (opt.beta_sigmoid) {
        const Acc sgm = Sigmoid<Acc>(Acc(Cvt<In>::Load(bin[(b * T + t) * HV + hv])));
        dbeta *= sgm * (Acc(1) - sgm) * (opt.allow_neg_eigval ? Acc(2) : Acc(1));
      }
      *dbrow = Cvt<In>::Store(dbeta);
    }
    A.da_log[bh] = float(da);
    for (int64_t i = 0; i < K; ++i) A.ddt[bh * K + i] = float(ddt[i]);
  }

  // q and k: sum over the value heads of the group (and V ranges), then scale / l2norm.
  for (int64_t t = 0; t < T; ++t) {
    In* dqrow = dqo + ((b * T + t) * H + h) * K;
    In* dkrow = dko + ((b * T + t) * H + h) * K;
    if (slot[t] < 0) {
      for (int64_t i = 0; i < K; ++i) dqrow[i] = dkrow[i] = Cvt<In>::Store(Acc(0));
      continue;
    }
    std::fill(dq.begin(), dq.end(), Acc(0));
    std::fill(dk.begin(), dk.end(), Acc(0));
    for (int64_t hv = h * G; hv < (h + 1) * G; ++hv) {
      for (int64_t sp = 0; sp < NS; ++sp) {
        const int64_t base = (((b * HV + hv) * NS + sp) * T + t) * K;
        for (int64_t i = 0; i < K; ++i) dq[i] += sq[base + i];
        for (int64_t i = 0; i < K; ++i) dk[i] += sk[base + i];
      }
    }
    for (int64_t i = 0; i < K; ++i) dq[i] *= scale;
    if (opt.qk_l2norm) {
      // y = x r, r = (|x|^2 + eps)^-1/2:  dx = r (dy - y (y . dy)).
      for (int pass = 0; pass < 2; ++pass) {
        const In* src = (pass == 0 ? qin : kin) + ((b * T + t) * H + h) * K;
        std::vector<Acc>& d = pass == 0 ? dq : dk;
        LoadRow<In, Acc>(src, x.data(), K);
        const Acc r = L2Rsqrt<Acc>(x.data(), K);
        for (int64_t i = 0; i < K; ++i) y[i] = x[i] * r;
        const Acc yd = Dot<Acc>(y.data(), d.data(), K);
        for (int64_t i = 0; i < K; ++i) d[i] = r * (d[i] - y[i] * yd);
      }
    }
    for (int64_t i = 0; i < K; ++i) dqrow[i] = Cvt<In>::Store(dq[i]);
    for (int64_t i = 0; i < K; ++i) dkrow[i] = Cvt<In>::Store(dk[i]);
  }
}

template <class In, class C> void BwdTaskGeneric(const BwdArgs& A, int64_t t) { BwdTask<In, C>(A, t); }
template <class In, class Acc> void FinishTaskGeneric(const BwdArgs& A, int64_t t) { FinishTask<In, Acc>(A, t); }
#if FKDA_X86_DISPATCH
template <class In, class C> FKDA_TARGET_AVX2 void BwdTaskAvx2(const BwdArgs& A, int64_t t) {
  BwdTask<In, C>(A, t);
}
template <class In, class C> FKDA_TARGET_AVX512 void BwdTaskAvx512(const BwdArgs& A, int64_t t) {
  BwdTask<In, C>(A, t);
}
template <class In, class Acc> FKDA_TARGET_AVX2 void FinishTaskAvx2(const BwdArgs& A, int64_t t) {
  FinishTask<In, Acc>(A, t);
}
#endif

using TaskFn = void (*)(const BwdArgs&, int64_t);
struct Picked {
  TaskFn fn;
  int VB;
};
template <class In, class Acc> Picked PickBwd() {
#if FKDA_X86_DISPATCH
  switch (CpuLevel()) {
    case 2: { using C = Cfg<Acc, 64, 4>; return Picked{&BwdTaskAvx512<In, C>, C::VB}; }
    case 1: { using C = Cfg<Acc, 32, 4>; return Picked{&BwdTaskAvx2<In, C>, C::VB}; }
    default: break;
  }
#endif
  using C = Cfg<Acc, 16, 4>;
  return Picked{&BwdTaskGeneric<In, C>, C::VB};
}

template <class In, class Acc> TaskFn PickFinish() {
#if FKDA_X86_DISPATCH
  if (CpuLevel() >= 1) return &FinishTaskAvx2<In, Acc>;
#endif
  return &FinishTaskGeneric<In, Acc>;
}

ffi::Error KdaBwd(ffi::ThreadPool& pool, FLASHKDA_BWD_PARAMS) {
  constexpr const char* op = "flashkda_bwd";
  (void)bwd_window;  // the CUDA backward's token windows; the CPU backward has no per-token scratch to bound
  KdaOptions opt;
  if (auto e = FLASHKDA_DECODE_OPTIONS(opt); e.failure()) return e;
  BwdArgs A;
  if (auto e = SetupProblem(op, q, k, v, g, beta, a_log, dt_bias, slot, initial_state, opt, &A.P); e.failure()) {
    return e;
  }
  Problem& P = A.P;
  const KdaShape& s = P.s;
  if (TotalElements(chunk_states, saved_qg, saved_kd, saved_w, saved_u, saved_aqk, saved_gamma) != 0) {
    return ffi::Error::InvalidArgument("flashkda_bwd (CPU): chunk_states / saved_* come from the CUDA forward only; "
                                       "pass empty buffers");
  }
  const size_t nq = size_t(s.B * s.T * s.H * s.K), nv = size_t(s.B * s.T * s.HV * s.V);
  const size_t ng = size_t(s.B * s.T * s.HV * s.K), nb = size_t(s.B * s.T * s.HV);
  if (d_o.element_count() != nv || d_o.element_type() != s.dtype) {
    return ffi::Error::InvalidArgument("flashkda_bwd: do must have v's shape and dtype");
  }
  if (auto e = StateBufferSlots(op, "dfinal_state", dfinal_state, P, &P.S_out); e.failure()) return e;
  // State-only mode (docs/ffi.md): every input-gradient result empty -> only dinitial_state is produced.
  // Here the gradients are still computed, into scratch (the CUDA handler skips their stages).
  const size_t nrow = size_t(s.B * s.HV);
  const bool state_only = StateOnlyRequested(s, *dq, *dk, *dv, *dg, *dbeta, *da_log_partial, *ddt_bias_partial);
  if (state_only && P.S_in == 0) {
    return ffi::Error::InvalidArgument("flashkda_bwd: the state-only backward needs an initial_state");
  }
  const size_t w = ffi::ByteWidth(s.dtype);
  Buf<unsigned char> scratch(state_only ? (2 * nq + nv + ng + nb) * w + nrow * (1 + s.K) * 4 + 7 * 64 : 0);
  if (state_only) {
    unsigned char* at = scratch.data();
    auto take = [&](size_t bytes) { unsigned char* r = at; at += (bytes + 63) / 64 * 64; return r; };
    A.dq = take(nq * w);
    A.dk = take(nq * w);
    A.dv = take(nv * w);
    A.dg = take(ng * w);
    A.dbeta = take(nb * w);
    A.da_log = reinterpret_cast<float*>(take(nrow * 4));
    A.ddt = reinterpret_cast<float*>(take(nrow * s.K * 4));
  }
  if (!state_only) {
    if (auto e = CheckResult(op, "dq", *dq, nq, s.dtype); e.failure()) return e;
    if (auto e = CheckResult(op, "dk", *dk, nq, s.dtype); e.failure()) return e;
    if (auto e = CheckResult(op, "dv", *dv, nv, s.dtype); e.failure()) return e;
    if (auto e = CheckResult(op, "dg", *dg, ng, s.dtype); e.failure()) return e;
    if (auto e = CheckResult(op, "dbeta", *dbeta, nb, s.dtype); e.failure()) return e;
    if (auto e = CheckResult(op, "da_log_partial", *da_log_partial, size_t(s.B * s.HV), ffi::DataType::F32);
        e.failure()) {
      return e;
    }
    if (auto e = CheckResult(op, "ddt_bias_partial", *ddt_bias_partial, size_t(s.B * s.HV * s.K), ffi::DataType::F32);
        e.failure()) {
      return e;
    }
    A.dq = dq->untyped_data();
    A.dk = dk->untyped_data();
    A.dv = dv->untyped_data();
    A.dg = dg->untyped_data();
    A.dbeta = dbeta->untyped_data();
    A.da_log = static_cast<float*>(da_log_partial->untyped_data());
    A.ddt = static_cast<float*>(ddt_bias_partial->untyped_data());
  }
  if (auto e = CheckResult(op, "dinitial_state", *dinitial_state, initial_state.element_count(), s.state_dtype);
      e.failure()) {
    return e;
  }
  A.d_o = d_o.untyped_data();
  A.dfin = P.S_out > 0 ? dfinal_state.untyped_data() : nullptr;
  A.dinit = P.S_in > 0 ? dinitial_state->untyped_data() : nullptr;

  if (s.B == 0 || s.HV == 0) return ffi::Error::Success();
  if (s.T == 0 || s.K == 0 || s.V == 0) {
    // No token moves a state: every gradient is zero except dinitial_state = dfinal_state.
    for (ffi::Result<ffi::AnyBuffer>* r : {&dq, &dk, &dv, &dg, &dbeta, &da_log_partial, &ddt_bias_partial}) {
      if ((*r)->size_bytes() > 0) std::memset((*r)->untyped_data(), 0, (*r)->size_bytes());
    }
    if (A.dinit != nullptr) {
      if (A.dfin != nullptr) std::memcpy(A.dinit, A.dfin, dinitial_state->size_bytes());
      else std::memset(A.dinit, 0, dinitial_state->size_bytes());
    }
    return ffi::Error::Success();
  }

  return DispatchDtype(op, s.dtype, [&](auto tag) -> ffi::Error {
    using In = typename decltype(tag)::In;
    using Acc = typename decltype(tag)::Acc;
    const Picked picked = PickBwd<In, Acc>();
    const int64_t VB = picked.VB;
    A.nvb = (s.V + VB - 1) / VB;
    int64_t threads = 1;
    try {
      threads = std::max<int64_t>(1, pool.num_threads());
    } catch (...) {
    }
    const int64_t pairs = s.B * s.HV;
    A.nsplit = 1;
    while (A.nsplit < A.nvb && pairs * A.nsplit < 2 * threads) ++A.nsplit;
    const size_t rows = size_t(pairs * A.nsplit);
    Buf<Acc> sq(rows * s.T * s.K), sk(rows * s.T * s.K), sg(rows * s.T * s.K), sb(rows * s.T);
    A.sq = sq.data();
    A.sk = sk.data();
    A.sg = sg.data();
    A.sb = sb.data();
    const BwdArgs& args = A;
    TaskFn fn = picked.fn;
    if (auto e = ParallelFor(pool, pairs * A.nsplit, [&args, fn](int64_t i) { fn(args, i); }); e.failure()) {
      return e;
    }
    TaskFn fin = PickFinish<In, Acc>();
    return ParallelFor(pool, s.B * s.H, [&args, fin](int64_t i) { fin(args, i); });
  });
}

}  // namespace

static ffi::Error KdaCpuBwdImpl(ffi::ThreadPool pool, FLASHKDA_BWD_PARAMS) {
  return Guard("flashkda_bwd", [&]() {
    return KdaBwd(pool, q, k, v, g, beta, a_log, dt_bias, slot, initial_state, d_o, dfinal_state, chunk_states,
                  saved_qg, saved_kd, saved_w, saved_u, saved_aqk, saved_gamma, scale, gate_mode, lower_bound, use_a_log, qk_l2norm,
                  beta_sigmoid, allow_neg_eigval, state_vk, bwd_window, dq, dk, dv, dg, dbeta, da_log_partial, ddt_bias_partial,
                  dinitial_state, workspace);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaBwdCpu, KdaCpuBwdImpl,
                              FLASHKDA_BWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
