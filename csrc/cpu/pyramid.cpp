// CPU kernels of pyramid pooling (slsdeep_kernels/ops/pyramid.py, docs/design.md §4.2).
//
// Every kernel reads its input through its strides and accumulates in at::opmath_type. The pool
// works by segments (csrc/common/pyramid.h), plane by plane or, where channels are innermost, pixel
// row by pixel row. The resizes and taps work plane by plane ((n, c) planes, at::parallel_for over
// planes), separably: a pass along the width into a small per-plane buffer, then one along the
// height (their adjoints: the height first). Backward passes gather (the cells containing a segment;
// per-axis reader lists built from csrc/common/pyramid.h): deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "alloc.h"
#include "bind_utils.h"
#include "common/pyramid.h"
#include "cpu/dispatch.h"
#include "cpu/stream.h"

SLSDEEP_CPU_VARIANT_BEGIN
namespace {

using pyramid::LinearTap;

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The stencil of every output index of one axis resized from in_size to out_size.
template <typename acc_t>
std::vector<LinearTap<acc_t>> axis_taps(int64_t in_size, int64_t out_size, bool align_corners) {
  const acc_t scale = pyramid::linear_scale<acc_t>(in_size, out_size, align_corners);
  std::vector<LinearTap<acc_t>> taps(out_size);
  for (int64_t o = 0; o < out_size; ++o) taps[o] = pyramid::linear_tap<acc_t>(o, in_size, scale, align_corners);
  return taps;
}

// Adjoint of one resized axis, as reader lists: for input index i, the output indices o (with their
// weights) whose stencil at o + shift reads i, consecutive and ascending; o + shift outside
// [0, out_size) reads zero.
template <typename acc_t>
struct AxisReaders {
  std::vector<int64_t> begin;  // in_size + 1 offsets into index/weight
  std::vector<int64_t> index;
  std::vector<acc_t> weight;
};

template <typename acc_t>
AxisReaders<acc_t> axis_readers(int64_t in_size, int64_t out_size, bool align_corners, int64_t shift) {
  const acc_t scale = pyramid::linear_scale<acc_t>(in_size, out_size, align_corners);
  AxisReaders<acc_t> readers;
  readers.begin.push_back(0);
  for (int64_t i = 0; i < in_size; ++i) {
    int64_t first = 0, last = 0;
    pyramid::linear_readers<acc_t>(i, in_size, out_size, scale, align_corners, &first, &last);
    for (int64_t o = std::max<int64_t>(first - shift, 0); o < std::min<int64_t>(last - shift, out_size); ++o) {
      const LinearTap<acc_t> tap = pyramid::linear_tap<acc_t>(o + shift, in_size, scale, align_corners);
      readers.index.push_back(o);
      readers.weight.push_back(pyramid::tap_weight(tap, i));
    }
    readers.begin.push_back(static_cast<int64_t>(readers.index.size()));
  }
  return readers;
}

// The adjoint of gather_columns on one row: value spread over the outputs that read input i, out[o] += weight * value.
// An input's readers are consecutive outputs (axis_readers), so this is one contiguous multiply-add.
template <typename acc_t>
inline void spread(acc_t* out, const AxisReaders<acc_t>& readers, int64_t i, acc_t value) {
  const int64_t first = readers.begin[i], count = readers.begin[i + 1] - first;
  if (count == 0) return;
  acc_t* o = out + readers.index[first];
  const acc_t* weight = readers.weight.data() + first;
#pragma omp simd
  for (int64_t m = 0; m < count; ++m) o[m] += weight[m] * value;
}

constexpr int kColumnChunk = 16;  // columns summed in registers over a row's terms
constexpr int kRowBlock = 8;      // rows of a transposed block (RowBlocks): one vector of sums per column

// Rows of accumulators held transposed, kRowBlock at a time, for the width pass of a separable
// adjoint: row r, column q at data[((r / kRowBlock) * W + q) * kRowBlock + r % kRowBlock], so one
// column of a block is kRowBlock contiguous values. The lanes past the last row stay 0.
template <typename acc_t>
class RowBlocks {
 public:
  RowBlocks(int64_t rows, int64_t W) : W_(W), data_(((rows + kRowBlock - 1) / kRowBlock) * W * kRowBlock) {}
  acc_t* column(int64_t row, int64_t q) { return data_.data() + ((row / kRowBlock) * W_ + q) * kRowBlock + row % kRowBlock; }
  const acc_t* block(int64_t b) const { return data_.data() + b * W_ * kRowBlock; }

