// CUDA kernels of conv_bn_relu (declared in conv_bn_relu.h): the BatchNorm passes around cuDNN's
// convolution, designed to the HBM roof (docs/design.md §4.1). The per-element maths and the
// reductions' split are csrc/common/conv_bn_relu.h, shared with the CPU kernels.
//
// Layouts. The channel is uniform along one axis of the activation, and each kernel keeps it so:
//   NCHW, N·C planes of S values: a block sweeps part of one plane, its channel blockIdx's (one
//     32-bit modulo per block); reductions walk a channel's planes with the position carried;
//   NHWC, N·S rows of C values: a thread keeps one pack of channels (its threadIdx) and walks rows.
// No division of any width runs per element, and every offset advances by addition.
// Accesses are 16-byte packs of kVec = 16 / sizeof(T) elements wherever the plane (NCHW) or row
// (NHWC) length is a multiple of kVec and every pointer is 16-byte aligned; else kVec = 1, the
// same code. Reductions: a fixed split of each channel's values into parts (split_units), a fixed
// tree inside a block, the parts merged in order: deterministic, no atomics.
//
// Floors at 4.8 TB/s (H200; 3.35 TB/s H100 SXM), B = N·C·S·sizeof(T): statistics read B,
// bn_act reads and writes 2B, the backward sums read 2B, the backward apply moves 3B. The
// encoder's (16, 2048, 48, 48) bf16 is B = 151 MB: 31 µs statistics, 63 µs bn_act, 63 µs sums,
// 94 µs apply on an H200. The design reaches for it with 16-byte coalesced accesses only, ~1024
// reduction blocks (≥ 7 per SM on 132 SMs) and 2–4 independent 16-byte reads per thread where a
// pass has them; what it reaches waits for a GPU run (bench/gpu_validate.sh). Known gap: an NCHW
// plane of fewer than 128 packs (the pyramid branches' 1×1–6×6 maps) leaves most of its
// elementwise block idle; those tensors are small.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/conv_bn_relu.h"
#include "common/dtype.h"
#include "cuda/conv_bn_relu.h"
#include "cuda/pack.cuh"

namespace slsdeep {
namespace conv_bn_relu_cuda {
namespace {

namespace cbr = slsdeep::conv_bn_relu;
using packs::load;
using packs::store;

constexpr int kThreads = 256;        // threads of an NHWC block (a tile of channel packs × rows)
constexpr int kPlaneThreads = 128;   // threads of an NCHW block (one plane's packs)
constexpr int kTargetBlocks = 1024;  // reduction blocks aimed at: ≥ 7 per SM on 132 SMs
constexpr int kGroup = 4;            // NHWC statistics: rows loaded together, merged as one group

// ---------------------------------------------------------------- helpers

__device__ __forceinline__ float load_or(const float* p, int64_t i, float fallback) { return p ? p[i] : fallback; }

// Channel of lane j of a pack whose first element has channel c: NCHW packs lie in one plane.
template <bool kPlanar>
__device__ __forceinline__ int64_t lane_channel(int64_t c, int j) {
  return kPlanar ? c : c + j;
}

// ---------------------------------------------------------------- launch geometry

// NHWC tile: kVec-channel packs across threadIdx.x (a power of two ≤ 32, so a warp reads whole
// 16-byte packs of consecutive channels), rows across threadIdx.y.
dim3 row_tile(const Activation& a, int vec) {
  const int64_t packs = a.C / vec;
  unsigned x = 1;
  while (x < 32 && x < packs) x *= 2;
  return dim3(x, kThreads / x);
}

unsigned channel_tiles(const Activation& a, int vec, const dim3& tile) {
  return static_cast<unsigned>((a.C / vec + tile.x - 1) / tile.x);
}

// The split of a channel's values into reduction parts: NHWC rows; NCHW packs of the channel's
// N·S/kVec (each part a contiguous run of that sequence, planes one after another).
// Parts: kTargetBlocks over the channel blocks, but no fewer than two groups (NHWC) or four packs
// (NCHW) per thread, so the block's tree stays small beside its reads.
cbr::Split reduction_split(const Activation& a, int vec) {
  if (a.C <= 0) return cbr::split_units(0, 1);
  if (a.channels_last) {
    const dim3 tile = row_tile(a, vec);
    const int64_t rows = a.N * a.S;
    const int64_t tiles = std::max<int64_t>(1, channel_tiles(a, vec, tile));
    const int64_t by_occupancy = (kTargetBlocks + tiles - 1) / tiles;
    return cbr::split_units(rows, std::min<int64_t>(by_occupancy, rows / (2 * kGroup * tile.y)));
  }
  const int64_t packs = a.N * a.S / vec;
  const int64_t by_occupancy = (kTargetBlocks + a.C - 1) / a.C;
  return cbr::split_units(packs, std::min<int64_t>(by_occupancy, packs / (4 * kPlaneThreads)));
}

// ---------------------------------------------------------------- elementwise passes

// bn_act: out = act(y·scale[c] + shift[c]).
template <typename T, int kVec, bool kPlanar_>
struct BnAct {
  static constexpr bool kPlanar = kPlanar_;
  const T* y;  // may be out (eval runs in place)
  T* out;
  const float* __restrict__ scale;
  const float* __restrict__ shift;
  bool relu;

