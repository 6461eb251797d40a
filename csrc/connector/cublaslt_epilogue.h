// cuBLASLt GEMMs with fused epilogues for the connector MLP (gelu_tanh only:
// cuBLASLt's GELU epilogues implement the tanh approximation, the same function
// torch's F.gelu(approximate="tanh") computes). No torch here: raw pointers,
// row-major [rows, cols] contiguous matrices, fp16 or bf16 with fp32 accumulation.
// Every function returns 0 or a cublasStatus_t value (see lt_status_string).
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastvlm {

enum class LtDtype : int32_t { kF16 = 0, kBF16 = 1 };

// pre[M,N] = x[M,K] @ w[N,K]^T + bias[N];  out = gelu_tanh(pre).  (GELU_AUX_BIAS)
int lt_linear_gelu_aux_bias(const void* x, const void* w, const void* bias, void* out, void* pre,
                            int64_t m, int64_t n, int64_t k, LtDtype dtype, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

// dz[M,N] = (dy[M,P] @ w2[P,N]) * gelu_tanh'(pre[M,N]);  dbias[N] = sum over M of dz.  (DGELU_BGRAD)
int lt_dgelu_bgrad(const void* dy, const void* w2, const void* pre, void* dz, void* dbias, int64_t m,
                   int64_t n, int64_t p, LtDtype dtype, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);

const char* lt_status_string(int status);

}  // namespace fastvlm
