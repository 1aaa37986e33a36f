// CUDA kernels of pyramid pooling (declared in csrc/cuda/pyramid.h); fp32 accumulation, the index
// maths of csrc/common/pyramid.h, shared with the CPU kernels; every backward a gather: no atomics.
// Designed to the HBM roof (each section says how): the pool kernels by segments, each thread owning
// one; the upsample forward by runs of outputs sharing a stencil; the taps forward by blocks that
// stage the separable kx-sums in shared memory; the taps backward (its k = 1 case the upsample
// backward) by blocks that reduce rows, then columns, in shared memory.
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/pyramid.h"
#include "cuda/pack.cuh"
#include "cuda/pyramid.h"

namespace slsdeep {
namespace pyramid_cuda {
namespace {

using packs::load;
using packs::load_cached;
using packs::store;
using packs::keeps_packs;
using packs::packed;
using pyramid::LinearTap;

constexpr int kThreads = 256;

// ---------------------------------------------------------------- pyramid_pool
//
// By segments (csrc/common/pyramid.h, docs/design.md §4.2). Forward: (1) every segment of every
// plane summed once in fp32 (one read of x), (2) every cell the sum of its segments over its area.
// Backward: (1) every segment's gradient, Σ grad / area over the cells containing it, (2) every
// segment filled with it (one write of grad_x). A thread owns a segment: NCHW (plane, segment), its
// rows' runs in 16-byte packs where the segment bounds along w and the strides allow; NHWC
// (n, segment, pack of channels), one 16-byte pack per pixel, coalesced across the channel packs.
// The segment values are laid out (N, C, pairs) for NCHW and (N, pairs, C) for NHWC so that the
// big kernels' accesses to them coalesce as well. Floors (4.8 TB/s): the read of x (forward), the
// write of grad_x (backward); the model's (16, 2048, 48, 48) bf16 is 151 MB: 31 µs each on an H200.

// Everything a pool kernel needs about the bins, by value.
struct PoolPlan {
  int count;                    // bins
  int64_t size[kMaxBins];       // bin sizes
  int cell_offset[kMaxBins];    // first cell of each bin in the (N, C, cells) output
  int axis_offset[kMaxBins];    // first axis cell of each bin (Σ of the earlier sizes)
  int cells;                    // Σ b²
  pyramid::AxisPlan rows, cols;
  SLSDEEP_HD int pairs() const { return rows.segments * cols.segments; }
};

// The plan, or false when the bins sum to more than kMaxAxisCells.
bool make_pool_plan(const int64_t* bins, int num_bins, int64_t H, int64_t W, PoolPlan* plan) {
  if (num_bins < 1 || num_bins > kMaxBins) return false;
  int64_t sum = 0;
  for (int k = 0; k < num_bins; ++k) sum += bins[k] > 0 ? bins[k] : pyramid::kMaxAxisCells + 1;
  if (sum > pyramid::kMaxAxisCells) return false;
  PoolPlan p{};
  p.count = num_bins;
  int axis = 0;
  for (int k = 0; k < num_bins; ++k) {
    p.size[k] = bins[k];
    p.cell_offset[k] = p.cells;
    p.axis_offset[k] = axis;
    p.cells += static_cast<int>(bins[k] * bins[k]);
    axis += static_cast<int>(bins[k]);
  }
  if (!pyramid::axis_plan(H, bins, num_bins, &p.rows) || !pyramid::axis_plan(W, bins, num_bins, &p.cols)) return false;
  *plan = p;
  return true;
}

// A segment pair's index in the segment values: (N, pairs, C) for NHWC, (N, C, pairs) for NCHW.
__device__ __forceinline__ int64_t pair_index(bool channels_last, int64_t n, int64_t c, int64_t pair, int64_t C,
                                              int64_t pairs) {
  return channels_last ? (n * pairs + pair) * C + c : (n * C + c) * pairs + pair;
}

// This thread's segment pair and where it lies: NCHW threads walk (plane, pair), NHWC threads
// (n, pair, channel pack), channel packs fastest. 32-bit divisions, once per thread (the host
// checks that the thread count fits 32 bits).
struct SegmentThread {
  unsigned n, c, pair;
  int h0, h1, w0, w1;
  __device__ __forceinline__ SegmentThread(unsigned t, bool channels_last, unsigned C, unsigned packs, int vec,
                                           const PoolPlan& plan) {
    const unsigned pairs = plan.pairs();
    unsigned rest;
    if (channels_last) {
      const unsigned pack = t % packs;
      rest = t / packs;
      c = pack * vec;
      pair = rest % pairs;
      n = rest / pairs;
    } else {
      pair = t % pairs;
      rest = t / pairs;
      c = rest % C;
      n = rest / C;
    }
    const unsigned sh = pair / plan.cols.segments, sw = pair - sh * plan.cols.segments;
    h0 = plan.rows.bound[sh];
    h1 = plan.rows.bound[sh + 1];
    w0 = plan.cols.bound[sw];
    w1 = plan.cols.bound[sw + 1];
  }
};

// f(p) for the first element p of every pack of the thread's segment in the image at `base`: NCHW
// runs along w in packs of kVec, NHWC one pack of channels per pixel.
template <int kVec, bool kChannelsLast, typename T, typename F>
__device__ __forceinline__ void for_each_pack(const SegmentThread& seg, T* base, const Strides& s, const F& f) {
  for (int h = seg.h0; h < seg.h1; ++h) {
    T* row = base + h * s.h;
    for (int w = seg.w0; w < seg.w1; w += kChannelsLast ? 1 : kVec) f(row + w * s.w);
  }
}

// (1) forward: the segment sums of x. kVec > 1: NHWC packs of channels (stride c == 1), or NCHW
// packs along w (stride w == 1, every w bound a multiple of kVec).
template <typename T, int kVec, bool kChannelsLast>
__global__ void pool_segment_sums_kernel(const T* __restrict__ x, Strides s, unsigned C, unsigned packs, PoolPlan plan,
                                         float* __restrict__ sums, unsigned threads) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const SegmentThread seg(t, kChannelsLast, C, packs, kVec, plan);
  float acc[kVec] = {};
  for_each_pack<kVec, kChannelsLast>(seg, x + seg.n * s.n + seg.c * s.c, s, [&](const T* p) {
    float v[kVec];
    load<T, kVec>(p, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] += v[j];
  });
  const int64_t pairs = plan.pairs();
  if constexpr (kChannelsLast) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) sums[pair_index(true, seg.n, seg.c + j, seg.pair, C, pairs)] = acc[j];
  } else {
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) total += acc[j];
    sums[pair_index(false, seg.n, seg.c, seg.pair, C, pairs)] = total;
  }
}

// (2) forward: out (N, C, cells) from the segment sums; one thread per cell.
template <typename T>
__global__ void pool_cells_kernel(const float* __restrict__ sums, bool channels_last, unsigned C, PoolPlan plan,
                                  T* __restrict__ out, unsigned threads) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const unsigned cell = t % plan.cells, plane = t / plan.cells;
  int k = 0;
  while (k + 1 < plan.count && static_cast<int>(cell) >= plan.cell_offset[k + 1]) ++k;
  const int b = static_cast<int>(plan.size[k]), local = static_cast<int>(cell) - plan.cell_offset[k];
  const int i = local / b, j = local - i * b;
  const int row_cell = plan.axis_offset[k] + i, col_cell = plan.axis_offset[k] + j;
  const int r0 = plan.rows.first[row_cell], r1 = plan.rows.last[row_cell];
  const int q0 = plan.cols.first[col_cell], q1 = plan.cols.last[col_cell];
  const int64_t pairs = plan.pairs();
  float sum = 0.f;
  for (int r = r0; r < r1; ++r) {
    for (int q = q0; q < q1; ++q) {
      sum += sums[pair_index(channels_last, plane / C, plane % C, r * plan.cols.segments + q, C, pairs)];
    }
  }
  const float area = static_cast<float>(pyramid::cell_extent(plan.rows, row_cell) * pyramid::cell_extent(plan.cols, col_cell));
  out[t] = from_float<T>(sum / area);
}

