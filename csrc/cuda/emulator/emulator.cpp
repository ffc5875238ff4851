// The CUDA emulator's runtime: fibers, the block scheduler, barriers, warp collectives,
// shared memory, launches and the subset of the CUDA runtime API the launchers call.
// See emulator.h for the model.
#include "emulator.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FN_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FN_EMU_ASAN 1
#endif
#endif
#ifdef FN_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Context switch (x86-64 System V): saves the callee-saved registers, the SSE and x87
// control words and the stack pointer of the running context into *save_sp, then resumes
// the context whose stack pointer is load_sp. An external function, so the compiler
// re-reads memory (the running fiber, threadIdx) after every switch.
extern "C" void fn_emu_switch_context(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl fn_emu_switch_context
  .hidden fn_emu_switch_context
  .type fn_emu_switch_context, @function
fn_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fn_emu_switch_context, .-fn_emu_switch_context
)");

namespace fused_norm {
namespace emu {
namespace {

// ---------------------------------------------------------------------------------------
// Device description: an H100 SXM, with a settable SM count.
constexpr int kDefaultSms = 132;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockX = 1024, kMaxBlockY = 1024, kMaxBlockZ = 64;
constexpr unsigned kMaxGridX = 0x7fffffffu, kMaxGridYZ = 65535;
constexpr size_t kDefaultSmemPerBlock = 48 * 1024;   // without the opt-in attribute
constexpr size_t kMaxSmemPerBlockOptin = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
#ifdef FN_EMU_ASAN
constexpr size_t kStackBytes = size_t(1) << 20;  // instrumented frames are larger
#else
constexpr size_t kStackBytes = size_t(256) << 10;
#endif

struct Config {
  std::mutex mutex;
  Schedule schedule;
  std::atomic<int> sms{kDefaultSms};
  std::atomic<bool> fail_device_queries{false};
  std::atomic<int64_t> launches{0};
  std::string last_error;
  std::map<const void*, size_t> max_dynamic_smem;  // cudaFuncSetAttribute