 private:
  int64_t W_;
  std::vector<acc_t> data_;
};

// The height adjoint by output rows: every output row that reads an input row, with its terms, at
// most two consecutive input rows (a linear stencil) and their weights as the readers of those rows
// hold them; grouped by the first input row they add to (group i: terms[begin[i], begin[i + 1])).
template <typename acc_t>
struct HeightTerm {
  int64_t row;  // the output row
  int count;    // 1 or 2: the input rows first and first + 1
  acc_t weight[2];
};

template <typename acc_t>
struct HeightAdjoint {
  std::vector<HeightTerm<acc_t>> terms;
  std::vector<int64_t> begin;
};

template <typename acc_t>
HeightAdjoint<acc_t> height_adjoint(const AxisReaders<acc_t>& readers, int64_t in_size, int64_t out_size) {
  std::vector<int64_t> first(out_size, -1);
  std::vector<HeightTerm<acc_t>> by_row(out_size, HeightTerm<acc_t>{0, 0, {0, 0}});
  for (int64_t i = 0; i < in_size; ++i) {
    for (int64_t k = readers.begin[i]; k < readers.begin[i + 1]; ++k) {
      const int64_t o = readers.index[k];
      HeightTerm<acc_t>& t = by_row[o];
      if (t.count == 0) first[o] = i;
      TORCH_CHECK(t.count < 2 && i == first[o] + t.count, "pyramid: a linear stencil reads at most two consecutive rows");
      t.row = o;
      t.weight[t.count++] = readers.weight[k];
    }
  }
  HeightAdjoint<acc_t> adjoint;
  adjoint.begin.assign(in_size + 1, 0);
  int64_t group = 0;
  for (int64_t o = 0; o < out_size; ++o) {
    if (by_row[o].count == 0) continue;
    TORCH_CHECK(first[o] >= group, "pyramid: a linear stencil's rows never decrease");
    while (group < first[o]) adjoint.begin[++group] = static_cast<int64_t>(adjoint.terms.size());
    adjoint.terms.push_back(by_row[o]);
  }
  while (group < in_size) adjoint.begin[++group] = static_cast<int64_t>(adjoint.terms.size());
  return adjoint;
}

// Rows [row0, row0 + h) of `blocks`, columns [q0, q0 + width): input row i = the sum over the output
// rows o that read it, ascending (the readers' order), of weight * image row o (at image + o *
// row_stride, its values column_stride apart). One pass down the image, input row by input row: the
// group of rows adding first to i adds to i and i + 1, whose sums are two register arrays that swap
// roles from one i to the next (kWidth columns, column_stride 1; kWidth 0: any width up to
// kColumnChunk, any stride). Each image row is read once, where gathering each input row's readers
// read it twice and kept the sums in memory (docs/performance.md §4.4).
template <int kWidth, typename acc_t, typename scalar_t>
inline void gather_row_chunk(RowBlocks<acc_t>& blocks, int64_t row0, const HeightAdjoint<acc_t>& adjoint, int64_t h,
                             const scalar_t* image, int64_t row_stride, int64_t column_stride, int64_t q0,
                             int64_t width) {
  constexpr int kSize = kWidth > 0 ? kWidth : kColumnChunk;
  const int64_t n = kWidth > 0 ? kWidth : width, stride = kWidth > 0 ? 1 : column_stride;
  acc_t even[kSize] = {}, odd[kSize] = {}, done[kSize];
  // Adds group i's rows to low (row i) and high (row i + 1), then stores row i and clears it.
  auto finish_row = [&](acc_t* __restrict__ low, acc_t* __restrict__ high, int64_t i) {
    for (int64_t t = adjoint.begin[i]; t < adjoint.begin[i + 1]; ++t) {
      const HeightTerm<acc_t>& term = adjoint.terms[t];
      const scalar_t* __restrict__ values = image + term.row * row_stride + q0 * stride;
      const acc_t w0 = term.weight[0], w1 = term.weight[1];
      if (term.count == 2) {
        for (int64_t q = 0; q < n; ++q) {
          const acc_t v = static_cast<acc_t>(values[q * stride]);
          low[q] += w0 * v;
          high[q] += w1 * v;
        }
      } else {
        for (int64_t q = 0; q < n; ++q) low[q] += w0 * static_cast<acc_t>(values[q * stride]);
      }
    }
    for (int q = 0; q < kSize; ++q) {
      done[q] = low[q];
      low[q] = 0;
    }
    for (int64_t q = 0; q < n; ++q) *blocks.column(row0 + i, q0 + q) = done[q];
  };
  for (int64_t i = 0; i < h; i += 2) {
    finish_row(even, odd, i);
    if (i + 1 < h) finish_row(odd, even, i + 1);
  }
}

// Rows [row0, row0 + h) of `blocks` from one image (gather_row_chunk), up to kMaxChunks chunks of
// kColumnChunk columns at a time: two rows of 48 fp32 sums are 12 of AVX2's 16 vector registers.
constexpr int kMaxChunks = 3;
template <typename acc_t, typename scalar_t>
inline void gather_rows(RowBlocks<acc_t>& blocks, int64_t row0, const HeightAdjoint<acc_t>& adjoint, int64_t h,
                        const scalar_t* image, int64_t row_stride, int64_t column_stride, int64_t W) {
  int64_t q0 = 0;
  while (q0 < W) {
    const int64_t chunks = column_stride == 1 ? std::min<int64_t>((W - q0) / kColumnChunk, kMaxChunks) : 0;
    const int64_t width = chunks > 0 ? chunks * kColumnChunk : std::min<int64_t>(W - q0, kColumnChunk);
    switch (chunks) {
      case 3: gather_row_chunk<3 * kColumnChunk>(blocks, row0, adjoint, h, image, row_stride, 1, q0, width); break;
      case 2: gather_row_chunk<2 * kColumnChunk>(blocks, row0, adjoint, h, image, row_stride, 1, q0, width); break;
      case 1: gather_row_chunk<kColumnChunk>(blocks, row0, adjoint, h, image, row_stride, 1, q0, width); break;
      default: gather_row_chunk<0>(blocks, row0, adjoint, h, image, row_stride, column_stride, q0, width);
    }
    q0 += width;
  }
}

// The width pass: store(r, j, value) for every row r < rows of `blocks` and output column j, value =
// sum over column j's readers of weight * row r's value at the reader's column, in the readers' order:
// a vector of kRowBlock rows' sums per term.
template <typename acc_t, typename Store>
inline void gather_columns(const RowBlocks<acc_t>& blocks, int64_t rows, const AxisReaders<acc_t>& readers,
                           int64_t w, Store store) {
  for (int64_t b = 0; b * kRowBlock < rows; ++b) {
    const acc_t* __restrict__ block = blocks.block(b);
    const int64_t block_rows = std::min<int64_t>(kRowBlock, rows - b * kRowBlock);
    for (int64_t j = 0; j < w; ++j) {
      acc_t sum[kRowBlock] = {};
      for (int64_t k = readers.begin[j]; k < readers.begin[j + 1]; ++k) {
        const acc_t weight = readers.weight[k];
        const acc_t* __restrict__ column = block + readers.index[k] * kRowBlock;
#pragma omp simd
        for (int r = 0; r < kRowBlock; ++r) sum[r] += weight * column[r];
      }
      for (int64_t r = 0; r < block_rows; ++r) store(b * kRowBlock + r, j, sum[r]);
    }
  }
}

// ---------------------------------------------------------------- pyramid_pool
//
// By segments (csrc/common/pyramid.h), as the CUDA kernels: the forward sums every segment once,
// then every cell its segments over its area; the backward gives every segment pair the sum of its
// cells' gradients over their areas and fills the segment with it. Two walks of the image: planes
// (NCHW and any other strides), or, where channels are contiguous (channels_last), pixel rows (the
// forward: every channel of a pixel at once; the backward: a pixel's channels copied), so that both
// layouts stream through memory once.

constexpr int64_t kChannelChunk = 64;     // channels per task of the cells from segment sums
constexpr int64_t kChannelWalkFrom = 16;  // fewer channels: the plane walk (short channel runs are slow)
constexpr int64_t kPlaneChunk = 16;       // planes per task of the plane walk
constexpr int64_t kTasksPerThread = 2;    // the pool forward's channel walk splits channels below this

// The plan of both axes and, for the backward, the adjoint's terms: for every segment pair, the
// cells containing it (their index in a plane's Σ b² cells) with weight 1 / area.
template <typename acc_t>
struct PoolPlan {
  pyramid::AxisPlan rows, cols;
  std::vector<int> axis_offset;     // first axis cell of each bin
  std::vector<int64_t> term_begin;  // pairs + 1 offsets into term_cell / term_weight
  std::vector<int64_t> term_cell;
  std::vector<acc_t> term_weight;
  int pairs() const { return rows.segments * cols.segments; }
};

// The bins as for_cells_containing reads them.
struct BinSizes {
  int count;
  const int64_t* size;
};

template <typename acc_t>
PoolPlan<acc_t> pool_plan(const std::vector<int64_t>& bins, int64_t H, int64_t W, bool with_terms) {
  PoolPlan<acc_t> plan;
  TORCH_CHECK(pyramid::axis_plan(H, bins.data(), static_cast<int>(bins.size()), &plan.rows) &&
                  pyramid::axis_plan(W, bins.data(), static_cast<int>(bins.size()), &plan.cols),
              "pyramid_pool: an image of ", H, "x", W, " (each side in [1, 2^31)) and bins summing to at most ",
              pyramid::kMaxAxisCells);
  int offset = 0;
  for (const int64_t bin : bins) {
    plan.axis_offset.push_back(offset);
    offset += static_cast<int>(bin);
  }
  if (!with_terms) return plan;
  plan.term_begin.push_back(0);
  const BinSizes sizes{static_cast<int>(bins.size()), bins.data()};
  for (int sh = 0; sh < plan.rows.segments; ++sh) {
    for (int sw = 0; sw < plan.cols.segments; ++sw) {
      pyramid::for_cells_containing(plan.rows, plan.cols, sizes, sh, sw, [&](int64_t cell, int64_t area) {
        plan.term_cell.push_back(cell);
        plan.term_weight.push_back(acc_t(1) / static_cast<acc_t>(area));
      });
      plan.term_begin.push_back(static_cast<int64_t>(plan.term_cell.size()));
    }
  }
  return plan;
}

// The channel walk: channels innermost, and enough of them.
bool walks_channels(const at::Tensor& t) { return channels_innermost(t) && t.size(1) >= kChannelWalkFrom; }

// out[c · out_channel_stride + cell] for `count` <= kChannelChunk channels, from segment sums laid out
// sums[pair · pair_stride + c]: every cell the sum of its segments over its area, vector adds over c.
template <typename acc_t, typename scalar_t>
void cells_from_sums(const PoolPlan<acc_t>& plan, const std::vector<int64_t>& bins, const acc_t* sums, int64_t pair_stride,
                     int64_t count, scalar_t* out, int64_t out_channel_stride) {
  const int segments_w = plan.cols.segments;
  acc_t sum[kChannelChunk];
  int64_t cell = 0;
  for (size_t k = 0; k < bins.size(); ++k) {
    for (int64_t i = 0; i < bins[k]; ++i) {
      const int row_cell = plan.axis_offset[k] + static_cast<int>(i);
      const int r0 = plan.rows.first[row_cell], r1 = plan.rows.last[row_cell];
      for (int64_t j = 0; j < bins[k]; ++j, ++cell) {
        const int col_cell = plan.axis_offset[k] + static_cast<int>(j);
        const int q0 = plan.cols.first[col_cell], q1 = plan.cols.last[col_cell];
        const acc_t inverse_area =
            acc_t(1) / static_cast<acc_t>(pyramid::cell_extent(plan.rows, row_cell) * pyramid::cell_extent(plan.cols, col_cell));
        std::fill(sum, sum + count, acc_t(0));
        for (int r = r0; r < r1; ++r) {
          for (int q = q0; q < q1; ++q) {
            const acc_t* __restrict__ pair = sums + (r * segments_w + q) * pair_stride;
#pragma omp simd
            for (int64_t c = 0; c < count; ++c) sum[c] += pair[c];
          }
        }
        for (int64_t c = 0; c < count; ++c) out[c * out_channel_stride + cell] = static_cast<scalar_t>(sum[c] * inverse_area);
      }
    }
  }
}

// out (N, C, S) contiguous: the pyramid's cells of x (N, C, H, W, any strides), from every segment's
// sums. Channels innermost: tasks (n, row segment, block of channels) walk their rows pixel by pixel
// in memory order, each pixel's channels added to its segment's (one sweep of x; one block of all
// the channels where the images' row segments give every thread kTasksPerThread tasks, else as few
// blocks of whole chunks as do), then tasks (n, chunk of channels) form the cells. Otherwise tasks (n, chunk of planes) sum their planes' segments (a row segment's rows into
// one row, then cut) and form their cells. Either way the cells are vector adds over channels (not a
// plane's 50 cells one by one).
template <typename scalar_t>
void pool_forward(const at::Tensor& x, const at::Tensor& out, const std::vector<int64_t>& bins) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cells = out.size(2);
  const Strides4 s = strides_of(x);
  const PoolPlan<acc_t> plan = pool_plan<acc_t>(bins, H, W, false);
  const int segments_h = plan.rows.segments, segments_w = plan.cols.segments, pairs = plan.pairs();
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  scalar_t* result = out.mutable_data_ptr<scalar_t>();
  if (walks_channels(x)) {
    // sums[(n · pairs + pair) · C + c], every element written by its task before it is read
    const std::unique_ptr<acc_t[]> sums(new acc_t[static_cast<size_t>(N * pairs * C)]);
    const int64_t chunks = (C + kChannelChunk - 1) / kChannelChunk, images_segments = N * segments_h;
    const int64_t wanted = kTasksPerThread * at::get_num_threads(), per_segment = std::max<int64_t>(images_segments, 1);
    const int64_t blocks_wanted = std::min(chunks, (wanted + per_segment - 1) / per_segment);  // >= 1
    const int64_t block_channels = (chunks + blocks_wanted - 1) / blocks_wanted * kChannelChunk;
    const int64_t blocks = (C + block_channels - 1) / block_channels;
    at::parallel_for(0, images_segments * blocks, grain_for(H * W * block_channels / segments_h), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / (segments_h * blocks), rest = task % (segments_h * blocks);
        const int sh = static_cast<int>(rest / blocks);
        const int64_t c0 = (rest % blocks) * block_channels, count = std::min(block_channels, C - c0);
        acc_t* segment_sums = sums.get() + (n * pairs + sh * segments_w) * C + c0;
        for (int sw = 0; sw < segments_w; ++sw) std::fill(segment_sums + sw * C, segment_sums + sw * C + count, acc_t(0));
        for (int64_t h = plan.rows.bound[sh]; h < plan.rows.bound[sh + 1]; ++h) {
          for (int sw = 0; sw < segments_w; ++sw) {
            acc_t* __restrict__ sum = segment_sums + sw * C;
            for (int64_t w = plan.cols.bound[sw]; w < plan.cols.bound[sw + 1]; ++w) {
              const scalar_t* __restrict__ pixel = data + n * s.n + h * s.h + w * s.w + c0;
#pragma omp simd
              for (int64_t c = 0; c < count; ++c) sum[c] += static_cast<acc_t>(pixel[c]);
            }
          }
        }
      }
    });
    at::parallel_for(0, N * chunks, grain_for(pairs * kChannelChunk * 4), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks, c0 = (task % chunks) * kChannelChunk, count = std::min(kChannelChunk, C - c0);
        cells_from_sums(plan, bins, sums.get() + n * pairs * C + c0, C, count, result + (n * C + c0) * cells, cells);
      }
    });
    return;
  }
  const int64_t chunks = (C + kPlaneChunk - 1) / kPlaneChunk;
  at::parallel_for(0, N * chunks, grain_for(H * W * kPlaneChunk), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(static_cast<size_t>(pairs) * kPlaneChunk), column_sums(W);  // sums[pair * kPlaneChunk + c]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, c0 = (task % chunks) * kPlaneChunk, count = std::min(kPlaneChunk, C - c0);
      for (int64_t c = 0; c < count; ++c) {  // a row segment's rows added into one row (whole-row adds), then cut
        const scalar_t* plane = data + n * s.n + (c0 + c) * s.c;
        for (int sh = 0; sh < segments_h; ++sh) {
          acc_t* __restrict__ columns = column_sums.data();
          std::fill(columns, columns + W, acc_t(0));
          for (int64_t h = plan.rows.bound[sh]; h < plan.rows.bound[sh + 1]; ++h) {
            const scalar_t* __restrict__ row = plane + h * s.h;
            if (s.w == 1) {
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) columns[w] += static_cast<acc_t>(row[w]);
            } else {
              for (int64_t w = 0; w < W; ++w) columns[w] += static_cast<acc_t>(row[w * s.w]);
            }
          }
          for (int sw = 0; sw < segments_w; ++sw) {
            acc_t run = 0;
            for (int64_t w = plan.cols.bound[sw]; w < plan.cols.bound[sw + 1]; ++w) run += columns[w];
            sums[(sh * segments_w + sw) * kPlaneChunk + c] = run;
          }
        }
      }
      cells_from_sums(plan, bins, sums.data(), kPlaneChunk, count, result + (n * C + c0) * cells, cells);
    }
  });
}

