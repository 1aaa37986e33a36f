// CUDA kernels of conv_bn_relu: see conv_bn_relu.h. The per-element maths is csrc/common/conv_bn_relu.h,
// shared with the CPU kernels.
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common/conv_bn_relu.h"
#include "common/dtype.h"
#include "cuda/conv_bn_relu.h"

namespace slsdeep {
namespace conv_bn_relu_cuda {
namespace {

namespace cbr = slsdeep::conv_bn_relu;

constexpr int kThreads = 256;
constexpr int kTargetBlocks = 1024;  // reduction blocks aimed at (parts × channel blocks)

// Reduction blocks are tiles of channel lanes × row lanes, the coalesced direction on threadIdx.x:
// NHWC 32 channels × 8 rows, NCHW 8 channels × 32 rows (consecutive rows are contiguous there).
template <bool kChannelsLast>
struct Tile {
  static constexpr int kChannels = kChannelsLast ? 32 : 8;
  static constexpr int kRows = kThreads / kChannels;
};

__device__ __forceinline__ float load_or(const float* p, int64_t i, float fallback) { return p ? p[i] : fallback; }

__device__ __forceinline__ int64_t channel_of(int64_t i, const Activation& a) {
  return a.channels_last ? i % a.C : (i / a.S) % a.C;
}

// Offset of row r = (n, s) of channel c.
__device__ __forceinline__ int64_t offset_of(int64_t r, int64_t c, const Activation& a) {
  if (a.channels_last) return r * a.C + c;
  const int64_t n = r / a.S;
  return (n * a.C + c) * a.S + (r - n * a.S);
}

struct Split {
  int64_t parts, rows_per_part;
};

int tile_channels(const Activation& a) { return a.channels_last ? Tile<true>::kChannels : Tile<false>::kChannels; }

int64_t channel_blocks(const Activation& a) { return (a.C + tile_channels(a) - 1) / tile_channels(a); }

Split split_of(const Activation& a) {
  const int64_t rows = a.N * a.S;
  const int64_t row_lanes = kThreads / tile_channels(a);
  const int64_t by_rows = (rows + row_lanes - 1) / row_lanes;
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(by_rows, kTargetBlocks / channel_blocks(a)));
  const int64_t rows_per_part = (rows + parts - 1) / parts;
  parts = (rows + rows_per_part - 1) / rows_per_part;
  return {parts, rows_per_part};
}

// This thread's channel lane and row lane in a reduction tile.
template <bool kChannelsLast>
__device__ __forceinline__ void tile_lanes(int& channel, int& row) {
  constexpr int lanes_x = kChannelsLast ? Tile<kChannelsLast>::kChannels : Tile<kChannelsLast>::kRows;
  const int x = threadIdx.x % lanes_x, y = threadIdx.x / lanes_x;
  channel = kChannelsLast ? x : y;
  row = kChannelsLast ? y : x;
}

// A thread of a reduction block (blockIdx.x: a tile of channels, blockIdx.y: a part of the rows):
// its lanes in the tile, its channel c and the part's rows [start, end).
template <bool kChannelsLast>
struct PartLanes {
  int channel_lane, row_lane;
  int64_t c, start, end;
  __device__ __forceinline__ PartLanes(const Activation& a, int64_t rows_per_part) {
    tile_lanes<kChannelsLast>(channel_lane, row_lane);
    c = static_cast<int64_t>(blockIdx.x) * Tile<kChannelsLast>::kChannels + channel_lane;
    start = static_cast<int64_t>(blockIdx.y) * rows_per_part;
    end = min(start + rows_per_part, a.N * a.S);
  }
};

// Per thread: Welford over its rows; per block: Chan merges over the row lanes (fixed tree).
template <typename T, bool kChannelsLast>
__global__ void stats_partial_kernel(const T* __restrict__ y, Activation a, int64_t rows_per_part, float* part_mean,
                                     float* part_m2) {
  using tile = Tile<kChannelsLast>;
  __shared__ float sh_count[kThreads], sh_mean[kThreads], sh_m2[kThreads];
  const PartLanes<kChannelsLast> lanes(a, rows_per_part);
  const int channel_lane = lanes.channel_lane, row_lane = lanes.row_lane;
  const int64_t c = lanes.c, start = lanes.start, end = lanes.end;
  cbr::Moments<float> m{0.f, 0.f, 0.f};
  if (c < a.C) {
    for (int64_t r = start + row_lane; r < end; r += tile::kRows) {
      const float v = to_float(y[offset_of(r, c, a)]);
      m.count += 1.f;
      const float d = v - m.mean;
      m.mean += d / m.count;
      m.m2 += d * (v - m.mean);
    }
  }
  const int slot = row_lane * tile::kChannels + channel_lane;
  sh_count[slot] = m.count;
  sh_mean[slot] = m.mean;
  sh_m2[slot] = m.m2;
  __syncthreads();
  for (int stride = tile::kRows / 2; stride > 0; stride /= 2) {
    if (row_lane < stride) {
      const int other = slot + stride * tile::kChannels;
      const cbr::Moments<float> merged =
          cbr::merge<float>({sh_count[slot], sh_mean[slot], sh_m2[slot]}, {sh_count[other], sh_mean[other], sh_m2[other]});
      sh_count[slot] = merged.count;
      sh_mean[slot] = merged.mean;
      sh_m2[slot] = merged.m2;
    }
    __syncthreads();
  }
  if (row_lane == 0 && c < a.C) {
    part_mean[blockIdx.y * a.C + c] = sh_mean[slot];
    part_m2[blockIdx.y * a.C + c] = sh_m2[slot];
  }
}

__global__ void stats_merge_kernel(const float* part_mean, const float* part_m2, Activation a, Split split,
                                   const float* gamma, const float* beta, float eps, float* mean, float* var, float* scale,
                                   float* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  const int64_t rows = a.N * a.S;
  cbr::Moments<float> total{0.f, 0.f, 0.f};
  for (int64_t p = 0; p < split.parts; ++p) {
    const float count = static_cast<float>(min(split.rows_per_part, rows - p * split.rows_per_part));
    total = cbr::merge<float>(total, {count, part_mean[p * a.C + c], part_m2[p * a.C + c]});
  }
  mean[c] = total.mean;
  var[c] = total.m2 / total.count;
  cbr::fold_train<float>(load_or(gamma, c, 1.f), load_or(beta, c, 0.f), total.mean, var[c], eps, scale[c], shift[c]);
}

__global__ void fold_eval_kernel(const float* gamma, const float* beta, const float* running_mean,
                                 const float* running_var, const float* conv_bias, float eps, int64_t C, float* scale,
                                 float* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  cbr::fold_eval<float>(load_or(gamma, c, 1.f), load_or(beta, c, 0.f), running_mean[c], running_var[c],
                        load_or(conv_bias, c, 0.f), eps, scale[c], shift[c]);
}

// kVec consecutive elements moved as one aligned 16-byte (or kVec-element) access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__global__ void bn_act_kernel(const T* y, T* out, Activation a, const float* __restrict__ scale,
                              const float* __restrict__ shift, bool relu) {
  const int64_t packs = a.N * a.C * a.S / kVec;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, kVec> in = reinterpret_cast<const Pack<T, kVec>*>(y)[p];
    Pack<T, kVec> result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = channel_of(p * kVec + j, a);
      result.v[j] = from_float<T>(cbr::bn_act(to_float(in.v[j]), scale[c], shift[c], relu));
    }
    reinterpret_cast<Pack<T, kVec>*>(out)[p] = result;
  }
}

