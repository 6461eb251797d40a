// Tile classification for attention layouts described by per-token metadata.
//
// Plain C++/CUDA: no torch here, so the same code serves the CPU op, the CUDA
// kernel and the standalone C++ tests.
//
// Every mask kind is expressed per query row q as an interval of allowed keys
// [lo[q], hi[q]] (empty when hi < lo, which is how padding rows are stored);
// a kind that isolates images (mmca) additionally forbids image keys other than
// q itself for image queries. The kinds are defined in fastvlm/ops/mask_kinds.py,
// which derives lo/hi in O(N); this file knows a kind only by its code and by
// isolates_images() (tests/test_mask_kinds.py checks both against the Python
// definitions). It turns lo/hi into
// per-block summaries and then classifies every tile in O(1), so the whole
// block map costs O(N + Tq*Tk) and never touches an N x N mask.
//
// A shared-prompt layout (branch ids) adds per query a cut [cut_lo, cut_hi] of
// keys dropped from its interval (an answer skips the answers before it), with
// lo < cut_lo <= cut_hi < q when present, (0, -1) otherwise. A query then sees
// two intervals; the tile rules for keys before the queries and for full tiles
// read per-(query block, kv block) cells (CutCell) instead of block summaries.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTVLM_HD __host__ __device__ __forceinline__
#else
#define FASTVLM_HD inline
#endif