// grad_x (N, C, H, W) in `out`'s layout from grad (N, C, S) contiguous: every segment pair's
// gradient (the plan's terms: a gather, deterministic), then every segment filled with it.
template <typename scalar_t>
void pool_backward(const at::Tensor& grad, const at::Tensor& out, const std::vector<int64_t>& bins) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), cells = grad.size(2);
  const Strides4 s = strides_of(out);
  const PoolPlan<acc_t> plan = pool_plan<acc_t>(bins, H, W, true);
  const int segments_w = plan.cols.segments, pairs = plan.pairs();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* result = out.mutable_data_ptr<scalar_t>();
  const bool stream = streams(out.numel() * static_cast<int64_t>(sizeof(scalar_t)));  // write-only: csrc/cpu/stream.h
  auto pair_value = [&](int pair, const scalar_t* plane_cells) {
    acc_t sum = 0;
    for (int64_t t = plan.term_begin[pair]; t < plan.term_begin[pair + 1]; ++t) {
      sum += static_cast<acc_t>(plane_cells[plan.term_cell[t]]) * plan.term_weight[t];
    }
    return static_cast<scalar_t>(sum);
  };
  if (walks_channels(out)) {  // every pair's value per channel, then pixel rows: each pixel's channels copied
    std::vector<scalar_t> values(static_cast<size_t>(N * pairs * C));  // values[(n · pairs + pair) · C + c]
    at::parallel_for(0, N * pairs, grain_for(C * 4), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / pairs;
        const int pair = static_cast<int>(task % pairs);
        for (int64_t c = 0; c < C; ++c) values[task * C + c] = pair_value(pair, g + (n * C + c) * cells);
      }
    });
    at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        int sh = 0;
        while (h >= plan.rows.bound[sh + 1]) ++sh;
        for (int sw = 0; sw < segments_w; ++sw) {
          const scalar_t* value = values.data() + (n * pairs + sh * segments_w + sw) * C;
          for (int64_t w = plan.cols.bound[sw]; w < plan.cols.bound[sw + 1]; ++w) {
            copy_bytes(result + n * s.n + h * s.h + w * s.w, value, C * sizeof(scalar_t), stream);
          }
        }
      }
      if (stream) stream_fence();
    });
    return;
  }
  // planes: the first row of each row segment built, then copied to the segment's other rows
  at::parallel_for(0, N * C, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> row_values(W);
    for (int64_t p = begin; p < end; ++p) {
      scalar_t* plane = result + (p / C) * s.n + (p % C) * s.c;
      for (int sh = 0; sh < plan.rows.segments; ++sh) {
        for (int sw = 0; sw < segments_w; ++sw) {
          const scalar_t value = pair_value(sh * segments_w + sw, g + p * cells);
          std::fill(row_values.begin() + plan.cols.bound[sw], row_values.begin() + plan.cols.bound[sw + 1], value);
        }
        for (int64_t h = plan.rows.bound[sh]; h < plan.rows.bound[sh + 1]; ++h) {
          scalar_t* row = plane + h * s.h;
          if (s.w == 1) {
            copy_bytes(row, row_values.data(), W * sizeof(scalar_t), stream);
          } else {
            for (int64_t w = 0; w < W; ++w) row[w * s.w] = row_values[w];
          }
        }
      }
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------- upsample_concat

// out (N, C + sum Cb, H, W) = cat([x] + bilinear resizes of the branches (N, Cb, h, w) contiguous), in
// ONE parallel pass over the output planes (few parallel regions: robust on a busy machine). x's
// planes are copied; a branch plane is resized as ATen does: each source row along the width
// first, then the two rows blended.
template <typename acc_t>
struct ResizedBranch {
  const void* data;
  int64_t channels, h, w, first_channel;
  std::vector<LinearTap<acc_t>> rows, cols;
};

template <typename scalar_t>
void upsample_concat_planes(const at::Tensor& x, const std::vector<at::Tensor>& branches, const at::Tensor& out,
                            bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), total = out.size(1), H = out.size(2), W = out.size(3);
  const Strides4 s = strides_of(out), sx = strides_of(x);
  std::vector<ResizedBranch<acc_t>> resized_branches;
  int64_t first_channel = C, buffer_size = 0;
  for (const at::Tensor& z : branches) {
    const int64_t h = z.size(2), w = z.size(3);
    resized_branches.push_back({z.const_data_ptr(), z.size(1), h, w, first_channel,
                                axis_taps<acc_t>(h, H, align_corners), axis_taps<acc_t>(w, W, align_corners)});
    first_channel += z.size(1);
    buffer_size = std::max(buffer_size, h * W);
  }
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const bool stream = streams(out.numel() * static_cast<int64_t>(sizeof(scalar_t)));  // write-only: csrc/cpu/stream.h
  at::parallel_for(0, out.size(0) * total, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> resized(buffer_size);
    std::vector<scalar_t> streamed_row(stream ? W : 0);  // a resized row, then streamed to the output
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / total, c = plane % total;
      scalar_t* plane_out = dst + n * s.n + c * s.c;
      if (c < C) {
        const scalar_t* in = x_data + n * sx.n + c * sx.c;
        for (int64_t p = 0; p < H; ++p) {
          const scalar_t* row_in = in + p * sx.h;
          scalar_t* row = plane_out + p * s.h;
          if (s.w == 1 && sx.w == 1) {
            copy_bytes(row, row_in, W * sizeof(scalar_t), stream);
          } else {
            for (int64_t q = 0; q < W; ++q) row[q * s.w] = row_in[q * sx.w];
          }
        }
        continue;
      }
      size_t b = 0;
      while (c >= resized_branches[b].first_channel + resized_branches[b].channels) ++b;
      const ResizedBranch<acc_t>& br = resized_branches[b];
      const int64_t h = br.h, w = br.w;
      const scalar_t* in = static_cast<const scalar_t*>(br.data) + (n * br.channels + c - br.first_channel) * h * w;
      for (int64_t i = 0; i < h; ++i) {
        for (int64_t q = 0; q < W; ++q) {
          const LinearTap<acc_t>& t = br.cols[q];
          resized[i * W + q] = t.weight0 * static_cast<acc_t>(in[i * w + t.index0]) +
                               t.weight1 * static_cast<acc_t>(in[i * w + t.index1]);
        }
      }
      for (int64_t p = 0; p < H; ++p) {
        const LinearTap<acc_t>& t = br.rows[p];
        const acc_t* row0 = resized.data() + t.index0 * W;
        const acc_t* row1 = resized.data() + t.index1 * W;
        scalar_t* row = plane_out + p * s.h;
        if (s.w == 1) {
          scalar_t* values = stream ? streamed_row.data() : row;
          for (int64_t q = 0; q < W; ++q) values[q] = static_cast<scalar_t>(t.weight0 * row0[q] + t.weight1 * row1[q]);
          if (stream) copy_bytes(row, values, W * sizeof(scalar_t), true);
        } else {
          for (int64_t q = 0; q < W; ++q) row[q * s.w] = static_cast<scalar_t>(t.weight0 * row0[q] + t.weight1 * row1[q]);
        }
      }
    }
    if (stream) stream_fence();
  });
}

