// Index maths of pyramid pooling (docs/design.md §4.2), shared by the CPU and CUDA kernels.
//
// * Adaptive average pooling, PyTorch's rule: cell i of a grid of `cells` over `size` pixels
//   averages the window [floor(i*size/cells), ceil((i+1)*size/cells)) (any size, also < cells).
// * Bilinear resizing along one axis, PyTorch's rule (ATen's area_pixel_compute_source_index and
//   guard_index_and_lambda): output index o reads input indices index0/index1 with weights
//   weight0/weight1, computed in the accumulation type.
// * The adjoints are gathers: the cells containing a pixel, and the output indices whose stencil
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

// The cells whose windows contain `pixel`: [cells_begin, cells_end).
SLSDEEP_HD int64_t cells_begin(int64_t pixel, int64_t size, int64_t cells) { return pixel * cells / size; }

SLSDEEP_HD int64_t cells_end(int64_t pixel, int64_t size, int64_t cells) {
  return ((pixel + 1) * cells + size - 1) / size;
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

template <typename acc_t>
SLSDEEP_HD LinearTap<acc_t> linear_tap(int64_t out_index, int64_t in_size, acc_t scale, bool align_corners) {
  acc_t source = align_corners ? scale * static_cast<acc_t>(out_index)
                               : scale * (static_cast<acc_t>(out_index) + acc_t(0.5)) - acc_t(0.5);
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
