// CUDA kernels of the NLL + EPE loss: see nll_epe_loss.h.
#include <climits>

#include "common/dtype.h"
#include "common/nll_epe_loss.h"
#include "cuda/nll_epe_loss.h"
#include "cuda/pack.cuh"

namespace slsdeep {
namespace nll_epe_loss_cuda {
namespace {

using namespace nll_epe;

// A block owns a tile of kTileH rows x kTileW columns of one image; a thread owns a run of kRun
// consecutive columns of one tile row (one 16-byte pack of a uint8 mask, two of bf16 logits).
constexpr int kRun = 16;
constexpr int kRunsPerRow = 8;
constexpr int kTileW = kRun * kRunsPerRow, kTileH = 16;  // 128 x 16 outputs
constexpr int kThreads = kRunsPerRow * kTileH;           // 128: one thread per run of the tile
// Windows in shared memory: d on the tile plus a 2-pixel halo, the EPE direction on the tile plus 1.
constexpr int kDRows = kTileH + 4, kDCols = kTileW + 4;
constexpr int kURows = kTileH + 2, kUCols = kTileW + 2;
// The halo runs stage (1) loads besides the tile's: the 4 halo rows' runs (a run each side too), then
// the runs just left and right of each tile row.
constexpr int kHaloRowRuns = 4 * (kRunsPerRow + 2), kHaloRuns = kHaloRowRuns + 2 * kTileH;
// The ring of the EPE window around the tile: its top and bottom rows, then its left and right columns.
constexpr int kRingRowCells = 2 * kUCols, kRingCells = kRingRowCells + 2 * kTileH;

// Shared-memory column of window column m: one float of padding after every 16, so that a warp (4
// tile rows x 8 runs) reading element j of its runs hits 32 banks: runs sit 17 floats apart
// (banks 0, 17, 2, 19, ...), rows kRowFloats = 24 (mod 32) apart. padded(16 s + m) = 17 s + padded(m).
__host__ __device__ constexpr int padded(int m) { return m + m / 16; }
constexpr int kRowFloats = 152;
static_assert(kRowFloats >= padded(kDCols - 1) + 1 && kRowFloats >= padded(kUCols - 1) + 1, "a window row fits");
static_assert(kRowFloats % 32 == 24, "rows 24 banks apart");

__device__ __forceinline__ int clamp_index(int i, int size) { return i < 0 ? 0 : (i >= size ? size - 1 : i); }

// kCount consecutive elements at p (16-byte aligned) as floats, and back, in 16-byte packs (the halo
// is read again by the neighbouring tiles, from L2).
template <typename T, int kCount>
__device__ __forceinline__ void load_packs(const T* p, float (&out)[kCount]) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert(kCount % kPer == 0, "whole packs");
#pragma unroll
  for (int k = 0; k < kCount; k += kPer) {
    float v[kPer];
    packs::load<T, kPer>(p + k, v);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[k + j] = v[j];
  }
}

template <typename T, int kCount>
__device__ __forceinline__ void store_packs(T* p, const float (&in)[kCount]) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert(kCount % kPer == 0, "whole packs");
#pragma unroll
  for (int k = 0; k < kCount; k += kPer) {
    float v[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) v[j] = in[k + j];
    packs::store<T, kPer>(p + k, v);
  }
}

// A packed run of kCount columns from `start` (a multiple of kCount) reads the packs holding its
// clamped columns: start itself inside the image, the first or last run outside it, whose edge value
// then stands for every column of the run (the replicate padding).
template <int kCount>
__device__ __forceinline__ int packed_start(int start, int W) {
  return start < 0 ? 0 : (start >= W ? W - kCount : start);
}

template <int kCount>
__device__ __forceinline__ void replicate_edge(int start, int W, float (&v)[kCount]) {
  if (start < 0) {
#pragma unroll
    for (int j = 1; j < kCount; ++j) v[j] = v[0];
  } else if (start >= W) {
#pragma unroll
    for (int j = 0; j < kCount - 1; ++j) v[j] = v[kCount - 1];
  }
}

// The values of an (N, H, W)-shaped operand (mask or upstream gradient) on kCount columns from `start`
// of image row `row` (already clamped), at clamped columns.
template <bool kPacked, int kCount, typename T>
__device__ __forceinline__ void load_map_run(const T* image, const int64_t (&stride)[3], int row, int start, int W,
                                             float (&v)[kCount]) {
  const T* line = image + row * stride[1];
  if constexpr (kPacked) {
    load_packs<T, kCount>(line + packed_start<kCount>(start, W), v);
    replicate_edge(start, W, v);
  } else {
#pragma unroll
    for (int j = 0; j < kCount; ++j) v[j] = to_float(line[clamp_index(start + j, W) * stride[2]]);
  }
}

template <bool kPacked>
__device__ __forceinline__ void load_target_run(const Problem& pb, int64_t n, int row, int start, float (&v)[kRun]) {
  const auto from = [&](const auto* target) {
    load_map_run<kPacked, kRun>(target + n * pb.target_stride[0], pb.target_stride, row, start, static_cast<int>(pb.W), v);
  };
  switch (pb.target_type) {
    case DType::kUInt8:
      return from(static_cast<const uint8_t*>(pb.target));
    case DType::kInt64:
      return from(static_cast<const int64_t*>(pb.target));
    case DType::kFloat:
      return from(static_cast<const float*>(pb.target));
    case DType::kDouble:
      return from(static_cast<const double*>(pb.target));
    case DType::kHalf:
      return from(static_cast<const __half*>(pb.target));
    default:
      return from(static_cast<const __nv_bfloat16*>(pb.target));
  }
}

// The foreground margins z on the run (C = 1: the logit; C = 2: l1 - l0). kInterleaved: C = 2 with the
// channels innermost (channels_last), one run is 2 kRun consecutive elements; else channel planes.
template <bool kPacked, bool kInterleaved, typename T>
__device__ __forceinline__ void load_margin_run(const Problem& pb, const T* logits, int row, int start, float (&z)[kRun]) {
  const int64_t* s = pb.logits_stride;
  const T* line = logits + row * s[2];
  if constexpr (kPacked && kInterleaved) {
    float pairs[2 * kRun];
    load_packs<T, 2 * kRun>(line + 2 * packed_start<kRun>(start, pb.W), pairs);
#pragma unroll
    for (int j = 0; j < kRun; ++j) z[j] = pairs[2 * j + 1] - pairs[2 * j];
    replicate_edge(start, pb.W, z);
  } else if constexpr (kPacked) {
    const int first = packed_start<kRun>(start, pb.W);
    load_packs<T, kRun>(line + (pb.C - 1) * s[1] + first, z);
    if (pb.C == 2) {
      float background[kRun];
      load_packs<T, kRun>(line + first, background);
#pragma unroll
      for (int j = 0; j < kRun; ++j) z[j] -= background[j];
    }
    replicate_edge(start, pb.W, z);
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      const T* pixel = line + clamp_index(start + j, pb.W) * s[3];
      z[j] = to_float(pixel[(pb.C - 1) * s[1]]) - (pb.C == 2 ? to_float(pixel[0]) : 0.0f);
    }
  }
}

