// Standalone GPU self-test and benchmark of the grouped GEMM (src/grouped_gemm.h).
//
// 1. Captures one call in a CUDA graph (stream capture, global mode) as the first call of the
//    process, replays it and checks the result: the call path must be capturable.
// 2. Correctness: every op x dtype x implementation on small cases (odd sizes, empty groups, all
//    rows in one group, sum of group sizes below and above M, negative sizes) against a float64
//    host reference. Outputs are poisoned with NaN first; rows past the groups and d rhs slices of
//    empty groups must come out exactly zero. Relative Frobenius error < 1e-2 (bf16/f16), < 1e-5
//    (f32).
// 3. Timing (bf16, M = 32768, balanced random group sizes) of the six shapes of baseline.md §4:
//    median of 20 calls after warm-up, TFLOP/s = 2 M K N / time per op.
//
// Build and run: tests/cuda/run_selftest.sh. Exit status 1 if any correctness case fails.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if defined(SELFTEST_CUBLAS)
#include <cublas_v2.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "grouped_gemm.h"
#include "grouped_gemm_internal.h"

using jax_moe::GemmDtype;
using jax_moe::GemmOp;
using jax_moe::GroupedGemmArgs;
using jax_moe::detail::GemmImpl;

#define CHECK_CUDA(expr)                                                                   \
  do {                                                                                     \
    cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__,       \
                  __LINE__, #expr);                                                        \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

namespace {

// ---------------------------------------------------------------------------------------------
// Host helpers

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint32_t next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(s >> 33);
  }
  double uniform() { return (next() + 0.5) / 2147483648.0; }  // (0, 1)
  double normal() {
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

size_t elem_bytes(GemmDtype d) { return d == GemmDtype::kF32 ? 4 : 2; }
const char* dtype_name(GemmDtype d) {
  return d == GemmDtype::kF32 ? "f32" : d == GemmDtype::kBF16 ? "bf16" : "f16";
}
const char* op_name(GemmOp op) {
  return op == GemmOp::kForward ? "fwd" : op == GemmOp::kGradLhs ? "dlhs" : "drhs";
}
const char* impl_name(GemmImpl i) {
  switch (i) {
    case GemmImpl::kAuto: return "auto";
    case GemmImpl::kGeneric: return "generic";
    case GemmImpl::kSm90: return "sm90";
  }
  return "?";
}

// Rounds to the dtype and stores its bits.
void encode(GemmDtype d, const std::vector<float>& v, std::vector<uint8_t>& bytes) {
  bytes.resize(v.size() * elem_bytes(d));
  for (size_t i = 0; i < v.size(); ++i) {
    if (d == GemmDtype::kF32) {
      std::memcpy(&bytes[4 * i], &v[i], 4);
    } else if (d == GemmDtype::kBF16) {
      const __nv_bfloat16 h = __float2bfloat16(v[i]);
      std::memcpy(&bytes[2 * i], &h, 2);
    } else {
      const __half h = __float2half(v[i]);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
}

std::vector<double> decode(GemmDtype d, const std::vector<uint8_t>& bytes) {
  const size_t n = bytes.size() / elem_bytes(d);
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (d == GemmDtype::kF32) {
      float f;
      std::memcpy(&f, &bytes[4 * i], 4);
      out[i] = f;
    } else if (d == GemmDtype::kBF16) {
      __nv_bfloat16 h;
      std::memcpy(&h, &bytes[2 * i], 2);
      out[i] = __bfloat162float(h);
    } else {
      __half h;
      std::memcpy(&h, &bytes[2 * i], 2);
      out[i] = __half2float(h);
    }
  }
  return out;
}

// Clamped group start rows, as the library defines them: offsets[G] = rows that belong to a group.
std::vector<int64_t> host_offsets(const std::vector<int32_t>& sizes, int64_t M) {
  std::vector<int64_t> off(sizes.size() + 1);
  int64_t run = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    off[g] = std::min(run, M);
    run += std::max(sizes[g], 0);
  }
  off[sizes.size()] = std::min(run, M);
  return off;
}

struct Operands {
  std::vector<double> a, b;  // dtype-rounded values
  std::vector<uint8_t> a_bytes, b_bytes;
};

// Shapes of a, b and out for an op (see grouped_gemm.h).
void op_shapes(GemmOp op, int64_t M, int64_t K, int64_t N, int64_t G, size_t* na, size_t* nb,
               size_t* nout) {
  switch (op) {
    case GemmOp::kForward: *na = M * K, *nb = G * K * N, *nout = M * N; break;
    case GemmOp::kGradLhs: *na = M * N, *nb = G * K * N, *nout = M * K; break;
    case GemmOp::kGradRhs: *na = M * K, *nb = M * N, *nout = G * K * N; break;
  }
}

// float64 reference; `structural_zero[i]` marks outputs that no group owns.
std::vector<double> reference(GemmOp op, const Operands& x, const std::vector<int64_t>& off,
                              int64_t M, int64_t K, int64_t N, int64_t G,
                              std::vector<char>& structural_zero) {
  size_t na, nb, nout;
  op_shapes(op, M, K, N, G, &na, &nb, &nout);
  std::vector<double> out(nout, 0.0);
  structural_zero.assign(nout, 0);
  if (op == GemmOp::kGradRhs) {
    for (int64_t g = 0; g < G; ++g) {
      double* o = &out[g * K * N];
      if (off[g] == off[g + 1])
        std::fill(structural_zero.begin() + g * K * N, structural_zero.begin() + (g + 1) * K * N, 1);
      for (int64_t r = off[g]; r < off[g + 1]; ++r)
        for (int64_t k = 0; k < K; ++k) {
          const double av = x.a[r * K + k];
          for (int64_t n = 0; n < N; ++n) o[k * N + n] += av * x.b[r * N + n];
        }
    }
    return out;
  }
  const int64_t W = op == GemmOp::kForward ? N : K;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = off[g]; r < off[g + 1]; ++r) {
      double* o = &out[r * W];
      const double* bg = &x.b[g * K * N];
      if (op == GemmOp::kForward) {
        for (int64_t k = 0; k < K; ++k) {
          const double av = x.a[r * K + k];
          for (int64_t n = 0; n < N; ++n) o[n] += av * bg[k * N + n];
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          double s = 0;
          for (int64_t n = 0; n < N; ++n) s += x.a[r * N + n] * bg[k * N + n];
          o[k] = s;
        }
      }
    }
  for (int64_t r = off[G] * W; r < M * W; ++r) structural_zero[r] = 1;
  return out;
}

int sm_count() {
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Device buffers of one call; the output and the workspace are poisoned (0xFF: NaN in every dtype).
struct DeviceCall {
  void *a = nullptr, *b = nullptr, *out = nullptr, *ws = nullptr;
  int32_t* sizes = nullptr;
  size_t out_bytes = 0, ws_bytes = 0;
  GroupedGemmArgs args{};

  DeviceCall(GemmOp op, GemmDtype dt, const Operands& x, const std::vector<int32_t>& gs,
             int64_t M, int64_t K, int64_t N, int64_t G) {
    size_t na, nb, nout;
    op_shapes(op, M, K, N, G, &na, &nb, &nout);
    out_bytes = nout * elem_bytes(dt);
    ws_bytes = jax_moe::grouped_gemm_workspace_bytes(op, dt, M, K, N, G, sm_count());
    CHECK_CUDA(cudaMalloc(&a, std::max<size_t>(x.a_bytes.size(), 16)));
    CHECK_CUDA(cudaMalloc(&b, std::max<size_t>(x.b_bytes.size(), 16)));
    CHECK_CUDA(cudaMalloc(&out, std::max<size_t>(out_bytes, 16)));
    CHECK_CUDA(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 16)));
    CHECK_CUDA(cudaMalloc(&sizes, std::max<size_t>(gs.size(), 1) * sizeof(int32_t)));
    if (!x.a_bytes.empty())
      CHECK_CUDA(cudaMemcpy(a, x.a_bytes.data(), x.a_bytes.size(), cudaMemcpyHostToDevice));
    if (!x.b_bytes.empty())
      CHECK_CUDA(cudaMemcpy(b, x.b_bytes.data(), x.b_bytes.size(), cudaMemcpyHostToDevice));
    if (!gs.empty())
      CHECK_CUDA(cudaMemcpy(sizes, gs.data(), gs.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    poison();
    args = GroupedGemmArgs{op, dt, a, b, sizes, out, M, K, N, G, ws, ws_bytes};
  }
  void poison() {
    CHECK_CUDA(cudaMemset(out, 0xFF, std::max<size_t>(out_bytes, 16)));
    CHECK_CUDA(cudaMemset(ws, 0xFF, std::max<size_t>(ws_bytes, 16)));
  }
  std::vector<uint8_t> result() const {
    std::vector<uint8_t> h(out_bytes);
    if (out_bytes) CHECK_CUDA(cudaMemcpy(h.data(), out, out_bytes, cudaMemcpyDeviceToHost));
    return h;
  }
  ~DeviceCall() {
    cudaFree(a);
    cudaFree(b);
    cudaFree(out);
    cudaFree(ws);
    cudaFree(sizes);
  }
};

struct Case {
  std::string name;
  int64_t M, K, N;
  std::vector<int32_t> sizes;
};

Operands make_operands(GemmOp op, GemmDtype dt, const Case& c, uint64_t seed) {
  const int64_t G = static_cast<int64_t>(c.sizes.size());
  size_t na, nb, nout;
  op_shapes(op, c.M, c.K, c.N, G, &na, &nb, &nout);
  Rng rng(seed);
  std::vector<float> a(na), b(nb);
  for (auto& v : a) v = static_cast<float>(2 * rng.uniform() - 1);
  for (auto& v : b) v = static_cast<float>(2 * rng.uniform() - 1);
  Operands x;
  encode(dt, a, x.a_bytes);
  encode(dt, b, x.b_bytes);
  x.a = decode(dt, x.a_bytes);
  x.b = decode(dt, x.b_bytes);
  return x;
}

// Compares one result; returns true on PASS.
bool check(const std::vector<double>& ref, const std::vector<char>& structural_zero,
           const std::vector<double>& got, double tol, double* rel_err, int64_t* bad_zeros) {
  double num = 0, den = 0;
  *bad_zeros = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = got[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
    if (structural_zero[i] && got[i] != 0.0) ++*bad_zeros;
  }
  *rel_err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return *rel_err < tol && *bad_zeros == 0;  // NaN compares false: a NaN fails
}

int g_failures = 0;

void run_case(const Case& c) {
  const int64_t G = static_cast<int64_t>(c.sizes.size());
  const std::vector<int64_t> off = host_offsets(c.sizes, c.M);
  for (GemmDtype dt : {GemmDtype::kF32, GemmDtype::kBF16, GemmDtype::kF16}) {
    for (GemmOp op : {GemmOp::kForward, GemmOp::kGradLhs, GemmOp::kGradRhs}) {
      const Operands x = make_operands(op, dt, c, 1234 + static_cast<int>(op));
      std::vector<char> zero_mask;
      const std::vector<double> ref = reference(op, x, off, c.M, c.K, c.N, G, zero_mask);
      const double tol = dt == GemmDtype::kF32 ? 1e-5 : 1e-2;
      std::vector<GemmImpl> impls = {GemmImpl::kAuto, GemmImpl::kGeneric};
      if (dt != GemmDtype::kF32) impls.push_back(GemmImpl::kSm90);
      for (GemmImpl impl : impls) {
        DeviceCall call(op, dt, x, c.sizes, c.M, c.K, c.N, G);
        const cudaError_t err = jax_moe::detail::grouped_gemm_impl(call.args, impl, 0);
        if (err == cudaErrorNotSupported && impl != GemmImpl::kAuto) {
          std::printf("SKIP %-14s %-4s %-5s %-13s (not supported for this shape/device)\n",
                      c.name.c_str(), op_name(op), dtype_name(dt), impl_name(impl));
          continue;
        }
        const cudaError_t sync = cudaDeviceSynchronize();
        double rel;
        int64_t bad_zeros = 0;
        bool ok = err == cudaSuccess && sync == cudaSuccess;
        if (ok) ok = check(ref, zero_mask, decode(dt, call.result()), tol, &rel, &bad_zeros);
        else rel = NAN;
        if (!ok) ++g_failures;
        std::printf("%s %-14s %-4s %-5s %-13s rel_fro_err=%.3e bad_zeros=%lld%s%s\n",
                    ok ? "PASS" : "FAIL", c.name.c_str(), op_name(op), dtype_name(dt),
                    impl_name(impl), rel, static_cast<long long>(bad_zeros),
                    err != cudaSuccess ? " call_error=" : "",
                    err != cudaSuccess ? cudaGetErrorString(err) : "");
        if (sync != cudaSuccess) {
          std::printf("fatal: %s\n", cudaGetErrorString(sync));
          std::exit(2);
        }
      }
    }
  }
}

// The first call of the process runs inside a stream capture: the one-time per-device setup and
// the launch path must be legal while capturing.
void graph_capture_test() {
  const Case c{"graph_capture", 300, 72, 136, {70, 0, 100, 50, 80}};
  const int64_t G = static_cast<int64_t>(c.sizes.size());
  for (GemmOp op : {GemmOp::kForward, GemmOp::kGradLhs, GemmOp::kGradRhs}) {
    const GemmDtype dt = GemmDtype::kBF16;
    const Operands x = make_operands(op, dt, c, 99);
    std::vector<char> zero_mask;
    const std::vector<double> ref =
        reference(op, x, host_offsets(c.sizes, c.M), c.M, c.K, c.N, G, zero_mask);
    DeviceCall call(op, dt, x, c.sizes, c.M, c.K, c.N, G);
    cudaStream_t s;
    CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    const cudaError_t err = jax_moe::grouped_gemm(call.args, s);
    const cudaError_t end = cudaStreamEndCapture(s, &graph);
    bool ok = err == cudaSuccess && end == cudaSuccess;
    double rel = NAN;
    int64_t bad = 0;
    if (ok) {
      CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      CHECK_CUDA(cudaGraphLaunch(exec, s));
      CHECK_CUDA(cudaStreamSynchronize(s));
      ok = check(ref, zero_mask, decode(dt, call.result()), 1e-2, &rel, &bad);
      // A second replay must give the same answer from a poisoned output.
      call.poison();
      CHECK_CUDA(cudaGraphLaunch(exec, s));
      CHECK_CUDA(cudaStreamSynchronize(s));
      double rel2;
      ok = ok && check(ref, zero_mask, decode(dt, call.result()), 1e-2, &rel2, &bad);
      CHECK_CUDA(cudaGraphExecDestroy(exec));
      CHECK_CUDA(cudaGraphDestroy(graph));
    }
    if (!ok) ++g_failures;
    std::printf("%s graph_capture  %-4s bf16  auto          rel_fro_err=%.3e call=%s capture=%s\n",
                ok ? "PASS" : "FAIL", op_name(op), rel, cudaGetErrorString(err),
                cudaGetErrorString(end));
    CHECK_CUDA(cudaStreamDestroy(s));
  }
}

// ---------------------------------------------------------------------------------------------
// Benchmark

__global__ void fill_uniform_bf16(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t h = (static_cast<uint64_t>(i) + seed) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = __float2bfloat16((2.0f * u - 1.0f) * scale);
  }
}

void fill(void* p, int64_t n, uint64_t seed, float scale) {
  fill_uniform_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), n, seed, scale);
  CHECK_CUDA(cudaGetLastError());
}