  struct Lanes {
    float scale[kVec], shift[kVec];
  };

  __device__ __forceinline__ Lanes lanes(int64_t c) const {
    Lanes l;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      l.scale[j] = scale[lane_channel<kPlanar>(c, j)];
      l.shift[j] = shift[lane_channel<kPlanar>(c, j)];
    }
    return l;
  }

  __device__ __forceinline__ void apply(const Lanes& l, int64_t offset) const {
    float v[kVec];
    load<T, kVec>(y + offset, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = cbr::bn_act(v[j], l.scale[j], l.shift[j], relu);
    store<T, kVec>(out + offset, v);
  }
};

// The training backward's elementwise pass: grad_y = g_coef·g + centered_coef·(y − mean) + constant,
// g the ReLU-masked gradient; coef holds (scale, shift, g_coef, centered_coef, constant) × C.
template <typename T, int kVec, bool kPlanar_>
struct BackwardApply {
  static constexpr bool kPlanar = kPlanar_;
  const T* __restrict__ grad;
  const T* __restrict__ y;
  T* __restrict__ grad_y;
  const float* __restrict__ mean;
  const float* __restrict__ coef;
  int64_t C;
  bool relu;

  struct Lanes {
    float mean[kVec], scale[kVec], shift[kVec];
    cbr::BackwardCoefficients<float> k[kVec];
  };

  __device__ __forceinline__ Lanes lanes(int64_t c) const {
    Lanes l;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t cj = lane_channel<kPlanar>(c, j);
      l.mean[j] = mean[cj];
      l.scale[j] = coef[cj];
      l.shift[j] = coef[C + cj];
      l.k[j] = {coef[2 * C + cj], coef[3 * C + cj], coef[4 * C + cj]};
    }
    return l;
  }

  __device__ __forceinline__ void apply(const Lanes& l, int64_t offset) const {
    float g[kVec], v[kVec];
    load<T, kVec>(grad + offset, g);
    load<T, kVec>(y + offset, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float masked = cbr::relu_masked(g[j], v[j], l.scale[j], l.shift[j], relu);
      g[j] = cbr::bn_backward(masked, v[j] - l.mean[j], l.k[j]);
    }
    store<T, kVec>(grad_y + offset, g);
  }
};

// NCHW: blockIdx.x a plane (n, c), blockIdx.y a stripe of its packs.
template <int kVec, typename Op>
__global__ void __launch_bounds__(kPlaneThreads) planes_elementwise_kernel(Op op, unsigned C, int64_t S) {
  const auto lanes = op.lanes(blockIdx.x % C);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * S;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kPlaneThreads * kVec;
  for (int64_t s = (static_cast<int64_t>(blockIdx.y) * kPlaneThreads + threadIdx.x) * kVec; s < S; s += step) {
    op.apply(lanes, base + s);
  }
}

// NHWC: blockIdx.x a tile of channel packs, rows strided over threadIdx.y and blockIdx.y.
template <int kVec, typename Op>
__global__ void __launch_bounds__(kThreads) rows_elementwise_kernel(Op op, int64_t rows, int64_t C) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c >= C) return;
  const auto lanes = op.lanes(c);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y * C;
  const int64_t end = rows * C;
  for (int64_t offset = (static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y) * C + c; offset < end;
       offset += step) {
    op.apply(lanes, offset);
  }
}

