// Index maths of pyramid pooling (docs/design.md §4.2), shared by the CPU and CUDA kernels.
//
// * Adaptive average pooling, PyTorch's rule: cell i of a grid of `cells` over `size` pixels
//   averages the window [floor(i*size/cells), ceil((i+1)*size/cells)) (any size, also < cells).
// * Bilinear resizing along one axis, PyTorch's rule (ATen's area_pixel_compute_source_index and
//   guard_index_and_lambda): output index o reads input indices index0/index1 with weights
//   weight0/weight1, computed in the accumulation type.
// * Pooling by segments (AxisPlan, below): the forward sums every segment once, the adjoint gives
//   every segment the gradients of the cells containing it.
// * The adjoints are gathers: the cells containing a segment, and the output indices whose stencil
//   reads an input index (a contiguous range, found by bisection because the stencils are
//   monotone in o), so backward passes need no atomics.
// Torch-free on purpose (nvcc compiles it without torch headers).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace slsdeep {
namespace pyramid {

// First pixel of the window of adaptive cell `cell` (of `cells`) over `size` pixels.
SLSDEEP_HD int64_t window_begin(int64_t cell, int64_t size, int64_t cells) { return cell * size / cells; }

// One past the last pixel of that window.
SLSDEEP_HD int64_t window_end(int64_t cell, int64_t size, int64_t cells) {
  return ((cell + 1) * size + cells - 1) / cells;
}

// Pooling by segments. One axis of `size` pixels is cut at every window boundary of every bin, so
// each window is a run of whole segments and each pixel lies in exactly one segment. Pooling sums
// each segment once (one read of the input), then each cell sums its segments; the adjoint gives
// each segment the sum of its cells' gradients over their areas, one value to fill it with. The
// axis's cells are numbered bin by bin: cell k = (offset of bin b) + i, i < b.
constexpr int kMaxBins = 16;                      // bins of one pool
constexpr int kMaxAxisCells = 64;                 // the sum of the bins
constexpr int kMaxSegments = 2 * kMaxAxisCells;  // > the distinct cuts - 1 (every bin cuts at 0 and size)

struct AxisPlan {
  int segments;
  int32_t bound[kMaxSegments + 1];  // segment s = pixels [bound[s], bound[s + 1])
  int32_t first[kMaxAxisCells];     // cell k = segments [first[k], last[k])
  int32_t last[kMaxAxisCells];
};

// The plan of one axis; false (plan untouched) when the bins sum to more than kMaxAxisCells or
// size is not in [1, 2^31). Host code: a sorted insertion over the few cuts.
inline bool axis_plan(int64_t size, const int64_t* bins, int num_bins, AxisPlan* plan) {
  int64_t cells = 0;
  for (int b = 0; b < num_bins; ++b) cells += bins[b];
  if (cells > kMaxAxisCells || size < 1 || size > INT32_MAX) return false;
  AxisPlan p;
  p.segments = 0;
  p.bound[0] = 0;
  int cuts = 1;
  auto insert = [&](int64_t value) {
    int at = 0;
    while (at < cuts && p.bound[at] < value) ++at;
    if (at < cuts && p.bound[at] == value) return;
    for (int k = cuts; k > at; --k) p.bound[k] = p.bound[k - 1];
    p.bound[at] = static_cast<int32_t>(value);
    ++cuts;
  };
  for (int b = 0; b < num_bins; ++b) {
    for (int64_t i = 0; i < bins[b]; ++i) {
      insert(window_begin(i, size, bins[b]));
      insert(window_end(i, size, bins[b]));
    }
  }
  p.segments = cuts - 1;
  auto segment_at = [&](int64_t value) {
    int s = 0;
    while (p.bound[s] != value) ++s;
    return s;
  };
  int k = 0;
  for (int b = 0; b < num_bins; ++b) {
    for (int64_t i = 0; i < bins[b]; ++i, ++k) {
      p.first[k] = segment_at(window_begin(i, size, bins[b]));
      p.last[k] = segment_at(window_end(i, size, bins[b]));
    }
  }
  *plan = p;
  return true;
}

// Pixels in the window of axis cell k.
SLSDEEP_HD int64_t cell_extent(const AxisPlan& plan, int k) { return plan.bound[plan.last[k]] - plan.bound[plan.first[k]]; }

// The cells [*begin, *end) of one bin (its `count` cells numbered from `offset` along the axis)
// that contain segment s: consecutive, found from the plan without a division.
SLSDEEP_HD void cells_containing(const AxisPlan& plan, int offset, int count, int s, int* begin, int* end) {
  int i = 0;
  while (i < count && plan.last[offset + i] <= s) ++i;
  *begin = i;
  while (i < count && plan.first[offset + i] <= s) ++i;
  *end = i;
}

// f(cell, area) for every cell containing the segment pair (sh, sw) of the plans `rows` and `cols`:
// `cell` its index among a plane's Σ b² cells (bins in order, each b×b row-major), `area` the
// pixels of its window. The pool's adjoint, CPU and CUDA alike. `bins` has `bins.count` sizes
// `bins.size[k]` (an array or a pointer).
template <typename Bins, typename F>
SLSDEEP_HD void for_cells_containing(const AxisPlan& rows, const AxisPlan& cols, const Bins& bins, int sh, int sw,
                                     const F& f) {
  int axis_offset = 0;
  int64_t cell_offset = 0;
  for (int k = 0; k < bins.count; ++k) {
    const int b = static_cast<int>(bins.size[k]);
    int i0, i1, j0, j1;
    cells_containing(rows, axis_offset, b, sh, &i0, &i1);
    cells_containing(cols, axis_offset, b, sw, &j0, &j1);
    for (int i = i0; i < i1; ++i) {
      for (int j = j0; j < j1; ++j) {
        f(cell_offset + static_cast<int64_t>(i) * b + j,
          cell_extent(rows, axis_offset + i) * cell_extent(cols, axis_offset + j));
      }
    }
    axis_offset += b;
    cell_offset += static_cast<int64_t>(b) * b;
  }
}

// Output index -> input index scale of bilinear resizing from in_size to out_size.
template <typename acc_t>
SLSDEEP_HD acc_t linear_scale(int64_t in_size, int64_t out_size, bool align_corners) {
  if (align_corners) {
    return out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1) : acc_t(0);
  }
  return static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
}