// Balanced random group sizes summing to M: relative spread 1/sqrt(50), as a Dirichlet(alpha=50)
// draw has (baseline.md §4), from a fixed seed.
std::vector<int32_t> balanced_sizes(int64_t M, int64_t G, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> w(G);
  double sum = 0;
  for (auto& v : w) {
    v = std::max(0.2, 1.0 + rng.normal() / std::sqrt(50.0));
    sum += v;
  }
  std::vector<int32_t> s(G);
  int64_t used = 0;
  for (int64_t g = 0; g < G; ++g) {
    s[g] = static_cast<int32_t>(std::floor(M * w[g] / sum));
    used += s[g];
  }
  for (int64_t g = 0; used < M; g = (g + 1) % G, ++used) ++s[g];
  return s;
}

template <class F>
double median_ms(F&& f, int warmup = 3, int reps = 20) {
  for (int i = 0; i < warmup; ++i) f();
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> t(reps);
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    f();
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    CHECK_CUDA(cudaEventElapsedTime(&t[i], e0, e1));
  }
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  std::sort(t.begin(), t.end());
  return t[reps / 2];
}

struct BenchShape {
  const char* name;
  int64_t G, K, N;
};

void benchmark() {
  const int64_t M = 32768;
  const BenchShape shapes[] = {
      {"DSv3 gate_up", 32, 7168, 4096},    {"DSv3 down", 32, 2048, 7168},
      {"Mixtral gate_up", 8, 4096, 28672}, {"Mixtral down", 8, 14336, 4096},
      {"Qwen3 gate_up", 128, 2048, 1536},  {"Qwen3 down", 128, 768, 2048},
  };
  const int sms = sm_count();
#if defined(SELFTEST_CUBLAS)
  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) std::exit(2);