// Runs op over every element of the activation, in packs of kVec (the layout is the op's).
template <int kVec, typename Op>
void elementwise(const Op& op, const Activation& a, cudaStream_t stream) {
  if (a.N * a.C * a.S == 0) return;
  if constexpr (!Op::kPlanar) {
    const dim3 tile = row_tile(a, kVec);
    const int64_t row_blocks = std::min<int64_t>((a.N * a.S + tile.y - 1) / tile.y, 65535);
    rows_elementwise_kernel<kVec><<<dim3(channel_tiles(a, kVec, tile), static_cast<unsigned>(row_blocks)), tile, 0,
                                    stream>>>(op, a.N * a.S, a.C);
  } else {
    const int64_t stripes = std::min<int64_t>((a.S / kVec + kPlaneThreads - 1) / kPlaneThreads, 65535);
    planes_elementwise_kernel<kVec><<<dim3(static_cast<unsigned>(a.N * a.C), static_cast<unsigned>(stripes)),
                                      kPlaneThreads, 0, stream>>>(op, static_cast<unsigned>(a.C), a.S);
  }
}

// ---------------------------------------------------------------- reductions

// A channel's reduction part in NCHW: packs [begin, end) of its sequence of N·S/kVec packs, walked
// kPlaneThreads apart, the plane n and the pack's place s in it carried (no division per pack).
struct PlaneWalk {
  int64_t index, end, n, s, plane_packs, step_planes, step_packs;
  __device__ __forceinline__ PlaneWalk(const cbr::Split& split, int64_t plane_packs_) : plane_packs(plane_packs_) {
    index = cbr::part_begin(split, blockIdx.y) + threadIdx.x;
    end = cbr::part_end(split, blockIdx.y);
    n = s = step_planes = step_packs = 0;
    if (index < end) {  // 32-bit divisions once per thread: the host checks that a channel's packs fit 31 bits
      const unsigned packs = static_cast<unsigned>(plane_packs);
      n = static_cast<unsigned>(index) / packs;
      s = index - n * plane_packs;
      step_planes = static_cast<unsigned>(kPlaneThreads) / packs;  // a step of kPlaneThreads packs, split
      step_packs = kPlaneThreads - step_planes * plane_packs;
    }
  }
  __device__ __forceinline__ bool valid() const { return index < end; }
  __device__ __forceinline__ int64_t offset(int64_t c, int64_t C, int vec) const { return ((n * C + c) * plane_packs + s) * vec; }
  __device__ __forceinline__ void next() {
    index += kPlaneThreads;
    n += step_planes;
    s += step_packs;
    if (s >= plane_packs) {
      s -= plane_packs;
      ++n;
    }
  }
};

// Fixed-order tree over a block's kPlaneThreads moments in shared memory; thread 0 ends with the total.
__device__ __forceinline__ cbr::Moments<float> block_merge(cbr::Moments<float> m, float* count, float* mean, float* m2) {
  const int t = threadIdx.x;
  count[t] = m.count;
  mean[t] = m.mean;
  m2[t] = m.m2;
  __syncthreads();
  for (int stride = kPlaneThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      m = cbr::merge<float>({count[t], mean[t], m2[t]}, {count[t + stride], mean[t + stride], m2[t + stride]});
      count[t] = m.count;
      mean[t] = m.mean;
      m2[t] = m.m2;
    }
    __syncthreads();
  }
  return {count[0], mean[0], m2[0]};
}

__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int t = threadIdx.x;
  sh[t] = v;
  __syncthreads();
  for (int stride = kPlaneThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) sh[t] += sh[t + stride];
    __syncthreads();
  }
  return sh[0];
}

// Moments of a pack's values, two-pass in registers (exact).
template <int kVec>
__device__ __forceinline__ cbr::Moments<float> pack_moments(const float (&v)[kVec]) {
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) sum += v[j];
  const float mean = sum * (1.f / kVec);
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) m2 += (v[j] - mean) * (v[j] - mean);
  return {static_cast<float>(kVec), mean, m2};
}

