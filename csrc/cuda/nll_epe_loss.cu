// CUDA kernels of the NLL + EPE loss: see nll_epe_loss.h.
#include "common/dtype.h"
#include "common/nll_epe_loss.h"
#include "cuda/nll_epe_loss.h"

namespace slsdeep {
namespace nll_epe_loss_cuda {
namespace {

using namespace nll_epe;

constexpr int kTileW = 32, kTileH = 16;           // outputs per block
constexpr int kThreadsX = 32, kThreadsY = 8;      // a warp per row of the tile
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kHaloW = kTileW + 4, kHaloH = kTileH + 4;  // d: 2-pixel halo
constexpr int kDirW = kTileW + 2, kDirH = kTileH + 2;    // EPE direction: 1-pixel halo

__device__ __forceinline__ float load_target(const void* target, DType type, int64_t offset) {
  switch (type) {
    case DType::kUInt8:
      return static_cast<float>(static_cast<const uint8_t*>(target)[offset]);
    case DType::kInt64:
      return static_cast<float>(static_cast<const int64_t*>(target)[offset]);
    case DType::kFloat:
      return static_cast<const float*>(target)[offset];
    case DType::kDouble:
      return static_cast<float>(static_cast<const double*>(target)[offset]);
    case DType::kHalf:
      return to_float(static_cast<const __half*>(target)[offset]);
    default:
      return to_float(static_cast<const __nv_bfloat16*>(target)[offset]);
  }
}

__device__ __forceinline__ int64_t clamp_index(int64_t i, int64_t size) {
  return i < 0 ? 0 : (i >= size ? size - 1 : i);
}

// Sum over the block (kThreads threads); the result is valid in thread 0.
__device__ float block_sum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x, warp = threadIdx.y;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = 0.0f;
  if (warp == 0) {
    value = lane < kThreadsY ? scratch[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) tile_kernel(Problem pb) {
  __shared__ float d_s[kHaloH][kHaloW];
  __shared__ float ux_s[kDirH][kDirW];
  __shared__ float uy_s[kDirH][kDirW];
  __shared__ float spread_s[kTileH][kTileW];
  __shared__ float nll_s[kTileH][kTileW];
  __shared__ float scratch[kThreadsY];

  // grid (N · row tiles, column tiles): the batch shares axis x (y and z stop at 65,535); once per block
  const unsigned row_tiles = (static_cast<unsigned>(pb.H) + kTileH - 1) / kTileH;
  const int64_t n = blockIdx.x / row_tiles;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x % row_tiles) * kTileH, c0 = static_cast<int64_t>(blockIdx.y) * kTileW;
  const int64_t H = pb.H, W = pb.W;
  const int tid = threadIdx.y * kThreadsX + threadIdx.x;
  const auto* logits = static_cast<const scalar_t*>(pb.logits) + n * pb.logits_stride[0];
  const int64_t target_base = n * pb.target_stride[0];
  const bool with_gradient = pb.gradient != nullptr;
  const bool with_loss = pb.loss_map != nullptr || pb.partials != nullptr;

  // 1. d = p - v on the tile and its 2-pixel halo (clamped coordinates: the replicate padding);
  //    p(1 - p) and the NLL on the tile.
  for (int k = tid; k < kHaloH * kHaloW; k += kThreads) {
    const int li = k / kHaloW, lj = k % kHaloW;
    const int64_t i = clamp_index(r0 - 2 + li, H), j = clamp_index(c0 - 2 + lj, W);
    const scalar_t* pixel = logits + i * pb.logits_stride[2] + j * pb.logits_stride[3];
    float z = to_float(pixel[(pb.C - 1) * pb.logits_stride[1]]);
    if (pb.C == 2) z -= to_float(pixel[0]);
    const float v = load_target(pb.target, pb.target_type, target_base + i * pb.target_stride[1] + j * pb.target_stride[2]);
    const float e = exp_neg_abs(z);
    const float inverse = 1.0f / (1.0f + e);
    const float p = foreground_probability(z, e, inverse);
    d_s[li][lj] = p - v;
    const int ti = li - 2, tj = lj - 2;
    if (ti >= 0 && ti < kTileH && tj >= 0 && tj < kTileW) {
      spread_s[ti][tj] = p * (1.0f - p);
      nll_s[ti][tj] = negative_log_likelihood(z, v, z < 0.0f ? 1.0f : 0.0f, log1p_of(e, inverse));
    }
  }
  __syncthreads();

  // 2. Sobel derivatives, EPE and its direction (times the upstream gradient) on the tile plus 1.
  float loss_sum = 0.0f;
  for (int k = tid; k < kDirH * kDirW; k += kThreads) {
    const int qi = k / kDirW, qj = k % kDirW;  // d_s centre at (qi + 1, qj + 1)
    const float(*row)[kHaloW] = &d_s[qi];
    const float s_left = row[0][qj] + 2.0f * row[1][qj] + row[2][qj];
    const float s_right = row[0][qj + 2] + 2.0f * row[1][qj + 2] + row[2][qj + 2];
    const float v_left = row[2][qj] - row[0][qj];
    const float v_mid = row[2][qj + 1] - row[0][qj + 1];
    const float v_right = row[2][qj + 2] - row[0][qj + 2];
    float dx, dy;
    const float epe = end_point_error((s_right - s_left) * 0.125f, (v_left + 2.0f * v_mid + v_right) * 0.125f, dx, dy);
    const int64_t q = r0 - 1 + qi, c = c0 - 1 + qj;
    const bool in_image = q >= 0 && q < H && c >= 0 && c < W;
    const bool in_tile = qi >= 1 && qi <= kTileH && qj >= 1 && qj <= kTileW && in_image;
    if (in_tile && with_loss) {
      const float value = nll_s[qi - 1][qj - 1] + pb.alpha * epe;
      if (pb.loss_map != nullptr) {
        static_cast<scalar_t*>(pb.loss_map)[(n * H + q) * W + c] = from_float<scalar_t>(value);
      } else {
        loss_sum += value;
      }
    }
    float weight = 1.0f;
    if (pb.grad_map != nullptr && in_image) {
      weight = to_float(static_cast<const scalar_t*>(pb.grad_map)[n * pb.grad_map_stride[0] + q * pb.grad_map_stride[1] +
                                                                  c * pb.grad_map_stride[2]]);
    }
    ux_s[qi][qj] = dx * weight;
    uy_s[qi][qj] = dy * weight;
  }
  if (pb.partials != nullptr) {
    const float total = block_sum(loss_sum, scratch);
    if (tid == 0) pb.partials[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = total;
  }
  if (!with_gradient) return;
  __syncthreads();

  // 3. The gradient on the tile: the vertical then horizontal adjoint of the stencils.
  const int tj = threadIdx.x;
  const int64_t c = c0 + tj;
  for (int ti = threadIdx.y; ti < kTileH; ti += kThreadsY) {
    const int64_t r = r0 + ti;
    if (r >= H || c >= W) continue;
    const bool top = r == 0, bottom = r == H - 1, left = c == 0, right = c == W - 1;
    float a[3], b[3];  // columns c-1, c, c+1 after the vertical adjoint
    for (int k = 0; k < 3; ++k) {
      const int col = tj + k;  // ux_s column of c - 1 + k
      a[k] = smooth_adjoint(ux_s[ti][col], ux_s[ti + 1][col], ux_s[ti + 2][col], top, bottom);
      b[k] = difference_adjoint(uy_s[ti][col], uy_s[ti + 1][col], uy_s[ti + 2][col], top, bottom);
    }
    const float through_epe =
        (difference_adjoint(a[0], a[1], a[2], left, right) + smooth_adjoint(b[0], b[1], b[2], left, right)) * 0.125f;
    float weight = 1.0f;
    if (pb.grad_map != nullptr) {
      weight = to_float(static_cast<const scalar_t*>(pb.grad_map)[n * pb.grad_map_stride[0] + r * pb.grad_map_stride[1] +
                                                                  c * pb.grad_map_stride[2]]);
    }
    const float grad = pb.gradient_scale * (weight * d_s[ti + 2][tj + 2] + pb.alpha * spread_s[ti][tj] * through_epe);
    scalar_t* out = static_cast<scalar_t*>(pb.gradient) + n * pb.gradient_stride[0] + r * pb.gradient_stride[2] +
                    c * pb.gradient_stride[3];
    out[(pb.C - 1) * pb.gradient_stride[1]] = from_float<scalar_t>(grad);
    if (pb.C == 2) out[0] = from_float<scalar_t>(-grad);
  }
}

constexpr int kFinishThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const float* partials, int64_t count, double scale,
                                                                scalar_t* loss) {
  __shared__ double sums[kFinishThreads];
  double sum = 0.0;
  for (int64_t k = threadIdx.x; k < count; k += kFinishThreads) sum += partials[k];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kFinishThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = from_float<scalar_t>(static_cast<float>(sums[0] * scale));
}

template <typename scalar_t>
__global__ void scale_kernel(scalar_t* gradient, int64_t numel, const float* factor) {
  const float f = *factor;
  if (f == 1.0f) return;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < numel;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gradient[k] = from_float<scalar_t>(to_float(gradient[k]) * f);
  }
}

}  // namespace

int64_t partial_count(int64_t N, int64_t H, int64_t W) {
  return N * ((H + kTileH - 1) / kTileH) * ((W + kTileW - 1) / kTileW);
}

cudaError_t run(const Problem& problem, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(problem.N * ((problem.H + kTileH - 1) / kTileH)),
                  static_cast<unsigned>((problem.W + kTileW - 1) / kTileW));
  const dim3 block(kThreadsX, kThreadsY);
  SLSDEEP_DISPATCH_FLOATING(problem.dtype, tile_kernel<scalar_t><<<grid, block, 0, stream>>>(problem))
  return cudaGetLastError();
}

cudaError_t finish_loss(DType dtype, const float* partials, int64_t count, double scale, void* loss,
                        cudaStream_t stream) {
  SLSDEEP_DISPATCH_FLOATING(dtype, finish_kernel<scalar_t><<<1, kFinishThreads, 0, stream>>>(
                                       partials, count, scale, static_cast<scalar_t*>(loss)))
  return cudaGetLastError();
}

cudaError_t scale(DType dtype, void* gradient, int64_t numel, const float* factor, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (numel + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  SLSDEEP_DISPATCH_FLOATING(dtype, scale_kernel<scalar_t><<<grid, threads, 0, stream>>>(
                                       static_cast<scalar_t*>(gradient), numel, factor))
  return cudaGetLastError();
}

}  // namespace nll_epe_loss_cuda
}  // namespace slsdeep