  Config() {
    if (const char* s = std::getenv("FUSED_NORM_EMULATE_CUDA_SCHEDULE")) {
      if (!parse_schedule(s, &schedule)) {
        std::fprintf(stderr, "fused_norm CUDA emulator: ignoring FUSED_NORM_EMULATE_CUDA_SCHEDULE=%s "
                             "(expected forward, reverse or random:SEED)\n", s);
      }
    }
    if (const char* s = std::getenv("FUSED_NORM_EMULATE_CUDA_SMS")) {
      const int n = std::atoi(s);
      if (n > 0) sms = n;
    }
  }
};

Config& config() {
  static Config c;
  return c;
}

thread_local cudaError_t t_last_error = cudaSuccess;

// ---------------------------------------------------------------------------------------
// Fibers.
enum class State { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  void* mapping = nullptr;  // guard page + stack
  char* stack_lo = nullptr;
  void* sp = nullptr;
  ThreadCtx ctx{};
  int tid = 0;
  State state = State::kReady;
  Where where{};  // where it blocked
  alignas(16) unsigned char result[64];
#ifdef FN_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct PendingOp {
  WarpOp op;
  unsigned mask;
  int width;
  Where where;
  unsigned arrived = 0;
  size_t bytes = 0;
  std::array<std::array<unsigned char, 64>, 32> in{};
  std::array<int, 32> arg{};
};

struct Block {
  const LaunchSpec* spec = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  int nthreads = 0;
  int live = 0;
  int waiting = 0;  // at the barrier
  Where barrier_where{};
  std::vector<std::vector<PendingOp>> warps;
  struct Static {
    const void* key;
    void* mem;
  };
  std::vector<Static> statics;
  size_t smem_bytes = 0;  // static + dynamic in use
  size_t smem_limit = 0;
  void* dynamic = nullptr;
  void* scheduler_sp = nullptr;
  Fiber* current = nullptr;
  bool failed = false;
  std::string error;
};

thread_local Block* t_block = nullptr;
thread_local std::vector<Fiber> t_fibers;  // reused by every launch on this OS thread
#ifdef FN_EMU_ASAN
thread_local const void* t_main_stack_bottom = nullptr;
thread_local size_t t_main_stack_size = 0;
#endif

std::string where_str(const Where& w) {
  std::ostringstream s;
  const char* file = w.file_name();
  const char* slash = std::strrchr(file, '/');
  s << (slash ? slash + 1 : file) << ":" << w.line() << ":" << w.column();
  return s.str();
}

bool same_site(const Where& a, const Where& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

std::string thread_str(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.ctx.thread_idx.x << "," << f.ctx.thread_idx.y << "," << f.ctx.thread_idx.z << ") of block ("
    << f.ctx.block_idx.x << "," << f.ctx.block_idx.y << "," << f.ctx.block_idx.z << ")";
  return s.str();
}

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled ? demangled : info.dli_sname;
    std::free(demangled);
    return name;
  }
  std::ostringstream s;
  s << "kernel at " << kernel;
  return s.str();
}

// Every thread's state, for error reports.
std::string block_state(const Block& b) {
  std::ostringstream s;
  constexpr int kMaxLines = 40;
  int shown = 0;
  for (int t = 0; t < b.nthreads; ++t) {
    const Fiber& f = (*b.fibers)[t];
    if (shown == kMaxLines) {
      s << "  ... (" << b.nthreads - t << " more threads)\n";
      break;
    }
    s << "  " << thread_str(f) << ": ";
    switch (f.state) {
      case State::kReady: s << "runnable"; break;
      case State::kBarrier: s << "waits at __syncthreads " << where_str(f.where); break;
      case State::kWarp: s << "waits at a warp collective " << where_str(f.where); break;
      case State::kDone: s << "exited"; break;
    }
    s << "\n";
    ++shown;
  }
  return s.str();
}

// Thrown by fail() to unwind the failing fiber's frames (their destructors run) up to
// fiber_entry, which leaves the fiber for good.
struct KernelFault {};

// Records the first error of the block and stops the running fiber.
[[noreturn]] void fail(const std::string& what) {
  Block& b = *t_block;
  Fiber& f = *b.current;
  if (!b.failed) {
    b.failed = true;
    b.error = "fused_norm CUDA emulator: " + what + "\n  in " + thread_str(f) + " of " + kernel_name(b.spec->kernel) +
              "\nthread states:\n" + block_state(b);
  }
  throw KernelFault{};
}

void switch_to_scheduler(Fiber& f, bool final_switch) {
  Block& b = *t_block;
#ifdef FN_EMU_ASAN
  __sanitizer_start_switch_fiber(final_switch ? nullptr : &f.fake_stack, t_main_stack_bottom, t_main_stack_size);
#else
  (void)final_switch;
#endif
  fn_emu_switch_context(&f.sp, b.scheduler_sp);
#ifdef FN_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

// Gives the other fibers their turn; returns when the scheduler resumes this one.
void yield() { switch_to_scheduler(*t_block->current, false); }

// Checks that a thread may exit now (no lane or thread waits for it).
void check_exit(const Block& b, const Fiber& f) {
  const int lane = f.tid % 32;
  for (const PendingOp& op : b.warps[f.tid / 32]) {
    if (op.mask >> lane & 1u) {
      fail("thread exits while lanes of its warp wait for it at " + std::string(op_name(op.op)) + " " +
           where_str(op.where));
    }
  }
  if (b.waiting > 0) {
    fail("thread exits while " + std::to_string(b.waiting) + " threads wait at __syncthreads " +
         where_str(b.barrier_where));
  }
}

[[noreturn]] void fiber_entry() {
#ifdef FN_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &t_main_stack_bottom, &t_main_stack_size);
#endif
  Block& b = *t_block;
  Fiber& f = *b.current;
  try {
    b.spec->body();
    check_exit(b, f);
    f.state = State::kDone;
    --b.live;
  } catch (const KernelFault&) {
    // b.failed is set: the scheduler abandons the block.
  }
  switch_to_scheduler(f, true);
  std::abort();  // never resumed
}

void prepare_fiber(Fiber& f) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (f.mapping == nullptr) {
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "fused_norm CUDA emulator: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
    f.mapping = m;
    f.stack_lo = static_cast<char*>(m) + page;
  }
#ifdef FN_EMU_ASAN
  // The stack's previous fiber may have left frames' redzones poisoned.
  __asan_unpoison_memory_region(f.stack_lo, kStackBytes);
#endif
  // Initial frame, as fn_emu_switch_context leaves one: control words, r15..r12, rbx,
  // rbp, then the return address (fiber_entry) and an alignment slot.
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(f.stack_lo) + kStackBytes) & ~uintptr_t{15});
  uint64_t* sp = top;
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  sp -= 2;
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(reinterpret_cast<char*>(sp), &fpucw, sizeof fpucw);
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof mxcsr);
  f.sp = sp;
  f.state = State::kReady;