// (1) backward: each segment pair's gradient, Σ over the cells containing it of grad / area, in the
// layout of the segment values; one thread per value.
template <typename T>
__global__ void pool_segment_grads_kernel(const T* __restrict__ grad, bool channels_last, unsigned C, PoolPlan plan,
                                          float* __restrict__ grads, unsigned threads) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const SegmentThread seg(t, channels_last, C, C, 1, plan);
  const unsigned sh = seg.pair / plan.cols.segments, sw = seg.pair - sh * plan.cols.segments;
  const T* g = grad + (static_cast<int64_t>(seg.n) * C + seg.c) * plan.cells;
  float sum = 0.f;
  pyramid::for_cells_containing(plan.rows, plan.cols, plan, sh, sw, [&](int64_t cell, int64_t area) {
    sum += to_float(g[cell]) / static_cast<float>(area);
  });
  grads[t] = sum;  // t is the value's index in its layout (SegmentThread walks that order)
}

// (2) backward: grad_x, every segment filled with its gradient (packs as in the forward's (1)).
template <typename T, int kVec, bool kChannelsLast>
__global__ void pool_fill_kernel(const float* __restrict__ grads, Strides s, unsigned C, unsigned packs, PoolPlan plan,
                                 T* __restrict__ grad_x, unsigned threads) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const SegmentThread seg(t, kChannelsLast, C, packs, kVec, plan);
  const int64_t pairs = plan.pairs();
  float v[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    v[j] = grads[pair_index(kChannelsLast, seg.n, kChannelsLast ? seg.c + j : seg.c, seg.pair, C, pairs)];
  }
  for_each_pack<kVec, kChannelsLast>(seg, grad_x + seg.n * s.n + seg.c * s.c, s, [&](T* p) { store<T, kVec>(p, v); });
}


// The pack width of a pool pass over an (N, C, H, W) tensor with strides s at p: 16 bytes where the
// layout's contiguous axis, the other strides, every bound along it and the pointer allow it, else 1.
template <typename T>
int pool_vector_width(const void* p, const Strides& s, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                      const PoolPlan& plan) {
  constexpr int kWide = 16 / sizeof(T);
  if (!packed(p)) return 1;
  if (channels_last) {
    const bool ok = s.c == 1 && C % kWide == 0 && keeps_packs(W, s.w, kWide) && keeps_packs(H, s.h, kWide) &&
                    keeps_packs(N, s.n, kWide);
    return ok ? kWide : 1;
  }
  if (s.w != 1 || !keeps_packs(H, s.h, kWide) || !keeps_packs(C, s.c, kWide) || !keeps_packs(N, s.n, kWide)) return 1;
  for (int k = 0; k <= plan.cols.segments; ++k) {
    if (plan.cols.bound[k] % kWide != 0) return 1;
  }
  return kWide;
}

// f(width, layout) with the pass's pack width and layout as std::integral_constant tags.
template <typename T, typename F>
void with_width_and_layout(int vec, bool channels_last, const F& f) {
  constexpr int kWide = 16 / sizeof(T);
  using Wide = std::integral_constant<int, kWide>;
  using One = std::integral_constant<int, 1>;
  if (channels_last) {
    vec == kWide ? f(Wide{}, std::true_type{}) : f(One{}, std::true_type{});
  } else {
    vec == kWide ? f(Wide{}, std::false_type{}) : f(One{}, std::false_type{});
  }
}

// Blocks of kThreads for one thread per item (the kernels check the last block's overhang).
unsigned blocks_covering(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

// Threads of a block that loops over `items`: one per item, in whole warps, at most kThreads.
unsigned warps_covering(int items) {
  return static_cast<unsigned>(items >= kThreads ? kThreads : (items + 31) / 32 * 32);
}

// ---------------------------------------------------------------- upsample_concat

// Forward: a thread owns a run of outputs sharing one source row stencil, NHWC (n, output row p, a
// run of kRunColumns columns, a pack of channels: 4 16-byte source packs blended per pixel into one
// 16-byte store, coalesced across the channel packs) or NCHW ((n, c) plane, row p, a pack of
// columns: the tiny source plane read from L1/L2, one 16-byte store). Floor: the write of the
// branch's channels of the output (4.8 TB/s; the source is a few cells per channel). 32-bit index
// splits once per thread (the host checks the thread count).
constexpr int kRunColumns = 16;

template <typename T, int kVec, bool kChannelsLast>
__global__ void upsample_branch_kernel(const T* __restrict__ z, Strides zs, unsigned Cb, int h, int w,
                                       T* __restrict__ out, Strides s, int64_t channel_offset, int H, int W,
                                       bool align_corners, unsigned threads) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const float scale_h = pyramid::linear_scale<float>(h, H, align_corners);
  const float scale_w = pyramid::linear_scale<float>(w, W, align_corners);
  unsigned n, c, p, q0;
  int run;
  if (kChannelsLast) {  // t = ((n·H + p)·runs + run)·packs + pack
    const unsigned packs = Cb / kVec, runs = (static_cast<unsigned>(W) + kRunColumns - 1) / kRunColumns;
    c = (t % packs) * kVec;
    unsigned rest = t / packs;
    q0 = (rest % runs) * kRunColumns;
    rest /= runs;
    p = rest % H;
    n = rest / H;
    run = min(kRunColumns, W - static_cast<int>(q0));
  } else {  // t = ((n·Cb + c)·H + p)·(W / kVec) + column pack
    const unsigned columns = W / kVec;
    q0 = (t % columns) * kVec;
    unsigned rest = t / columns;
    p = rest % H;
    rest /= H;
    c = rest % Cb;
    n = rest / Cb;
    run = kVec;
  }
  const LinearTap<float> r = pyramid::linear_tap<float>(p, h, scale_h, align_corners);
  const T* top = z + n * zs.n + c * zs.c + r.index0 * zs.h;
  const T* bottom = z + n * zs.n + c * zs.c + r.index1 * zs.h;
  T* o = out + n * s.n + (channel_offset + c) * s.c + static_cast<int64_t>(p) * s.h;
  if constexpr (kChannelsLast) {
    for (int k = 0; k < run; ++k) {
      const int q = static_cast<int>(q0) + k;
      const LinearTap<float> col = pyramid::linear_tap<float>(q, w, scale_w, align_corners);
      float a[kVec], b[kVec], d[kVec], e[kVec], v[kVec];
      load<T, kVec>(top + col.index0 * zs.w, a), load<T, kVec>(top + col.index1 * zs.w, b);
      load<T, kVec>(bottom + col.index0 * zs.w, d), load<T, kVec>(bottom + col.index1 * zs.w, e);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[j] = r.weight0 * (col.weight0 * a[j] + col.weight1 * b[j]) + r.weight1 * (col.weight0 * d[j] + col.weight1 * e[j]);
      }
      store<T, kVec>(o + q * s.w, v);
    }
  } else {
    float v[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const LinearTap<float> col = pyramid::linear_tap<float>(static_cast<int>(q0) + j, w, scale_w, align_corners);
      const float upper = col.weight0 * to_float(top[col.index0 * zs.w]) + col.weight1 * to_float(top[col.index1 * zs.w]);
      const float lower =
          col.weight0 * to_float(bottom[col.index0 * zs.w]) + col.weight1 * to_float(bottom[col.index1 * zs.w]);
      v[j] = r.weight0 * upper + r.weight1 * lower;
    }
    store<T, kVec>(o + q0 * s.w, v);
  }
}

// ---------------------------------------------------------------- pyramid_conv taps
//
// Forward (taps_add): out (N, C_out, H, W) += Σ_b Σ_(ky,kx) up(z_b[:, :, ky, kx])(p + (ky, kx) − k/2),
// zero outside the image. Separable, by blocks: a block owns (n, a tile of channels, a strip of
// columns, a strip of rows) and
//   (1) forms in shared memory, for every branch, ky and source row i its rows read, the kx-sum of
//       the width-resized, kx-shifted z rows over its columns: U[b][ky][i][q] = Σ_kx C(q + kx − k/2)·z[ky][kx][i]
//       (fp32), and tables every output row's height stencil per (branch, ky);
//   (2) gives each thread kTapRunRows output rows × one pack: out += Σ_(b,ky) R(p + ky − k/2)·U[b][ky],
//       the pack's two U vectors reloaded only where the stencil moves to other source rows, the
//       output read and written once in 16-byte packs.
// Packs run along channels for NHWC (z read in 16-byte channel packs: the cuda backend keeps z in
// (N, h, w, k, k, C_out) storage) and along columns for NCHW (z read an element at a time, coalesced
// across the channels). U's innermost axis is the pack axis: [outer][inner] = [column][channel]
// (NHWC) or [channel][column] (NCHW). Floor: out's read and write (the model's decoder, (16, 512,
// 48, 48) bf16: 75 MB, 16 µs at 4.8 TB/s on an H200, 22 µs at 3.35 TB/s on an H100 SXM; z adds a
// tenth). The design's arithmetic, 2k fp32 FMAs per branch and output (24 at bins 1, 2, 3, 6 and
// k = 3) plus ~5 for (1), is 550 M FMAs there: 16 µs at the 33.5 T FMA/s of either GPU, so the
// kernel is bound by both at once on an H200 (expect 60–85% of the HBM roof) and by memory on an
// H100 (expect ≥ 80%). Index splits are 32-bit, once per block or per pack; offsets into the
// tensors are 64-bit.
constexpr int kTapChannels = 16;      // channel tile of a block
constexpr int kTapColumns = 16;       // column strip of a block
constexpr int kTapRunRows = 8;        // output rows of a thread
constexpr int kTapSharedBytes = 48 * 1024;  // the default dynamic shared memory limit, no opt-in