// Sum over the block; the result is valid in thread 0.
__device__ float block_sum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = 0.0f;
  if (warp == 0) {
    value = lane < kThreads / 32 ? scratch[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// The EPE at one pixel from the 3 x 3 window of d around it (rows d0, d1, d2 of the d window, columns
// a, b, c: padded shared-memory columns), its direction scaled by the upstream gradient w into u.
__device__ __forceinline__ float epe_at(const float* d0, const float* d1, const float* d2, int a, int b, int c, float w,
                                        float& ux, float& uy) {
  const float s_left = d0[a] + 2.0f * d1[a] + d2[a];
  const float s_right = d0[c] + 2.0f * d1[c] + d2[c];
  const float v_left = d2[a] - d0[a], v_mid = d2[b] - d0[b], v_right = d2[c] - d0[c];
  float dx, dy;
  const float epe = end_point_error((s_right - s_left) * 0.125f, (v_left + 2.0f * v_mid + v_right) * 0.125f, dx, dy);
  ux = dx * w;
  uy = dy * w;
  return epe;
}

constexpr int kHalf = kRun / 2;

// d(loss)/d(logits) on kHalf columns from `first` of one row (`out`: the row's start): +grad on the
// foreground channel, -grad on the background one where C = 2.
template <bool kPacked, bool kInterleaved, typename T>
__device__ __forceinline__ void store_gradient(const Problem& pb, T* out, int first, float (&grad)[kHalf]) {
  const int64_t* s = pb.gradient_stride;
  if constexpr (kPacked && kInterleaved) {
    float pairs[2 * kHalf];
#pragma unroll
    for (int j = 0; j < kHalf; ++j) pairs[2 * j] = -grad[j], pairs[2 * j + 1] = grad[j];
    store_packs<T, 2 * kHalf>(out + 2 * first, pairs);
  } else if constexpr (kPacked) {
    store_packs<T, kHalf>(out + (pb.C - 1) * s[1] + first, grad);
    if (pb.C == 2) {
#pragma unroll
      for (int j = 0; j < kHalf; ++j) grad[j] = -grad[j];
      store_packs<T, kHalf>(out + first, grad);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      if (first + j >= pb.W) break;
      T* pixel = out + (first + j) * s[3];
      pixel[(pb.C - 1) * s[1]] = from_float<T>(grad[j]);
      if (pb.C == 2) pixel[0] = from_float<T>(-grad[j]);
    }
  }
}

// Blocks per SM the tile kernel is built for (35 KB of shared memory each allow 6): 5 (96 registers)
// for 16-bit logits, 4 for fp32 (96 would spill); the element-wise fallback is not capped.
template <typename T, bool kPacked>
constexpr int resident_blocks() {
  return !kPacked ? 1 : sizeof(T) == 2 ? 5 : 4;
}

// The tile kernel, in three stages through shared memory:
//  (1) 72 threads load the halo's runs, then each thread its own run (margins, mask, upstream
//      gradient), writing d = p - v to the window and keeping what (2) and (3) need of its pixels;
//  (2) the EPE and its weighted direction u: each thread on its run, then the window's ring;
//  (3) each thread the gradient on its run: the vertical then horizontal adjoint of the stencils.
// kPacked: every access in 16-byte packs (the launcher checks strides, W % 16 and alignment); else
// element accesses at any strides. Index maths in 32 bits but for the per-row base offsets.
template <typename T, bool kPacked, bool kInterleaved>
__global__ void __launch_bounds__(kThreads, resident_blocks<T, kPacked>()) tile_kernel(Problem pb) {
  __shared__ float d_s[kDRows * kRowFloats];
  __shared__ float ux_s[kURows * kRowFloats];
  __shared__ float uy_s[kURows * kRowFloats];
  __shared__ float ring_w[kRingCells];  // the upstream gradient on the ring (grad_map only; order of kRingCells)
  __shared__ float scratch[kThreads / 32];

  // grid (N x row tiles, column tiles): the batch shares axis x (y and z stop at 65,535)
  const unsigned row_tiles = (static_cast<unsigned>(pb.H) + kTileH - 1) / kTileH;
  const int64_t n = blockIdx.x / row_tiles;
  const int r0 = static_cast<int>(blockIdx.x % row_tiles) * kTileH, c0 = static_cast<int>(blockIdx.y) * kTileW;
  const int H = static_cast<int>(pb.H), W = static_cast<int>(pb.W);
  const int tid = threadIdx.x, ti = tid / kRunsPerRow, slot = tid % kRunsPerRow;
  const T* logits = static_cast<const T*>(pb.logits) + n * pb.logits_stride[0];
  const T* grad_map = pb.grad_map ? static_cast<const T*>(pb.grad_map) + n * pb.grad_map_stride[0] : nullptr;

  // (1) the halo's runs first (their registers are free before the thread's own run is loaded): the 4
  // halo rows (window rows 0, 1, 18, 19) with a run each side, then the runs left and right of the tile
  // rows; window columns outside [0, kDCols) are not kept. The ring's upstream gradient goes to ring_w.
  if (tid < kHaloRuns) {
    int li, s;  // window row, run (-1 .. kRunsPerRow)
    if (tid < kHaloRowRuns) {
      const int k = tid / (kRunsPerRow + 2);
      li = k < 2 ? k : k + kTileH;
      s = tid % (kRunsPerRow + 2) - 1;
    } else {
      li = 2 + (tid - kHaloRowRuns) / 2;
      s = (tid - kHaloRowRuns) % 2 ? kRunsPerRow : -1;
    }
    const int halo_row = clamp_index(r0 - 2 + li, H), halo_start = c0 + kRun * s;
    float z[kRun], v[kRun];
    load_margin_run<kPacked, kInterleaved>(pb, logits, halo_row, halo_start, z);
    load_target_run<kPacked>(pb, n, halo_row, halo_start, v);
    const bool ring_row = li == 1 || li == kDRows - 2, ring_side = li >= 2 && li < kDRows - 2;
    if (grad_map && (ring_row || ring_side)) {
      float w[kRun];
      load_map_run<kPacked, kRun>(grad_map, pb.grad_map_stride, halo_row, halo_start, W, w);
#pragma unroll
      for (int j = 0; j < kRun; ++j) {
        const int m = kRun * s + j + 1;  // EPE window column
        if (ring_row && m >= 0 && m < kUCols) ring_w[(li == 1 ? 0 : kUCols) + m] = w[j];
        if (ring_side && (m == 0 || m == kUCols - 1)) ring_w[kRingRowCells + 2 * (li - 2) + (m == 0 ? 0 : 1)] = w[j];
      }
    }
    float* line = d_s + li * kRowFloats;
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      const int m = kRun * s + j + 2;  // d window column
      if (m >= 0 && m < kDCols) {
        const float e = exp_neg_abs(z[j]);
        line[padded(m)] = foreground_probability(z[j], e, 1.0f / (1.0f + e)) - v[j];
      }
    }
  }
  // ... then this thread's run: row r, columns [start, start + kRun), d at window (ti + 2, 16 slot + 2 + j).
  // Kept for (3) in registers: p (1 - p) (d stays in the window; w is loaded again, from L2). The NLL and
  // w wait for (2) in the run's own cells of ux_s and uy_s, which (2) then overwrites with u.
  const int r = r0 + ti, start = c0 + kRun * slot, row = clamp_index(r, H);
  float spread[kRun];
  float* d_own = d_s + (ti + 2) * kRowFloats + 17 * slot;
  float* ux_own = ux_s + (ti + 1) * kRowFloats + 17 * slot;
  float* uy_own = uy_s + (ti + 1) * kRowFloats + 17 * slot;
  {
    float z[kRun], v[kRun], w[kRun];
    load_margin_run<kPacked, kInterleaved>(pb, logits, row, start, z);
    load_target_run<kPacked>(pb, n, row, start, v);
    if (grad_map) {
      load_map_run<kPacked, kRun>(grad_map, pb.grad_map_stride, row, start, W, w);
    } else {
#pragma unroll
      for (int j = 0; j < kRun; ++j) w[j] = 1.0f;
    }
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      const float e = exp_neg_abs(z[j]), inverse = 1.0f / (1.0f + e);
      const float p = foreground_probability(z[j], e, inverse);
      d_own[padded(j + 2)] = p - v[j];
      spread[j] = p * (1.0f - p);
      ux_own[padded(j + 1)] = negative_log_likelihood(z[j], v[j], z[j] < 0.0f ? 1.0f : 0.0f, log1p_of(e, inverse));
      uy_own[padded(j + 1)] = w[j];
    }
  }
  __syncthreads();

  // (2) the EPE and u = w (Ex, Ey) / EPE on this thread's run (u window row ti + 1, columns 16 slot + 1 + j)
  float loss_sum = 0.0f;
  {
    const float* d0 = d_s + (ti + 1) * kRowFloats + 17 * slot;  // d rows ti + 1 .. ti + 3 around the run
    float loss[kRun];
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      const int q = padded(j + 1);
      float ux, uy;
      const float epe = epe_at(d0, d0 + kRowFloats, d0 + 2 * kRowFloats, padded(j + 1), padded(j + 2), padded(j + 3),
                               uy_own[q], ux, uy);
      loss[j] = ux_own[q] + pb.alpha * epe;
      ux_own[q] = ux;
      uy_own[q] = uy;
      if (r < H && start + j < W) loss_sum += loss[j];
    }
    if (pb.loss_map != nullptr && r < H && start < W) {
      T* out = static_cast<T*>(pb.loss_map) + (n * H + r) * W;
      if constexpr (kPacked) {
        store_packs<T, kRun>(out + start, loss);
      } else {
#pragma unroll
        for (int j = 0; j < kRun; ++j) {
          if (start + j < W) out[start + j] = from_float<T>(loss[j]);
        }
      }
    }
  }
  // ... and on the ring: window rows 0 and kURows - 1, then columns 0 and kUCols - 1 of the others
  for (int k = tid; k < kRingCells; k += kThreads) {
    int qi, qj;
    if (k < kRingRowCells) {
      qi = k < kUCols ? 0 : kURows - 1;
      qj = k < kUCols ? k : k - kUCols;
    } else {
      qi = 1 + (k - kRingRowCells) / 2;
      qj = (k - kRingRowCells) % 2 ? kUCols - 1 : 0;
    }
    const float* d0 = d_s + qi * kRowFloats;
    float ux, uy;
    epe_at(d0, d0 + kRowFloats, d0 + 2 * kRowFloats, padded(qj), padded(qj + 1), padded(qj + 2),
           grad_map ? ring_w[k] : 1.0f, ux, uy);
    ux_s[qi * kRowFloats + padded(qj)] = ux;
    uy_s[qi * kRowFloats + padded(qj)] = uy;
  }
  if (pb.partials != nullptr) {
    const float total = block_sum(loss_sum, scratch);
    if (tid == 0) pb.partials[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = total;
  }
  if (pb.gradient == nullptr) return;
  __syncthreads();

  // (3) the gradient on this thread's run, a half (kHalf columns) at a time: the vertical adjoints of u
  // on the half's columns and one each side (u window columns 16 slot + h + m, m = 0 .. kHalf + 1),
  // then the horizontal ones
  if (r >= H || start >= W) return;
  const bool top = r == 0, bottom = r == H - 1;
  const int64_t* gs = pb.gradient_stride;
  T* out = static_cast<T*>(pb.gradient) + n * gs[0] + r * gs[2];
#pragma unroll
  for (int h = 0; h < kRun; h += kHalf) {
    float a[kHalf + 2], b[kHalf + 2], grad[kHalf];
    const float* ux0 = ux_s + ti * kRowFloats + 17 * slot;
    const float* uy0 = uy_s + ti * kRowFloats + 17 * slot;
#pragma unroll
    for (int m = 0; m < kHalf + 2; ++m) {
      const int q = padded(h + m);
      a[m] = smooth_adjoint(ux0[q], ux0[q + kRowFloats], ux0[q + 2 * kRowFloats], top, bottom);
      b[m] = difference_adjoint(uy0[q], uy0[q + kRowFloats], uy0[q + 2 * kRowFloats], top, bottom);
    }
    if (grad_map) {
      load_map_run<kPacked, kHalf>(grad_map, pb.grad_map_stride, row, start + h, W, grad);
    } else {
#pragma unroll
      for (int j = 0; j < kHalf; ++j) grad[j] = 1.0f;
    }
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      const int c = start + h + j;
      const float through_epe = (difference_adjoint(a[j], a[j + 1], a[j + 2], c == 0, c == W - 1) +
                                 smooth_adjoint(b[j], b[j + 1], b[j + 2], c == 0, c == W - 1)) *
                                0.125f;
      grad[j] = pb.gradient_scale * (grad[j] * d_own[padded(h + j + 2)] + pb.alpha * spread[h + j] * through_epe);
    }
    store_gradient<kPacked, kInterleaved>(pb, out, start + h, grad);
  }
}