// The adjoint of a branch's resize: its gradient (N, Cb, h, w) contiguous, the height adjoint and the
// width's readers.
template <typename acc_t>
struct BranchAdjoint {
  void* data;
  int64_t channels, h, w, first_channel;  // first_channel: in grad
  HeightAdjoint<acc_t> rows;
  AxisReaders<acc_t> cols;
};

// Every branch's gradient from grad's channels [first_channel, first_channel + Cb), in ONE parallel
// pass over grad's branch planes ((n, c) order: memory order for NCHW grad). A plane is gathered
// along the height first (gather_rows: one pass down the plane, up to 48 columns at a time in
// registers) into h rows of W, then along the width (h·W values instead of H·W), kRowBlock rows at a
// time.
template <typename scalar_t>
void upsample_concat_backward_planes(const at::Tensor& grad, int64_t channels, const std::vector<at::Tensor>& grads,
                                     bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = grad.size(2), W = grad.size(3), branch_channels = grad.size(1) - channels;
  const Strides4 s = strides_of(grad);
  std::vector<BranchAdjoint<acc_t>> branches;
  int64_t first_channel = channels;
  for (const at::Tensor& grad_z : grads) {
    const int64_t h = grad_z.size(2), w = grad_z.size(3);
    branches.push_back({grad_z.mutable_data_ptr(), grad_z.size(1), h, w, first_channel,
                        height_adjoint(axis_readers<acc_t>(h, H, align_corners, 0), h, H),
                        axis_readers<acc_t>(w, W, align_corners, 0)});
    first_channel += grad_z.size(1);
  }
  const scalar_t* src = grad.const_data_ptr<scalar_t>();
  at::parallel_for(0, grad.size(0) * branch_channels, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<RowBlocks<acc_t>> partials;
    for (const BranchAdjoint<acc_t>& br : branches) partials.emplace_back(br.h, W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / branch_channels, c = channels + plane % branch_channels;
      size_t b = 0;
      while (c >= branches[b].first_channel + branches[b].channels) ++b;
      const BranchAdjoint<acc_t>& br = branches[b];
      const int64_t h = br.h, w = br.w;
      RowBlocks<acc_t>& partial = partials[b];
      const scalar_t* g = src + n * s.n + c * s.c;
      gather_rows(partial, 0, br.rows, h, g, s.h, s.w, W);
      scalar_t* out = static_cast<scalar_t*>(br.data) + (n * br.channels + c - br.first_channel) * h * w;
      gather_columns(partial, h, br.cols, w,
                     [&](int64_t i, int64_t j, acc_t value) { out[i * w + j] = static_cast<scalar_t>(value); });
    }
  });
}