namespace fastvlm {

enum MaskKind : int32_t {
  kCausal = 0,
  kPrefixLM = 1,
  kImageBidirectional = 2,
  kMMCA = 3,
};

struct MaskKindName {
  const char* name;  // as fastvlm.ops.mask_kinds names it
  MaskKind code;
};
constexpr MaskKindName kMaskKinds[] = {
    {"causal", kCausal}, {"prefix_lm", kPrefixLM}, {"image_bidirectional", kImageBidirectional},
    {"mmca", kMMCA}};
constexpr int32_t kNumMaskKinds = sizeof(kMaskKinds) / sizeof(kMaskKinds[0]);

// The only per-kind rule of the tile classification: whether image queries drop
// every image key but their own. Such a kind keeps image queries causal (hi == q).
FASTVLM_HD bool isolates_images(int32_t kind) { return kind == kMMCA; }

enum TileClass : uint8_t { kEmpty = 0, kPartial = 1, kFull = 2 };

constexpr int32_t kNone = 0x7fffffff;  // "no such row" for the min-summaries

// Summary of one query block, over its non-padding rows.
struct QBlockSummary {
  int32_t rows;          // non-padding rows in the block
  int32_t min_lo, max_lo, min_hi, max_hi;
  int32_t min_lo_text;   // smallest lo over text rows (kNone if none)
  int32_t min_lo_image;  // smallest lo over image rows (kNone if none)
  int32_t image_rows;
  int32_t min_cut_hi_text;   // smallest cut_hi over text-role rows with a cut (kNone if none)
  int32_t min_cut_hi_image;  // the same over isolated image rows (kNone if none)
};

// With cuts: one cell per (query block, kv-block bucket 0..Tk). Each tile rule with a
// cut is "some row of the block with x <= (a tile bound) has y > (another bound)": a
// row adds y to the cell of the bucket of x (max or min), and a running max / min over
// the buckets (finish_cut_cells) answers the rule for every tile of the block.
struct CutCell {
  int32_t text_cut_lo;   // max over text-role rows with lo in the bucket of cut_lo (kNone
                         // without a cut); after the running max: over lo <= k1
  int32_t image_lo;      // min lo over isolated image rows whose prompt ends in the bucket
                         // (bucket Tk: no cut); after the running min from the end: buckets >= kb
  int32_t prompt_text;   // 1 if an isolated image row whose prompt ends in this kv block
                         // has an allowed text key of its prompt in it
  int32_t cut_hi;        // max cut_hi over rows with cut_lo in the bucket; after the
                         // running max: over cut_lo <= k1
};

FASTVLM_HD CutCell empty_cut_cell() { return CutCell{-1, kNone, 0, -1}; }

FASTVLM_HD bool row_nonempty(int32_t lo, int32_t hi) { return hi >= lo; }

// Summarise rows [q0, q1] of one batch row.
FASTVLM_HD QBlockSummary summarize_q_block(const int32_t* lo, const int32_t* hi,
                                           const uint8_t* is_image, int32_t q0,
                                           int32_t q1) {
  QBlockSummary s{0, kNone, -1, kNone, -1, kNone, kNone, 0, kNone, kNone};
  for (int32_t q = q0; q <= q1; ++q) {
    if (!row_nonempty(lo[q], hi[q])) continue;
    s.rows += 1;
    s.min_lo = lo[q] < s.min_lo ? lo[q] : s.min_lo;
    s.max_lo = lo[q] > s.max_lo ? lo[q] : s.max_lo;
    s.min_hi = hi[q] < s.min_hi ? hi[q] : s.min_hi;
    s.max_hi = hi[q] > s.max_hi ? hi[q] : s.max_hi;
    if (is_image[q]) {
      s.image_rows += 1;
      s.min_lo_image = lo[q] < s.min_lo_image ? lo[q] : s.min_lo_image;
    } else {
      s.min_lo_text = lo[q] < s.min_lo_text ? lo[q] : s.min_lo_text;
    }
  }
  return s;
}

// The cut's share of the summary of rows [q0, q1] (cut_lo / cut_hi: the row's cuts).
FASTVLM_HD void summarize_cuts(QBlockSummary& s, const int32_t* lo, const int32_t* hi,
                               const uint8_t* is_image, const int32_t* cut_lo,
                               const int32_t* cut_hi, bool isolate, int32_t q0, int32_t q1) {
  for (int32_t q = q0; q <= q1; ++q) {
    if (!row_nonempty(lo[q], hi[q]) || cut_hi[q] < cut_lo[q]) continue;
    int32_t& m = isolate && is_image[q] ? s.min_cut_hi_image : s.min_cut_hi_text;
    m = cut_hi[q] < m ? cut_hi[q] : m;
  }
}

// Where row q (live, in its block's cells) writes: text_cut_lo at bucket
// text_bucket, image_lo at image_bucket, prompt_text at image_bucket when
// prompt_text_hit, cut_hi at cut_bucket (-1: the row writes no such value).
struct CutRowWrites {
  int32_t text_bucket, text_cut_lo;
  int32_t image_bucket, image_lo;
  bool prompt_text_hit;
  int32_t cut_bucket, cut_hi;
};

// text_cum: prefix counts of live text tokens (cum[i] = count below i).
FASTVLM_HD CutRowWrites cut_row_writes(int32_t q, const int32_t* lo, const uint8_t* is_image,
                                       const int32_t* cut_lo, const int32_t* cut_hi,
                                       const int32_t* nonpad_cum, const int32_t* image_cum,
                                       bool isolate, int32_t block_k, int32_t tk) {
  CutRowWrites w{-1, 0, -1, 0, false, -1, 0};
  const bool has_cut = cut_hi[q] >= cut_lo[q];
  if (isolate && is_image[q]) {
    // text keys of [lo, cut_lo - 1] (the prompt) or of [cut_hi + 1, q - 1], and itself
    w.image_bucket = has_cut ? (cut_lo[q] - 1) / block_k : tk;
    w.image_lo = lo[q];
    if (has_cut) {
      const int32_t tile0 = w.image_bucket * block_k, first = lo[q] > tile0 ? lo[q] : tile0;
      const int32_t last = cut_lo[q] - 1;
      w.prompt_text_hit = first <= last && (nonpad_cum[last + 1] - image_cum[last + 1]) -
                                               (nonpad_cum[first] - image_cum[first]) > 0;
    }
  } else {
    w.text_bucket = lo[q] / block_k;
    w.text_cut_lo = has_cut ? cut_lo[q] : kNone;
  }
  if (has_cut) {
    w.cut_bucket = cut_lo[q] / block_k;
    w.cut_hi = cut_hi[q];
  }
  return w;
}

// Running max / min over the buckets of one query block's cells (Tk + 1 of them).
FASTVLM_HD void finish_cut_cells(CutCell* cells, int32_t tk) {
  for (int32_t kb = 1; kb <= tk; ++kb) {
    const CutCell& p = cells[kb - 1];
    CutCell& c = cells[kb];
    c.text_cut_lo = p.text_cut_lo > c.text_cut_lo ? p.text_cut_lo : c.text_cut_lo;
    c.cut_hi = p.cut_hi > c.cut_hi ? p.cut_hi : c.cut_hi;
  }
  for (int32_t kb = tk - 1; kb >= 0; --kb)
    cells[kb].image_lo = cells[kb + 1].image_lo < cells[kb].image_lo ? cells[kb + 1].image_lo
                                                                      : cells[kb].image_lo;
}

// Largest non-padding text key index in [k0, k1], or -1.
FASTVLM_HD int32_t last_text_key(const int32_t* lo, const int32_t* hi,
                                 const uint8_t* is_image, int32_t k0, int32_t k1) {
  for (int32_t k = k1; k >= k0; --k)
    if (row_nonempty(lo[k], hi[k]) && !is_image[k]) return k;
  return -1;
}

// Classify tile (rows [q0,q1]) x (keys [k0,k1]).
//   nonpad_cum / image_cum: inclusive-exclusive prefix counts over the row
//   (cum[i] = count of tokens < i), so a range count is cum[b+1] - cum[a].
//   cells: the query block's finished CutCells (nullptr without cuts).
// Exact: kFull iff every pair is allowed, kEmpty iff none is. The proofs rest
// on the layout invariants AttentionLayout validates: segments, image runs and
// prefix runs are contiguous, so every allowed interval holds only
// non-padding tokens of the query's own segment, and lo[q] <= q <= hi[q].
FASTVLM_HD uint8_t classify_tile(int32_t kind, const QBlockSummary& s, int32_t q0,
                                 int32_t q1, int32_t k0, int32_t k1,
                                 int32_t k_last_text, const int32_t* nonpad_cum,
                                 const int32_t* image_cum, const uint8_t* is_image,
                                 const CutCell* cells = nullptr, int32_t kb = 0) {
  if (s.rows == 0) return kEmpty;
  const bool isolate = isolates_images(kind);
  bool any;
  const int32_t m0 = q0 > k0 ? q0 : k0, m1 = q1 < k1 ? q1 : k1;
  if (m0 <= m1) {
    // Overlapping ranges: any non-padding token in the overlap sees itself;
    // if the overlap is all padding, no interval can cross it.
    any = nonpad_cum[m1 + 1] - nonpad_cum[m0] > 0;
  } else if (k1 < q0 && cells != nullptr) {
    // Keys before the queries, with cuts: a text-role row meets the tile iff lo <= k1
    // and not (cut_lo <= k0 and k1 <= cut_hi) (lo < cut_lo); an isolated image row iff a
    // text key of its prompt part or of [cut_hi + 1, k1] is in it.
    any = cells[kb].text_cut_lo > k0 || s.min_cut_hi_text < k1;
    if (isolate && !any)
      any = cells[kb].prompt_text != 0 ||
            (k_last_text >= 0 && (cells[kb + 1].image_lo <= k_last_text || s.min_cut_hi_image < k_last_text));
  } else if (k1 < q0) {
    // Keys strictly before the queries: hi[q] >= q > k1 holds, so only lo matters.
    any = isolate ? (s.min_lo_text <= k1 || (s.min_lo_image != kNone && k_last_text >= s.min_lo_image))
               : s.min_lo <= k1;
  } else {
    // Keys strictly after the queries: only bidirectional runs reach forward
    // (never an image row of an isolating kind, which stays causal).
    any = s.max_hi >= k0;
  }
  if (!any) return kEmpty;
  bool all = s.rows == q1 - q0 + 1 && s.max_lo <= k0 && s.min_hi >= k1;
  if (all && cells != nullptr) all = cells[kb].cut_hi < k0;  // no row's cut meets the tile
  if (all && isolate) {
    // Causal envelope holds (so k <= q); forbid image-query x other-image-key pairs.
    const int32_t image_keys = image_cum[k1 + 1] - image_cum[k0];
    const bool only_diagonal = s.image_rows == 1 && image_keys == 1 && k1 == q0 && is_image[q0];
    if (s.image_rows > 0 && image_keys > 0 && !only_diagonal) all = false;
  }
  return all ? kFull : kPartial;
}

// Plain-C++ block map for a batch (no torch). Outputs are caller-allocated and
// laid out like FlexAttention's BlockMask: counts [B, Tq], indices [B, Tq, Tk]
// (ascending, unused slots 0) and the transposed lists [B, Tk] / [B, Tk, Tq].
struct BlockMapOut {
  int32_t* kv_num;       // [B, Tq]
  int32_t* kv_idx;       // [B, Tq, Tk]
  int32_t* full_kv_num;  // [B, Tq]
  int32_t* full_kv_idx;  // [B, Tq, Tk]
  int32_t* q_num;        // [B, Tk]
  int32_t* q_idx;        // [B, Tk, Tq]
  int32_t* full_q_num;   // [B, Tk]
  int32_t* full_q_idx;   // [B, Tk, Tq]
};

FASTVLM_HD int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

// cut_lo / cut_hi: [B, N] each, or nullptr (no cuts).
void block_map_cpu(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                   int32_t batch, int32_t seq_len, int32_t kind, int32_t block_q,
                   int32_t block_k, BlockMapOut out, const int32_t* cut_lo = nullptr,
                   const int32_t* cut_hi = nullptr);

#if defined(FASTVLM_WITH_CUDA)
// Bytes of device scratch block_map_cuda needs (caller allocates, so the
// framework's caching allocator serves it).
int64_t block_map_cuda_workspace_bytes(int32_t batch, int32_t seq_len, int32_t block_q,
                                       int32_t block_k, bool cuts = false);
// Same contract as block_map_cpu on device pointers; runs on `stream` (a
// cudaStream_t). Returns 0 on success or a cudaError_t value.
int block_map_cuda(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                   int32_t batch, int32_t seq_len, int32_t kind, int32_t block_q,
                   int32_t block_k, BlockMapOut out, void* workspace, void* stream,
                   const int32_t* cut_lo = nullptr, const int32_t* cut_hi = nullptr);
#endif

}  // namespace fastvlm
