// Packs of kVec consecutive elements for the CUDA kernels' 16-byte accesses (torch-free; device code).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dtype.h"

namespace slsdeep {
namespace packs {

// kVec consecutive elements (kVec = 1: one element, any alignment). A 16-byte pack moves through __ldcg/__stcg on a uint4 (one
// ld/st.global.cg.v4: streamed through L2, no reuse in L1 to keep); a plain struct copy is split
// by the compiler wherever it loses track of the address's alignment.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

namespace detail {
template <bool kCached, typename T, int kVec>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[kVec]) {
  Pack<T, kVec> pack;
  if constexpr (sizeof(pack) == 16) {
    const uint4* bits_at = reinterpret_cast<const uint4*>(p);
    const uint4 bits = kCached ? __ldg(bits_at) : __ldcg(bits_at);
    memcpy(&pack, &bits, 16);
  } else {
    pack = *reinterpret_cast<const Pack<T, kVec>*>(p);
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(pack.v[j]);
}
}  // namespace detail

// A pack read once (streamed through L2).
template <typename T, int kVec>
__device__ __forceinline__ void load(const T* p, float (&out)[kVec]) {
  detail::load_pack<false>(p, out);
}

// A pack the block reads again (ld.global.nc: kept in L1 as well).
template <typename T, int kVec>
__device__ __forceinline__ void load_cached(const T* p, float (&out)[kVec]) {
  detail::load_pack<true>(p, out);
}

template <typename T, int kVec>
__device__ __forceinline__ void store(T* p, const float (&in)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int j = 0; j < kVec; ++j) pack.v[j] = from_float<T>(in[j]);
  if constexpr (sizeof(pack) == 16) {
    uint4 bits;
    memcpy(&bits, &pack, 16);
    __stcg(reinterpret_cast<uint4*>(p), bits);
  } else {
    *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
  }
}

// Host side: whether 16-byte packs can be used.

// A pointer on the 16-byte grid.
inline bool packed(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether packs of `width` elements (16 bytes) stay aligned along a dimension of this size and stride: a
// stride that is a multiple of the width, or any stride of a size-1 dimension (torch gives those any).
inline bool keeps_packs(int64_t size, int64_t stride, int width) { return size == 1 || stride % width == 0; }

}  // namespace packs
}  // namespace slsdeep