// ---------------------------------------------------------------- pyramid_conv taps
//
// A tap tensor z (N, Co, k, k, h, w), k odd, any strides (the op keeps it in the (k, k, Co, N, h, w) order
// of the matmul that makes it), holds z_t = W_t . y of one branch for the k*k taps t = (ky, kx) of the
// k x k conv. Its contribution to the conv output is sum_t up(z_t)(p + t - k/2) (k/2 rounded down),
// zero outside the image (k = 1: the plain upsample). Separable: for every (ky, cell row i) the kx-sum
// of width-resized, width-shifted rows is formed once per plane (u: each cell value spread over the
// consecutive columns that read it, a contiguous multiply-add), then each output row blends two u rows
// per (branch, ky).

struct TapStrides {
  int64_t n, c, ky, kx, i, j;
};

TapStrides tap_strides(const at::Tensor& z) {
  return {z.stride(0), z.stride(1), z.stride(2), z.stride(3), z.stride(4), z.stride(5)};
}

template <typename acc_t>
struct TapBranch {
  int64_t k, h, w, u_offset;  // k: this branch's kernel size (branches may differ)
  TapStrides s;
  std::vector<LinearTap<acc_t>> rows;
  std::vector<AxisReaders<acc_t>> cols;  // per kx: the readers of each cell column, shifted by kx - k/2
};