// One branch as the kernel reads it: z's strides, the sizes, and where its U and stencils live in
// shared memory (`rows`: the most source rows any row strip reads; the host sizes U with it).
struct TapBranchPlan {
  const void* data;
  TapStrides strides;
  int k, h, w, rows;
  float scale_h, scale_w;
  int u_offset, stencil_offset;  // floats into U, entries into the stencil table
};

// One output row's height stencil for a (branch, ky): source rows relative to the strip's span, and
// their weights (rows -1 for a row the shift takes outside the image: it adds nothing).
struct RowStencil {
  int row0, row1;
  float weight0, weight1;
};

struct TapPlan {
  int count;
  TapBranchPlan branch[kMaxBranches];
  int channels, columns, strip_rows;  // a block's tile: channels, columns, rows
  int channel_tiles, column_strips, row_strips;
  int u_floats, stencils;  // shared memory: U floats (a multiple of 4), then the stencil table
  bool align_corners;
  // The pack axis of U and of the threads: channels (NHWC) or columns (NCHW).
  SLSDEEP_HD int inner(bool channels_last) const { return channels_last ? channels : columns; }
  SLSDEEP_HD int outer(bool channels_last) const { return channels_last ? columns : channels; }
  // U, the stencil table, then each branch's span of source rows (begin, end): all of the block's
  // shared memory (nothing static: the 48 KB limit counts both).
  int shared_bytes() const {
    return u_floats * 4 + stencils * static_cast<int>(sizeof(RowStencil)) + 2 * count * static_cast<int>(sizeof(int));
  }
  // One thread per (2)'s item (warps_covering).
  unsigned threads(bool channels_last, int vec) const {
    return warps_covering((strip_rows + kTapRunRows - 1) / kTapRunRows * outer(channels_last) * (inner(channels_last) / vec));
  }
};

// kVec fp32 values at p, in shared or global memory (float4 accesses when kVec is a multiple of 4: p
// is then 16-byte aligned).
template <int kVec>
__device__ __forceinline__ void load_floats(const float* p, float (&v)[kVec]) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int j = 0; j < kVec; j += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + j);
      v[j] = f.x, v[j + 1] = f.y, v[j + 2] = f.z, v[j + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = p[j];
  }
}

template <int kVec>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[kVec]) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int j = 0; j < kVec; j += 4) *reinterpret_cast<float4*>(p + j) = make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) p[j] = v[j];
  }
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void taps_add_kernel(T* __restrict__ out, Strides s, int C, int H, int W, TapPlan plan) {
  extern __shared__ float4 shared[];  // U, the stencil table, the spans: plan.shared_bytes()
  float* U = reinterpret_cast<float*>(shared);
  RowStencil* stencils = reinterpret_cast<RowStencil*>(U + plan.u_floats);
  int* span_begin = reinterpret_cast<int*>(stencils + plan.stencils);
  int* span_end = span_begin + plan.count;

  // The block's tile: column strips fastest, then row strips, channel tiles, images (32-bit, once).
  unsigned rest = blockIdx.x;
  const int q0 = static_cast<int>(rest % plan.column_strips) * plan.columns;
  rest /= plan.column_strips;
  const int p0 = static_cast<int>(rest % plan.row_strips) * plan.strip_rows;
  rest /= plan.row_strips;
  const int c0 = static_cast<int>(rest % plan.channel_tiles) * plan.channels;
  const int64_t n = rest / plan.channel_tiles;
  const int strip_rows = min(plan.strip_rows, H - p0);
  const int inner = plan.inner(kChannelsLast), outer = plan.outer(kChannelsLast), packs = inner / kVec;

  if (static_cast<int>(threadIdx.x) < plan.count) {  // each branch's source rows for this row strip
    const TapBranchPlan& br = plan.branch[threadIdx.x];
    int64_t begin, end;
    pyramid::source_span<float>(p0 - br.k / 2, p0 + strip_rows - 1 + br.k / 2, br.h, H, br.scale_h,
                                plan.align_corners, &begin, &end);
    span_begin[threadIdx.x] = static_cast<int>(begin);
    span_end[threadIdx.x] = static_cast<int>(end);
  }
  __syncthreads();

  // (1a) the height stencils of the strip's rows, per (branch, ky).
  for (int b = 0; b < plan.count; ++b) {
    const TapBranchPlan& br = plan.branch[b];
    for (int e = threadIdx.x; e < br.k * strip_rows; e += blockDim.x) {
      const int ky = e / strip_rows, row = p0 + e - ky * strip_rows + ky - br.k / 2;
      RowStencil st{-1, -1, 0.f, 0.f};
      if (row >= 0 && row < H) {
        const LinearTap<float> t = pyramid::linear_tap<float>(row, br.h, br.scale_h, plan.align_corners);
        st = {static_cast<int>(t.index0) - span_begin[b], static_cast<int>(t.index1) - span_begin[b], t.weight0, t.weight1};
      }
      stencils[br.stencil_offset + ky * plan.strip_rows + (e - ky * strip_rows)] = st;
    }
  }
  // (1b) U, a pack of kVec values per step (NHWC: channels of one column; NCHW: columns of one channel).
  for (int b = 0; b < plan.count; ++b) {
    const TapBranchPlan& br = plan.branch[b];
    const T* z = static_cast<const T*>(br.data);
    const TapStrides& zs = br.strides;
    const int rows = span_end[b] - span_begin[b], half = br.k / 2;
    for (int e = threadIdx.x; e < br.k * rows * outer * packs; e += blockDim.x) {
      // NHWC: channel packs fastest; NCHW: channels fastest (z is channels innermost: coalesced reads)
      const int pack = kChannelsLast ? e % packs : (e / outer) % packs, o = kChannelsLast ? (e / packs) % outer : e % outer;
      const int r = e / (packs * outer);  // ky·rows + source row
      const int ky = r / rows, i = span_begin[b] + (r - ky * rows);
      const int q = q0 + (kChannelsLast ? o : pack * kVec), c = c0 + (kChannelsLast ? pack * kVec : o);
      if (q >= W || c >= C) continue;
      const T* zi = z + n * zs.n + c * zs.c + ky * zs.ky + i * zs.i;
      float v[kVec] = {};
      for (int kx = 0; kx < br.k; ++kx) {
        if constexpr (kChannelsLast) {
          const int col = q + kx - half;
          if (col < 0 || col >= W) continue;
          const LinearTap<float> t = pyramid::linear_tap<float>(col, br.w, br.scale_w, plan.align_corners);
          float left[kVec], right[kVec];
          load_cached<T, kVec>(zi + kx * zs.kx + t.index0 * zs.j, left);
          load_cached<T, kVec>(zi + kx * zs.kx + t.index1 * zs.j, right);
#pragma unroll
          for (int j = 0; j < kVec; ++j) v[j] += t.weight0 * left[j] + t.weight1 * right[j];
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const int col = q + j + kx - half;
            if (col < 0 || col >= W) continue;
            const LinearTap<float> t = pyramid::linear_tap<float>(col, br.w, br.scale_w, plan.align_corners);
            v[j] += t.weight0 * to_float(__ldg(zi + kx * zs.kx + t.index0 * zs.j)) +
                    t.weight1 * to_float(__ldg(zi + kx * zs.kx + t.index1 * zs.j));
          }
        }
      }
      store_floats<kVec>(U + br.u_offset + (r * outer + o) * inner + pack * kVec, v);
    }
  }
  __syncthreads();

  // (2) kTapRunRows rows × one pack per item; items: packs fastest, then outer, then runs of rows,
  // so that a warp's items share their rows (the stencil reads are broadcasts).
  const int runs = (strip_rows + kTapRunRows - 1) / kTapRunRows;
  for (int item = threadIdx.x; item < runs * outer * packs; item += blockDim.x) {
    const int pack = item % packs, o = (item / packs) % outer, run = item / (packs * outer);
    const int q = q0 + (kChannelsLast ? o : pack * kVec), c = c0 + (kChannelsLast ? pack * kVec : o);
    if (q >= W || c >= C) continue;
    float acc[kTapRunRows][kVec] = {};
    for (int b = 0; b < plan.count; ++b) {
      const TapBranchPlan& br = plan.branch[b];
      for (int ky = 0; ky < br.k; ++ky) {
        const RowStencil* st = stencils + br.stencil_offset + ky * plan.strip_rows + run * kTapRunRows;
        const float* u = U + br.u_offset + (ky * (span_end[b] - span_begin[b]) * outer + o) * inner + pack * kVec;
        const int row_floats = outer * inner;
        int row0 = -1, row1 = -1;
        float lower[kVec], upper[kVec];
#pragma unroll
        for (int r = 0; r < kTapRunRows; ++r) {
          if (run * kTapRunRows + r >= strip_rows) break;
          const RowStencil t = st[r];
          if (t.row0 < 0) continue;
          if (t.row0 != row0) {  // the stencil moved: shift the upper row down or load anew
            if (t.row0 == row1) {
#pragma unroll
              for (int j = 0; j < kVec; ++j) lower[j] = upper[j];
            } else {
              load_floats<kVec>(u + t.row0 * row_floats, lower);
            }
            row0 = t.row0;
          }
          if (t.row1 != row1) {
            load_floats<kVec>(u + t.row1 * row_floats, upper);
            row1 = t.row1;
          }
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[r][j] += t.weight0 * lower[j] + t.weight1 * upper[j];
        }
      }
    }
    T* o_pixel = out + n * s.n + static_cast<int64_t>(c) * s.c + static_cast<int64_t>(q) * s.w;
#pragma unroll
    for (int r = 0; r < kTapRunRows; ++r) {
      const int p = p0 + run * kTapRunRows + r;
      if (p >= p0 + strip_rows) break;
      T* o_pack = o_pixel + static_cast<int64_t>(p) * s.h;
      float v[kVec];
      load<T, kVec>(o_pack, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] += acc[r][j];
      store<T, kVec>(o_pack, v);
    }
  }
}