constexpr int kFinishThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const float* partials, int64_t count, double scale,
                                                                T* loss) {
  __shared__ double sums[kFinishThreads];
  double sum = 0.0;
  for (int64_t k = threadIdx.x; k < count; k += kFinishThreads) sum += partials[k];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kFinishThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = from_float<T>(static_cast<float>(sums[0] * scale));
}

constexpr int kScaleThreads = 256;

// gradient *= *factor over kVec-element packs (16 bytes, or single elements), a grid-stride loop.
template <typename T, int kVec>
__global__ void __launch_bounds__(kScaleThreads) scale_kernel(T* gradient, int64_t packs, const float* factor) {
  const float f = *factor;
  if (f == 1.0f) return;
#pragma unroll 1  // an unrolled grid-stride loop would count its trips with a 64-bit division
  for (int64_t k = blockIdx.x * static_cast<int64_t>(kScaleThreads) + threadIdx.x; k < packs;
       k += static_cast<int64_t>(gridDim.x) * kScaleThreads) {
    T* p = gradient + k * kVec;
    if constexpr (kVec == 1) {
      *p = from_float<T>(to_float(*p) * f);
    } else {
      float v[kVec];
      load_packs<T, kVec>(p, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] *= f;
      store_packs<T, kVec>(p, v);
    }
  }
}