// One (branch, ky) term of an output row: u rows at offset0 and offset1 blended with its weights.
template <typename acc_t>
struct RowTerm {
  int64_t offset0, offset1;
  acc_t weight0, weight1;
};

template <typename scalar_t>
void taps_add(const at::Tensor& out, at::TensorList taps, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Co = out.size(1), H = out.size(2), W = out.size(3);
  const Strides4 s = strides_of(out);
  std::vector<TapBranch<acc_t>> branches;
  int64_t u_size = 0;
  for (const at::Tensor& z : taps) {
    const int64_t k = z.size(2), h = z.size(4), w = z.size(5);
    std::vector<AxisReaders<acc_t>> cols;
    for (int64_t kx = 0; kx < k; ++kx) cols.push_back(axis_readers<acc_t>(w, W, align_corners, kx - k / 2));
    branches.push_back({k, h, w, u_size, tap_strides(z), axis_taps<acc_t>(h, H, align_corners), std::move(cols)});
    u_size += k * h * W;
  }
  // Every output row's terms, in (branch, ky) order: the two u rows its stencil blends and their
  // weights (the same for every plane).
  std::vector<int64_t> term_begin{0};
  std::vector<RowTerm<acc_t>> terms;
  for (int64_t p = 0; p < H; ++p) {
    for (const TapBranch<acc_t>& br : branches) {
      for (int64_t ky = 0; ky < br.k; ++ky) {
        const int64_t row = p + ky - br.k / 2;
        if (row < 0 || row >= H) continue;
        const LinearTap<acc_t>& r = br.rows[row];
        terms.push_back({br.u_offset + (ky * br.h + r.index0) * W, br.u_offset + (ky * br.h + r.index1) * W, r.weight0, r.weight1});
      }
    }
    term_begin.push_back(static_cast<int64_t>(terms.size()));
  }
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, out.size(0) * Co, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> u(u_size), row_sum(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / Co, co = plane % Co;
      for (size_t b = 0; b < branches.size(); ++b) {
        const TapBranch<acc_t>& br = branches[b];
        const TapStrides& t = br.s;
        const scalar_t* z = taps[b].const_data_ptr<scalar_t>() + n * t.n + co * t.c;
        for (int64_t ky = 0; ky < br.k; ++ky) {
          for (int64_t i = 0; i < br.h; ++i) {
            acc_t* u_row = u.data() + br.u_offset + (ky * br.h + i) * W;
            std::fill(u_row, u_row + W, acc_t(0));
            for (int64_t kx = 0; kx < br.k; ++kx) {
              const scalar_t* z_row = z + ky * t.ky + kx * t.kx + i * t.i;
              for (int64_t j = 0; j < br.w; ++j) spread(u_row, br.cols[kx], j, static_cast<acc_t>(z_row[j * t.j]));
            }
          }
        }
      }
      scalar_t* plane_out = dst + n * s.n + co * s.c;
      for (int64_t p = 0; p < H; ++p) {
        const RowTerm<acc_t>* row_terms = terms.data() + term_begin[p];
        const int64_t term_count = term_begin[p + 1] - term_begin[p];
        int64_t q0 = 0;
        for (; q0 + kColumnChunk <= W; q0 += kColumnChunk) {  // the chunk's sums stay in registers
          acc_t sum[kColumnChunk] = {};
          for (int64_t t = 0; t < term_count; ++t) {
            const RowTerm<acc_t>& term = row_terms[t];
            const acc_t* __restrict__ u0 = u.data() + term.offset0 + q0;
            const acc_t* __restrict__ u1 = u.data() + term.offset1 + q0;
            for (int j = 0; j < kColumnChunk; ++j) sum[j] += term.weight0 * u0[j] + term.weight1 * u1[j];
          }
          std::copy(sum, sum + kColumnChunk, row_sum.begin() + q0);
        }
        std::fill(row_sum.begin() + q0, row_sum.end(), acc_t(0));
        for (int64_t t = 0; t < term_count; ++t) {
          const RowTerm<acc_t>& term = row_terms[t];
          for (int64_t q = q0; q < W; ++q) row_sum[q] += term.weight0 * u[term.offset0 + q] + term.weight1 * u[term.offset1 + q];
        }
        scalar_t* row_out = plane_out + p * s.h;
        if (s.w == 1) {
          for (int64_t q = 0; q < W; ++q) row_out[q] = static_cast<scalar_t>(static_cast<acc_t>(row_out[q]) + row_sum[q]);
        } else {
          for (int64_t q = 0; q < W; ++q) {
            row_out[q * s.w] = static_cast<scalar_t>(static_cast<acc_t>(row_out[q * s.w]) + row_sum[q]);
          }
        }
      }
    }
  });
}

