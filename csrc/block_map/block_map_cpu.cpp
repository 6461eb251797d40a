// CPU block map: per-row prefix counts, per-block summaries, O(1) per tile.
#include <algorithm>
#include <vector>

#include "block_map.h"

namespace fastvlm {

void block_map_cpu(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                   int32_t batch, int32_t seq_len, int32_t kind, int32_t block_q,
                   int32_t block_k, BlockMapOut out, const int32_t* cut_lo,
                   const int32_t* cut_hi) {
  const int32_t n = seq_len, tq = ceil_div(n, block_q), tk = ceil_div(n, block_k);
  std::vector<int32_t> nonpad_cum(n + 1), image_cum(n + 1), last_text(tk);
  std::vector<QBlockSummary> qsum(tq);
  std::vector<uint8_t> cls(static_cast<size_t>(tq) * tk);
  const bool cuts = cut_lo != nullptr, isolate = isolates_images(kind);
  std::vector<CutCell> cells(cuts ? static_cast<size_t>(tq) * (tk + 1) : 0);
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t* lo_b = lo + static_cast<int64_t>(b) * n;
    const int32_t* hi_b = hi + static_cast<int64_t>(b) * n;
    const uint8_t* img_b = is_image + static_cast<int64_t>(b) * n;
    nonpad_cum[0] = image_cum[0] = 0;
    for (int32_t i = 0; i < n; ++i) {
      const bool live = row_nonempty(lo_b[i], hi_b[i]);
      nonpad_cum[i + 1] = nonpad_cum[i] + live;
      image_cum[i + 1] = image_cum[i] + (live && img_b[i]);
    }
    for (int32_t qb = 0; qb < tq; ++qb)
      qsum[qb] = summarize_q_block(lo_b, hi_b, img_b, qb * block_q,
                                   std::min(n, (qb + 1) * block_q) - 1);
    if (cuts) {
      const int32_t* clo = cut_lo + static_cast<int64_t>(b) * n;
      const int32_t* chi = cut_hi + static_cast<int64_t>(b) * n;
      std::fill(cells.begin(), cells.end(), empty_cut_cell());
      for (int32_t qb = 0; qb < tq; ++qb)
        summarize_cuts(qsum[qb], lo_b, hi_b, img_b, clo, chi, isolate, qb * block_q,
                       std::min(n, (qb + 1) * block_q) - 1);
      for (int32_t q = 0; q < n; ++q) {
        if (!row_nonempty(lo_b[q], hi_b[q])) continue;
        CutCell* row = cells.data() + static_cast<size_t>(q / block_q) * (tk + 1);
        const CutRowWrites w = cut_row_writes(q, lo_b, img_b, clo, chi, nonpad_cum.data(),
                                              image_cum.data(), isolate, block_k, tk);
        if (w.text_bucket >= 0)
          row[w.text_bucket].text_cut_lo = std::max(row[w.text_bucket].text_cut_lo, w.text_cut_lo);
        if (w.image_bucket >= 0) {
          row[w.image_bucket].image_lo = std::min(row[w.image_bucket].image_lo, w.image_lo);
          if (w.prompt_text_hit) row[w.image_bucket].prompt_text = 1;
        }
        if (w.cut_bucket >= 0) row[w.cut_bucket].cut_hi = std::max(row[w.cut_bucket].cut_hi, w.cut_hi);
      }
      for (int32_t qb = 0; qb < tq; ++qb)
        finish_cut_cells(cells.data() + static_cast<size_t>(qb) * (tk + 1), tk);
    }
    for (int32_t kb = 0; kb < tk; ++kb)
      last_text[kb] = last_text_key(lo_b, hi_b, img_b, kb * block_k,
                                    std::min(n, (kb + 1) * block_k) - 1);
    for (int32_t qb = 0; qb < tq; ++qb) {
      const int32_t q0 = qb * block_q, q1 = std::min(n, q0 + block_q) - 1;
      for (int32_t kb = 0; kb < tk; ++kb) {
        const int32_t k0 = kb * block_k, k1 = std::min(n, k0 + block_k) - 1;
        cls[static_cast<size_t>(qb) * tk + kb] =
            classify_tile(kind, qsum[qb], q0, q1, k0, k1, last_text[kb],
                          nonpad_cum.data(), image_cum.data(), img_b,
                          cuts ? cells.data() + static_cast<size_t>(qb) * (tk + 1) : nullptr, kb);
      }
    }
    // Compact into ascending index lists, both orientations.
    for (int32_t qb = 0; qb < tq; ++qb) {
      const int64_t row = static_cast<int64_t>(b) * tq + qb;
      int32_t* kv = out.kv_idx + row * tk;
      int32_t* fkv = out.full_kv_idx + row * tk;
      int32_t np = 0, nf = 0;
      for (int32_t kb = 0; kb < tk; ++kb) {
        const uint8_t c = cls[static_cast<size_t>(qb) * tk + kb];
        if (c == kPartial) kv[np++] = kb;
        if (c == kFull) fkv[nf++] = kb;
      }
      std::fill(kv + np, kv + tk, 0);
      std::fill(fkv + nf, fkv + tk, 0);
      out.kv_num[row] = np;
      out.full_kv_num[row] = nf;
    }
    for (int32_t kb = 0; kb < tk; ++kb) {
      const int64_t row = static_cast<int64_t>(b) * tk + kb;
      int32_t* qi = out.q_idx + row * tq;
      int32_t* fqi = out.full_q_idx + row * tq;
      int32_t np = 0, nf = 0;
      for (int32_t qb = 0; qb < tq; ++qb) {
        const uint8_t c = cls[static_cast<size_t>(qb) * tk + kb];
        if (c == kPartial) qi[np++] = qb;
        if (c == kFull) fqi[nf++] = qb;
      }
      std::fill(qi + np, qi + tq, 0);
      std::fill(fqi + nf, fqi + tq, 0);
      out.q_num[row] = np;
      out.full_q_num[row] = nf;
    }
  }
}

}  // namespace fastvlm