// The two input indices output index `out_index` reads and their weights.
template <typename acc_t>
struct LinearTap {
  int64_t index0;
  int64_t index1;
  acc_t weight0;
  acc_t weight1;
};

// a·b + c rounded after the product and after the sum, on the host and on the device alike: nvcc
// would fuse it into one FMA on the device, which moves a stencil's index0 by one for some sizes
// (e.g. 2 -> 50, output 37), and the CUDA kernels' plans (made on the host) must name the rows their
// stencils (computed on the device) read. The CPU build never fuses (-ffp-contract=off).
template <typename acc_t>
SLSDEEP_HD acc_t mul_add_unfused(acc_t a, acc_t b, acc_t c) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    return __fadd_rn(__fmul_rn(a, b), c);
  } else {
    return __dadd_rn(__dmul_rn(a, b), c);
  }
#else
  return a * b + c;
#endif
}

template <typename acc_t>
SLSDEEP_HD LinearTap<acc_t> linear_tap(int64_t out_index, int64_t in_size, acc_t scale, bool align_corners) {
  acc_t source = align_corners ? scale * static_cast<acc_t>(out_index)
                               : mul_add_unfused(scale, static_cast<acc_t>(out_index) + acc_t(0.5), acc_t(-0.5));
  if (source < acc_t(0)) source = acc_t(0);
  int64_t index0 = static_cast<int64_t>(source);  // floor, source >= 0
  if (index0 > in_size - 1) index0 = in_size - 1;
  acc_t weight1 = source - static_cast<acc_t>(index0);
  weight1 = weight1 < acc_t(0) ? acc_t(0) : (weight1 > acc_t(1) ? acc_t(1) : weight1);
  LinearTap<acc_t> tap;
  tap.index0 = index0;
  tap.index1 = index0 + (index0 < in_size - 1 ? 1 : 0);
  tap.weight0 = acc_t(1) - weight1;
  tap.weight1 = weight1;
  return tap;
}

// The input indices [*begin, *end) that the stencils of the outputs [first, last] (clamped to
// [0, out_size)) read: index0 and index1 never decrease along the output, so the span runs from the
// first output's index0 to the last one's index1. The taps kernels stage this span of each branch.
template <typename acc_t>
SLSDEEP_HD void source_span(int64_t first, int64_t last, int64_t in_size, int64_t out_size, acc_t scale,
                            bool align_corners, int64_t* begin, int64_t* end) {
  first = first < 0 ? 0 : first;
  last = last > out_size - 1 ? out_size - 1 : last;
  *begin = linear_tap<acc_t>(first, in_size, scale, align_corners).index0;
  *end = linear_tap<acc_t>(last, in_size, scale, align_corners).index1 + 1;
}

// Weight of input index `in_index` in the stencil `tap` (both taps may name the same index).
template <typename acc_t>
SLSDEEP_HD acc_t tap_weight(const LinearTap<acc_t>& tap, int64_t in_index) {
  return (tap.index0 == in_index ? tap.weight0 : acc_t(0)) + (tap.index1 == in_index ? tap.weight1 : acc_t(0));
}

// The output indices o in [0, out_size) whose stencil reads input index `in_index`: [*begin, *end).
// index0(o) and index1(o) never decrease with o, so the readers are {o : index0(o) <= in_index <=
// index1(o)}, an interval found by two bisections over the forward rule itself (exact, no float
// inversion).
template <typename acc_t>
SLSDEEP_HD void linear_readers(int64_t in_index, int64_t in_size, int64_t out_size, acc_t scale, bool align_corners,
                               int64_t* begin, int64_t* end) {
  int64_t lo = 0;
  int64_t hi = out_size;
  while (lo < hi) {  // first o with index1(o) >= in_index
    const int64_t mid = lo + (hi - lo) / 2;
    if (linear_tap<acc_t>(mid, in_size, scale, align_corners).index1 >= in_index) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  *begin = lo;
  hi = out_size;
  while (lo < hi) {  // first o with index0(o) > in_index
    const int64_t mid = lo + (hi - lo) / 2;
    if (linear_tap<acc_t>(mid, in_size, scale, align_corners).index0 > in_index) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  *end = lo;
}

}  // namespace pyramid
}  // namespace slsdeep
