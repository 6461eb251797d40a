// block_map_cuda against block_map_cpu on random layouts, plain and with shared-prompt
// branches (skipped without a GPU).
#include <cuda_runtime.h>

#include <cstdio>

#include "layout_gen.h"

namespace {

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  cudaMalloc(&p, v.size() * sizeof(T) + 1);
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}

bool run_cuda(const fastvlm_test::Layout& L, int bq, int bk, fastvlm_test::Lists& host, bool branched) {
  const int32_t* cut_lo = branched ? to_device(L.cut_lo) : nullptr;
  const int32_t* cut_hi = branched ? to_device(L.cut_hi) : nullptr;
  const int32_t* lo = to_device(L.lo);
  const int32_t* hi = to_device(L.hi);
  const uint8_t* img = to_device(L.is_image);
  std::vector<int32_t>* fields[] = {&host.kv_num, &host.kv_idx, &host.full_kv_num, &host.full_kv_idx,
                                    &host.q_num,  &host.q_idx,  &host.full_q_num,  &host.full_q_idx};
  int32_t* dev[8];
  for (int i = 0; i < 8; ++i) dev[i] = to_device(*fields[i]);
  fastvlm::BlockMapOut out{dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6], dev[7]};
  void* ws = nullptr;
  cudaMalloc(&ws, fastvlm::block_map_cuda_workspace_bytes(L.batch, L.n, bq, bk, branched));
  int err = fastvlm::block_map_cuda(lo, hi, img, L.batch, L.n, L.kind, bq, bk, out, ws, nullptr, cut_lo,
                                    cut_hi);
  if (!err) err = cudaDeviceSynchronize();
  for (int i = 0; i < 8; ++i) {
    cudaMemcpy(fields[i]->data(), dev[i], fields[i]->size() * sizeof(int32_t), cudaMemcpyDeviceToHost);
    cudaFree(dev[i]);
  }
  cudaFree(ws), cudaFree((void*)lo), cudaFree((void*)hi), cudaFree((void*)img);
  if (branched) cudaFree((void*)cut_lo), cudaFree((void*)cut_hi);
  if (err) std::printf("CUDA error: %s\n", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return err == 0;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 rng(777);
  const int blocks[][2] = {{1, 1}, {16, 16}, {3, 7}, {64, 128}, {128, 128}};
  int cases = 0, failures = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int n = 1 + static_cast<int>(rng() % (trial < 30 ? 200 : 5000));
    const int batch = 1 + static_cast<int>(rng() % 3);
    for (int kind = 0; kind < fastvlm::kNumMaskKinds; ++kind) {
      for (int branched = 0; branched < 2; ++branched) {
        auto L = fastvlm_test::random_layout(rng, batch, n, kind);
        if (branched) fastvlm_test::add_branches(rng, L);
        for (auto& bs : blocks) {
          const int tq = (n + bs[0] - 1) / bs[0], tk = (n + bs[1] - 1) / bs[1];
          fastvlm_test::Lists cpu(batch, tq, tk), gpu(batch, tq, tk);
          fastvlm::block_map_cpu(L.lo.data(), L.hi.data(), L.is_image.data(), batch, n, kind, bs[0],
                                 bs[1], cpu.out(), branched ? L.cut_lo.data() : nullptr,
                                 branched ? L.cut_hi.data() : nullptr);
          ++cases;
          if (!run_cuda(L, bs[0], bs[1], gpu, branched) || !(gpu == cpu)) {
            ++failures;
            std::printf("MISMATCH trial=%d kind=%d branched=%d n=%d block=(%d,%d)\n", trial, kind, branched,
                        n, bs[0], bs[1]);
          }
        }
      }
    }
  }
  std::printf("block_map_cuda: %d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
