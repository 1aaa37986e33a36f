// CUDA kernels of pyramid pooling (declared in csrc/cuda/pyramid.h). One thread per output element
// in a grid-stride loop, threads walking the output in memory order (NCHW or channels_last) so that
// writes coalesce; fp32 accumulation; the index maths of csrc/common/pyramid.h. Backward kernels
// gather (the cells containing a pixel, the bisected reader range of a source index): no atomics.
#include "common/dtype.h"
#include "common/pyramid.h"
#include "cuda/pyramid.h"

namespace slsdeep {
namespace pyramid_cuda {
namespace {

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

// Bins by value: size and first cell of each, and the total cell count.
struct BinList {
  int count;
  int64_t size[kMaxBins];
  int64_t offset[kMaxBins];
  int64_t cells;
};

BinList make_bins(const int64_t* bins, int num_bins) {
  BinList list{};
  list.count = num_bins;
  for (int k = 0; k < num_bins; ++k) {
    list.size[k] = bins[k];
    list.offset[k] = list.cells;
    list.cells += bins[k] * bins[k];
  }
  return list;
}

// ---------------------------------------------------------------- pyramid_pool

template <typename scalar_t>
__global__ void pool_forward_kernel(const scalar_t* x, Strides s, int64_t C, int64_t H, int64_t W, BinList bins,
                                    scalar_t* out, int64_t total) {
  SLSDEEP_GRID_STRIDE(index, total) {
    const int64_t cell = index % bins.cells;
    const int64_t plane = index / bins.cells;
    int k = 0;
    while (k + 1 < bins.count && cell >= bins.offset[k + 1]) ++k;
    const int64_t b = bins.size[k], local = cell - bins.offset[k];
    const int64_t h0 = pyramid::window_begin(local / b, H, b), h1 = pyramid::window_end(local / b, H, b);
    const int64_t w0 = pyramid::window_begin(local % b, W, b), w1 = pyramid::window_end(local % b, W, b);
    const scalar_t* in = x + (plane / C) * s.n + (plane % C) * s.c;
    float sum = 0.f;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) sum += to_float(*(in + h * s.h + w * s.w));
    }
    out[index] = from_float<scalar_t>(sum / static_cast<float>((h1 - h0) * (w1 - w0)));
  }
}

template <typename scalar_t>
__global__ void pool_backward_kernel(const scalar_t* grad, BinList bins, scalar_t* grad_x, Strides s, bool channels_last,
                                     int64_t C, int64_t H, int64_t W, int64_t total) {
  SLSDEEP_GRID_STRIDE(index, total) {
    const Position p = position(index, C, H, W, channels_last);
    const scalar_t* g = grad + (p.n * C + p.c) * bins.cells;
    float sum = 0.f;
    for (int k = 0; k < bins.count; ++k) {
      const int64_t b = bins.size[k];
      const int64_t i1 = pyramid::cells_end(p.h, H, b), j1 = pyramid::cells_end(p.w, W, b);
      for (int64_t i = pyramid::cells_begin(p.h, H, b); i < i1; ++i) {
        const int64_t rows = pyramid::window_end(i, H, b) - pyramid::window_begin(i, H, b);
        for (int64_t j = pyramid::cells_begin(p.w, W, b); j < j1; ++j) {
          const int64_t cols = pyramid::window_end(j, W, b) - pyramid::window_begin(j, W, b);
          sum += to_float(*(g + bins.offset[k] + i * b + j)) / static_cast<float>(rows * cols);
        }
      }
    }
    grad_x[offset_of(s, p.n, p.c, p.h, p.w)] = from_float<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------- upsample_concat

template <typename scalar_t>
__global__ void upsample_branch_kernel(const scalar_t* z, int64_t Cb, int64_t h, int64_t w, scalar_t* out, Strides s,
                                       bool channels_last, int64_t channel_offset, int64_t H, int64_t W,
                                       bool align_corners, int64_t total) {
  const float scale_h = pyramid::linear_scale<float>(h, H, align_corners);
  const float scale_w = pyramid::linear_scale<float>(w, W, align_corners);
  SLSDEEP_GRID_STRIDE(index, total) {
    const Position p = position(index, Cb, H, W, channels_last);
    const LinearTap<float> r = pyramid::linear_tap<float>(p.h, h, scale_h, align_corners);
    const LinearTap<float> c = pyramid::linear_tap<float>(p.w, w, scale_w, align_corners);
    const scalar_t* plane = z + (p.n * Cb + p.c) * h * w;
    const float top =
        c.weight0 * to_float(*(plane + r.index0 * w + c.index0)) + c.weight1 * to_float(*(plane + r.index0 * w + c.index1));
    const float bottom =
        c.weight0 * to_float(*(plane + r.index1 * w + c.index0)) + c.weight1 * to_float(*(plane + r.index1 * w + c.index1));
    *(out + offset_of(s, p.n, channel_offset + p.c, p.h, p.w)) = from_float<scalar_t>(r.weight0 * top + r.weight1 * bottom);
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

cudaError_t pool_forward(DType dtype, const void* x, Strides x_strides, int64_t N, int64_t C, int64_t H, int64_t W,
                         const int64_t* bins, int num_bins, void* out, cudaStream_t stream) {
  const BinList list = make_bins(bins, num_bins);
  const int64_t total = N * C * list.cells;
  if (total == 0) return cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype, pool_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
                                       static_cast<const scalar_t*>(x), x_strides, C, H, W, list,
                                       static_cast<scalar_t*>(out), total))
  return cudaGetLastError();
}

cudaError_t pool_backward(DType dtype, const void* grad, const int64_t* bins, int num_bins, void* grad_x, Strides out_strides,
                          bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W, cudaStream_t stream) {
  const BinList list = make_bins(bins, num_bins);
  const int64_t total = N * C * H * W;
  if (total == 0) return cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype, pool_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
                                       static_cast<const scalar_t*>(grad), list, static_cast<scalar_t*>(grad_x),
                                       out_strides, channels_last, C, H, W, total))
  return cudaGetLastError();
}

cudaError_t upsample_branch(DType dtype, const void* z, int64_t N, int64_t Cb, int64_t h, int64_t w, void* out,
                            Strides out_strides, bool channels_last, int64_t channel_offset, int64_t H, int64_t W,
                            bool align_corners, cudaStream_t stream) {
  const int64_t total = N * Cb * H * W;
  if (total == 0) return cudaSuccess;
  SLSDEEP_DISPATCH_FLOATING(dtype, upsample_branch_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
                                       static_cast<const scalar_t*>(z), Cb, h, w, static_cast<scalar_t*>(out),
                                       out_strides, channels_last, channel_offset, H, W, align_corners, total))
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
