// The only translation unit that includes torch: argument checks, output
// allocation, and registration of fastvlm's compiled ops as torch.ops.fastvlm.*.
// Kernel sources (block_map/*.cpp, *.cu) see raw pointers only.
#include <torch/extension.h>
#include <torch/library.h>

#include "block_map/block_map.h"

#if defined(FASTVLM_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#if defined(FASTVLM_WITH_CUDA) && defined(FASTVLM_WITH_CUBLASLT)
#include "connector/cublaslt_epilogue.h"
#endif

#ifndef FASTVLM_CUDA_ARCHS
#define FASTVLM_CUDA_ARCHS ""
#endif

namespace {

using fastvlm::BlockMapOut;

void check_metadata(const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& is_image,
                    int64_t kind, int64_t block_q, int64_t block_k) {
  TORCH_CHECK(lo.dim() == 2, "block_map: lo must be [B, N], got ", lo.sizes());
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt,
              "block_map: lo and hi must be int32");
  TORCH_CHECK(is_image.scalar_type() == at::kBool || is_image.scalar_type() == at::kByte,
              "block_map: is_image must be bool or uint8");
  TORCH_CHECK(hi.sizes() == lo.sizes() && is_image.sizes() == lo.sizes(),
              "block_map: lo, hi, is_image must share one shape [B, N]");
  TORCH_CHECK(hi.device() == lo.device() && is_image.device() == lo.device(),
              "block_map: lo, hi, is_image must be on one device");
  TORCH_CHECK(kind >= 0 && kind < fastvlm::kNumMaskKinds, "block_map: unknown kind ", kind);
  TORCH_CHECK(block_q > 0 && block_k > 0, "block_map: block sizes must be positive");
  TORCH_CHECK(lo.size(1) < (int64_t(1) << 30), "block_map: sequence too long for int32 indices");
}

std::vector<at::Tensor> allocate_outputs(const at::Tensor& lo, int64_t block_q, int64_t block_k,
                                         BlockMapOut& out) {
  const int64_t b = lo.size(0), n = lo.size(1);
  const int64_t tq = (n + block_q - 1) / block_q, tk = (n + block_k - 1) / block_k;
  auto opts = lo.options().dtype(at::kInt);
  std::vector<at::Tensor> t = {
      at::empty({b, tq}, opts), at::empty({b, tq, tk}, opts), at::empty({b, tq}, opts),
      at::empty({b, tq, tk}, opts), at::empty({b, tk}, opts), at::empty({b, tk, tq}, opts),
      at::empty({b, tk}, opts), at::empty({b, tk, tq}, opts)};
  int32_t** slots[] = {&out.kv_num, &out.kv_idx, &out.full_kv_num, &out.full_kv_idx,
                       &out.q_num,  &out.q_idx,  &out.full_q_num,  &out.full_q_idx};
  for (size_t i = 0; i < t.size(); ++i) *slots[i] = t[i].data_ptr<int32_t>();
  return t;
}

// The optional cuts [2, B, N] (shared-prompt layouts), contiguous, or an undefined tensor.
at::Tensor checked_cut(const at::Tensor& lo, const std::optional<at::Tensor>& cut) {
  if (!cut.has_value() || !cut->defined()) return at::Tensor();
  TORCH_CHECK(cut->scalar_type() == at::kInt, "block_map: cut must be int32");
  TORCH_CHECK(cut->dim() == 3 && cut->size(0) == 2 && cut->size(1) == lo.size(0) &&
                  cut->size(2) == lo.size(1),
              "block_map: cut must be [2, B, N] with lo's [B, N], got ", cut->sizes());
  TORCH_CHECK(cut->device() == lo.device(), "block_map: cut must be on lo's device");
  return cut->contiguous();
}

const int32_t* cut_row(const at::Tensor& cut, int which) {
  return cut.defined() ? cut.data_ptr<int32_t>() + which * cut.size(1) * cut.size(2) : nullptr;
}