#ifdef FN_EMU_ASAN
  f.fake_stack = nullptr;
#endif
}

void resume(Block& b, Fiber& f) {
  b.current = &f;
#ifdef FN_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack_lo, kStackBytes);
#endif
  fn_emu_switch_context(&b.scheduler_sp, f.sp);
#ifdef FN_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  b.current = nullptr;
}

uint64_t mix(uint64_t v) {  // splitmix64
  v += 0x9e3779b97f4a7c15ull;
  v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ull;
  v = (v ^ (v >> 27)) * 0x94d049bb133111ebull;
  return v ^ (v >> 31);
}

// Runs one block to completion (or to its first error).
void run_block(Block& b, const LaunchSpec& spec, const uint3& block_idx, const Schedule& sched) {
  const dim3 bd = spec.block;
  b.nthreads = static_cast<int>(bd.x * bd.y * bd.z);
  b.live = b.nthreads;
  b.waiting = 0;
  b.warps.assign((b.nthreads + 31) / 32, {});
  b.statics.clear();
  b.smem_bytes = spec.dynamic_smem;
  b.dynamic = nullptr;
  if (posix_memalign(&b.dynamic, 16, spec.dynamic_smem) != 0) std::abort();
  std::memset(b.dynamic, 0xff, spec.dynamic_smem);
  std::vector<Fiber>& fibers = *b.fibers;
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = fibers[t];
    prepare_fiber(f);
    f.tid = t;
    f.ctx.thread_idx = uint3{static_cast<unsigned>(t) % bd.x, static_cast<unsigned>(t) / bd.x % bd.y,
                             static_cast<unsigned>(t) / (bd.x * bd.y)};
    f.ctx.block_idx = block_idx;
    f.ctx.block_dim = bd;
    f.ctx.grid_dim = spec.grid;
  }
  const uint64_t linear = (uint64_t{block_idx.z} * spec.grid.y + block_idx.y) * spec.grid.x + block_idx.x;
  std::mt19937_64 rng(mix(sched.seed ^ mix(linear)));
  std::vector<int> ready;
  while (!b.failed) {
    ready.clear();
    for (int t = 0; t < b.nthreads; ++t)
      if (fibers[t].state == State::kReady) ready.push_back(t);
    if (ready.empty()) {
      if (b.live == 0) break;
      b.failed = true;
      b.error = "fused_norm CUDA emulator: deadlock, no thread of block (" + std::to_string(block_idx.x) + "," +
                std::to_string(block_idx.y) + "," + std::to_string(block_idx.z) + ") of " + kernel_name(spec.kernel) +
                " can run\nthread states:\n" + block_state(b);
      break;
    }
    if (sched.order == Order::kReverse) std::reverse(ready.begin(), ready.end());
    if (sched.order == Order::kRandom) std::shuffle(ready.begin(), ready.end(), rng);
    for (int t : ready) {
      resume(b, fibers[t]);
      if (b.failed) break;
    }
  }
  for (const Block::Static& s : b.statics) std::free(s.mem);
  b.statics.clear();
  std::free(b.dynamic);
  b.dynamic = nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Configuration.