// The pack width of taps_add: 16 bytes where out's pack axis (channels for NHWC, columns for NCHW),
// its other strides and pointer allow it, and for NHWC every z is channels-innermost as well.
template <typename T>
int taps_vector_width(const void* out, const Strides& s, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                      const TapTensor* taps, int count) {
  constexpr int kWide = 16 / sizeof(T);
  auto fits = [](int64_t size, int64_t stride) { return keeps_packs(size, stride, kWide); };
  if (!packed(out)) return 1;
  if (!channels_last) {
    return s.w == 1 && W % kWide == 0 && fits(H, s.h) && fits(C, s.c) && fits(N, s.n) ? kWide : 1;
  }
  if (s.c != 1 || C % kWide != 0 || !fits(W, s.w) || !fits(H, s.h) || !fits(N, s.n)) return 1;
  for (int b = 0; b < count; ++b) {
    const TapTensor& z = taps[b];
    const TapStrides& zs = z.strides;
    if (!packed(z.data) || zs.c != 1 || !fits(N, zs.n) || !fits(z.k, zs.ky) || !fits(z.k, zs.kx) || !fits(z.h, zs.i) ||
        !fits(z.w, zs.j)) {
      return 1;
    }
  }
  return kWide;
}

// The most source rows of a branch (sizes h, k) that a strip of `strip_rows` output rows reads.
int strip_source_rows(int64_t h, int64_t k, int64_t H, int64_t strip_rows, float scale, bool align_corners) {
  int64_t most = 0;
  for (int64_t p0 = 0; p0 < H; p0 += strip_rows) {
    int64_t begin, end;
    const int64_t last = (p0 + strip_rows < H ? p0 + strip_rows : H) - 1;
    pyramid::source_span<float>(p0 - k / 2, last + k / 2, h, H, scale, align_corners, &begin, &end);
    most = end - begin > most ? end - begin : most;
  }
  return static_cast<int>(most);
}

// taps_add's tile and the branches' shared-memory layout. The tile starts at kTapChannels ×
// kTapColumns × all rows and shrinks until it fits kTapSharedBytes: first the row strip (down to
// kTapRunRows), then the tile's other axis, then its pack axis (down to one pack), then the strip to
// one row; false when even that does not fit (branches of thousands of source rows per output row).
bool make_taps_plan(const TapTensor* taps, int count, int64_t C, int64_t H, int64_t W, bool channels_last, int vec,
                    bool align_corners, TapPlan* plan) {
  TapPlan p{};
  p.count = count;
  p.align_corners = align_corners;
  p.channels = kTapChannels;
  p.columns = kTapColumns;
  p.strip_rows = static_cast<int>(H);
  for (int b = 0; b < count; ++b) {
    const TapTensor& z = taps[b];
    if (z.k < 1 || z.k > INT_MAX || z.h < 1 || z.h > INT_MAX || z.w < 1 || z.w > INT_MAX) return false;
    p.branch[b] = {z.data, z.strides, static_cast<int>(z.k), static_cast<int>(z.h), static_cast<int>(z.w), 0,
                   pyramid::linear_scale<float>(z.h, H, align_corners), pyramid::linear_scale<float>(z.w, W, align_corners),
                   0, 0};
  }
  const int64_t span_bytes = 2 * count * static_cast<int64_t>(sizeof(int));
  for (;;) {
    int64_t u = 0, stencils = 0;
    for (int b = 0; b < count; ++b) stencils += p.branch[b].k * static_cast<int64_t>(p.strip_rows);
    bool fits = stencils * static_cast<int64_t>(sizeof(RowStencil)) + span_bytes <= kTapSharedBytes;
    for (int b = 0, offset = 0; fits && b < count; ++b) {  // the spans only where the table fits (H may be huge)
      TapBranchPlan& br = p.branch[b];
      br.rows = strip_source_rows(br.h, br.k, H, p.strip_rows, br.scale_h, align_corners);
      br.u_offset = static_cast<int>(u);
      br.stencil_offset = offset;
      offset += br.k * p.strip_rows;
      u += static_cast<int64_t>(br.k) * br.rows * p.channels * p.columns;
      fits = u * 4 <= kTapSharedBytes;  // (also: no int overflow below)
    }
    const int64_t bytes = (u + 3) / 4 * 4 * 4 + stencils * static_cast<int64_t>(sizeof(RowStencil)) + span_bytes;
    if (fits && bytes <= kTapSharedBytes) {
      p.u_floats = static_cast<int>((u + 3) / 4 * 4);
      p.stencils = static_cast<int>(stencils);
      break;
    }
    int& outer = channels_last ? p.columns : p.channels;
    int& inner = channels_last ? p.channels : p.columns;
    if (p.strip_rows > kTapRunRows) {
      p.strip_rows = (p.strip_rows + 1) / 2;
    } else if (outer > 1) {
      outer /= 2;
    } else if (inner > vec) {
      inner /= 2;
    } else if (p.strip_rows > 1) {
      p.strip_rows = (p.strip_rows + 1) / 2;
    } else {
      return false;
    }
  }
  p.channel_tiles = static_cast<int>((C + p.channels - 1) / p.channels);
  p.column_strips = static_cast<int>((W + p.columns - 1) / p.columns);
  p.row_strips = static_cast<int>((H + p.strip_rows - 1) / p.strip_rows);
  *plan = p;
  return true;
}

