// Row-major C[M,N] is column-major C^T[N,M] with ld = N, so every call below
// computes the transposed product D^T = op(A) op(B) in cuBLASLt's column-major
// terms: the weight is the A operand, the activations the B operand, and the
// bias (or bias gradient) runs along D's m = N rows, which is what the
// epilogues broadcast (or reduce) over.
#include "connector/cublaslt_epilogue.h"

#include <cublasLt.h>

#include <mutex>

namespace fastvlm {
namespace {

constexpr int kMaxDevices = 64;

// One handle per device, created on first use and kept for the process.
cublasStatus_t handle_for_current_device(cublasLtHandle_t* out) {
  static std::mutex mutex;
  static cublasLtHandle_t handles[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices)
    return CUBLAS_STATUS_NOT_INITIALIZED;
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr) {
    cublasStatus_t status = cublasLtCreate(&handles[device]);
    if (status != CUBLAS_STATUS_SUCCESS) return status;
  }
  *out = handles[device];
  return CUBLAS_STATUS_SUCCESS;
}

struct Descriptors {  // owns the per-call descriptors
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

#define FASTVLM_LT_CHECK(expr)                                         \
  do {                                                                 \
    const cublasStatus_t status_ = (expr);                             \
    if (status_ != CUBLAS_STATUS_SUCCESS) return static_cast<int>(status_); \
  } while (0)

struct Gemm {  // column-major D[m,n] = op(A) op(B), epilogue applied
  cublasOperation_t trans_a, trans_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  cublasLtEpilogue_t epilogue;
  const void* bias;  // bias input, or the bias-gradient output of a BGRAD epilogue
  const void* aux;   // GELU input: written by GELU_AUX, read by DGELU
};

int run(const Gemm& g, LtDtype dtype, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  cublasLtHandle_t handle;
  FASTVLM_LT_CHECK(handle_for_current_device(&handle));
  const cudaDataType_t type = dtype == LtDtype::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
  Descriptors desc;
  FASTVLM_LT_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  auto set = [&](cublasLtMatmulDescAttributes_t attr, const void* value, size_t size) {
    return cublasLtMatmulDescSetAttribute(desc.op, attr, value, size);
  };
  FASTVLM_LT_CHECK(set(CUBLASLT_MATMUL_DESC_TRANSA, &g.trans_a, sizeof(g.trans_a)));
  FASTVLM_LT_CHECK(set(CUBLASLT_MATMUL_DESC_TRANSB, &g.trans_b, sizeof(g.trans_b)));
  FASTVLM_LT_CHECK(set(CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)));
  FASTVLM_LT_CHECK(set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  FASTVLM_LT_CHECK(set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)));
  const int64_t aux_ld = g.m;  // aux has D's shape and layout
  FASTVLM_LT_CHECK(set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));

  const bool ta = g.trans_a != CUBLAS_OP_N, tb = g.trans_b != CUBLAS_OP_N;
  FASTVLM_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.a, type, ta ? g.k : g.m, ta ? g.m : g.k, g.lda));
  FASTVLM_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.b, type, tb ? g.n : g.k, tb ? g.k : g.n, g.ldb));
  FASTVLM_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.d, type, g.m, g.n, g.m));

  FASTVLM_LT_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref));
  const uint64_t max_ws = workspace_bytes;
  FASTVLM_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
      desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws, sizeof(max_ws)));
  cublasLtMatmulHeuristicResult_t best = {};
  int found = 0;
  FASTVLM_LT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                                  desc.pref, 1, &best, &found));
  if (found == 0) return static_cast<int>(CUBLAS_STATUS_NOT_SUPPORTED);
  const float alpha = 1.0f, beta = 0.0f;
  FASTVLM_LT_CHECK(cublasLtMatmul(handle, desc.op, &alpha, g.a, desc.a, g.b, desc.b, &beta, g.d,
                                  desc.d, g.d, desc.d, &best.algo, workspace, workspace_bytes, stream));
  return 0;
}

}  // namespace

int lt_linear_gelu_aux_bias(const void* x, const void* w, const void* bias, void* out, void* pre,
                            int64_t m, int64_t n, int64_t k, LtDtype dtype, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  // D^T[N,M] = (w stored [K,N] col-major, transposed) x (x stored [K,M] col-major)
  const Gemm g{CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, w, k, x, k, out,
               CUBLASLT_EPILOGUE_GELU_AUX_BIAS, bias, pre};
  return run(g, dtype, workspace, workspace_bytes, stream);
}

int lt_dgelu_bgrad(const void* dy, const void* w2, const void* pre, void* dz, void* dbias, int64_t m,
                   int64_t n, int64_t p, LtDtype dtype, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
  // dz^T[N,M] = (w2 stored [N,P] col-major) x (dy stored [P,M] col-major)
  const Gemm g{CUBLAS_OP_N, CUBLAS_OP_N, n, m, p, w2, n, dy, p, dz,
               CUBLASLT_EPILOGUE_DGELU_BGRAD, dbias, pre};
  return run(g, dtype, workspace, workspace_bytes, stream);
}

const char* lt_status_string(int status) {
  switch (status) {
    case 0: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED (no algorithm for this shape/epilogue)";
    default: return "cuBLASLt error";
  }
}

}  // namespace fastvlm