// Adjoint of taps_add for one branch: grad_z (N, Co, K, K, h, w) through its strides, gathered along
// the height first (readers of the ky-shifted stencils, whole rows at a time) into a (K, h, W) buffer,
// then along the width (readers of the kx-shifted stencils).
template <typename scalar_t>
void taps_backward(const at::Tensor& grad, const at::Tensor& grad_z, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Co = grad.size(1), H = grad.size(2), W = grad.size(3);
  const int64_t K = grad_z.size(2), h = grad_z.size(4), w = grad_z.size(5);  // K: the kernel size
  const Strides4 s = strides_of(grad);
  const TapStrides t = tap_strides(grad_z);
  std::vector<HeightAdjoint<acc_t>> rows;  // per ky
  std::vector<AxisReaders<acc_t>> cols;    // per kx
  for (int64_t k = 0; k < K; ++k) {
    rows.push_back(height_adjoint(axis_readers<acc_t>(h, H, align_corners, k - K / 2), h, H));
    cols.push_back(axis_readers<acc_t>(w, W, align_corners, k - K / 2));
  }
  std::vector<int64_t> row_offset(K * h);  // of partial's row ky * h + i in grad_z
  for (int64_t ky = 0; ky < K; ++ky) {
    for (int64_t i = 0; i < h; ++i) row_offset[ky * h + i] = ky * t.ky + i * t.i;
  }
  const scalar_t* src = grad.const_data_ptr<scalar_t>();
  scalar_t* dst = grad_z.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, grad.size(0) * Co, grain_for(H * W), [&](int64_t begin, int64_t end) {
    RowBlocks<acc_t> partial(K * h, W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / Co, co = plane % Co;
      const scalar_t* g = src + n * s.n + co * s.c;
      for (int64_t ky = 0; ky < K; ++ky) {
        gather_rows(partial, ky * h, rows[ky], h, g, s.h, s.w, W);
      }
      scalar_t* out = dst + n * t.n + co * t.c;
      for (int64_t kx = 0; kx < K; ++kx) {
        gather_columns(partial, K * h, cols[kx], w, [&](int64_t row, int64_t j, acc_t value) {
          out[row_offset[row] + kx * t.kx + j * t.j] = static_cast<scalar_t>(value);
        });
      }
    }
  });
}

// ---------------------------------------------------------------- operators

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace

at::Tensor pyramid_pool_kernel(const at::Tensor& x, at::IntArrayRef bins) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) > 0 && x.size(3) > 0, "pyramid_pool_kernel: x must be (N, C, H, W), H, W > 0");
  const int64_t cells = checked_pool_cells(bins);
  const std::vector<int64_t> bin_list(bins.begin(), bins.end());
  at::Tensor out = new_output({x.size(0), x.size(1), cells}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyramid_pool_kernel",
                                  [&] { pool_forward<scalar_t>(x, out, bin_list); });
  return out;
}