bool parse_schedule(const char* text, Schedule* out) {
  const std::string s(text);
  if (s == "forward") {
    *out = Schedule{Order::kForward, 0};
    return true;
  }
  if (s == "reverse") {
    *out = Schedule{Order::kReverse, 0};
    return true;
  }
  if (s.rfind("random:", 0) == 0 && s.size() > 7) {
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(s.c_str() + 7, &end, 10);
    if (end == nullptr || *end != '\0') return false;
    *out = Schedule{Order::kRandom, seed};
    return true;
  }
  return false;
}

void set_schedule(const Schedule& s) {
  std::lock_guard<std::mutex> lock(config().mutex);
  config().schedule = s;
}

Schedule schedule() {
  std::lock_guard<std::mutex> lock(config().mutex);
  return config().schedule;
}

void set_sm_count(int sms) { config().sms = sms > 0 ? sms : kDefaultSms; }
int sm_count() { return config().sms; }
void set_fail_device_queries(bool fail) { config().fail_device_queries = fail; }
int64_t launches() { return config().launches; }

std::string last_error_message() {
  std::lock_guard<std::mutex> lock(config().mutex);
  return config().last_error;
}

const ThreadCtx& this_thread() {
  if (t_block == nullptr || t_block->current == nullptr) {
    std::fprintf(stderr, "fused_norm CUDA emulator: threadIdx/blockIdx read outside a kernel\n");
    std::abort();
  }
  return t_block->current->ctx;
}

// ---------------------------------------------------------------------------------------
// Barrier.
void syncthreads(const Where& where) {
  Block& b = *t_block;
  Fiber& f = *b.current;
  const int lane = f.tid % 32;
  for (const PendingOp& op : b.warps[f.tid / 32]) {
    if (op.mask >> lane & 1u) {
      fail("__syncthreads " + where_str(where) + " reached while lanes of the warp wait for this thread at " +
           op_name(op.op) + " " + where_str(op.where));
    }
  }
  if (b.waiting == 0) {
    b.barrier_where = where;
  } else if (!same_site(b.barrier_where, where)) {
    fail("divergent barrier: __syncthreads " + where_str(where) + " while " + std::to_string(b.waiting) +
         " threads wait at __syncthreads " + where_str(b.barrier_where));
  }
  ++b.waiting;
  f.state = State::kBarrier;
  f.where = where;
  if (b.waiting == b.live) {
    for (int t = 0; t < b.nthreads; ++t)
      if ((*b.fibers)[t].state == State::kBarrier) (*b.fibers)[t].state = State::kReady;
    b.waiting = 0;
  }
  yield();
}