// NCHW statistics: block (c = blockIdx.x, part blockIdx.y); each pack's moments merged into the thread's.
template <typename T, int kVec>
__global__ void __launch_bounds__(kPlaneThreads)
    planes_stats_kernel(const T* __restrict__ y, Activation a, cbr::Split split, float* part_count, float* part_mean,
                        float* part_m2) {
  __shared__ float sh_count[kPlaneThreads], sh_mean[kPlaneThreads], sh_m2[kPlaneThreads];
  const int64_t c = blockIdx.x;
  cbr::Moments<float> m{0.f, 0.f, 0.f};
  for (PlaneWalk walk(split, a.S / kVec); walk.valid(); walk.next()) {
    float v[kVec];
    load<T, kVec>(y + walk.offset(c, a.C, kVec), v);
    m = cbr::merge(m, pack_moments<kVec>(v));
  }
  m = block_merge(m, sh_count, sh_mean, sh_m2);
  if (threadIdx.x == 0) {
    part_count[blockIdx.y * a.C + c] = m.count;
    part_mean[blockIdx.y * a.C + c] = m.mean;
    part_m2[blockIdx.y * a.C + c] = m.m2;
  }
}

// NHWC statistics: block (a tile of channel packs, part blockIdx.y); a thread's rows in groups of
// kGroup loaded together, each group's per-channel moments (two-pass in registers) merged into the
// thread's with one division per group; then a fixed tree over the tile's row lanes.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    rows_stats_kernel(const T* __restrict__ y, Activation a, cbr::Split split, float* part_count, float* part_mean,
                      float* part_m2) {
  __shared__ float sh_count[kThreads], sh_mean[kThreads * kVec], sh_m2[kThreads * kVec];
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const int lanes_y = blockDim.y;
  float count = 0.f, mean[kVec] = {}, m2[kVec] = {};
  if (c < a.C) {
    const int64_t end = cbr::part_end(split, blockIdx.y);
    int64_t r = cbr::part_begin(split, blockIdx.y) + threadIdx.y;
    for (; r + (kGroup - 1) * lanes_y < end; r += kGroup * lanes_y) {
      float v[kGroup][kVec];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) load<T, kVec>(y + (r + g * lanes_y) * a.C + c, v[g]);
      const float merged = count + kGroup, share = kGroup / merged;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float group_mean = 0.f;
#pragma unroll
        for (int g = 0; g < kGroup; ++g) group_mean += v[g][j];
        group_mean *= 1.f / kGroup;
        float group_m2 = 0.f;
#pragma unroll
        for (int g = 0; g < kGroup; ++g) group_m2 += (v[g][j] - group_mean) * (v[g][j] - group_mean);
        const float delta = group_mean - mean[j];
        mean[j] += delta * share;
        m2[j] += group_m2 + delta * delta * count * share;
      }
      count = merged;
    }
    for (; r < end; r += lanes_y) {  // the rows short of a group, one by one (Welford)
      float v[kVec];
      load<T, kVec>(y + r * a.C + c, v);
      count += 1.f;
      const float inverse = 1.f / count;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float delta = v[j] - mean[j];
        mean[j] += delta * inverse;
        m2[j] += delta * (v[j] - mean[j]);
      }
    }
  }
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
  sh_count[slot] = count;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    sh_mean[slot * kVec + j] = mean[j];
    sh_m2[slot * kVec + j] = m2[j];
  }
  __syncthreads();
  for (int stride = lanes_y / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.y) < stride) {
      const int other = slot + stride * blockDim.x;
      float total = 0.f;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const cbr::Moments<float> m = cbr::merge<float>(
            {sh_count[slot], sh_mean[slot * kVec + j], sh_m2[slot * kVec + j]},
            {sh_count[other], sh_mean[other * kVec + j], sh_m2[other * kVec + j]});
        sh_mean[slot * kVec + j] = m.mean;
        sh_m2[slot * kVec + j] = m.m2;
        total = m.count;
      }
      sh_count[slot] = total;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < a.C) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      part_count[blockIdx.y * a.C + c + j] = sh_count[slot];
      part_mean[blockIdx.y * a.C + c + j] = sh_mean[slot * kVec + j];
      part_m2[blockIdx.y * a.C + c + j] = sh_m2[slot * kVec + j];
    }
  }
}

// Per channel: the parts' moments merged in part order, then BN's training affine map.
__global__ void stats_merge_kernel(const float* part_count, const float* part_mean, const float* part_m2, Activation a,
                                   int64_t parts, const float* gamma, const float* beta, float eps, float* mean,
                                   float* var, float* scale, float* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  cbr::Moments<float> total{0.f, 0.f, 0.f};
  for (int64_t p = 0; p < parts; ++p) {
    total = cbr::merge<float>(total, {part_count[p * a.C + c], part_mean[p * a.C + c], part_m2[p * a.C + c]});
  }
  mean[c] = total.mean;
  var[c] = total.m2 / total.count;
  cbr::fold_train<float>(load_or(gamma, c, 1.f), load_or(beta, c, 0.f), total.mean, var[c], eps, scale[c], shift[c]);
}