at::Tensor pyramid_pool_backward_kernel(const at::Tensor& grad, at::IntArrayRef bins, int64_t height, int64_t width,
                                        bool channels_last) {
  const std::vector<int64_t> bin_list(bins.begin(), bins.end());
  TORCH_CHECK(height > 0 && width > 0, "pyramid_pool_backward_kernel: height and width must be positive, got ", height,
              "x", width);
  TORCH_CHECK(grad.dim() == 3 && grad.size(2) == checked_pool_cells(bins),
              "pyramid_pool_backward_kernel: grad must be (N, C, sum of bin^2)");
  const at::Tensor g = grad.contiguous();
  at::Tensor out = new_output({g.size(0), g.size(1), height, width}, g.options(), memory_format(channels_last));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pyramid_pool_backward_kernel",
                                  [&] { pool_backward<scalar_t>(g, out, bin_list); });
  return out;
}

at::Tensor upsample_concat_kernel(const at::Tensor& x, at::TensorList branches, bool align_corners,
                                  bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "upsample_concat_kernel: x must be (N, C, H, W)");
  int64_t channels = x.size(1);
  for (const at::Tensor& z : branches) {
    TORCH_CHECK(z.dim() == 4 && z.size(0) == x.size(0) && z.scalar_type() == x.scalar_type(),
                "upsample_concat_kernel: every branch must be (N, C_b, h, w) of x's batch and dtype");
    channels += z.size(1);
  }
  at::Tensor out = new_output({x.size(0), channels, x.size(2), x.size(3)}, x.options(), memory_format(channels_last));
  std::vector<at::Tensor> contiguous_branches;
  for (const at::Tensor& z : branches) contiguous_branches.push_back(z.contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_concat_kernel",
                                  [&] { upsample_concat_planes<scalar_t>(x, contiguous_branches, out, align_corners); });
  return out;
}

std::vector<at::Tensor> upsample_concat_backward_kernel(const at::Tensor& grad, int64_t channels,
                                                        at::IntArrayRef branch_sizes, bool align_corners) {
  TORCH_CHECK(grad.dim() == 4 && branch_sizes.size() % 3 == 0,
              "upsample_concat_backward_kernel: grad (N, C_total, H, W) and (C_b, h, w) per branch");
  TORCH_CHECK(channels >= 0, "upsample_concat_backward_kernel: channels must be >= 0, got ", channels);
  std::vector<at::Tensor> grads;
  int64_t total = channels;
  for (size_t b = 0; b < branch_sizes.size(); b += 3) {
    grads.push_back(new_output({grad.size(0), branch_sizes[b], branch_sizes[b + 1], branch_sizes[b + 2]}, grad.options()));
    total += branch_sizes[b];
  }
  TORCH_CHECK(total == grad.size(1), "upsample_concat_backward_kernel: channels do not add up to grad's");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_concat_backward_kernel",
                                  [&] { upsample_concat_backward_planes<scalar_t>(grad, channels, grads, align_corners); });
  return grads;
}

// k is read from each tap tensor; branches may have different k.
void pyramid_taps_add_kernel(const at::Tensor& out, at::TensorList taps, bool align_corners) {
  TORCH_CHECK(out.dim() == 4, "pyramid_taps_add_kernel: out must be (N, C_out, H, W)");
  for (const at::Tensor& z : taps) {
    TORCH_CHECK(z.dim() == 6 && z.size(0) == out.size(0) && z.size(1) == out.size(1) && z.size(2) == z.size(3) &&
                    z.size(2) % 2 == 1 && z.scalar_type() == out.scalar_type(),
                "pyramid_taps_add_kernel: every tap tensor must be (N, C_out, k, k, h, w), k odd, of out's dtype; got ",
                z.sizes(), " ", z.scalar_type(), " for out ", out.sizes(), " ", out.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pyramid_taps_add_kernel",
                                  [&] { taps_add<scalar_t>(out, taps, align_corners); });
}

// Each grad is returned as (N, C_out, k, k, h, w), k = kernel_size, over (k, k, C_out, N, h, w) storage:
// the order in which the op's matmuls read it.
std::vector<at::Tensor> pyramid_taps_backward_kernel(const at::Tensor& grad, at::IntArrayRef tap_sizes,
                                                     int64_t kernel_size, bool align_corners) {
  TORCH_CHECK(grad.dim() == 4 && tap_sizes.size() % 2 == 0,
              "pyramid_taps_backward_kernel: grad (N, C_out, H, W) and (h, w) per branch");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1,
              "pyramid_taps_backward_kernel: kernel_size must be odd and >= 1, got ", kernel_size);
  const int64_t k = kernel_size;
  std::vector<at::Tensor> grads;
  for (size_t b = 0; b < tap_sizes.size(); b += 2) {
    at::Tensor grad_z = new_output({k, k, grad.size(1), grad.size(0), tap_sizes[b], tap_sizes[b + 1]}, grad.options())
                            .permute({3, 2, 0, 1, 4, 5});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pyramid_taps_backward_kernel",
                                    [&] { taps_backward<scalar_t>(grad, grad_z, align_corners); });
    grads.push_back(grad_z);
  }
  return grads;
}

SLSDEEP_CPU_VARIANT_END

#ifdef SLSDEEP_CPU_VARIANT_DEFAULT
SLSDEEP_PYRAMID_KERNELS(SLSDEEP_CPU_DECLARE_VARIANTS)
TORCH_LIBRARY_IMPL(slsdeep_kernels, CPU, m) { SLSDEEP_PYRAMID_KERNELS(SLSDEEP_CPU_IMPL) }
#endif