// Per thread: Σg and Σg(y − mean) over its rows, g the ReLU-masked gradient; per block: a fixed tree.
template <typename T, bool kChannelsLast>
__global__ void backward_partial_kernel(const T* __restrict__ grad, const T* __restrict__ y, Activation a,
                                        int64_t rows_per_part, const float* mean, const float* var, const float* gamma,
                                        const float* beta, float eps, bool relu, float* part_g, float* part_gc) {
  using tile = Tile<kChannelsLast>;
  __shared__ float sh_g[kThreads], sh_gc[kThreads];
  const PartLanes<kChannelsLast> lanes(a, rows_per_part);
  const int channel_lane = lanes.channel_lane, row_lane = lanes.row_lane;
  const int64_t c = lanes.c, start = lanes.start, end = lanes.end;
  float sum_g = 0.f, sum_gc = 0.f;
  if (c < a.C) {
    float scale, shift;
    const float m = mean[c];
    cbr::fold_train<float>(load_or(gamma, c, 1.f), load_or(beta, c, 0.f), m, var[c], eps, scale, shift);
    for (int64_t r = start + row_lane; r < end; r += tile::kRows) {
      const int64_t i = offset_of(r, c, a);
      const float yv = to_float(y[i]);
      const float g = cbr::relu_masked(to_float(grad[i]), yv, scale, shift, relu);
      sum_g += g;
      sum_gc += g * (yv - m);
    }
  }
  const int slot = row_lane * tile::kChannels + channel_lane;
  sh_g[slot] = sum_g;
  sh_gc[slot] = sum_gc;
  __syncthreads();
  for (int stride = tile::kRows / 2; stride > 0; stride /= 2) {
    if (row_lane < stride) {
      sh_g[slot] += sh_g[slot + stride * tile::kChannels];
      sh_gc[slot] += sh_gc[slot + stride * tile::kChannels];
    }
    __syncthreads();
  }
  if (row_lane == 0 && c < a.C) {
    part_g[blockIdx.y * a.C + c] = sh_g[slot];
    part_gc[blockIdx.y * a.C + c] = sh_gc[slot];
  }
}

