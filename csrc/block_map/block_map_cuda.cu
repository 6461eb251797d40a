// CUDA block map: the same summaries and tile classification as the CPU op
// (shared through block_map.h), one thread per block or tile.
#include <cuda_runtime.h>

#include "block_map.h"

namespace fastvlm {
namespace {

constexpr int kScanThreads = 1024;

struct Workspace {
  int32_t* nonpad_cum;  // [B, N+1]
  int32_t* image_cum;   // [B, N+1]
  QBlockSummary* qsum;  // [B, Tq]
  int32_t* last_text;   // [B, Tk]
  uint8_t* cls;         // [B, Tq, Tk]
  CutCell* cells;       // [B, Tq, Tk + 1] with cuts, else nullptr
};

FASTVLM_HD int64_t align_up(int64_t x) { return (x + 255) / 256 * 256; }

Workspace carve(void* base, int32_t batch, int32_t n, int32_t tq, int32_t tk, bool cuts) {
  char* p = static_cast<char*>(base);
  Workspace w;
  const int64_t cum = align_up(int64_t(batch) * (n + 1) * sizeof(int32_t));
  w.nonpad_cum = reinterpret_cast<int32_t*>(p);
  w.image_cum = reinterpret_cast<int32_t*>(p + cum);
  w.qsum = reinterpret_cast<QBlockSummary*>(p + 2 * cum);
  const int64_t qs = align_up(int64_t(batch) * tq * sizeof(QBlockSummary));
  w.last_text = reinterpret_cast<int32_t*>(p + 2 * cum + qs);
  const int64_t lt = align_up(int64_t(batch) * tk * sizeof(int32_t));
  w.cls = reinterpret_cast<uint8_t*>(p + 2 * cum + qs + lt);
  const int64_t cl = align_up(int64_t(batch) * tq * tk);
  w.cells = cuts ? reinterpret_cast<CutCell*>(p + 2 * cum + qs + lt + cl) : nullptr;
  return w;
}

// One CUDA block per batch row: each thread scans a contiguous chunk, chunk
// totals are scanned in shared memory, then chunks are rewritten with offsets.
__global__ void prefix_counts_kernel(const int32_t* lo, const int32_t* hi,
                                     const uint8_t* is_image, int32_t n,
                                     int32_t* nonpad_cum, int32_t* image_cum) {
  __shared__ int32_t tot_np[kScanThreads], tot_im[kScanThreads];
  const int b = blockIdx.x, t = threadIdx.x;
  const int32_t chunk = (n + kScanThreads - 1) / kScanThreads;
  const int32_t begin = min(n, t * chunk), end = min(n, begin + chunk);
  const int64_t off = int64_t(b) * n, coff = int64_t(b) * (n + 1);
  int32_t np = 0, im = 0;
  for (int32_t i = begin; i < end; ++i) {
    const bool live = row_nonempty(lo[off + i], hi[off + i]);
    np += live;
    im += live && is_image[off + i];
  }
  tot_np[t] = np;
  tot_im[t] = im;
  __syncthreads();
  if (t == 0) {  // 1024 additions: cheaper than being clever here
    int32_t a = 0, c = 0;
    for (int i = 0; i < kScanThreads; ++i) {
      const int32_t x = tot_np[i], y = tot_im[i];
      tot_np[i] = a;
      tot_im[i] = c;
      a += x;
      c += y;
    }
    nonpad_cum[coff] = 0;
    image_cum[coff] = 0;
  }
  __syncthreads();
  np = tot_np[t];
  im = tot_im[t];
  for (int32_t i = begin; i < end; ++i) {
    const bool live = row_nonempty(lo[off + i], hi[off + i]);
    np += live;
    im += live && is_image[off + i];
    nonpad_cum[coff + i + 1] = np;
    image_cum[coff + i + 1] = im;
  }
}

__global__ void summaries_kernel(const int32_t* lo, const int32_t* hi,
                                 const uint8_t* is_image, int32_t batch, int32_t n,
                                 int32_t block_q, int32_t block_k, int32_t tq,
                                 int32_t tk, QBlockSummary* qsum, int32_t* last_text) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nq = int64_t(batch) * tq, nk = int64_t(batch) * tk;
  if (i < nq) {
    const int32_t b = i / tq, qb = i % tq, q0 = qb * block_q;
    const int64_t off = int64_t(b) * n;
    qsum[i] = summarize_q_block(lo + off, hi + off, is_image + off, q0,
                                min(n, q0 + block_q) - 1);
  } else if (i < nq + nk) {
    const int64_t j = i - nq;
    const int32_t b = j / tk, kb = j % tk, k0 = kb * block_k;
    const int64_t off = int64_t(b) * n;
    last_text[j] = last_text_key(lo + off, hi + off, is_image + off, k0,
                                 min(n, k0 + block_k) - 1);
  }
}

// With cuts: each query block's summary gets its cut minima, its cells start empty.
__global__ void cut_init_kernel(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                                const int32_t* cut_lo, const int32_t* cut_hi, int32_t batch,
                                int32_t n, bool isolate, int32_t block_q, int32_t tq, int32_t tk,
                                Workspace w) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(batch) * tq) return;
  const int32_t b = i / tq, q0 = (i % tq) * block_q;
  const int64_t off = int64_t(b) * n;
  summarize_cuts(w.qsum[i], lo + off, hi + off, is_image + off, cut_lo + off, cut_hi + off,
                 isolate, q0, min(n, q0 + block_q) - 1);
  for (int32_t kb = 0; kb <= tk; ++kb) w.cells[i * (tk + 1) + kb] = empty_cut_cell();
}