std::vector<at::Tensor> block_map_cpu(const at::Tensor& lo_in, const at::Tensor& hi_in,
                                      const at::Tensor& is_image_in, int64_t kind,
                                      int64_t block_q, int64_t block_k,
                                      const std::optional<at::Tensor>& cut_in) {
  check_metadata(lo_in, hi_in, is_image_in, kind, block_q, block_k);
  auto lo = lo_in.contiguous(), hi = hi_in.contiguous();
  auto is_image = is_image_in.to(at::kByte).contiguous();
  auto cut = checked_cut(lo, cut_in);
  BlockMapOut out{};
  auto result = allocate_outputs(lo, block_q, block_k, out);
  fastvlm::block_map_cpu(lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(),
                         is_image.data_ptr<uint8_t>(), lo.size(0), lo.size(1), kind, block_q,
                         block_k, out, cut_row(cut, 0), cut_row(cut, 1));
  return result;
}

#if defined(FASTVLM_WITH_CUDA)
std::vector<at::Tensor> block_map_cuda(const at::Tensor& lo_in, const at::Tensor& hi_in,
                                       const at::Tensor& is_image_in, int64_t kind,
                                       int64_t block_q, int64_t block_k,
                                       const std::optional<at::Tensor>& cut_in) {
  check_metadata(lo_in, hi_in, is_image_in, kind, block_q, block_k);
  c10::cuda::CUDAGuard guard(lo_in.device());
  auto lo = lo_in.contiguous(), hi = hi_in.contiguous();
  auto is_image = is_image_in.to(at::kByte).contiguous();
  auto cut = checked_cut(lo, cut_in);
  BlockMapOut out{};
  auto result = allocate_outputs(lo, block_q, block_k, out);
  const int64_t ws_bytes =
      fastvlm::block_map_cuda_workspace_bytes(lo.size(0), lo.size(1), block_q, block_k, cut.defined());
  auto workspace = at::empty({ws_bytes}, lo.options().dtype(at::kByte));
  const int err = fastvlm::block_map_cuda(
      lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), is_image.data_ptr<uint8_t>(), lo.size(0),
      lo.size(1), kind, block_q, block_k, out, workspace.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream(), cut_row(cut, 0), cut_row(cut, 1));
  TORCH_CHECK(err == 0, "block_map CUDA kernel failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return result;
}
#endif

#if defined(FASTVLM_WITH_CUDA) && defined(FASTVLM_WITH_CUBLASLT)
// The connector's cuBLASLt GEMMs (gelu_tanh epilogues); see connector/cublaslt_epilogue.h.
constexpr int64_t kLtWorkspaceBytes = int64_t(32) << 20;

fastvlm::LtDtype lt_operands(const char* op, std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor& first = **ts.begin();
  TORCH_CHECK(first.scalar_type() == at::kHalf || first.scalar_type() == at::kBFloat16, op,
              ": takes float16 or bfloat16, got ", first.scalar_type());
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->scalar_type() == first.scalar_type(), op, ": operands must share one dtype");
    TORCH_CHECK(t->is_cuda() && t->device() == first.device(), op, ": operands must be on one GPU");
  }
  return first.scalar_type() == at::kBFloat16 ? fastvlm::LtDtype::kBF16 : fastvlm::LtDtype::kF16;
}

