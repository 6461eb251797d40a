// Test support: random packed layouts, their per-token intervals, and tile
// classes by brute force over the mask definitions (no summaries involved).
#pragma once
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "block_map/block_map.h"

namespace fastvlm_test {

struct Layout {
  int32_t batch = 0, n = 0, kind = 0;
  std::vector<int32_t> seg, img, lo, hi;  // [B, N]
  std::vector<uint8_t> pre, is_image;     // [B, N]
  std::vector<int32_t> br, cut_lo, cut_hi;  // [B, N]: shared-prompt branches (0 = prompt) and cuts
};

inline void compute_intervals(Layout& L);

// Padding runs, segments, image runs and a prefix run at random.
inline Layout random_layout(std::mt19937& rng, int32_t batch, int32_t n, int32_t kind) {
  Layout L;
  L.batch = batch, L.n = n, L.kind = kind;
  L.seg.assign(batch * n, -1), L.img.assign(batch * n, -1), L.pre.assign(batch * n, 0);
  auto uni = [&](int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); };
  for (int b = 0; b < batch; ++b) {
    int pos = 0, s = 0;
    while (pos < n) {
      if (uni(0, 5) == 0) { pos += uni(1, 9); continue; }  // a padding gap
      const int len = std::min(n - pos, uni(1, n / 2 + 1));
      const int pre_len = uni(0, len);
      const int pre_start = pos + (uni(0, 3) == 0 ? uni(0, len - pre_len) : 0);
      int image = 0;
      for (int i = pos; i < pos + len;) {
        if (uni(0, 2) == 0) {  // an image run inside this segment
          const int run = std::min(pos + len - i, uni(1, 12));
          for (int j = i; j < i + run; ++j) L.img[b * n + j] = image;
          ++image, i += run;
        } else {
          i += uni(1, 6);
        }
      }
      for (int i = pos; i < pos + len; ++i) {
        L.seg[b * n + i] = s;
        L.pre[b * n + i] = (kind == fastvlm::kPrefixLM) && i >= pre_start && i < pre_start + pre_len;
      }
      ++s, pos += len;
    }
  }
  L.br.assign(batch * n, 0);
  compute_intervals(L);
  return L;
}

// Intervals: lo = segment start; hi = end of the bidirectional run or q itself; with
// branches, the cut of an answer's query (the answers between the prompt and its own),
// kept only strictly inside the interval as fastvlm.ops.mask_kinds.intervals keeps it.
inline void compute_intervals(Layout& L) {
  const int batch = L.batch, n = L.n, kind = L.kind;
  L.lo.assign(batch * n, 0), L.hi.assign(batch * n, -1), L.is_image.assign(batch * n, 0);
  L.cut_lo.assign(batch * n, 0), L.cut_hi.assign(batch * n, -1);
  for (int b = 0; b < batch; ++b) {
    const int32_t* seg = &L.seg[b * n];
    const int32_t* img = &L.img[b * n];
    const uint8_t* pre = &L.pre[b * n];
    for (int q = 0; q < n; ++q) {
      if (seg[q] < 0) continue;
      int start = q;
      while (start > 0 && seg[start - 1] == seg[q]) --start;
      int end = q;
      if (kind == fastvlm::kPrefixLM && pre[q])
        while (end + 1 < n && seg[end + 1] == seg[q] && pre[end + 1]) ++end;
      if (kind == fastvlm::kImageBidirectional && img[q] >= 0)
        while (end + 1 < n && seg[end + 1] == seg[q] && img[end + 1] == img[q]) ++end;
      L.lo[b * n + q] = start, L.hi[b * n + q] = end, L.is_image[b * n + q] = img[q] >= 0;
      const int32_t* br = &L.br[b * n];
      if (br[q] == 0) continue;
      int branch_start = q, prompt_end = start - 1;
      while (branch_start > start && br[branch_start - 1] == br[q]) --branch_start;
      for (int k = start; k < n && seg[k] == seg[q] && br[k] == 0; ++k) prompt_end = k;
      if (prompt_end + 1 > branch_start - 1) continue;  // the first answer: nothing to cut
      if (start >= prompt_end + 1) {  // no prompt: the interval starts at the own answer
        L.lo[b * n + q] = branch_start;
      } else {
        L.cut_lo[b * n + q] = prompt_end + 1, L.cut_hi[b * n + q] = branch_start - 1;
      }
    }
  }
}

// Most segments become a prompt and 1..3 answers; an image run crossing an answer's
// boundary is split there (a new image id), a prefix ends with the branch it starts in.
inline void add_branches(std::mt19937& rng, Layout& L) {
  auto uni = [&](int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); };
  const int n = L.n;
  for (int b = 0; b < L.batch; ++b) {
    int32_t* seg = &L.seg[b * n];
    int32_t* br = &L.br[b * n];
    for (int start = 0; start < n;) {
      if (seg[start] < 0) { ++start; continue; }
      int end = start;
      while (end + 1 < n && seg[end + 1] == seg[start]) ++end;
      if (uni(0, 4) != 0) {
        const int k = uni(1, 3), len = end - start + 1;
        std::vector<int> cuts(k);
        for (int& c : cuts) c = uni(0, len);
        std::sort(cuts.begin(), cuts.end());
        for (int j = 0; j < k; ++j)
          for (int i = start + cuts[j]; i <= end; ++i) br[i] = j + 1;
      }
      int32_t* img = &L.img[b * n];
      uint8_t* pre = &L.pre[b * n];
      int fresh = 1000, prefix_branch = -1;
      for (int i = start; i <= end; ++i) {
        if (i > start && img[i] >= 0 && br[i] != br[i - 1]) {
          const int32_t old = img[i], renamed = fresh++;
          for (int j = i; j <= end && img[j] == old; ++j) img[j] = renamed;
        }
        if (pre[i] && prefix_branch < 0) prefix_branch = br[i];
        if (pre[i] && br[i] != prefix_branch) pre[i] = 0;
      }
      start = end + 1;
    }
  }
  compute_intervals(L);
}

