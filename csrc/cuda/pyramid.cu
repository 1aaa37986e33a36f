// CUDA kernels of pyramid pooling (declared in csrc/cuda/pyramid.h); fp32 accumulation, the index
// maths of csrc/common/pyramid.h, shared with the CPU kernels; every backward a gather: no atomics.
// The pool kernels work by segments, each thread owning one, and the upsample forward by runs of
// outputs sharing a stencil (both designed to the HBM roof, below); the upsample backward and the
// tap kernels still run one thread per output element in a grid-stride loop, threads walking the
// output in memory order (NCHW or channels_last) so that writes coalesce (issue 12: their rewrite
// is pending).
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
using packs::store;
using pyramid::LinearTap;

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `total` elements (the loop covers any remainder).
unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < (int64_t{1} << 22) ? blocks : (int64_t{1} << 22));
}

#define SLSDEEP_GRID_STRIDE(index, total)                                                      \
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < (total); \
       index += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Element `index` of an (N, C, H, W) tensor walked in memory order.
struct Position {
  int64_t n, c, h, w;
};

// The coordinate of extent `size` that varies fastest in a memory-order index; index becomes the rest.
__device__ __forceinline__ int64_t split_off(int64_t& index, int64_t size) {
  const int64_t coordinate = index % size;
  index /= size;
  return coordinate;
}

__device__ __forceinline__ Position position(int64_t index, int64_t C, int64_t H, int64_t W, bool channels_last) {
  Position p;
  if (channels_last) {  // memory order (N, H, W, C)
    p.c = split_off(index, C);
    p.w = split_off(index, W);
    p.h = split_off(index, H);
  } else {  // memory order (N, C, H, W)
    p.w = split_off(index, W);
    p.h = split_off(index, H);
    p.c = split_off(index, C);
  }
  p.n = index;
  return p;
}

