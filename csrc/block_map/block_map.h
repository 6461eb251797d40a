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
};

FASTVLM_HD bool row_nonempty(int32_t lo, int32_t hi) { return hi >= lo; }

// Summarise rows [q0, q1] of one batch row.
FASTVLM_HD QBlockSummary summarize_q_block(const int32_t* lo, const int32_t* hi,
                                           const uint8_t* is_image, int32_t q0,
                                           int32_t q1) {
  QBlockSummary s{0, kNone, -1, kNone, -1, kNone, kNone, 0};
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
// Exact: kFull iff every pair is allowed, kEmpty iff none is. The proofs rest
// on the layout invariants AttentionLayout validates: segments, image runs and
// prefix runs are contiguous, so every allowed interval holds only
// non-padding tokens of the query's own segment, and lo[q] <= q <= hi[q].
FASTVLM_HD uint8_t classify_tile(int32_t kind, const QBlockSummary& s, int32_t q0,
                                 int32_t q1, int32_t k0, int32_t k1,
                                 int32_t k_last_text, const int32_t* nonpad_cum,
                                 const int32_t* image_cum, const uint8_t* is_image) {
  if (s.rows == 0) return kEmpty;
  const bool isolate = isolates_images(kind);
  bool any;
  const int32_t m0 = q0 > k0 ? q0 : k0, m1 = q1 < k1 ? q1 : k1;
  if (m0 <= m1) {
    // Overlapping ranges: any non-padding token in the overlap sees itself;
    // if the overlap is all padding, no interval can cross it.
    any = nonpad_cum[m1 + 1] - nonpad_cum[m0] > 0;
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

void block_map_cpu(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                   int32_t batch, int32_t seq_len, int32_t kind, int32_t block_q,
                   int32_t block_k, BlockMapOut out);

#if defined(FASTVLM_WITH_CUDA)
// Bytes of device scratch block_map_cuda needs (caller allocates, so the
// framework's caching allocator serves it).
int64_t block_map_cuda_workspace_bytes(int32_t batch, int32_t seq_len, int32_t block_q,
                                       int32_t block_k);
// Same contract as block_map_cpu on device pointers; runs on `stream` (a
// cudaStream_t). Returns 0 on success or a cudaError_t value.
int block_map_cuda(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                   int32_t batch, int32_t seq_len, int32_t kind, int32_t block_q,
                   int32_t block_k, BlockMapOut out, void* workspace, void* stream);
#endif

}  // namespace fastvlm