// Backward (taps_backward; its k = 1 case with a channel offset is the upsample_concat backward): the
// adjoint of taps_add, grad_z_b[ky][kx][a][j] = Σ_p Σ_q R(p + ky − k/2)[a]·C(q + kx − k/2)[j]·grad[p][q],
// as two reductions. A block owns (n, a tile of channels, a strip of columns, every row):
//   (1) rows: dU_b[ky][a][q] = Σ_p R(p + ky − k/2)[a]·grad[p][q] in shared memory; a thread owns
//       kAdjointPairs (branch, ky) pairs × one column × one 16-byte pack of grad and walks every row,
//       reading each grad pack once per pair group (HBM once, L1 after) and summing into the two
//       source rows its stencil covers (AdjointWalk), each row stored once the stencil has passed it;
//   (2) columns: grad_z_b[ky][kx][a][j] = Σ_q C(q + kx − k/2)[j]·dU_b[ky][a][q]: a thread owns (branch,
//       ky, kx, a, a lane: a pack of channels for NHWC, a channel for NCHW) and walks the strip's
//       columns the same way, storing each j into grad_z once: directly where a lane's channels are
//       a 16-byte pack of grad_z (NHWC, channels innermost), else into a shared-memory stage that the
//       block then writes in 16-byte packs (the upsample's NCHW grad_z, the block's channels one run
//       of it; NCHW grad with channels-innermost taps, a pack of channels an entry).
// Where one strip holds every column (the model's shapes) (2) writes grad_z itself; otherwise every
// strip writes its fp32 sums to a workspace and a second kernel adds the strips in order. No atomics:
// deterministic. Floor: the read of grad (the model's decoder, (16, 512, 48, 48) bf16: 38 MB, 8 µs at
// 4.8 TB/s on an H200, 11 µs at 3.35 TB/s on an H100 SXM; grad_z is a fifth of that). The arithmetic
// is the forward's, 2k FMAs per branch and grad element (450 M FMAs there: 13.5 µs at 33.5 T FMA/s),
// plus one stencil per (row, pair) shared by a pack: compute-bound, at best ~60% of the HBM roof on
// an H200 and ~80% on an H100.
constexpr int kAdjointPairs = 4;     // (branch, ky) pairs a thread of (1) sums at once
constexpr int kAdjointRowBatch = 4;  // grad rows a thread of (1) loads at once

// The adjoint of one resized axis, walked along the output: each step adds w0·v at its stencil's
// index0 and w1·v at index1 (index0 or index0 + 1); the stencil never moves back, so an input index
// is complete once the stencil has passed it. store(i, sum) is called once for every i in [0, size),
// in order, zero for those no step reaches.
template <int kVec>
struct AdjointWalk {
  int index = 0;  // `low` sums input index `index`, `high` index + 1
  float low[kVec] = {}, high[kVec] = {};

  template <typename Store>
  __device__ __forceinline__ void advance(int to, const Store& store) {
    for (; index < to; ++index) {
      store(index, low);
#pragma unroll
      for (int j = 0; j < kVec; ++j) low[j] = high[j], high[j] = 0.f;
    }
  }
  template <typename Store>
  __device__ __forceinline__ void add(const LinearTap<float>& t, const float (&v)[kVec], const Store& store) {
    advance(static_cast<int>(t.index0), store);
    const bool same = t.index1 == t.index0;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      low[j] += t.weight0 * v[j] + (same ? t.weight1 * v[j] : 0.f);
      high[j] += same ? 0.f : t.weight1 * v[j];
    }
  }
  template <typename Store>
  __device__ __forceinline__ void finish(int size, const Store& store) {
    advance(size, store);
  }
};

// How (2) writes a branch's grad_z: lanes' channel packs straight to it; or through the stage, as one
// run per block (grad_z's channels and entries dense, NCHW-contiguous) or as packs of channels per
// entry (channels innermost).
enum AdjointStore : int { kStoreDirect, kStoreStagedRun, kStoreStagedChannels };

// One branch's gradient as the kernels write it: grad_z's strides and sizes, its pairs' first index,
// where its dU and its stage live in shared memory and its entries in one (strip, image)'s workspace row.
struct AdjointBranch {
  void* data;
  TapStrides strides;
  int k, h, w;
  float scale_h, scale_w;
  bool packed;  // NHWC: a lane's channels are a 16-byte pack of grad_z (channels innermost, aligned)
  int pair_offset, du_offset, item_offset;  // first (branch, ky) pair, dU float, item of (2)
  int64_t entry_offset;                     // Σ of the earlier branches' k²·h·w
  AdjointStore store;
  int stage_offset;  // float of its stage, (tile channel, entry), entries fastest
  SLSDEEP_HD int entries() const { return k * k * h * w; }
};

struct AdjointPlan {
  int count, pairs;
  AdjointBranch branch[kMaxBranches];
  int channels, columns;  // a block's tile: channels × a strip of columns, every row
  int channel_tiles, column_strips;
  int du_floats, column_items;
  int stage_floats;  // after dU, from a 16-byte aligned float: the staged branches' tiles
  int64_t entries;   // Σ k²·h·w: grad_z values per (image, channel)
  int64_t channel_offset;
  bool align_corners;
  SLSDEEP_HD int inner(bool channels_last) const { return channels_last ? channels : columns; }
  SLSDEEP_HD int outer(bool channels_last) const { return channels_last ? columns : channels; }
  // dU's strides in floats, per outer index and per source row: padded by 4 floats along the axis
  // that neighbouring threads of (2) step over (rows for NHWC, channels for NCHW), so that their
  // float4 reads fall in different banks.
  SLSDEEP_HD int outer_stride(bool channels_last) const { return inner(channels_last) + (channels_last ? 0 : 4); }
  SLSDEEP_HD int row_stride(bool channels_last) const {
    return outer(channels_last) * outer_stride(channels_last) + (channels_last ? 4 : 0);
  }
  SLSDEEP_HD int stage_start() const { return (du_floats + 3) / 4 * 4; }
  int shared_bytes() const { return (stage_start() + stage_floats) * 4; }
  // One thread per item of the larger of (1) and (2) (warps_covering).
  unsigned threads(bool channels_last, int vec) const {
    const int groups = (pairs + kAdjointPairs - 1) / kAdjointPairs;
    const int items1 = groups * outer(channels_last) * (inner(channels_last) / vec);
    return warps_covering(items1 > column_items ? items1 : column_items);
  }
  int64_t workspace_floats(int64_t N, int64_t C) const { return column_strips > 1 ? column_strips * N * entries * C : 0; }
};