// Whether every access of a tensor along its rows can be a 16-byte pack of `elements`-byte values:
// an aligned base, unit stride along the row (`unit`: 2 for interleaved C = 2), and the other strides
// (of dimensions longer than 1) whole packs.
bool rows_pack(const void* p, int element_bytes, const int64_t* stride, const int64_t* size, int dims, int64_t unit) {
  if (p == nullptr) return true;
  if (!packs::packed(p) || stride[dims - 1] != unit) return false;
  for (int k = 0; k < dims - 1; ++k) {
    if (!packs::keeps_packs(size[k], stride[k], 16 / element_bytes)) return false;
  }
  return true;
}

template <typename T>
cudaError_t launch(const Problem& pb, cudaStream_t stream) {
  const int bytes = sizeof(T);
  const bool interleaved = pb.C == 2 && pb.logits_stride[1] == 1 && pb.logits_stride[3] == 2;
  // logits and gradient: (N, C, H, W) with rows along W; channel planes, or the pair of a pixel innermost
  const int64_t size4[4] = {pb.N, interleaved ? 1 : pb.C, pb.H, pb.W};
  const int64_t logits_rows[4] = {pb.logits_stride[0], interleaved ? 0 : pb.logits_stride[1], pb.logits_stride[2],
                                  pb.logits_stride[3]};
  const int64_t gradient_rows[4] = {pb.gradient_stride[0], interleaved ? 0 : pb.gradient_stride[1],
                                    pb.gradient_stride[2], pb.gradient_stride[3]};
  const bool gradient_interleaved_too =
      !interleaved || pb.gradient == nullptr || (pb.gradient_stride[1] == 1 && pb.gradient_stride[3] == 2);
  const int64_t size3[3] = {pb.N, pb.H, pb.W}, loss_map_stride[3] = {pb.H * pb.W, pb.W, 1};
  const int64_t unit = interleaved ? 2 : 1;
  const bool packed = pb.W % kRun == 0 && gradient_interleaved_too &&
                      rows_pack(pb.logits, bytes, logits_rows, size4, 4, unit) &&
                      rows_pack(pb.gradient, bytes, gradient_rows, size4, 4, unit) &&
                      rows_pack(pb.target, bytes_of(pb.target_type), pb.target_stride, size3, 3, 1) &&
                      rows_pack(pb.grad_map, bytes, pb.grad_map_stride, size3, 3, 1) &&
                      rows_pack(pb.loss_map, bytes, loss_map_stride, size3, 3, 1);
  const dim3 grid(static_cast<unsigned>(pb.N * ((pb.H + kTileH - 1) / kTileH)),
                  static_cast<unsigned>((pb.W + kTileW - 1) / kTileW));
  if (!packed) {
    tile_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(pb);
  } else if (interleaved) {
    tile_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(pb);
  } else {
    tile_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(pb);
  }
  return cudaGetLastError();
}

}  // namespace

