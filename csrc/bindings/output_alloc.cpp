// Output allocation. Large CPU outputs (y, dx) come from huge-page mappings that are
// kept for reuse. With glibc, a large output is either a fresh mmap (requests of 32 MiB
// and more) or heap memory that free() may have trimmed back to the kernel: either way it
// is faulted in 4 KiB at a time on first write, which on this kind of machine costs more
// than the kernel itself (a 64 MiB output: ~16 ms of page faults against ~2 ms of
// writing). Here a large output is a 2 MiB-aligned mapping advised MADV_HUGEPAGE
// (faulted 2 MiB at a time where transparent huge pages are enabled), and when its tensor
// dies the mapping goes to a small cache that the next output of a similar size reuses,
// as a training loop allocates the same sizes every step. The cache holds at most
// kCacheBytes; anything beyond is unmapped. Small outputs use torch's allocator.
#include <sys/mman.h>

#include <list>
#include <mutex>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include "common.h"

namespace fused_norm {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kLargeOutput = size_t(4) << 20;
constexpr size_t kCacheBytes = size_t(512) << 20;

struct Mapping {
  void* base;
  size_t length;   // of the mapping
  void* data;      // 2 MiB-aligned start
  size_t usable;   // bytes from data to the end
};

class MappingCache {
 public:
  // A cached mapping with room for n bytes that wastes at most half of it, or a new one.
  Mapping* take(size_t n) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if ((*it)->usable >= n && (*it)->usable / 2 <= n) {
          Mapping* m = *it;
          cached_ -= m->length;
          free_.erase(it);
          return m;
        }
      }
    }
    const size_t length = (n + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    const uintptr_t start = reinterpret_cast<uintptr_t>(base);
    const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
    auto* m = new Mapping{base, length, reinterpret_cast<void*>(aligned), length - (aligned - start)};
#ifdef MADV_HUGEPAGE  // a hint: without huge page support the mapping works as is
    madvise(m->data, m->usable, MADV_HUGEPAGE);
#endif
    return m;
  }
  // Back into the cache (most recent first), evicting the oldest beyond kCacheBytes.
  void give(Mapping* m) {
    std::vector<Mapping*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_front(m);
      cached_ += m->length;
      while (cached_ > kCacheBytes) {
        evicted.push_back(free_.back());
        cached_ -= free_.back()->length;
        free_.pop_back();
      }
    }
    for (Mapping* e : evicted) {
      munmap(e->base, e->length);
      delete e;
    }
  }

 private:
  std::mutex mutex_;
  std::list<Mapping*> free_;
  size_t cached_ = 0;
};

MappingCache& cache() {
  static auto* c = new MappingCache();  // never destroyed: tensors may outlive static teardown
  return *c;
}

void release(void* ctx) { cache().give(static_cast<Mapping*>(ctx)); }

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
#ifdef FN_CUDA_EMULATION
    const bool reuse = !cuda_emulation_enabled();  // emulated runs get fresh, poisoned memory
#else
    const bool reuse = true;
#endif
    if (reuse && n >= kLargeOutput) {
      if (Mapping* m = cache().take(n)) return {m->data, m, &release, c10::Device(c10::kCPU)};
    }
    return c10::GetCPUAllocator()->allocate(n);
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

OutputAllocator output_allocator;

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  if (options.device().is_cpu()) {
    return at::detail::empty_generic(sizes, &output_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()), format);
  }
  return at::empty(sizes, options.memory_format(format));
}

}  // namespace fused_norm
