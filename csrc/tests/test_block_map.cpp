// block_map_cpu against brute-force tile classes on random layouts, plain and with
// shared-prompt branches (the cuts).
#include <cstdio>

#include "layout_gen.h"

int main() {
  std::mt19937 rng(12345);
  const int blocks[][2] = {{1, 1}, {4, 4}, {3, 7}, {16, 16}, {16, 32}, {64, 16}, {128, 128}};
  int cases = 0, failures = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 180);
    const int batch = 1 + static_cast<int>(rng() % 3);
    for (int kind = 0; kind < fastvlm::kNumMaskKinds; ++kind) {
      for (int branched = 0; branched < 2; ++branched) {
        auto L = fastvlm_test::random_layout(rng, batch, n, kind);
        if (branched) fastvlm_test::add_branches(rng, L);
        for (auto& bs : blocks) {
          const int tq = (n + bs[0] - 1) / bs[0], tk = (n + bs[1] - 1) / bs[1];
          fastvlm_test::Lists lists(batch, tq, tk);
          fastvlm::block_map_cpu(L.lo.data(), L.hi.data(), L.is_image.data(), batch, n, kind,
                                 bs[0], bs[1], lists.out(), branched ? L.cut_lo.data() : nullptr,
                                 branched ? L.cut_hi.data() : nullptr);
          ++cases;
          if (!fastvlm_test::lists_match(lists, fastvlm_test::brute_force_classes(L, bs[0], bs[1]))) {
            ++failures;
            std::printf("MISMATCH trial=%d kind=%d branched=%d n=%d batch=%d block=(%d,%d)\n", trial,
                        kind, branched, n, batch, bs[0], bs[1]);
          }
        }
      }
    }
  }
  std::printf("block_map_cpu: %d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