__device__ __forceinline__ int64_t offset_of(const Strides& s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

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

// Whether 16-byte packs of kWide elements stay aligned along a dimension of this size and stride: a
// stride that is a multiple of the width, or any stride of a size-1 dimension (torch gives those any).
template <int kWide>
bool keeps_packs(int64_t size, int64_t stride) {
  return size == 1 || stride % kWide == 0;
}

bool packed(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The pack width of a pool pass over an (N, C, H, W) tensor with strides s at p: 16 bytes where the
// layout's contiguous axis, the other strides, every bound along it and the pointer allow it, else 1.
template <typename T>
int pool_vector_width(const void* p, const Strides& s, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                      const PoolPlan& plan) {
  constexpr int kWide = 16 / sizeof(T);
  if (!packed(p)) return 1;
  if (channels_last) {
    const bool ok = s.c == 1 && C % kWide == 0 && keeps_packs<kWide>(W, s.w) && keeps_packs<kWide>(H, s.h) &&
                    keeps_packs<kWide>(N, s.n);
    return ok ? kWide : 1;
  }
  if (s.w != 1 || !keeps_packs<kWide>(H, s.h) || !keeps_packs<kWide>(C, s.c) || !keeps_packs<kWide>(N, s.n)) return 1;
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

template <typename scalar_t>
__global__ void upsample_branch_backward_kernel(const scalar_t* grad, Strides s, int64_t channel_offset, int64_t H,
                                                int64_t W, scalar_t* grad_z, int64_t Cb, int64_t h, int64_t w,
                                                bool align_corners, int64_t total) {
  const float scale_h = pyramid::linear_scale<float>(h, H, align_corners);
  const float scale_w = pyramid::linear_scale<float>(w, W, align_corners);
  SLSDEEP_GRID_STRIDE(index, total) {
    const int64_t j = index % w, i = (index / w) % h, plane = index / (h * w);
    int64_t p0, p1, q0, q1;
    pyramid::linear_readers<float>(i, h, H, scale_h, align_corners, &p0, &p1);
    pyramid::linear_readers<float>(j, w, W, scale_w, align_corners, &q0, &q1);
    const scalar_t* g = grad + (plane / Cb) * s.n + (channel_offset + plane % Cb) * s.c;
    float sum = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      float row = 0.f;
      for (int64_t q = q0; q < q1; ++q) {
        row += pyramid::tap_weight(pyramid::linear_tap<float>(q, w, scale_w, align_corners), j) * to_float(*(g + p * s.h + q * s.w));
      }
      sum += pyramid::tap_weight(pyramid::linear_tap<float>(p, h, scale_h, align_corners), i) * row;
    }
    grad_z[index] = from_float<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------- pyramid_conv taps

struct TapList {
  int count;
  TapTensor taps[kMaxBranches];
};

template <typename scalar_t>
__global__ void taps_add_kernel(scalar_t* out, Strides s, bool channels_last, int64_t C_out, int64_t H, int64_t W,
                                TapList taps, bool align_corners, int64_t total) {
  SLSDEEP_GRID_STRIDE(index, total) {
    const Position p = position(index, C_out, H, W, channels_last);
    float sum = 0.f;
    for (int b = 0; b < taps.count; ++b) {
      const TapTensor& tap = taps.taps[b];
      const int64_t h = tap.h, w = tap.w;
      const TapStrides& ts = tap.strides;
      const float scale_h = pyramid::linear_scale<float>(h, H, align_corners);
      const float scale_w = pyramid::linear_scale<float>(w, W, align_corners);
      const scalar_t* z = static_cast<const scalar_t*>(tap.data) + p.n * ts.n + p.c * ts.c;
      const int64_t half = tap.k / 2;
      for (int64_t ky = 0; ky < tap.k; ++ky) {
        const int64_t row = p.h + ky - half;
        if (row < 0 || row >= H) continue;
        const LinearTap<float> r = pyramid::linear_tap<float>(row, h, scale_h, align_corners);
        for (int64_t kx = 0; kx < tap.k; ++kx) {
          const int64_t col = p.w + kx - half;
          if (col < 0 || col >= W) continue;
          const LinearTap<float> c = pyramid::linear_tap<float>(col, w, scale_w, align_corners);
          const scalar_t* t = z + ky * ts.ky + kx * ts.kx;
          const scalar_t* top_row = t + r.index0 * ts.i;
          const scalar_t* bottom_row = t + r.index1 * ts.i;
          const float top = c.weight0 * to_float(top_row[c.index0 * ts.j]) + c.weight1 * to_float(top_row[c.index1 * ts.j]);
          const float bottom =
              c.weight0 * to_float(bottom_row[c.index0 * ts.j]) + c.weight1 * to_float(bottom_row[c.index1 * ts.j]);
          sum += r.weight0 * top + r.weight1 * bottom;
        }
      }
    }
    scalar_t* o = out + offset_of(s, p.n, p.c, p.h, p.w);
    *o = from_float<scalar_t>(to_float(*o) + sum);
  }
}

template <typename scalar_t>
__global__ void taps_backward_kernel(const scalar_t* grad, Strides s, int64_t N, int64_t C_out, int64_t H, int64_t W,
                                     scalar_t* grad_z, TapStrides zs, int64_t k, int64_t h, int64_t w,
                                     bool align_corners, int64_t total) {
  const float scale_h = pyramid::linear_scale<float>(h, H, align_corners);
  const float scale_w = pyramid::linear_scale<float>(w, W, align_corners);
  const int64_t taps = k * k, half = k / 2;
  SLSDEEP_GRID_STRIDE(index, total) {
    // index walks (C_out, k, k, N, h, w), the order of the grad's usual storage.
    const int64_t j = index % w, i = (index / w) % h, n = (index / (h * w)) % N;
    const int64_t c = index / (taps * N * h * w);
    // tap < k * k, split in 32 bits: 64-bit division by the runtime k costs ~15 registers more.
    const int tap = static_cast<int>(index / (N * h * w) - c * taps);
    const int ky = tap / static_cast<int>(k), kx = tap - ky * static_cast<int>(k);
    const int64_t dy = ky - half, dx = kx - half;  // output p reads the stencil at p + (dy, dx)
    int64_t p0, p1, q0, q1;
    pyramid::linear_readers<float>(i, h, H, scale_h, align_corners, &p0, &p1);
    pyramid::linear_readers<float>(j, w, W, scale_w, align_corners, &q0, &q1);
    p0 = p0 - dy > 0 ? p0 - dy : 0;
    p1 = p1 - dy < H ? p1 - dy : H;
    q0 = q0 - dx > 0 ? q0 - dx : 0;
    q1 = q1 - dx < W ? q1 - dx : W;
    const scalar_t* g = grad + n * s.n + c * s.c;
    float sum = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      float row = 0.f;
      for (int64_t q = q0; q < q1; ++q) {
        row += pyramid::tap_weight(pyramid::linear_tap<float>(q + dx, w, scale_w, align_corners), j) *
               to_float(*(g + p * s.h + q * s.w));
      }
      sum += pyramid::tap_weight(pyramid::linear_tap<float>(p + dy, h, scale_h, align_corners), i) * row;
    }
    *(grad_z + n * zs.n + c * zs.c + ky * zs.ky + kx * zs.kx + i * zs.i + j * zs.j) = from_float<scalar_t>(sum);
  }
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
    auto fits = [](int64_t size, int64_t stride) { return keeps_packs<kWide>(size, stride); };
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

cudaError_t upsample_branch_backward(DType dtype, const void* grad, Strides grad_strides, int64_t channel_offset, int64_t H,
                                     int64_t W, void* grad_z, int64_t N, int64_t Cb, int64_t h, int64_t w, bool align_corners,
                                     cudaStream_t stream) {
  const int64_t total = N * Cb * h * w;
  if (total == 0) return cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype,
                            upsample_branch_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
                                static_cast<const scalar_t*>(grad), grad_strides, channel_offset, H, W,
                                static_cast<scalar_t*>(grad_z), Cb, h, w, align_corners, total))
  return cudaGetLastError();
}

cudaError_t taps_add(DType dtype, void* out, Strides out_strides, bool channels_last, int64_t N, int64_t C_out, int64_t H,
                     int64_t W, const TapTensor* taps, int num_taps, bool align_corners, cudaStream_t stream) {
  TapList list{};
  list.count = num_taps;
  for (int k = 0; k < num_taps; ++k) list.taps[k] = taps[k];
  const int64_t total = N * C_out * H * W;
  if (total == 0 || num_taps == 0) return cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype, taps_add_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
                                       static_cast<scalar_t*>(out), out_strides, channels_last, C_out, H, W, list,
                                       align_corners, total))
  return cudaGetLastError();
}

cudaError_t taps_backward(DType dtype, const void* grad, Strides grad_strides, int64_t N, int64_t C_out, int64_t H, int64_t W,
                          void* grad_z, TapStrides grad_z_strides, int64_t kernel_size, int64_t h, int64_t w,
                          bool align_corners, cudaStream_t stream) {
  const int64_t total = N * C_out * kernel_size * kernel_size * h * w;
  if (total == 0) return cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype, taps_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
                                       static_cast<const scalar_t*>(grad), grad_strides, N, C_out, H, W,
                                       static_cast<scalar_t*>(grad_z), grad_z_strides, kernel_size, h, w,
                                       align_corners, total))
  return cudaGetLastError();
}

}  // namespace pyramid_cuda
}  // namespace slsdeep
