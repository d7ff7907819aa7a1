// Softmax attention for XLA:CPU as two FFI handlers (forward, backward), float32.
//
// q [B, Nq, H, Dh], k and v [B, Nk, H, Dh] are read in place (a head is a strided view, so no
// transposes). Each (batch, head) pair is one work item: Eigen's single-threaded GEMMs on
// [Nq, Nk] scratch, spread over XLA's intra-op thread pool. Forward writes the output and the
// row log-sum-exp [B, H, Nq]; backward recomputes the probabilities from it (FlashAttention's
// recipe, without the tiling: a pair's [Nq, Nk] block fits in cache at ViT lengths).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "Eigen/Core"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Stride = Eigen::OuterStride<>;
using HeadView = Eigen::Map<RowMajor, 0, Stride>;
using ConstHeadView = Eigen::Map<const RowMajor, 0, Stride>;

struct Shape {
  int64_t b, nq, nk, h, d;
  float scale;
  int64_t q_offset(int64_t item) const { return (item / h) * nq * h * d + (item % h) * d; }
  int64_t k_offset(int64_t item) const { return (item / h) * nk * h * d + (item % h) * d; }
  int64_t lse_offset(int64_t item) const { return item * nq; }
};

// Runs body(item) for item in [0, count) on the calling thread and the pool's others. The
// caller works too and waits only for items that another thread has claimed, so a pool whose
// threads are all busy (or absent) never deadlocks: the caller then does every item itself.
void ParallelFor(ffi::ThreadPool& pool, int64_t count,
                 const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, &body]() {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < count; ++finished) body(i);
    if (finished == 0) return;
    std::lock_guard<std::mutex> lock(state->mutex);
    state->done += finished;
    if (state->done == count) state->all_done.notify_all();
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    // A helper that starts after the work is gone returns without touching `body`.
    pool.Schedule([state, count, work]() {
      if (state->next.load() < count) work();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done == count; });
}

Shape ShapeOf(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], qd[3], 1.0f / std::sqrt(static_cast<float>(qd[3]))};
}

// probs = scale * q k^T of one (batch, head) pair: the logits, which callers turn into
// probabilities in place.
void Logits(const Shape& s, const float* q, const float* k, RowMajor& probs) {
  ConstHeadView qm(q, s.nq, s.d, Stride(s.h * s.d)), km(k, s.nk, s.d, Stride(s.h * s.d));
  probs.resize(s.nq, s.nk);
  probs.noalias() = (qm * s.scale) * km.transpose();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  const Shape s = ShapeOf(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, s.b * s.h, [&](int64_t item) {
    thread_local RowMajor probs;
    Logits(s, qp + s.q_offset(item), kp + s.k_offset(item), probs);
    Eigen::VectorXf max = probs.rowwise().maxCoeff();
    probs.colwise() -= max;
    probs = probs.array().exp();
    Eigen::Map<Eigen::VectorXf> lse_row(lp + s.lse_offset(item), s.nq);
    lse_row = max.array() + probs.rowwise().sum().array().log();
    probs.array().colwise() *= (max - lse_row).array().exp();
    ConstHeadView vm(vp + s.k_offset(item), s.nk, s.d, Stride(s.h * s.d));
    HeadView om(op + s.q_offset(item), s.nq, s.d, Stride(s.h * s.d));
    om.noalias() = probs * vm;
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Shape s = ShapeOf(q, k);
  ParallelFor(pool, s.b * s.h, [&](int64_t item) {
    thread_local RowMajor probs, dprobs;
    const int64_t qo = s.q_offset(item), ko = s.k_offset(item);
    const Stride st(s.h * s.d);
    Logits(s, q.typed_data() + qo, k.typed_data() + ko, probs);
    probs.colwise() -= Eigen::Map<const Eigen::VectorXf>(lse.typed_data() + s.lse_offset(item),
                                                         s.nq);
    probs = probs.array().exp();
    ConstHeadView qm(q.typed_data() + qo, s.nq, s.d, st), km(k.typed_data() + ko, s.nk, s.d, st);
    ConstHeadView vm(v.typed_data() + ko, s.nk, s.d, st), om(out.typed_data() + qo, s.nq, s.d, st);
    ConstHeadView gm(dout.typed_data() + qo, s.nq, s.d, st);
    HeadView dqm(dq->typed_data() + qo, s.nq, s.d, st), dkm(dk->typed_data() + ko, s.nk, s.d, st);
    HeadView dvm(dv->typed_data() + ko, s.nk, s.d, st);
    dvm.noalias() = probs.transpose() * gm;
    dprobs.resize(s.nq, s.nk);
    dprobs.noalias() = gm * vm.transpose();
    Eigen::VectorXf row_dot = (gm.array() * om.array()).rowwise().sum();
    dprobs.colwise() -= row_dot;
    dprobs.array() *= probs.array() * s.scale;   // d logits, with the logits' scale folded in
    dqm.noalias() = dprobs * km;
    dkm.noalias() = dprobs.transpose() * qm;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KivfmAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KivfmAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