// The backward sums' inputs per channel: BN's training map (for the ReLU mask) and the mean.
template <int kVec, bool kPlanar>
struct SumLanes {
  float scale[kVec], shift[kVec], mean[kVec];
  __device__ __forceinline__ SumLanes(int64_t c, const float* m, const float* var, const float* gamma, const float* beta,
                                      float eps) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t cj = lane_channel<kPlanar>(c, j);
      mean[j] = m[cj];
      cbr::fold_train<float>(load_or(gamma, cj, 1.f), load_or(beta, cj, 0.f), mean[j], var[cj], eps, scale[j], shift[j]);
    }
  }
};

// Adds a pack's Σg and Σg(y − mean) (g the ReLU-masked gradient) into sum_g[j], sum_gc[j].
template <typename T, int kVec, bool kPlanar>
__device__ __forceinline__ void add_backward_sums(const T* grad, const T* y, const SumLanes<kVec, kPlanar>& l, bool relu,
                                                  float (&sum_g)[kVec], float (&sum_gc)[kVec]) {
  float g[kVec], v[kVec];
  load<T, kVec>(grad, g);
  load<T, kVec>(y, v);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float masked = cbr::relu_masked(g[j], v[j], l.scale[j], l.shift[j], relu);
    sum_g[j] += masked;
    sum_gc[j] += masked * (v[j] - l.mean[j]);
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kPlaneThreads)
    planes_backward_sums_kernel(const T* __restrict__ grad, const T* __restrict__ y, Activation a, cbr::Split split,
                                const float* mean, const float* var, const float* gamma, const float* beta, float eps,
                                bool relu, float* part_g, float* part_gc) {
  __shared__ float sh[kPlaneThreads];
  const int64_t c = blockIdx.x;
  const SumLanes<kVec, true> lanes(c, mean, var, gamma, beta, eps);
  float sum_g[kVec] = {}, sum_gc[kVec] = {};
  for (PlaneWalk walk(split, a.S / kVec); walk.valid(); walk.next()) {
    const int64_t offset = walk.offset(c, a.C, kVec);
    add_backward_sums<T, kVec, true>(grad + offset, y + offset, lanes, relu, sum_g, sum_gc);
  }
  float g = 0.f, gc = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    g += sum_g[j];
    gc += sum_gc[j];
  }
  g = block_sum(g, sh);
  __syncthreads();
  gc = block_sum(gc, sh);
  if (threadIdx.x == 0) {
    part_g[blockIdx.y * a.C + c] = g;
    part_gc[blockIdx.y * a.C + c] = gc;
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    rows_backward_sums_kernel(const T* __restrict__ grad, const T* __restrict__ y, Activation a, cbr::Split split,
                              const float* mean, const float* var, const float* gamma, const float* beta, float eps,
                              bool relu, float* part_g, float* part_gc) {
  __shared__ float sh_g[kThreads * kVec], sh_gc[kThreads * kVec];
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  float sum_g[kVec] = {}, sum_gc[kVec] = {};
  if (c < a.C) {
    const SumLanes<kVec, false> lanes(c, mean, var, gamma, beta, eps);
    const int64_t end = cbr::part_end(split, blockIdx.y) * a.C, step = static_cast<int64_t>(blockDim.y) * a.C;
    for (int64_t offset = (cbr::part_begin(split, blockIdx.y) + threadIdx.y) * a.C + c; offset < end; offset += step) {
      add_backward_sums<T, kVec, false>(grad + offset, y + offset, lanes, relu, sum_g, sum_gc);
    }
  }
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    sh_g[slot * kVec + j] = sum_g[j];
    sh_gc[slot * kVec + j] = sum_gc[j];
  }
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.y) < stride) {
      const int other = slot + stride * blockDim.x;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sh_g[slot * kVec + j] += sh_g[other * kVec + j];
        sh_gc[slot * kVec + j] += sh_gc[other * kVec + j];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < a.C) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      part_g[blockIdx.y * a.C + c + j] = sh_g[slot * kVec + j];
      part_gc[blockIdx.y * a.C + c + j] = sh_gc[slot * kVec + j];
    }
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