// ---------------------------------------------------------------------------------------
// Warp collectives.
void warp_collective(WarpOp op, unsigned mask, const void* in, void* out, size_t bytes, int arg, int width,
                     const Where& where) {
  Block& b = *t_block;
  Fiber& f = *b.current;
  const int lane = f.tid % 32;
  const int warp = f.tid / 32;
  const int warp_threads = std::min(32, b.nthreads - warp * 32);
  const unsigned existing = warp_threads == 32 ? 0xffffffffu : (1u << warp_threads) - 1u;
  // Reports are built only on failure: a waiting fiber keeps no heap memory alive.
  auto name = [&] { return std::string(op_name(op)) + " " + where_str(where); };
  auto hex = [](unsigned v) {
    std::ostringstream s;
    s << "0x" << std::hex << v;
    return s.str();
  };
  if (bytes > sizeof(f.result)) fail(name() + ": values of more than 64 bytes are not supported");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(name() + ": width " + std::to_string(width) + " is not a power of two <= 32");
  if ((mask >> lane & 1u) == 0) fail(name() + ": lane " + std::to_string(lane) + " is not in its mask " + hex(mask));
  if ((mask & ~existing) != 0) fail(name() + ": mask " + hex(mask) + " names lanes past the end of the block");
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) == 0 || l == lane) continue;
    const Fiber& o = (*b.fibers)[warp * 32 + l];
    if (o.state == State::kDone)
      fail(name() + ": mask " + hex(mask) + " names lane " + std::to_string(l) + ", which has exited");
    if (o.state == State::kBarrier) {
      fail(name() + ": mask " + hex(mask) + " names lane " + std::to_string(l) + ", which waits at __syncthreads " +
           where_str(o.where));
    }
  }
  std::vector<PendingOp>& ops = b.warps[warp];
  PendingOp* mine = nullptr;
  for (PendingOp& p : ops) {
    if ((p.mask & mask) == 0) continue;
    if (p.op != op || p.mask != mask || p.width != width || !same_site(p.where, where)) {
      fail(name() + " (mask " + hex(mask) + ", width " + std::to_string(width) + ") while lanes wait at " +
           op_name(p.op) + " " + where_str(p.where) + " (mask " + hex(p.mask) + ", width " + std::to_string(p.width) +
           ")");
    }
    mine = &p;
  }
  if (mine == nullptr) {
    ops.push_back(PendingOp{op, mask, width, where});
    mine = &ops.back();
    mine->bytes = bytes;
  }
  if (in != nullptr) std::memcpy(mine->in[lane].data(), in, bytes);
  mine->arg[lane] = arg;
  mine->arrived |= 1u << lane;
  f.where = where;
  if (mine->arrived == mask) {
    const PendingOp p = *mine;
    ops.erase(ops.begin() + (mine - ops.data()));
    unsigned votes = 0;
    for (int l = 0; l < 32; ++l)
      if ((p.mask >> l & 1u) && p.arg[l] != 0) votes |= 1u << l;
    for (int l = 0; l < 32; ++l) {
      if ((p.mask >> l & 1u) == 0) continue;
      Fiber& o = (*b.fibers)[warp * 32 + l];
      o.state = State::kReady;
      const int base = l & ~(p.width - 1);
      int src = l;
      switch (p.op) {
        case WarpOp::kShflIdx: src = base + (p.arg[l] & (p.width - 1)); break;
        case WarpOp::kShflUp: src = l - p.arg[l] >= base ? l - p.arg[l] : l; break;
        case WarpOp::kShflDown: src = l + p.arg[l] < base + p.width ? l + p.arg[l] : l; break;
        case WarpOp::kShflXor: src = (l ^ p.arg[l]) < base + p.width ? l ^ p.arg[l] : l; break;
        default: break;
      }
      switch (p.op) {
        case WarpOp::kSyncwarp: break;
        case WarpOp::kBallot: std::memcpy(o.result, &votes, sizeof votes); break;
        case WarpOp::kAny: {
          const unsigned r = votes != 0;
          std::memcpy(o.result, &r, sizeof r);
          break;
        }
        case WarpOp::kAll: {
          const unsigned r = votes == p.mask;
          std::memcpy(o.result, &r, sizeof r);
          break;
        }
        default:
          if ((p.mask >> src & 1u) == 0) {
            fail(name() + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                 ", which is not in the mask " + hex(p.mask));
          }
          std::memcpy(o.result, p.in[src].data(), p.bytes);
      }
    }
  } else {
    f.state = State::kWarp;
  }
  yield();
  if (bytes > 0) std::memcpy(out, f.result, bytes);
}

unsigned active_mask() {
  Block& b = *t_block;
  const int warp = b.current->tid / 32;
  unsigned mask = 0;
  for (int l = 0; l < 32 && warp * 32 + l < b.nthreads; ++l)
    if ((*b.fibers)[warp * 32 + l].state != State::kDone) mask |= 1u << l;
  return mask;
}

// ---------------------------------------------------------------------------------------
// Shared memory.
void* shared_static(const void* key, size_t bytes, size_t align, const Where& where) {
  Block& b = *t_block;
  for (const Block::Static& s : b.statics)
    if (s.key == key) return s.mem;
  if (b.smem_bytes + bytes > b.smem_limit) {
    fail("shared memory " + where_str(where) + ": " + std::to_string(bytes) +
         " more bytes exceed the block's limit of " + std::to_string(b.smem_limit) + " (" +
         std::to_string(b.smem_bytes) + " in use)");
  }
  void* mem = nullptr;
  if (posix_memalign(&mem, std::max<size_t>(align, 16), bytes) != 0) std::abort();
  std::memset(mem, 0xff, bytes);
  b.statics.push_back(Block::Static{key, mem});
  b.smem_bytes += bytes;
  return mem;
}