// The branch of (branch, ky) pair `pair` (pairs are numbered branch by branch).
__device__ __forceinline__ int branch_of_pair(const AdjointPlan& plan, int pair) {
  int b = 0;
  while (b + 1 < plan.count && pair >= plan.branch[b + 1].pair_offset) ++b;
  return b;
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void taps_backward_kernel(const T* __restrict__ grad, Strides s, int64_t N, int C, int H, int W,
                                     AdjointPlan plan, float* __restrict__ workspace) {
  extern __shared__ float4 shared[];
  float* dU = reinterpret_cast<float*>(shared);
  unsigned rest = blockIdx.x;  // column strips fastest, then channel tiles, images (32-bit, once)
  const int strip = static_cast<int>(rest % plan.column_strips);
  rest /= plan.column_strips;
  const int c0 = static_cast<int>(rest % plan.channel_tiles) * plan.channels;
  const int64_t n = rest / plan.channel_tiles;
  const int q0 = strip * plan.columns, strip_columns = min(plan.columns, W - q0);
  const int inner = plan.inner(kChannelsLast), outer = plan.outer(kChannelsLast), packs = inner / kVec;
  const int outer_floats = plan.outer_stride(kChannelsLast), row_floats = plan.row_stride(kChannelsLast);

  // (1) rows, kAdjointPairs pairs at a time.
  const int groups = (plan.pairs + kAdjointPairs - 1) / kAdjointPairs;
  for (int item = threadIdx.x; item < groups * outer * packs; item += blockDim.x) {
    const int pack = item % packs, o = (item / packs) % outer, group = item / (packs * outer);
    const int q = q0 + (kChannelsLast ? o : pack * kVec), c = c0 + (kChannelsLast ? pack * kVec : o);
    if (q >= q0 + strip_columns || c >= C) continue;
    const T* g = grad + n * s.n + (plan.channel_offset + c) * s.c + static_cast<int64_t>(q) * s.w;
    AdjointWalk<kVec> walks[kAdjointPairs];
    int pair_branch[kAdjointPairs], pair_shift[kAdjointPairs];
    float* pair_du[kAdjointPairs];
#pragma unroll
    for (int slot = 0; slot < kAdjointPairs; ++slot) {
      const int pair = min(group * kAdjointPairs + slot, plan.pairs - 1);  // a repeated last pair stores nothing
      const int b = branch_of_pair(plan, pair), ky = pair - plan.branch[b].pair_offset;
      pair_branch[slot] = group * kAdjointPairs + slot < plan.pairs ? b : -1;
      pair_shift[slot] = ky - plan.branch[b].k / 2;
      pair_du[slot] = dU + plan.branch[b].du_offset + ky * plan.branch[b].h * row_floats + o * outer_floats + pack * kVec;
    }
    for (int p0 = 0; p0 < H; p0 += kAdjointRowBatch) {  // a batch of loads in flight, then their sums
      float v[kAdjointRowBatch][kVec];
#pragma unroll
      for (int r = 0; r < kAdjointRowBatch; ++r) {
        if (p0 + r < H) load_cached<T, kVec>(g + static_cast<int64_t>(p0 + r) * s.h, v[r]);
      }
#pragma unroll
      for (int r = 0; r < kAdjointRowBatch; ++r) {
        if (p0 + r >= H) break;
#pragma unroll
        for (int slot = 0; slot < kAdjointPairs; ++slot) {
          if (pair_branch[slot] < 0) continue;
          const AdjointBranch& br = plan.branch[pair_branch[slot]];
          const int row = p0 + r + pair_shift[slot];
          if (row < 0 || row >= H) continue;
          float* du = pair_du[slot];
          walks[slot].add(pyramid::linear_tap<float>(row, br.h, br.scale_h, plan.align_corners), v[r],
                          [&](int a, const float (&sum)[kVec]) { store_floats<kVec>(du + a * row_floats, sum); });
        }
      }
    }
#pragma unroll
    for (int slot = 0; slot < kAdjointPairs; ++slot) {
      if (pair_branch[slot] < 0) continue;
      float* du = pair_du[slot];
      walks[slot].finish(plan.branch[pair_branch[slot]].h,
                         [&](int a, const float (&sum)[kVec]) { store_floats<kVec>(du + a * row_floats, sum); });
    }
  }
  __syncthreads();

  // (2) columns: a lane is a pack of channels (NHWC) or one channel (NCHW).
  constexpr int kLane = kChannelsLast ? kVec : 1;
  const int lanes = kChannelsLast ? packs : outer;
  for (int item = threadIdx.x; item < plan.column_items; item += blockDim.x) {
    int b = 0;
    while (b + 1 < plan.count && item >= plan.branch[b + 1].item_offset) ++b;
    const AdjointBranch& br = plan.branch[b];
    const int local = item - br.item_offset;
    const int lane = local % lanes, a = (local / lanes) % br.h, tap = local / (lanes * br.h);
    const int ky = tap / br.k, kx = tap - ky * br.k;
    const int c = c0 + (kChannelsLast ? lane * kVec : lane);
    if (c >= C) continue;
    const float* du = dU + br.du_offset + (ky * br.h + a) * row_floats + (kChannelsLast ? lane * kVec : lane * outer_floats);
    T* gz = static_cast<T*>(br.data) + n * br.strides.n + static_cast<int64_t>(c) * br.strides.c + ky * br.strides.ky +
            kx * br.strides.kx + a * br.strides.i;
    float* ws = workspace == nullptr ? nullptr
                                     : workspace + ((strip * N + n) * plan.entries + br.entry_offset +
                                                    (static_cast<int64_t>(tap) * br.h + a) * br.w) * C + c;
    float* stage = br.store == kStoreDirect ? nullptr  // a staged tile fits shared memory: int offsets
                                            : dU + plan.stage_start() + br.stage_offset +
                                                  (kChannelsLast ? lane * kVec : lane) * br.entries() + (tap * br.h + a) * br.w;
    auto store_j = [&](int j, const float (&sum)[kLane]) {
      if (ws != nullptr) {
        store_floats<kLane>(ws + static_cast<int64_t>(j) * C, sum);  // fp32, channels innermost
      } else if (br.store != kStoreDirect) {
#pragma unroll
        for (int t = 0; t < kLane; ++t) stage[t * br.entries() + j] = sum[t];
      } else if (kLane > 1 && br.packed) {
        store<T, kLane>(gz + j * br.strides.j, sum);
      } else {
#pragma unroll
        for (int t = 0; t < kLane; ++t) gz[j * br.strides.j + t * br.strides.c] = from_float<T>(sum[t]);
      }
    };
    AdjointWalk<kLane> walk;
    for (int q = q0; q < q0 + strip_columns; ++q) {
      const int col = q + kx - br.k / 2;
      if (col < 0 || col >= W) continue;
      float v[kLane];
      load_floats<kLane>(du + (kChannelsLast ? (q - q0) * outer_floats : q - q0), v);
      walk.add(pyramid::linear_tap<float>(col, br.w, br.scale_w, plan.align_corners), v, store_j);
    }
    walk.finish(br.w, store_j);
  }
  if (plan.stage_floats == 0) return;
  __syncthreads();

  // The staged branches' tiles, in 16-byte packs of grad_z.
  constexpr int kWide = 16 / sizeof(T);
  const int tile = min(plan.channels, C - c0);
  for (int b = 0; b < plan.count; ++b) {
    const AdjointBranch& br = plan.branch[b];
    if (br.store == kStoreDirect) continue;
    const int entries = br.entries();
    const float* stage = dU + plan.stage_start() + br.stage_offset;
    T* gz = static_cast<T*>(br.data) + n * br.strides.n + static_cast<int64_t>(c0) * br.strides.c;
    if (br.store == kStoreStagedRun) {  // the tile is grad_z's run [c0·entries, (c0 + tile)·entries)
      const int count = tile * entries;
      for (int i = threadIdx.x * kWide; i < count; i += blockDim.x * kWide) {
        if (i + kWide <= count) {
          float v[kWide];
          load_floats<kWide>(stage + i, v);
          store<T, kWide>(gz + i, v);
        } else {
          for (int e = i; e < count; ++e) gz[e] = from_float<T>(stage[e]);
        }
      }
    } else {  // channels innermost: an entry's channels c0 + [pack·kWide, (pack + 1)·kWide)
      const int packs = tile / kWide;
      for (int item = threadIdx.x; item < packs * entries; item += blockDim.x) {
        const int pack = item % packs, e = item / packs;
        const int j = e % br.w, a = (e / br.w) % br.h, tap = e / (br.w * br.h), ky = tap / br.k, kx = tap - ky * br.k;
        float v[kWide];
#pragma unroll
        for (int t = 0; t < kWide; ++t) v[t] = stage[(pack * kWide + t) * entries + e];
        store<T, kWide>(gz + pack * kWide + ky * br.strides.ky + kx * br.strides.kx + a * br.strides.i + j * br.strides.j, v);
      }
    }
  }
}

// grad_z from the strips' fp32 sums in the workspace, added in strip order: a thread per (n, entry,
// channel), channels fastest (the workspace's order and, for channels-innermost grad_z, its storage's);
// blockIdx.y is n, the rest 32-bit (the host checks entries·C).
template <typename T>
__global__ void taps_backward_strips_kernel(const float* __restrict__ workspace, int64_t N, int C, AdjointPlan plan) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= plan.entries * C) return;
  const int64_t n = blockIdx.y;
  const int c = static_cast<int>(t % C), entry = static_cast<int>(t / C);
  int b = 0;
  while (b + 1 < plan.count && entry >= plan.branch[b + 1].entry_offset) ++b;
  const AdjointBranch& br = plan.branch[b];
  const int local = entry - static_cast<int>(br.entry_offset);
  const int j = local % br.w, a = (local / br.w) % br.h, tap = local / (br.w * br.h);
  const int ky = tap / br.k, kx = tap - ky * br.k;
  float sum = 0.f;
  for (int strip = 0; strip < plan.column_strips; ++strip) sum += workspace[((strip * N + n) * plan.entries + entry) * C + c];
  static_cast<T*>(br.data)[n * br.strides.n + static_cast<int64_t>(c) * br.strides.c + ky * br.strides.ky + kx * br.strides.kx +
                           a * br.strides.i + j * br.strides.j] = from_float<T>(sum);
}

// taps_backward's pack width: 16 bytes where grad's pack axis (channels for NHWC, columns for NCHW),
// its other strides, pointer and channel offset allow it.
template <typename T>
int adjoint_vector_width(const void* grad, const Strides& s, bool channels_last, int64_t channel_offset, int64_t N,
                         int64_t C, int64_t H, int64_t W) {
  constexpr int kWide = 16 / sizeof(T);
  auto fits = [](int64_t size, int64_t stride) { return keeps_packs(size, stride, kWide); };
  if (!packed(grad) || !fits(N, s.n) || !fits(H, s.h)) return 1;
  if (channels_last) return s.c == 1 && C % kWide == 0 && channel_offset % kWide == 0 && fits(W, s.w) ? kWide : 1;
  return s.w == 1 && W % kWide == 0 && (channel_offset * s.c) % kWide == 0 && fits(C, s.c) ? kWide : 1;
}