// Per channel: grad_γ, grad_β and, for the elementwise pass, (scale, shift, g_coef, centered_coef, constant).
__global__ void backward_merge_kernel(const float* part_g, const float* part_gc, Activation a, int64_t parts,
                                      const float* mean, const float* var, const float* gamma, const float* beta,
                                      float eps, float* grad_gamma, float* grad_beta, float* coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  float sum_g = 0.f, sum_gc = 0.f;
  for (int64_t p = 0; p < parts; ++p) {
    sum_g += part_g[p * a.C + c];
    sum_gc += part_gc[p * a.C + c];
  }
  const float g = load_or(gamma, c, 1.f);
  const float invstd = cbr::inverse_std(var[c], eps);
  grad_gamma[c] = sum_gc * invstd;
  grad_beta[c] = sum_g;
  cbr::fold_train<float>(g, load_or(beta, c, 0.f), mean[c], var[c], eps, coef[c], coef[a.C + c]);
  const cbr::BackwardCoefficients<float> k =
      cbr::backward_coefficients<float>(g, invstd, sum_g, sum_gc, static_cast<float>(a.N * a.S));
  coef[2 * a.C + c] = k.g_coef;
  coef[3 * a.C + c] = k.centered_coef;
  coef[4 * a.C + c] = k.constant;
}

template <typename T, int kVec>
__global__ void backward_apply_kernel(const T* __restrict__ grad, const T* __restrict__ y, T* __restrict__ grad_y,
                                      Activation a, const float* __restrict__ mean, const float* __restrict__ coef,
                                      bool relu) {
  const int64_t packs = a.N * a.C * a.S / kVec;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, kVec> gv = reinterpret_cast<const Pack<T, kVec>*>(grad)[p];
    const Pack<T, kVec> yv = reinterpret_cast<const Pack<T, kVec>*>(y)[p];
    Pack<T, kVec> result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = channel_of(p * kVec + j, a);
      const float yj = to_float(yv.v[j]);
      const float g = cbr::relu_masked(to_float(gv.v[j]), yj, coef[c], coef[a.C + c], relu);
      const cbr::BackwardCoefficients<float> k{coef[2 * a.C + c], coef[3 * a.C + c], coef[4 * a.C + c]};
      result.v[j] = from_float<T>(cbr::bn_backward(g, yj - mean[c], k));
    }
    reinterpret_cast<Pack<T, kVec>*>(grad_y)[p] = result;
  }
}

// Elements per thread access: 16 bytes where the size and every pointer allow it, else 1.
template <typename T>
int vector_width(const Activation& a, std::initializer_list<const void*> pointers) {
  constexpr int kWide = 16 / sizeof(T);
  if ((a.N * a.C * a.S) % kWide != 0) return 1;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return kWide;
}

unsigned elementwise_blocks(const Activation& a, int vec) {
  const int64_t packs = a.N * a.C * a.S / vec;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((packs + kThreads - 1) / kThreads, 65535LL * 8)));
}

unsigned channel_threads_blocks(int64_t C) { return static_cast<unsigned>((C + kThreads - 1) / kThreads); }

// f(element tag) for a floating dtype (the one dispatch macro of csrc/common/dtype.h), then the launch's error.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  SLSDEEP_DISPATCH_FLOATING(dtype, f(scalar_t{}))
  return cudaGetLastError();
}

// f(element tag, layout tag): the layout as Flag<channels_last>.
template <bool kValue>
struct Flag {
  static constexpr bool value = kValue;
};