void* shared_dynamic() { return t_block->dynamic; }

// ---------------------------------------------------------------------------------------
// Launches.
cudaError_t launch_kernel(const LaunchSpec& spec) {
  const dim3 g = spec.grid, bd = spec.block;
  const uint64_t threads = uint64_t{bd.x} * bd.y * bd.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || bd.x == 0 || bd.y == 0 || bd.z == 0 || bd.x > kMaxBlockX ||
      bd.y > kMaxBlockY || bd.z > kMaxBlockZ || threads > kMaxThreadsPerBlock || g.x > kMaxGridX ||
      g.y > kMaxGridYZ || g.z > kMaxGridYZ) {
    t_last_error = cudaErrorInvalidConfiguration;
    return t_last_error;
  }
  size_t limit = kDefaultSmemPerBlock;
  {
    std::lock_guard<std::mutex> lock(config().mutex);
    const auto it = config().max_dynamic_smem.find(spec.kernel);
    if (it != config().max_dynamic_smem.end()) limit = std::max(limit, std::min(kMaxSmemPerBlockOptin, it->second));
  }
  if (spec.dynamic_smem > limit) {
    t_last_error = cudaErrorInvalidValue;
    return t_last_error;
  }
  if (t_block != nullptr) {
    std::fprintf(stderr, "fused_norm CUDA emulator: a kernel launched from a kernel\n");
    std::abort();
  }
  ++config().launches;
  const Schedule sched = schedule();
  if (t_fibers.size() < threads) t_fibers.resize(threads);
  Block b;
  b.spec = &spec;
  b.fibers = &t_fibers;
  b.smem_limit = limit;
  t_block = &b;
  for (unsigned z = 0; z < g.z && !b.failed; ++z)
    for (unsigned y = 0; y < g.y && !b.failed; ++y)
      for (unsigned x = 0; x < g.x && !b.failed; ++x) run_block(b, spec, uint3{x, y, z}, sched);
  t_block = nullptr;
  if (b.failed) {
    {
      std::lock_guard<std::mutex> lock(config().mutex);
      config().last_error = b.error;
    }
    if (std::getenv("FUSED_NORM_EMULATE_CUDA_QUIET") == nullptr) std::fprintf(stderr, "%s\n", b.error.c_str());
    t_last_error = cudaErrorLaunchFailure;
    return t_last_error;
  }
  return cudaSuccess;
}

}  // namespace emu
}  // namespace fused_norm

// ---------------------------------------------------------------------------------------
// The CUDA runtime API subset the launchers call, answering as one H100.
using fused_norm::emu::config;

extern "C" {

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  if (device == nullptr) return fused_norm::emu::t_last_error = cudaErrorInvalidValue;
  if (config().fail_device_queries) return fused_norm::emu::t_last_error = cudaErrorNoDevice;
  *device = 0;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return fused_norm::emu::t_last_error = cudaErrorInvalidValue;
  if (device != 0) return fused_norm::emu::t_last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = config().sms; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = fused_norm::emu::kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(fused_norm::emu::kDefaultSmemPerBlock);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(fused_norm::emu::kMaxSmemPerBlockOptin);
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return fused_norm::emu::t_last_error = cudaErrorInvalidValue;
  }
}

cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t e = fused_norm::emu::t_last_error;
  fused_norm::emu::t_last_error = cudaSuccess;
  return e;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  if (count == 0) return cudaSuccess;
  if (ptr == nullptr) return fused_norm::emu::t_last_error = cudaErrorInvalidValue;
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr) return fused_norm::emu::t_last_error = cudaErrorInvalidDeviceFunction;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > fused_norm::emu::kMaxSmemPerBlockOptin)
    return fused_norm::emu::t_last_error = cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(config().mutex);
  config().max_dynamic_smem[func] = static_cast<size_t>(value);
  return cudaSuccess;
}

const char* CUDARTAPI cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure: return "unspecified launch failure (see the emulator's report)";
    default: return "unknown error";
  }
}

}  // extern "C"