// The most dynamic shared memory a block of this device may have (opt-in beyond 48 KB).
int shared_memory_limit() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return kTapSharedBytes;
  }
  return bytes;
}

// How (2) writes a branch's grad_z (16-byte packs of `wide` elements): directly where its lanes'
// channels are packs; else staged where grad_z's layout makes the block's tile a run (NCHW-contiguous)
// or packs of channels (channels innermost), aligned, and the stage fits beside dU in `limit` floats.
void stage_adjoint_branch(AdjointPlan& p, int64_t N, int64_t C, int wide, int64_t limit, AdjointBranch& br) {
  br.store = kStoreDirect;
  if (br.packed || !packed(br.data) || !keeps_packs(N, br.strides.n, wide)) return;
  const TapStrides& zs = br.strides;
  const int64_t hw = static_cast<int64_t>(br.h) * br.w, entries = br.entries();
  auto is = [](int64_t size, int64_t stride, int64_t dense) { return size == 1 || stride == dense; };
  const bool run = is(br.w, zs.j, 1) && is(br.h, zs.i, br.w) && is(br.k, zs.kx, hw) && is(br.k, zs.ky, br.k * hw) &&
                   is(C, zs.c, entries) && (p.channels * entries) % wide == 0;
  const bool channels = zs.c == 1 && C % wide == 0 && p.channels % wide == 0 && keeps_packs(br.k, zs.ky, wide) &&
                        keeps_packs(br.k, zs.kx, wide) && keeps_packs(br.h, zs.i, wide) && keeps_packs(br.w, zs.j, wide);
  const int64_t floats = p.channels * entries;
  if (!(run || channels) || p.stage_start() + p.stage_floats + floats > limit) return;
  br.store = run ? kStoreStagedRun : kStoreStagedChannels;
  br.stage_offset = p.stage_floats;
  p.stage_floats += static_cast<int>((floats + 3) / 4 * 4);  // the next stage 16-byte aligned too
}

// taps_backward's tile: one pack of channels (NHWC) or 8 channels (NCHW) × every column where dU fits
// the device's shared memory; else fewer channels (NCHW), then the widest strip of columns that fits
// (whose sums then go through the workspace); false when not even one pack of columns fits. Then the
// stages of the branches (2) does not write directly (`wide`: grad_z's elements a 16-byte pack).
// `limit`: the floats of shared memory a block may take (shared_memory_limit() / 4).
bool make_adjoint_plan(const TapGradient* grads, int count, int64_t channel_offset, int64_t N, int64_t C, int64_t H,
                       int64_t W, bool channels_last, int vec, int wide, bool align_corners, int64_t limit,
                       AdjointPlan* plan) {
  if (count < 1 || count > kMaxBranches || C > INT_MAX || H > INT_MAX || W > INT_MAX) return false;
  AdjointPlan p{};
  p.count = count;
  p.align_corners = align_corners;
  p.channel_offset = channel_offset;
  p.channels = channels_last && vec > 1 ? vec : 8;  // NHWC: one 16-byte pack, or 8 single lanes
  p.columns = static_cast<int>(W);  // NCHW: a multiple of vec (adjoint_vector_width)
  int64_t pairs = 0, entries = 0, rows = 0;
  int row_offset[kMaxBranches];
  for (int b = 0; b < count; ++b) {
    const TapGradient& z = grads[b];
    if (z.k < 1 || z.k > INT_MAX || z.h < 1 || z.h > INT_MAX || z.w < 1 || z.w > INT_MAX) return false;
    const TapStrides& zs = z.strides;
    const bool packs = channels_last && vec > 1 && packed(z.data) && zs.c == 1 && keeps_packs(N, zs.n, vec) &&
                       keeps_packs(z.k, zs.ky, vec) && keeps_packs(z.k, zs.kx, vec) && keeps_packs(z.h, zs.i, vec) &&
                       keeps_packs(z.w, zs.j, vec);
    p.branch[b] = {z.data, zs, static_cast<int>(z.k), static_cast<int>(z.h), static_cast<int>(z.w),
                   pyramid::linear_scale<float>(z.h, H, align_corners), pyramid::linear_scale<float>(z.w, W, align_corners),
                   packs, static_cast<int>(pairs), 0, 0, entries};
    row_offset[b] = static_cast<int>(rows);
    pairs += z.k;
    entries += z.k * z.k * z.h * z.w;
    rows += z.k * z.h;
    if (pairs > INT_MAX || rows > INT_MAX || entries > INT_MAX) return false;
  }
  const int unit = channels_last ? 1 : vec;  // the strip stays a whole number of packs
  while (rows * p.row_stride(channels_last) > limit) {
    if (p.channels > (channels_last ? vec : 1)) {
      p.channels /= 2;
    } else if (p.columns > unit) {
      p.columns = (p.columns / unit + 1) / 2 * unit;
    } else {
      return false;
    }
  }
  p.pairs = static_cast<int>(pairs);
  p.entries = entries;
  p.du_floats = static_cast<int>(rows * p.row_stride(channels_last));
  p.channel_tiles = static_cast<int>((C + p.channels - 1) / p.channels);
  p.column_strips = static_cast<int>((W + p.columns - 1) / p.columns);
  const int lanes = channels_last ? p.channels / vec : p.channels;
  for (int b = 0; b < count; ++b) {
    AdjointBranch& br = p.branch[b];
    br.du_offset = row_offset[b] * p.row_stride(channels_last);
    br.item_offset = p.column_items;
    p.column_items += br.k * br.k * br.h * lanes;
  }
  if (p.column_strips == 1) {
    for (int b = 0; b < count; ++b) stage_adjoint_branch(p, N, C, wide, limit, p.branch[b]);
  }
  if (p.column_strips > 1 && entries * C > UINT_MAX) return false;
  *plan = p;
  return true;
}

// Whether the grid fits: blocks in 32 bits, and the images in blockIdx.y of the strips' second pass.
bool launchable(const AdjointPlan& plan, int64_t N) {
  return N * plan.channel_tiles * plan.column_strips <= INT_MAX && (plan.column_strips == 1 || N <= 65535);
}

}  // namespace

int64_t pool_workspace_floats(int64_t N, int64_t C, int64_t H, int64_t W, const int64_t* bins, int num_bins) {
  PoolPlan plan;
  if (!make_pool_plan(bins, num_bins, H, W, &plan)) return -1;
  return N * C * plan.pairs();
}

cudaError_t pool_forward(DType dtype, const void* x, Strides x_strides, bool channels_last, int64_t N, int64_t C,
                         int64_t H, int64_t W, const int64_t* bins, int num_bins, float* workspace, void* out,
                         cudaStream_t stream) {
  PoolPlan plan;
  if (!make_pool_plan(bins, num_bins, H, W, &plan)) return cudaErrorInvalidValue;
  const int64_t values = N * C * plan.pairs(), cells = N * C * plan.cells;
  if (cells == 0) return cudaSuccess;
  if (values > UINT_MAX || cells > UINT_MAX) return cudaErrorInvalidValue;
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    const int vec = pool_vector_width<scalar_t>(x, x_strides, channels_last, N, C, H, W, plan);
    with_width_and_layout<scalar_t>(vec, channels_last, [&](auto width, auto layout) {
      constexpr int kVec = decltype(width)::value;
      constexpr bool kChannelsLast = decltype(layout)::value;
      const int64_t packs = kChannelsLast ? C / kVec : 1, threads = values / (kChannelsLast ? kVec : 1);
      pool_segment_sums_kernel<scalar_t, kVec, kChannelsLast><<<blocks_covering(threads), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(x), x_strides, static_cast<unsigned>(C), static_cast<unsigned>(packs), plan,
          workspace, static_cast<unsigned>(threads));
    });
    pool_cells_kernel<scalar_t><<<blocks_covering(cells), kThreads, 0, stream>>>(
        workspace, channels_last, static_cast<unsigned>(C), plan, static_cast<scalar_t*>(out), static_cast<unsigned>(cells));
  })
  return cudaGetLastError();
}