template <typename F>
cudaError_t dispatch(DType dtype, bool channels_last, F&& f) {
  return dispatch(dtype, [&](auto tag) {
    if (channels_last) {
      f(tag, Flag<true>{});
    } else {
      f(tag, Flag<false>{});
    }
  });
}

}  // namespace

cudaError_t fold_eval(const float* gamma, const float* beta, const float* running_mean, const float* running_var,
                      const float* conv_bias, float eps, int64_t C, float* scale, float* shift, cudaStream_t stream) {
  fold_eval_kernel<<<channel_threads_blocks(C), kThreads, 0, stream>>>(gamma, beta, running_mean, running_var, conv_bias,
                                                                        eps, C, scale, shift);
  return cudaGetLastError();
}

cudaError_t bn_act(DType dtype, const void* y, void* out, const Activation& a, const float* scale, const float* shift,
                   bool relu, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kWide = 16 / sizeof(T);
    const T* in = static_cast<const T*>(y);
    T* o = static_cast<T*>(out);
    if (vector_width<T>(a, {y, out}) == kWide) {
      bn_act_kernel<T, kWide><<<elementwise_blocks(a, kWide), kThreads, 0, stream>>>(in, o, a, scale, shift, relu);
    } else {
      bn_act_kernel<T, 1><<<elementwise_blocks(a, 1), kThreads, 0, stream>>>(in, o, a, scale, shift, relu);
    }
  });
}

int64_t workspace_floats(const Activation& a) { return 2 * split_of(a).parts * a.C + 5 * a.C; }

cudaError_t channel_stats(DType dtype, const void* y, const Activation& a, const float* gamma, const float* beta,
                          float eps, float* workspace, float* mean, float* var, float* scale, float* shift,
                          cudaStream_t stream) {
  const Split split = split_of(a);
  float* part_mean = workspace;
  float* part_m2 = workspace + split.parts * a.C;
  const dim3 grid(static_cast<unsigned>(channel_blocks(a)), static_cast<unsigned>(split.parts));
  const cudaError_t launched = dispatch(dtype, a.channels_last, [&](auto tag, auto layout) {
    using T = decltype(tag);
    stats_partial_kernel<T, decltype(layout)::value><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(y), a, split.rows_per_part, part_mean,
                                                           part_m2);
  });
  if (launched != cudaSuccess) return launched;
  stats_merge_kernel<<<channel_threads_blocks(a.C), kThreads, 0, stream>>>(part_mean, part_m2, a, split, gamma, beta, eps,
                                                                           mean, var, scale, shift);
  return cudaGetLastError();
}

cudaError_t bn_backward(DType dtype, const void* grad, const void* y, void* grad_y, const Activation& a,
                        const float* mean, const float* var, const float* gamma, const float* beta, float eps, bool relu,
                        float* workspace, float* grad_gamma, float* grad_beta, cudaStream_t stream) {
  const Split split = split_of(a);
  float* part_g = workspace;
  float* part_gc = workspace + split.parts * a.C;
  float* coef = workspace + 2 * split.parts * a.C;
  const dim3 grid(static_cast<unsigned>(channel_blocks(a)), static_cast<unsigned>(split.parts));
  cudaError_t launched = dispatch(dtype, a.channels_last, [&](auto tag, auto layout) {
    using T = decltype(tag);
    backward_partial_kernel<T, decltype(layout)::value><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(y), a,
                                                              split.rows_per_part, mean, var, gamma, beta, eps, relu,
                                                              part_g, part_gc);
  });
  if (launched != cudaSuccess) return launched;
  backward_merge_kernel<<<channel_threads_blocks(a.C), kThreads, 0, stream>>>(part_g, part_gc, a, split.parts, mean, var,
                                                                              gamma, beta, eps, grad_gamma, grad_beta,
                                                                              coef);
  launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kWide = 16 / sizeof(T);
    const T* g = static_cast<const T*>(grad);
    const T* yv = static_cast<const T*>(y);
    T* o = static_cast<T*>(grad_y);
    if (vector_width<T>(a, {grad, y, grad_y}) == kWide) {
      backward_apply_kernel<T, kWide><<<elementwise_blocks(a, kWide), kThreads, 0, stream>>>(g, yv, o, a, mean, coef, relu);
    } else {
      backward_apply_kernel<T, 1><<<elementwise_blocks(a, 1), kThreads, 0, stream>>>(g, yv, o, a, mean, coef, relu);
    }
  });
}

}  // namespace conv_bn_relu_cuda
}  // namespace slsdeep