// One thread per token: its writes into its query block's cells, by atomics.
__global__ void cut_cells_kernel(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                                 const int32_t* cut_lo, const int32_t* cut_hi, int32_t batch,
                                 int32_t n, bool isolate, int32_t block_q, int32_t block_k,
                                 int32_t tq, int32_t tk, Workspace w) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(batch) * n) return;
  const int32_t b = i / n, q = i % n;
  const int64_t off = int64_t(b) * n, coff = int64_t(b) * (n + 1);
  if (!row_nonempty(lo[off + q], hi[off + q])) return;
  const CutRowWrites c = cut_row_writes(q, lo + off, is_image + off, cut_lo + off, cut_hi + off,
                                        w.nonpad_cum + coff, w.image_cum + coff, isolate, block_k, tk);
  CutCell* row = w.cells + (int64_t(b) * tq + q / block_q) * (tk + 1);
  if (c.text_bucket >= 0) atomicMax(&row[c.text_bucket].text_cut_lo, c.text_cut_lo);
  if (c.image_bucket >= 0) {
    atomicMin(&row[c.image_bucket].image_lo, c.image_lo);
    if (c.prompt_text_hit) atomicMax(&row[c.image_bucket].prompt_text, 1);
  }
  if (c.cut_bucket >= 0) atomicMax(&row[c.cut_bucket].cut_hi, c.cut_hi);
}

__global__ void cut_finish_kernel(int32_t batch, int32_t tq, int32_t tk, Workspace w) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < int64_t(batch) * tq) finish_cut_cells(w.cells + i * (tk + 1), tk);
}

__global__ void classify_kernel(const uint8_t* is_image, int32_t batch, int32_t n,
                                int32_t kind, int32_t block_q, int32_t block_k,
                                int32_t tq, int32_t tk, Workspace w) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(batch) * tq * tk) return;
  const int32_t kb = i % tk, qb = (i / tk) % tq, b = i / (int64_t(tk) * tq);
  const int32_t q0 = qb * block_q, q1 = min(n, q0 + block_q) - 1;
  const int32_t k0 = kb * block_k, k1 = min(n, k0 + block_k) - 1;
  const int64_t coff = int64_t(b) * (n + 1);
  w.cls[i] = classify_tile(kind, w.qsum[int64_t(b) * tq + qb], q0, q1, k0, k1,
                           w.last_text[int64_t(b) * tk + kb], w.nonpad_cum + coff,
                           w.image_cum + coff, is_image + int64_t(b) * n,
                           w.cells ? w.cells + (int64_t(b) * tq + qb) * (tk + 1) : nullptr, kb);
}