__global__ void fold_eval_kernel(const float* gamma, const float* beta, const float* running_mean,
                                 const float* running_var, const float* conv_bias, float eps, int64_t C, float* scale,
                                 float* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  cbr::fold_eval<float>(load_or(gamma, c, 1.f), load_or(beta, c, 0.f), running_mean[c], running_var[c],
                        load_or(conv_bias, c, 0.f), eps, scale[c], shift[c]);
}

// ---------------------------------------------------------------- host side

// Elements per access: 16 bytes where the line length (S or C) and every pointer allow it, else 1.
template <typename T>
int vector_width(const Activation& a, std::initializer_list<const void*> pointers) {
  constexpr int kWide = 16 / sizeof(T);
  if ((a.channels_last ? a.C : a.S) % kWide != 0) return 1;
  for (const void* p : pointers) {
    if (!packs::packed(p)) return 1;
  }
  return kWide;
}

// The NCHW grids' limits: planes on gridDim.x, a channel's packs walked in 32 bits.
bool fits_grid(const Activation& a) { return a.channels_last || (a.N * a.C <= INT_MAX && a.N * a.S <= INT_MAX); }

unsigned channel_threads_blocks(int64_t C) { return static_cast<unsigned>((C + kThreads - 1) / kThreads); }

// f(element tag, vector-width tag) for a floating dtype (the one dispatch macro of csrc/common/dtype.h),
// the width 16 / sizeof(T) where vector_width allows it, then the launch's error.
template <typename F>
cudaError_t dispatch(DType dtype, const Activation& a, std::initializer_list<const void*> pointers, F&& f) {
  if (!fits_grid(a)) return cudaErrorInvalidConfiguration;
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    constexpr int kWide = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>(a, pointers) == kWide) {
      f(scalar_t{}, std::integral_constant<int, kWide>{});
    } else {
      f(scalar_t{}, std::integral_constant<int, 1>{});
    }
  })
  return cudaGetLastError();
}

// The reduction grid: (channels or channel tiles, parts), with the NHWC tile as the block.
template <int kVec>
void reduction_grid(const Activation& a, const cbr::Split& split, dim3& grid, dim3& block) {
  if (a.channels_last) {
    block = row_tile(a, kVec);
    grid = dim3(channel_tiles(a, kVec, block), static_cast<unsigned>(split.parts));
  } else {
    block = dim3(kPlaneThreads);
    grid = dim3(static_cast<unsigned>(a.C), static_cast<unsigned>(split.parts));
  }
}

// launch(element tag, width tag, split, grid, block) for a reduction pass over the pointers, at the
// width they allow; `parts` gets the split's part count (the merge kernel's).
template <typename F>
cudaError_t reduction(DType dtype, const Activation& a, std::initializer_list<const void*> pointers, int64_t& parts,
                      F&& launch) {
  return dispatch(dtype, a, pointers, [&](auto tag, auto width) {
    constexpr int kVec = decltype(width)::value;
    const cbr::Split split = reduction_split(a, kVec);
    parts = split.parts;
    dim3 grid, block;
    reduction_grid<kVec>(a, split, grid, block);
    launch(tag, width, split, grid, block);
  });
}

// The most parts a reduction splits into at any width vector_width can pick (the workspace's size).
int64_t max_parts(const Activation& a) {
  int64_t parts = 1;
  for (int vec : {1, 4, 8}) {
    if ((a.channels_last ? a.C : a.S) % vec == 0) parts = std::max(parts, reduction_split(a, vec).parts);
  }
  return parts;
}

}  // namespace

cudaError_t fold_eval(const float* gamma, const float* beta, const float* running_mean, const float* running_var,
                      const float* conv_bias, float eps, int64_t C, float* scale, float* shift, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  fold_eval_kernel<<<channel_threads_blocks(C), kThreads, 0, stream>>>(gamma, beta, running_mean, running_var, conv_bias,
                                                                        eps, C, scale, shift);
  return cudaGetLastError();
}

cudaError_t bn_act(DType dtype, const void* y, void* out, const Activation& a, const float* scale, const float* shift,
                   bool relu, cudaStream_t stream) {
  return dispatch(dtype, a, {y, out}, [&](auto tag, auto width) {
    using T = decltype(tag);
    constexpr int kVec = decltype(width)::value;
    const T* in = static_cast<const T*>(y);
    T* o = static_cast<T*>(out);
    if (a.channels_last) {
      elementwise<kVec>(BnAct<T, kVec, false>{in, o, scale, shift, relu}, a, stream);
    } else {
      elementwise<kVec>(BnAct<T, kVec, true>{in, o, scale, shift, relu}, a, stream);
    }
  });
}

