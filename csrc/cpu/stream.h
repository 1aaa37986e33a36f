// Streaming (non-temporal) stores for the CPU kernels' large write-only outputs.
//
// A kernel that fills an output far larger than the cores' caches (the pyramid pool's backward: 19 MB
// at the CPU benchmark's shape for 0.4 MB read) is bound by its stores. A plain store first reads
// the line it writes (read for ownership); a streaming store writes whole lines without reading
// them. Measured on the 2-vCPU Xeon VM (docs/performance.md §4.3), filling 19 MB whose lines are in
// no cache: 1.0-1.2 ms with plain stores (vector or memcpy), 0.40 ms with 16-byte streaming stores;
// into lines already cached, 0.33 ms plain against 0.39 ms streamed. The output then is not in the
// cache for its reader, so only outputs of at least kStreamingBytes stream (larger than the L2 of
// the cores writing them on the machines this library targets). SSE2's 16-byte store is baseline
// x86-64: the same code in every variant (csrc/cpu/variant.h); elsewhere the copy is a memcpy.
// Included before SLSDEEP_CPU_VARIANT_BEGIN, like the ATen headers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace slsdeep::cpu {

constexpr int64_t kStreamingBytes = int64_t{8} << 20;

// Whether an output of `bytes` is written with streaming stores.
inline bool streams(int64_t bytes) { return bytes >= kStreamingBytes; }

// dst[0, bytes) = src[0, bytes): streamed where `stream`, in 16-byte stores from dst's first 16-byte
// boundary (the ends plain), else memcpy. A thread that streamed calls stream_fence() before its
// writes are read by another (the stores are weakly ordered).
inline void copy_bytes(void* dst, const void* src, int64_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
    std::memcpy(d, s, head);
    int64_t i = head;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace slsdeep::cpu