cudaError_t pool_backward(DType dtype, const void* grad, const int64_t* bins, int num_bins, float* workspace,
                          void* grad_x, Strides out_strides, bool channels_last, int64_t N, int64_t C, int64_t H,
                          int64_t W, cudaStream_t stream) {
  PoolPlan plan;
  if (!make_pool_plan(bins, num_bins, H, W, &plan)) return cudaErrorInvalidValue;
  const int64_t values = N * C * plan.pairs();
  if (values == 0) return cudaSuccess;
  if (values > UINT_MAX) return cudaErrorInvalidValue;
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    pool_segment_grads_kernel<scalar_t><<<blocks_covering(values), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), channels_last, static_cast<unsigned>(C), plan, workspace,
        static_cast<unsigned>(values));
    const int vec = pool_vector_width<scalar_t>(grad_x, out_strides, channels_last, N, C, H, W, plan);
    with_width_and_layout<scalar_t>(vec, channels_last, [&](auto width, auto layout) {
      constexpr int kVec = decltype(width)::value;
      constexpr bool kChannelsLast = decltype(layout)::value;
      const int64_t packs = kChannelsLast ? C / kVec : 1, threads = values / (kChannelsLast ? kVec : 1);
      pool_fill_kernel<scalar_t, kVec, kChannelsLast><<<blocks_covering(threads), kThreads, 0, stream>>>(
          workspace, out_strides, static_cast<unsigned>(C), static_cast<unsigned>(packs), plan,
          static_cast<scalar_t*>(grad_x), static_cast<unsigned>(threads));
    });
  })
  return cudaGetLastError();
}

cudaError_t upsample_branch(DType dtype, const void* z, Strides z_strides, int64_t N, int64_t Cb, int64_t h, int64_t w,
                            void* out, Strides out_strides, bool channels_last, int64_t channel_offset, int64_t H,
                            int64_t W, bool align_corners, cudaStream_t stream) {
  const int64_t total = N * Cb * H * W;
  if (total == 0) return cudaSuccess;
  if (total > UINT_MAX || H > INT_MAX || W > INT_MAX || h > INT_MAX || w > INT_MAX) return cudaErrorInvalidValue;
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    constexpr int kWide = 16 / sizeof(scalar_t);
    auto fits = [](int64_t size, int64_t stride) { return keeps_packs(size, stride, kWide); };
    const Strides& s = out_strides;
    const Strides& zs = z_strides;
    const bool wide =
        channels_last ? packed(z) && packed(out) && zs.c == 1 && s.c == 1 && Cb % kWide == 0 &&
                            channel_offset % kWide == 0 && fits(w, zs.w) && fits(h, zs.h) && fits(N, zs.n) &&
                            fits(W, s.w) && fits(H, s.h) && fits(N, s.n)
                      : packed(out) && s.w == 1 && W % kWide == 0 && fits(H, s.h) && fits(N, s.n) && s.c % kWide == 0;
    with_width_and_layout<scalar_t>(wide ? kWide : 1, channels_last, [&](auto width, auto layout) {
      constexpr int kVec = decltype(width)::value;
      constexpr bool kChannelsLast = decltype(layout)::value;
      const int64_t threads = kChannelsLast ? N * H * ((W + kRunColumns - 1) / kRunColumns) * (Cb / kVec) : total / kVec;
      upsample_branch_kernel<scalar_t, kVec, kChannelsLast><<<blocks_covering(threads), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(z), z_strides, static_cast<unsigned>(Cb), static_cast<int>(h), static_cast<int>(w),
          static_cast<scalar_t*>(out), out_strides, channel_offset, static_cast<int>(H), static_cast<int>(W),
          align_corners, static_cast<unsigned>(threads));
    });
  })
  return cudaGetLastError();
}

cudaError_t taps_add(DType dtype, void* out, Strides out_strides, bool channels_last, int64_t N, int64_t C_out, int64_t H,
                     int64_t W, const TapTensor* taps, int num_taps, bool align_corners, cudaStream_t stream) {
  if (N * C_out * H * W == 0 || num_taps == 0) return cudaSuccess;
  if (num_taps > kMaxBranches || C_out > INT_MAX || H > INT_MAX || W > INT_MAX) return cudaErrorInvalidValue;
  cudaError_t status = cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    const int vec = taps_vector_width<scalar_t>(out, out_strides, channels_last, N, C_out, H, W, taps, num_taps);
    with_width_and_layout<scalar_t>(vec, channels_last, [&](auto width, auto layout) {
      constexpr int kVec = decltype(width)::value;
      constexpr bool kChannelsLast = decltype(layout)::value;
      TapPlan plan;
      if (!make_taps_plan(taps, num_taps, C_out, H, W, kChannelsLast, kVec, align_corners, &plan)) {
        status = cudaErrorInvalidValue;
        return;
      }
      const int64_t blocks = N * plan.channel_tiles * plan.row_strips * plan.column_strips;
      if (blocks > INT_MAX) {
        status = cudaErrorInvalidValue;
        return;
      }
      taps_add_kernel<scalar_t, kVec, kChannelsLast>
          <<<static_cast<unsigned>(blocks), plan.threads(kChannelsLast, kVec), plan.shared_bytes(), stream>>>(
              static_cast<scalar_t*>(out), out_strides, static_cast<int>(C_out), static_cast<int>(H),
              static_cast<int>(W), plan);
    });
  })
  return status != cudaSuccess ? status : cudaGetLastError();
}

int64_t taps_backward_workspace_floats(DType dtype, const void* grad, Strides grad_strides, bool channels_last,
                                       int64_t channel_offset, int64_t N, int64_t C, int64_t H, int64_t W,
                                       const TapGradient* grad_taps, int count, bool align_corners) {
  int64_t floats = -1;
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    const int vec = adjoint_vector_width<scalar_t>(grad, grad_strides, channels_last, channel_offset, N, C, H, W);
    AdjointPlan plan;
    if (make_adjoint_plan(grad_taps, count, channel_offset, N, C, H, W, channels_last, vec, 16 / sizeof(scalar_t),
                          align_corners, shared_memory_limit() / 4, &plan) &&
        launchable(plan, N)) {
      floats = plan.workspace_floats(N, C);
    }
  })
  return floats;
}

cudaError_t taps_backward(DType dtype, const void* grad, Strides grad_strides, bool channels_last, int64_t channel_offset,
                          int64_t N, int64_t C, int64_t H, int64_t W, const TapGradient* grad_taps, int count,
                          bool align_corners, float* workspace, cudaStream_t stream) {
  if (N * C * H * W == 0 || count == 0) return cudaSuccess;  // the binding fills empty grads
  cudaError_t status = cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    const int vec = adjoint_vector_width<scalar_t>(grad, grad_strides, channels_last, channel_offset, N, C, H, W);
    with_width_and_layout<scalar_t>(vec, channels_last, [&](auto width, auto layout) {
      constexpr int kVec = decltype(width)::value;
      constexpr bool kChannelsLast = decltype(layout)::value;
      AdjointPlan plan;
      const bool planned =
          make_adjoint_plan(grad_taps, count, channel_offset, N, C, H, W, kChannelsLast, kVec, 16 / sizeof(scalar_t),
                            align_corners, shared_memory_limit() / 4, &plan);
      const int64_t blocks = planned ? N * plan.channel_tiles * plan.column_strips : 0;
      if (!planned || !launchable(plan, N) || (plan.column_strips > 1 && workspace == nullptr)) {
        status = cudaErrorInvalidValue;
        return;
      }
      auto kernel = taps_backward_kernel<scalar_t, kVec, kChannelsLast>;
      if (plan.shared_bytes() > kTapSharedBytes) {
        status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.shared_bytes());
        if (status != cudaSuccess) return;
      }
      kernel<<<static_cast<unsigned>(blocks), plan.threads(kChannelsLast, kVec), plan.shared_bytes(), stream>>>(
          static_cast<const scalar_t*>(grad), grad_strides, N, static_cast<int>(C), static_cast<int>(H),
          static_cast<int>(W), plan, plan.column_strips > 1 ? workspace : nullptr);
      if (plan.column_strips > 1) {
        const dim3 grid(blocks_covering(plan.entries * C), static_cast<unsigned>(N));
        taps_backward_strips_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(workspace, N, static_cast<int>(C), plan);
      }
    });
  })
  return status != cudaSuccess ? status : cudaGetLastError();
}

}  // namespace pyramid_cuda
}  // namespace slsdeep