// channel_stats: three arrays of parts × C; bn_backward: two, then the 5 × C coefficients.
int64_t workspace_floats(const Activation& a) { return std::max(3 * max_parts(a) * a.C, 2 * max_parts(a) * a.C + 5 * a.C); }

cudaError_t channel_stats(DType dtype, const void* y, const Activation& a, const float* gamma, const float* beta,
                          float eps, float* workspace, float* mean, float* var, float* scale, float* shift,
                          cudaStream_t stream) {
  if (a.C == 0) return cudaSuccess;
  int64_t parts = 0;
  const int64_t stride = max_parts(a) * a.C;
  float* part_count = workspace;
  float* part_mean = workspace + stride;
  float* part_m2 = workspace + 2 * stride;
  const cudaError_t launched = reduction(dtype, a, {y}, parts, [&](auto tag, auto width, const cbr::Split& split,
                                                                   const dim3& grid, const dim3& block) {
    using T = decltype(tag);
    constexpr int kVec = decltype(width)::value;
    if (a.channels_last) {
      rows_stats_kernel<T, kVec><<<grid, block, 0, stream>>>(static_cast<const T*>(y), a, split, part_count, part_mean,
                                                             part_m2);
    } else {
      planes_stats_kernel<T, kVec><<<grid, block, 0, stream>>>(static_cast<const T*>(y), a, split, part_count,
                                                               part_mean, part_m2);
    }
  });
  if (launched != cudaSuccess) return launched;
  stats_merge_kernel<<<channel_threads_blocks(a.C), kThreads, 0, stream>>>(part_count, part_mean, part_m2, a, parts,
                                                                           gamma, beta, eps, mean, var, scale, shift);
  return cudaGetLastError();
}

cudaError_t bn_backward(DType dtype, const void* grad, const void* y, void* grad_y, const Activation& a,
                        const float* mean, const float* var, const float* gamma, const float* beta, float eps, bool relu,
                        float* workspace, float* grad_gamma, float* grad_beta, cudaStream_t stream) {
  if (a.C == 0) return cudaSuccess;
  int64_t parts = 0;
  const int64_t stride = max_parts(a) * a.C;
  float* part_g = workspace;
  float* part_gc = workspace + stride;
  float* coef = workspace + 2 * stride;
  cudaError_t launched = reduction(dtype, a, {grad, y}, parts, [&](auto tag, auto width, const cbr::Split& split,
                                                                const dim3& grid, const dim3& block) {
    using T = decltype(tag);
    constexpr int kVec = decltype(width)::value;
    const T* g = static_cast<const T*>(grad);
    const T* yv = static_cast<const T*>(y);
    if (a.channels_last) {
      rows_backward_sums_kernel<T, kVec><<<grid, block, 0, stream>>>(g, yv, a, split, mean, var, gamma, beta, eps, relu,
                                                                     part_g, part_gc);
    } else {
      planes_backward_sums_kernel<T, kVec><<<grid, block, 0, stream>>>(g, yv, a, split, mean, var, gamma, beta, eps,
                                                                       relu, part_g, part_gc);
    }
  });
  if (launched != cudaSuccess) return launched;
  backward_merge_kernel<<<channel_threads_blocks(a.C), kThreads, 0, stream>>>(part_g, part_gc, a, parts, mean, var,
                                                                              gamma, beta, eps, grad_gamma, grad_beta,
                                                                              coef);
  launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  return dispatch(dtype, a, {grad, y, grad_y}, [&](auto tag, auto width) {
    using T = decltype(tag);
    constexpr int kVec = decltype(width)::value;
    const T* g = static_cast<const T*>(grad);
    const T* yv = static_cast<const T*>(y);
    T* o = static_cast<T*>(grad_y);
    if (a.channels_last) {
      elementwise<kVec>(BackwardApply<T, kVec, false>{g, yv, o, mean, coef, a.C, relu}, a, stream);
    } else {
      elementwise<kVec>(BackwardApply<T, kVec, true>{g, yv, o, mean, coef, a.C, relu}, a, stream);
    }
  });
}

}  // namespace conv_bn_relu_cuda
}  // namespace slsdeep