// One thread per list: walks its row (or column) of tile classes in order.
__global__ void compact_kernel(const uint8_t* cls, int32_t batch, int32_t tq,
                               int32_t tk, BlockMapOut out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nq = int64_t(batch) * tq, nk = int64_t(batch) * tk;
  if (i < nq) {
    const int64_t b = i / tq, qb = i % tq;
    const uint8_t* row = cls + (b * tq + qb) * tk;
    int32_t* kv = out.kv_idx + i * tk;
    int32_t* fkv = out.full_kv_idx + i * tk;
    int32_t np = 0, nf = 0;
    for (int32_t kb = 0; kb < tk; ++kb) {
      if (row[kb] == kPartial) kv[np++] = kb;
      if (row[kb] == kFull) fkv[nf++] = kb;
    }
    for (int32_t j = np; j < tk; ++j) kv[j] = 0;
    for (int32_t j = nf; j < tk; ++j) fkv[j] = 0;
    out.kv_num[i] = np;
    out.full_kv_num[i] = nf;
  } else if (i < nq + nk) {
    const int64_t j = i - nq, b = j / tk, kb = j % tk;
    const uint8_t* col = cls + b * tq * tk + kb;
    int32_t* qi = out.q_idx + j * tq;
    int32_t* fqi = out.full_q_idx + j * tq;
    int32_t np = 0, nf = 0;
    for (int32_t qb = 0; qb < tq; ++qb) {
      const uint8_t c = col[int64_t(qb) * tk];
      if (c == kPartial) qi[np++] = qb;
      if (c == kFull) fqi[nf++] = qb;
    }
    for (int32_t x = np; x < tq; ++x) qi[x] = 0;
    for (int32_t x = nf; x < tq; ++x) fqi[x] = 0;
    out.q_num[j] = np;
    out.full_q_num[j] = nf;
  }
}

unsigned grid_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

}  // namespace

int64_t block_map_cuda_workspace_bytes(int32_t batch, int32_t seq_len, int32_t block_q,
                                       int32_t block_k, bool cuts) {
  const int32_t tq = ceil_div(seq_len, block_q), tk = ceil_div(seq_len, block_k);
  return 2 * align_up(int64_t(batch) * (seq_len + 1) * sizeof(int32_t)) +
         align_up(int64_t(batch) * tq * sizeof(QBlockSummary)) +
         align_up(int64_t(batch) * tk * sizeof(int32_t)) +
         align_up(int64_t(batch) * tq * tk) +
         (cuts ? int64_t(batch) * tq * (tk + 1) * int64_t(sizeof(CutCell)) : 0);
}

int block_map_cuda(const int32_t* lo, const int32_t* hi, const uint8_t* is_image,
                   int32_t batch, int32_t seq_len, int32_t kind, int32_t block_q,
                   int32_t block_k, BlockMapOut out, void* workspace, void* stream,
                   const int32_t* cut_lo, const int32_t* cut_hi) {
  if (batch == 0 || seq_len == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int32_t n = seq_len, tq = ceil_div(n, block_q), tk = ceil_div(n, block_k);
  const bool cuts = cut_lo != nullptr, isolate = isolates_images(kind);
  Workspace w = carve(workspace, batch, n, tq, tk, cuts);
  constexpr int kThreads = 256;
  prefix_counts_kernel<<<batch, kScanThreads, 0, s>>>(lo, hi, is_image, n, w.nonpad_cum,
                                                      w.image_cum);
  const int64_t lists = int64_t(batch) * (tq + tk);
  summaries_kernel<<<grid_for(lists, kThreads), kThreads, 0, s>>>(
      lo, hi, is_image, batch, n, block_q, block_k, tq, tk, w.qsum, w.last_text);
  if (cuts) {
    const int64_t blocks = int64_t(batch) * tq;
    cut_init_kernel<<<grid_for(blocks, kThreads), kThreads, 0, s>>>(
        lo, hi, is_image, cut_lo, cut_hi, batch, n, isolate, block_q, tq, tk, w);
    cut_cells_kernel<<<grid_for(int64_t(batch) * n, kThreads), kThreads, 0, s>>>(
        lo, hi, is_image, cut_lo, cut_hi, batch, n, isolate, block_q, block_k, tq, tk, w);
    cut_finish_kernel<<<grid_for(blocks, kThreads), kThreads, 0, s>>>(batch, tq, tk, w);
  }
  classify_kernel<<<grid_for(int64_t(batch) * tq * tk, kThreads), kThreads, 0, s>>>(
      is_image, batch, n, kind, block_q, block_k, tq, tk, w);
  compact_kernel<<<grid_for(lists, kThreads), kThreads, 0, s>>>(w.cls, batch, tq, tk, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fastvlm