#endif
  std::printf("\nBENCH bf16 M=%lld, median of 20 calls; TFLOP/s = 2MKN/t (fwd+bwd: 3x)\n",
              static_cast<long long>(M));
  for (const BenchShape& s : shapes) {
    const int64_t G = s.G, K = s.K, N = s.N;
    const std::vector<int32_t> sizes = balanced_sizes(M, G, 7 + G);
    void *lhs, *rhs, *out, *dout, *dlhs, *drhs, *ws;
    int32_t* gs;
    size_t ws_bytes = 0;
    for (GemmOp op : {GemmOp::kForward, GemmOp::kGradLhs, GemmOp::kGradRhs})
      ws_bytes = std::max(ws_bytes, jax_moe::grouped_gemm_workspace_bytes(
                                        op, GemmDtype::kBF16, M, K, N, G, sms));
    CHECK_CUDA(cudaMalloc(&lhs, M * K * 2));
    CHECK_CUDA(cudaMalloc(&rhs, G * K * N * 2));
    CHECK_CUDA(cudaMalloc(&out, M * N * 2));
    CHECK_CUDA(cudaMalloc(&dout, M * N * 2));
    CHECK_CUDA(cudaMalloc(&dlhs, M * K * 2));
    CHECK_CUDA(cudaMalloc(&drhs, G * K * N * 2));
    CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    CHECK_CUDA(cudaMalloc(&gs, G * sizeof(int32_t)));
    CHECK_CUDA(cudaMemcpy(gs, sizes.data(), G * sizeof(int32_t), cudaMemcpyHostToDevice));
    fill(lhs, M * K, 1, 1.0f);
    fill(rhs, G * K * N, 2, 1.0f / std::sqrt(static_cast<float>(K)));
    fill(dout, M * N, 3, 1.0f);

    const GroupedGemmArgs fwd{GemmOp::kForward, GemmDtype::kBF16, lhs, rhs, gs, out,
                              M, K, N, G, ws, ws_bytes};
    const GroupedGemmArgs bwd_lhs{GemmOp::kGradLhs, GemmDtype::kBF16, dout, rhs, gs, dlhs,
                                  M, K, N, G, ws, ws_bytes};
    const GroupedGemmArgs bwd_rhs{GemmOp::kGradRhs, GemmDtype::kBF16, lhs, dout, gs, drhs,
                                  M, K, N, G, ws, ws_bytes};
    const double flop = 2.0 * M * K * N;
    std::printf("%s: G=%lld K=%lld N=%lld groups %d..%d\n", s.name, static_cast<long long>(G),
                static_cast<long long>(K), static_cast<long long>(N),
                *std::min_element(sizes.begin(), sizes.end()),
                *std::max_element(sizes.begin(), sizes.end()));
    // Each measurement is a median of 20 calls; the list is run twice and the faster median is
    // kept, so that clock drift over the sequence does not favour whatever runs first.
    struct Measure {
      std::string what;
      std::function<void()> call;
      double mult;
      double ms;
    };
    std::vector<Measure> ms;
    const GroupedGemmArgs* op_args[3] = {&fwd, &bwd_lhs, &bwd_rhs};
    const char* op_names[3] = {"fwd", "dlhs", "drhs"};
    for (int o = 0; o < 3; ++o)
      for (GemmImpl impl : {GemmImpl::kAuto, GemmImpl::kSm90}) {
        const GroupedGemmArgs a = *op_args[o];
        if (jax_moe::detail::grouped_gemm_impl(a, impl, 0) == cudaErrorNotSupported) continue;
        ms.push_back({std::string(op_names[o]) + " " + impl_name(impl),
                      [a, impl] { CHECK_CUDA(jax_moe::detail::grouped_gemm_impl(a, impl, 0)); },
                      1.0, 1e30});
      }
    ms.push_back({"fwd+bwd auto",
                  [&] {
                    CHECK_CUDA(jax_moe::grouped_gemm(fwd, 0));
                    CHECK_CUDA(jax_moe::grouped_gemm(bwd_lhs, 0));
                    CHECK_CUDA(jax_moe::grouped_gemm(bwd_rhs, 0));
                  },
                  3.0, 1e30});
    if (G >= 128)
      ms.push_back({"fwd generic (reference)",
                    [&] { CHECK_CUDA(jax_moe::detail::grouped_gemm_impl(fwd, GemmImpl::kGeneric, 0)); },
                    1.0, 1e30});
#if defined(SELFTEST_CUBLAS)
    // Dense [M,K] x [K,N] with rhs[0], row-major: computed as out^T = rhs0^T lhs^T.
    ms.push_back({"dense cuBLAS",
                  [&] {
                    const float alpha = 1.f, beta = 0.f;
                    if (cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(N),
                                     static_cast<int>(M), static_cast<int>(K), &alpha, rhs,
                                     CUDA_R_16BF, static_cast<int>(N), lhs, CUDA_R_16BF,
                                     static_cast<int>(K), &beta, out, CUDA_R_16BF,
                                     static_cast<int>(N), CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
                      std::exit(2);
                  },
                  1.0, 1e30});
#endif
    CHECK_CUDA(cudaDeviceSynchronize());
    for (int round = 0; round < 2; ++round)
      for (Measure& m : ms) m.ms = std::min(m.ms, median_ms(m.call));
    for (const Measure& m : ms)
      std::printf("  %-26s %9.1f us %7.1f TFLOP/s\n", m.what.c_str(), m.ms * 1e3,
                  m.mult * flop / (m.ms * 1e-3) / 1e12);
    for (void* p : {lhs, rhs, out, dout, dlhs, drhs, ws}) CHECK_CUDA(cudaFree(p));
    CHECK_CUDA(cudaFree(gs));
  }
#if defined(SELFTEST_CUBLAS)
  cublasDestroy(blas);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  // Line-buffered: the log stays complete if the run is cut short.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const bool bench = !(argc > 1 && std::strcmp(argv[1], "--no-bench") == 0);
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, cc %d.%d, %d SMs\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);

  graph_capture_test();

  std::vector<Case> cases = {
      {"basic", 300, 72, 136, {70, 0, 100, 50, 80}},
      {"odd_sizes", 257, 50, 77, {60, 0, 97, 100}},
      {"one_group", 192, 64, 64, {0, 192, 0, 0}},
      {"sum_below_M", 333, 128, 96, {100, 0, 150}},
      {"sum_above_M", 200, 64, 128, {120, -5, 50, 300}},
      {"g1", 128, 256, 256, {128}},
      {"tiny_K", 64, 8, 8, {30, 34}},
      {"K_zero", 32, 0, 16, {10, 22}},
      {"M_zero", 0, 16, 16, {0, 0, 0}},
      {"all_empty", 40, 16, 16, {0, 0, 0}},
  };
  {
    Rng rng(5);
    Case many{"many_groups", 500, 40, 48, {}};
    for (int g = 0; g < 64; ++g) many.sizes.push_back(static_cast<int32_t>(rng.next() % 16));
    cases.push_back(many);
    Case large{"large", 2048, 512, 384, {}};
    large.sizes = balanced_sizes(2048, 6, 11);
    large.sizes[4] += large.sizes[2];
    large.sizes[2] = 0;
    cases.push_back(large);
  }
  for (const Case& c : cases) run_case(c);
  std::printf("\n%s: %d failing case(s)\n", g_failures ? "FAIL" : "PASS", g_failures);
  if (bench) benchmark();
  return g_failures ? 1 : 0;
}