bool launchable(int64_t N, int64_t H, int64_t W) {
  const int64_t row_blocks = N * ((H + kTileH - 1) / kTileH), column_tiles = (W + kTileW - 1) / kTileW;
  return H <= INT_MAX && W <= INT_MAX && row_blocks <= INT_MAX && column_tiles <= 65535;
}

int64_t partial_count(int64_t N, int64_t H, int64_t W) {
  return N * ((H + kTileH - 1) / kTileH) * ((W + kTileW - 1) / kTileW);
}

cudaError_t run(const Problem& problem, cudaStream_t stream) {
  if (!launchable(problem.N, problem.H, problem.W)) return cudaErrorInvalidValue;
  SLSDEEP_DISPATCH_FLOATING(problem.dtype, return launch<scalar_t>(problem, stream))
  return cudaSuccess;
}

cudaError_t finish_loss(DType dtype, const float* partials, int64_t count, double scale, void* loss,
                        cudaStream_t stream) {
  SLSDEEP_DISPATCH_FLOATING(dtype, finish_kernel<scalar_t><<<1, kFinishThreads, 0, stream>>>(
                                       partials, count, scale, static_cast<scalar_t*>(loss)))
  return cudaGetLastError();
}

cudaError_t scale(DType dtype, void* gradient, int64_t numel, const float* factor, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  auto grid_for = [](int64_t items) {
    const int64_t blocks = (items + kScaleThreads - 1) / kScaleThreads;
    return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  };
  SLSDEEP_DISPATCH_FLOATING(dtype, {
    constexpr int kWide = 16 / sizeof(scalar_t);
    auto* p = static_cast<scalar_t*>(gradient);
    if (numel % kWide == 0 && packs::packed(gradient)) {
      scale_kernel<scalar_t, kWide><<<grid_for(numel / kWide), kScaleThreads, 0, stream>>>(p, numel / kWide, factor);
    } else {
      scale_kernel<scalar_t, 1><<<grid_for(numel), kScaleThreads, 0, stream>>>(p, numel, factor);
    }
  })
  return cudaGetLastError();
}

}  // namespace nll_epe_loss_cuda
}  // namespace slsdeep