std::tuple<at::Tensor, at::Tensor> cublaslt_linear_gelu(const at::Tensor& x_in, const at::Tensor& w_in,
                                                        const at::Tensor& b_in) {
  const auto dtype = lt_operands("cublaslt_linear_gelu", {&x_in, &w_in, &b_in});
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && b_in.dim() == 1 && x_in.size(1) == w_in.size(1) &&
                  b_in.size(0) == w_in.size(0),
              "cublaslt_linear_gelu: expected x [M, K], w [N, K], b [N]");
  const int64_t m = x_in.size(0), n = w_in.size(0), k = x_in.size(1);
  TORCH_CHECK(n % 8 == 0, "cublaslt_linear_gelu: N must be a multiple of 8 (aux leading dim), got ", n);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  auto out = at::empty({m, n}, x.options()), pre = at::empty({m, n}, x.options());
  auto workspace = at::empty({kLtWorkspaceBytes}, x.options().dtype(at::kByte));
  const int status = fastvlm::lt_linear_gelu_aux_bias(
      x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), pre.data_ptr(), m, n, k, dtype,
      workspace.data_ptr(), kLtWorkspaceBytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "cublaslt_linear_gelu: ", fastvlm::lt_status_string(status));
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor> cublaslt_dgelu_bgrad(const at::Tensor& dy_in, const at::Tensor& w2_in,
                                                        const at::Tensor& pre_in) {
  const auto dtype = lt_operands("cublaslt_dgelu_bgrad", {&dy_in, &w2_in, &pre_in});
  TORCH_CHECK(dy_in.dim() == 2 && w2_in.dim() == 2 && pre_in.dim() == 2 && dy_in.size(1) == w2_in.size(0) &&
                  pre_in.size(0) == dy_in.size(0) && pre_in.size(1) == w2_in.size(1),
              "cublaslt_dgelu_bgrad: expected dy [M, P], w2 [P, N], pre [M, N]");
  const int64_t m = dy_in.size(0), p = dy_in.size(1), n = w2_in.size(1);
  TORCH_CHECK(n % 8 == 0, "cublaslt_dgelu_bgrad: N must be a multiple of 8 (aux leading dim), got ", n);
  c10::cuda::CUDAGuard guard(dy_in.device());
  auto dy = dy_in.contiguous(), w2 = w2_in.contiguous(), pre = pre_in.contiguous();
  auto dz = at::empty({m, n}, dy.options()), dbias = at::empty({n}, dy.options());
  auto workspace = at::empty({kLtWorkspaceBytes}, dy.options().dtype(at::kByte));
  const int status = fastvlm::lt_dgelu_bgrad(
      dy.data_ptr(), w2.data_ptr(), pre.data_ptr(), dz.data_ptr(), dbias.data_ptr(), m, n, p, dtype,
      workspace.data_ptr(), kLtWorkspaceBytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "cublaslt_dgelu_bgrad: ", fastvlm::lt_status_string(status));
  return {dz, dbias};
}
#endif

bool built_with_cuda() {
#if defined(FASTVLM_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

bool built_with_cublaslt() {
#if defined(FASTVLM_WITH_CUDA) && defined(FASTVLM_WITH_CUBLASLT)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(fastvlm, m) {
  m.def("block_map(Tensor lo, Tensor hi, Tensor is_image, int kind, int block_q, int block_k,"
        " Tensor? cut=None) -> Tensor[]");
  m.def("cublaslt_linear_gelu(Tensor x, Tensor w, Tensor b) -> (Tensor, Tensor)");
  m.def("cublaslt_dgelu_bgrad(Tensor dy, Tensor w2, Tensor pre) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvlm, CPU, m) { m.impl("block_map", &block_map_cpu); }

#if defined(FASTVLM_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastvlm, CUDA, m) {
  m.impl("block_map", &block_map_cuda);
#if defined(FASTVLM_WITH_CUBLASLT)
  m.impl("cublaslt_linear_gelu", &cublaslt_linear_gelu);
  m.impl("cublaslt_dgelu_bgrad", &cublaslt_dgelu_bgrad);
#endif
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvlm compiled ops (registered under torch.ops.fastvlm)";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("built_with_cublaslt", &built_with_cublaslt,
        "whether the cuBLASLt connector GEMMs were compiled in");
  m.def(
      "mask_kinds",
      []() {
        std::vector<std::tuple<std::string, int32_t, bool>> kinds;
        for (const auto& k : fastvlm::kMaskKinds)
          kinds.emplace_back(k.name, k.code, fastvlm::isolates_images(k.code));
        return kinds;
      },
      "(name, code, isolates_images) of every mask kind the block map classifies");
  m.def("cuda_archs", []() { return std::string(FASTVLM_CUDA_ARCHS); },
        "TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for");
}