// The mask kinds exactly as documented (fastvlm/ops/mask_kinds.py), written out
// independently of lo/hi: the oracle the block maps are checked against.
inline bool allowed(const Layout& L, int b, int q, int k) {
  const int32_t* seg = &L.seg[b * L.n];
  const int32_t* img = &L.img[b * L.n];
  const uint8_t* pre = &L.pre[b * L.n];
  if (seg[q] < 0 || seg[q] != seg[k]) return false;
  const int32_t* br = &L.br[b * L.n];
  if (br[k] != 0 && br[k] != br[q]) return false;  // an answer sees the prompt and itself
  const bool causal = k <= q;
  switch (L.kind) {
    case fastvlm::kCausal: return causal;
    case fastvlm::kPrefixLM: return causal || (pre[q] && pre[k]);
    case fastvlm::kImageBidirectional: return causal || (img[q] >= 0 && img[q] == img[k]);
    default: return causal && (img[q] < 0 || img[k] < 0 || k == q);
  }
}

// [B, Tq, Tk] tile classes by looking at every pair.
inline std::vector<uint8_t> brute_force_classes(const Layout& L, int bq, int bk) {
  const int tq = (L.n + bq - 1) / bq, tk = (L.n + bk - 1) / bk;
  std::vector<uint8_t> cls(static_cast<size_t>(L.batch) * tq * tk);
  for (int b = 0; b < L.batch; ++b)
    for (int i = 0; i < tq; ++i)
      for (int j = 0; j < tk; ++j) {
        bool any = false, all = true;
        for (int q = i * bq; q < std::min(L.n, (i + 1) * bq); ++q)
          for (int k = j * bk; k < std::min(L.n, (j + 1) * bk); ++k) {
            const bool a = allowed(L, b, q, k);
            any |= a, all &= a;
          }
        cls[(static_cast<size_t>(b) * tq + i) * tk + j] = any ? (all ? fastvlm::kFull : fastvlm::kPartial)
                                                              : fastvlm::kEmpty;
      }
  return cls;
}

// Owning storage for a BlockMapOut.
struct Lists {
  int32_t batch, tq, tk;
  std::vector<int32_t> kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx;
  Lists(int32_t b, int32_t tq_, int32_t tk_)
      : batch(b), tq(tq_), tk(tk_), kv_num(b * tq_), kv_idx(b * tq_ * tk_), full_kv_num(b * tq_),
        full_kv_idx(b * tq_ * tk_), q_num(b * tk_), q_idx(b * tk_ * tq_), full_q_num(b * tk_),
        full_q_idx(b * tk_ * tq_) {}
  fastvlm::BlockMapOut out() {
    return {kv_num.data(), kv_idx.data(), full_kv_num.data(), full_kv_idx.data(),
            q_num.data(),  q_idx.data(),  full_q_num.data(),  full_q_idx.data()};
  }
  bool operator==(const Lists& o) const {
    return kv_num == o.kv_num && kv_idx == o.kv_idx && full_kv_num == o.full_kv_num &&
           full_kv_idx == o.full_kv_idx && q_num == o.q_num && q_idx == o.q_idx &&
           full_q_num == o.full_q_num && full_q_idx == o.full_q_idx;
  }
};

// Do the lists say exactly `cls`, in ascending order, in both orientations?
inline bool lists_match(const Lists& l, const std::vector<uint8_t>& cls) {
  for (int b = 0; b < l.batch; ++b) {
    for (int i = 0; i < l.tq; ++i) {
      std::vector<int32_t> part, full;
      for (int j = 0; j < l.tk; ++j) {
        const uint8_t c = cls[(static_cast<size_t>(b) * l.tq + i) * l.tk + j];
        if (c == fastvlm::kPartial) part.push_back(j);
        if (c == fastvlm::kFull) full.push_back(j);
      }
      const int row = b * l.tq + i;
      if (l.kv_num[row] != static_cast<int32_t>(part.size()) ||
          l.full_kv_num[row] != static_cast<int32_t>(full.size()))
        return false;
      for (size_t x = 0; x < part.size(); ++x)
        if (l.kv_idx[row * l.tk + x] != part[x]) return false;
      for (size_t x = 0; x < full.size(); ++x)
        if (l.full_kv_idx[row * l.tk + x] != full[x]) return false;
    }
    for (int j = 0; j < l.tk; ++j) {
      std::vector<int32_t> part, full;
      for (int i = 0; i < l.tq; ++i) {
        const uint8_t c = cls[(static_cast<size_t>(b) * l.tq + i) * l.tk + j];
        if (c == fastvlm::kPartial) part.push_back(i);
        if (c == fastvlm::kFull) full.push_back(i);
      }
      const int col = b * l.tk + j;
      if (l.q_num[col] != static_cast<int32_t>(part.size()) ||
          l.full_q_num[col] != static_cast<int32_t>(full.size()))
        return false;
      for (size_t x = 0; x < part.size(); ++x)
        if (l.q_idx[col * l.tq + x] != part[x]) return false;
      for (size_t x = 0; x < full.size(); ++x)
        if (l.full_q_idx[col * l.tq + x] != full[x]) return false;
    }
  }
  return true;
}

}  // namespace fastvlm_test
