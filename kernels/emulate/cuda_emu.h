// Host emulation of the CUDA execution model: with this header a kernel source (after `kernels::emulate` has
// rewritten its `__shared__` declarations) compiles as C++17 with the host g++ and runs on the CPU.
//
// How a launch runs (zc_emu_launch, at the end of this file):
// - Blocks run one after another on the calling OS thread (a valid CUDA schedule: blocks are independent).
// - Every CUDA thread of a block is a fiber with its own stack (a hand-written context switch on x86-64, ucontext
//   elsewhere). A fiber runs until it reaches a synchronisation point (__syncthreads, a warp collective such as
//   __shfl_xor_sync) or returns; then another ready fiber runs. Barriers are released once all their participants have arrived. So threads really
//   interleave at barriers, and code that forgets a barrier reads values another thread has not written yet (or
//   has already overwritten). The launch's schedule picks the interleaving (see run_block): warp by warp, each
//   warp running as far ahead as it can (ascending or descending), or lockstep passes in which every thread
//   advances one synchronisation point (in thread order or shuffled).
// - Warp collectives are resolved by the scheduler once every non-exited lane named in the mask has arrived:
//   each lane's result is computed from the values the lanes deposited, so lanes exchange values in lockstep
//   even though they ran one after another. Reading a lane that does not take part (exited, not in the mask,
//   past the end of a partial warp) yields an all-ones bit pattern (NaN for floats), as CUDA leaves it undefined.
// - Misuse that is undefined behaviour on a GPU is reported as a launch error, never silently accepted: a warp
//   collective whose mask omits the caller, lanes meeting at different collectives or masks, a lane at a warp
//   collective while another lane it names waits at __syncthreads (a deadlock), __syncthreads reached while
//   other threads of the block have exited, invalid shuffle widths, bad launch dimensions, __trap().
// - `__shared__` variables are per-OS-thread storage (`static thread_local`), hence per block since a thread
//   runs one block at a time. They and the dynamic shared memory are filled with 0xff bytes (NaN) before every
//   block, so a kernel that reads shared memory it did not write sees NaN rather than a lucky zero.
// - Tensor-core instructions (mma.sync, ldmatrix) are warp collectives of the whole warp, computed from the PTX
//   ISA's fragment tables in kernels/mma.cuh; cp.async copies land only at the cp.async.wait_group that covers them,
//   their destination reading NaN until then (see "warp matrix instructions" and "asynchronous copies" below).
// - Atomics use the GCC __atomic builtins (correct whatever the host threading); math functions are the host
//   libm's (within a few ulp of CUDA's; results are compared with tolerances, not bit for bit).
// Not emulated: memory fences beyond the compiler's, __activemask (lanes run one at a time, so "active" has no
// meaning; it returns the non-exited lanes), textures, cooperative groups, dynamic parallelism, clusters.
#pragma once

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA keywords --------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __constant__
// The emulator rewrites every __shared__ declaration before compiling; one left over is a rewriting bug.
#define __shared__ zc_emu_unrewritten_shared_declaration
#define __CUDACC_EMULATED__ 1

// ---- built-in types -------------------------------------------------------------------------------------------

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define ZC_EMU_VEC2(T, NAME, ALIGN)                   \
    struct alignas(ALIGN) NAME {                      \
        T x, y;                                       \
    };                                                \
    inline NAME make_##NAME(T x, T y) { return {x, y}; }
#define ZC_EMU_VEC4(T, NAME, ALIGN)                             \
    struct alignas(ALIGN) NAME {                                \
        T x, y, z, w;                                           \
    };                                                          \
    inline NAME make_##NAME(T x, T y, T z, T w) { return {x, y, z, w}; }
ZC_EMU_VEC2(float, float2, 8)
ZC_EMU_VEC4(float, float4, 16)
ZC_EMU_VEC2(int, int2, 8)
ZC_EMU_VEC4(int, int4, 16)
ZC_EMU_VEC2(unsigned, uint2, 8)
ZC_EMU_VEC4(unsigned, uint4, 16)
ZC_EMU_VEC2(unsigned short, ushort2, 4)
ZC_EMU_VEC2(double, double2, 16)
#undef ZC_EMU_VEC2
#undef ZC_EMU_VEC4

static constexpr int warpSize = 32;

// ---- the runtime state of a launch ----------------------------------------------------------------------------

namespace zc_emu {

enum class State : unsigned char { Ready, Running, AtBarrier, AtWarp, Exited };
enum class WarpOp : unsigned char { Sync, Shfl, Ballot, Any, All, ReduceAdd, ReduceMin, ReduceMax, MatchAny, Matrix };
enum class BarrierOp : unsigned char { Plain, Count, And, Or };

inline const char* warp_op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Sync: return "__syncwarp";
        case WarpOp::Shfl: return "a warp shuffle";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::ReduceAdd: return "__reduce_add_sync";
        case WarpOp::ReduceMin: return "__reduce_min_sync";
        case WarpOp::ReduceMax: return "__reduce_max_sync";
        case WarpOp::MatchAny: return "__match_any_sync";
        case WarpOp::Matrix: return "a warp matrix instruction (mma.sync, ldmatrix)";
    }
    return "a warp collective";
}

// A fiber's saved execution context. On x86-64 a switch saves the callee-saved registers on the fiber's own stack
// and swaps stack pointers (a few nanoseconds); elsewhere it falls back to ucontext, whose swapcontext also saves the
// signal mask with a system call per switch (about a microsecond, which dominated emulated training steps: every
// CUDA thread switches at least twice per launch, and twice more at every barrier or warp collective).
#if defined(__x86_64__)
struct FiberContext {
    void* sp;
};
extern "C" void zc_emu_switch(void** save_sp, void* load_sp);
// Hidden: every emulated module carries its own copy, private to its shared library.
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl zc_emu_switch\n"
    ".hidden zc_emu_switch\n"
    ".type zc_emu_switch,@function\n"
    "zc_emu_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size zc_emu_switch, .-zc_emu_switch\n");
inline void context_switch(FiberContext& from, FiberContext& to) { zc_emu_switch(&from.sp, to.sp); }
// A fresh context whose first switch-in calls `entry` on the given stack; `entry` must never return.
inline void context_init(FiberContext& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    // At a function's entry the stack pointer is 8 past a 16-byte boundary (the call pushed the return address).
    void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack + bytes)) & ~uintptr_t(15));
    *--sp = nullptr;                            // `entry`'s return address: it never returns
    *--sp = reinterpret_cast<void*>(entry);     // where the first switch's `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15 as the switch pops them
    c.sp = sp;
}
#else
struct FiberContext {
    ucontext_t uc;
};
inline void context_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }
inline void context_init(FiberContext& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// A warp-wide matrix instruction (see warp_matrix_op): called once with every lane's operand block; on misuse it
// writes a message to `error` and returns false.
typedef bool (*WarpMatrixFn)(void* const* lanes, char* error, size_t error_len);

// One cp.async copy this thread issued and has not yet waited for (see async_copy).
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned bytes;
    unsigned src_bytes;
    unsigned long long group;  // the commit group; `uncommitted` until cp.async.commit_group
};

struct Fiber {
    FiberContext context;
    ::uint3 thread_idx;
    unsigned linear;
    unsigned lane;
    unsigned warp;
    State state;
    // The pending warp collective: what this lane deposited, and what the scheduler computed for it.
    WarpOp warp_op;
    bool is_signed;
    unsigned mask;
    int source_lane;
    unsigned long long value;
    unsigned long long result;
    WarpMatrixFn matrix_fn;
    // cp.async copies in flight (issued, not yet waited for), oldest first, and the number of groups committed.
    std::vector<AsyncCopy> async_copies;
    unsigned long long async_groups;
    // The pending block barrier (__syncthreads and its _count/_and/_or forms).
    BarrierOp barrier_op;
    int predicate;
    int barrier_result;
};

// What kernels see through `blockIdx`, `threadIdx`, ... and what the scheduler needs while a block runs.
struct BlockRun {
    void (*invoke)(void**);
    void** args;
    const char* kernel_name;
    ::dim3 grid_dim;
    ::dim3 block_dim;
    ::uint3 block_idx;
    Fiber* fibers;
    unsigned num_threads;
    Fiber* current;
    FiberContext scheduler;
    unsigned char* dynamic_shared;
    unsigned long long dynamic_shared_bytes;
    bool failed;
    std::string error;
};

inline thread_local BlockRun* current_run = nullptr;

inline BlockRun& run() { return *current_run; }
inline Fiber& fiber() { return *current_run->current; }

// Records the first error of the launch and stops the calling fiber for good: the scheduler sees `failed` and
// abandons the launch (the fiber's stack is reused by the next launch; kernels own no resources to release).
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
    BlockRun& r = run();
    if (!r.failed) {
        char text[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(text, sizeof text, fmt, ap);
        va_end(ap);
        const ::uint3 t = r.current->thread_idx;
        char where[256];
        snprintf(where, sizeof where, "%s, block (%u,%u,%u), thread (%u,%u,%u): ", r.kernel_name, r.block_idx.x,
                 r.block_idx.y, r.block_idx.z, t.x, t.y, t.z);
        r.error = std::string(where) + text;
        r.failed = true;
    }
    r.current->state = State::Exited;
    context_switch(r.current->context, r.scheduler);
    abort();  // never resumed
}

inline void yield_to_scheduler() {
    BlockRun& r = run();
    context_switch(r.current->context, r.scheduler);
}

inline const ::uint3& thread_idx() { return current_run->current->thread_idx; }
inline const ::uint3& block_idx() { return current_run->block_idx; }
inline const ::dim3& block_dim() { return current_run->block_dim; }
inline const ::dim3& grid_dim() { return current_run->grid_dim; }

// ---- shared memory ----------------------------------------------------------------------------------------------

// Every static __shared__ variable this OS thread has touched, so each block starts with them poisoned.
inline thread_local std::vector<std::pair<unsigned char*, size_t>> shared_registry;

inline void poison(void* p, size_t bytes) { memset(p, 0xff, bytes); }

// The storage of one `__shared__ T name;` declaration (T may be an array type). One instance per OS thread.
template <class T, size_t Align = (alignof(T) > 16 ? alignof(T) : 16)>
struct SharedVar {
    alignas(Align) unsigned char bytes[sizeof(T)];
    SharedVar() {
        poison(bytes, sizeof(T));
        shared_registry.emplace_back(bytes, sizeof(T));
    }
    T& get() { return *reinterpret_cast<T*>(bytes); }
};

inline unsigned char* dynamic_shared() { return current_run->dynamic_shared; }

// ---- barriers and warp collectives ------------------------------------------------------------------------------

inline int block_barrier(BarrierOp op, int predicate) {
    Fiber& f = fiber();
    f.state = State::AtBarrier;
    f.barrier_op = op;
    f.predicate = predicate;
    yield_to_scheduler();
    return f.barrier_result;
}

inline unsigned long long warp_collective(WarpOp op, unsigned mask, unsigned long long value, int source_lane,
                                          bool is_signed = false) {
    Fiber& f = fiber();
    if (!(mask & (1u << f.lane))) {
        fail("%s with mask 0x%08x, which does not name the calling lane %u", warp_op_name(op), mask, f.lane);
    }
    f.state = State::AtWarp;
    f.warp_op = op;
    f.mask = mask;
    f.value = value;
    f.source_lane = source_lane;
    f.is_signed = is_signed;
    yield_to_scheduler();
    return f.result;
}

template <class T>
inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <class T>
inline T from_bits(unsigned long long bits) {
    T v;
    memcpy(&v, &bits, sizeof(T));
    return v;
}

inline void check_width(const char* what, int width) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        fail("%s with width %d: the width must be a power of two from 1 to 32", what, width);
    }
}

// True when [p, p + bytes) lies inside this block's shared memory (a static __shared__ variable or the dynamic
// shared memory of the launch): ldmatrix and cp.async address shared memory only.
inline bool is_shared(const void* p, size_t bytes) {
    const unsigned char* b = static_cast<const unsigned char*>(p);
    const BlockRun& r = run();
    if (b >= r.dynamic_shared && b + bytes <= r.dynamic_shared + r.dynamic_shared_bytes) {
        return true;
    }
    for (const auto& var : shared_registry) {
        if (b >= var.first && b + bytes <= var.first + var.second) {
            return true;
        }
    }
    return false;
}

// ---- warp matrix instructions ------------------------------------------------------------------------------------
//
// mma.sync and ldmatrix are .sync.aligned: every lane of the warp executes the same instruction, and each lane's
// result depends on the operands of the other lanes. Each lane deposits a pointer to its operand block (on its own
// stack, which stays valid while it is parked) and `fn`, the instruction; once all 32 lanes have arrived, the
// scheduler calls `fn` once with the 32 pointers (lane order) and `fn` writes every lane's results (or reports
// misuse, such as an address outside shared memory, by returning false with a message). What the
// instructions compute (the PTX ISA's fragment layouts) lives with their GPU versions in kernels/mma.cuh; this is
// only the meeting point. Lanes at different instructions, a mask other than the full warp, an exited lane or a
// partial warp are reported as errors (undefined behaviour on a GPU).
inline void warp_matrix_op(WarpMatrixFn fn, void* operands) {
    Fiber& f = fiber();
    f.matrix_fn = fn;
    warp_collective(WarpOp::Matrix, 0xffffffffu, reinterpret_cast<unsigned long long>(operands), 0);
}

// ---- asynchronous copies (cp.async) ------------------------------------------------------------------------------
//
// A cp.async copy completes at some point before the cp.async.wait_group that covers its group; until then its
// destination holds undefined bytes. The emulator takes the least convenient legal choice: issuing a copy fills
// the destination with 0xff (NaN in every float type) and the bytes arrive only at the covering wait, so a kernel
// that reads a tile before waiting for it (or before the barrier after the wait, when another thread copied it)
// reads NaN. Copies still in flight when a thread exits are reported (a kernel that relies on them is broken).

constexpr unsigned long long kUncommitted = ~0ull;

// cp.async.cg.shared.global [dst], [src], bytes, src_bytes: copies src_bytes bytes and zero-fills the rest.
inline void async_copy(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
    if (src_bytes > bytes) {
        fail("cp.async with a source size of %u bytes, above the copy size %u", src_bytes, bytes);
    }
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % bytes != 0) {
        fail("cp.async of %u bytes from %p to %p: both addresses must be aligned to the copy size", bytes, src, dst);
    }
    if (!is_shared(dst, bytes)) {
        fail("cp.async to %p, which is not shared memory of this block", dst);
    }
    if (src_bytes > 0 && is_shared(src, src_bytes)) {
        fail("cp.async from %p, which is shared memory: the source must be global memory", src);
    }
    poison(dst, bytes);
    fiber().async_copies.push_back(AsyncCopy{dst, src, bytes, src_bytes, kUncommitted});
}

// cp.async.commit_group: the copies issued since the last commit form one group (possibly empty).
inline void async_commit() {
    Fiber& f = fiber();
    for (AsyncCopy& c : f.async_copies) {
        if (c.group == kUncommitted) {
            c.group = f.async_groups;
        }
    }
    ++f.async_groups;
}

// cp.async.wait_group n: completes every committed group but the n most recent. Uncommitted copies stay in
// flight, as in PTX.
inline void async_wait(unsigned n) {
    Fiber& f = fiber();
    const unsigned long long done = f.async_groups > n ? f.async_groups - n : 0;
    size_t kept = 0;
    for (size_t i = 0; i < f.async_copies.size(); ++i) {
        const AsyncCopy c = f.async_copies[i];
        if (c.group != kUncommitted && c.group < done) {
            memcpy(c.dst, c.src, c.src_bytes);
            memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
        } else {
            f.async_copies[kept++] = c;
        }
    }
    f.async_copies.resize(kept);
}

}  // namespace zc_emu

#define threadIdx (::zc_emu::thread_idx())
#define blockIdx (::zc_emu::block_idx())
#define blockDim (::zc_emu::block_dim())
#define gridDim (::zc_emu::grid_dim())

inline void __syncthreads() { ::zc_emu::block_barrier(::zc_emu::BarrierOp::Plain, 0); }
inline int __syncthreads_count(int p) { return ::zc_emu::block_barrier(::zc_emu::BarrierOp::Count, p != 0); }
inline int __syncthreads_and(int p) { return ::zc_emu::block_barrier(::zc_emu::BarrierOp::And, p != 0); }
inline int __syncthreads_or(int p) { return ::zc_emu::block_barrier(::zc_emu::BarrierOp::Or, p != 0); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::zc_emu::warp_collective(::zc_emu::WarpOp::Sync, mask, 0, 0);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    ::zc_emu::check_width("__shfl_sync", width);
    const int lane = (int)::zc_emu::fiber().lane;
    const int source = (lane & ~(width - 1)) + (src_lane & (width - 1));
    return ::zc_emu::from_bits<T>(
        ::zc_emu::warp_collective(::zc_emu::WarpOp::Shfl, mask, ::zc_emu::to_bits(var), source));
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    ::zc_emu::check_width("__shfl_up_sync", width);
    const int lane = (int)::zc_emu::fiber().lane;
    const int source = (lane & (width - 1)) >= (int)delta ? lane - (int)delta : lane;
    return ::zc_emu::from_bits<T>(
        ::zc_emu::warp_collective(::zc_emu::WarpOp::Shfl, mask, ::zc_emu::to_bits(var), source));
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    ::zc_emu::check_width("__shfl_down_sync", width);
    const int lane = (int)::zc_emu::fiber().lane;
    const int source = (lane & (width - 1)) + (int)delta < width ? lane + (int)delta : lane;
    return ::zc_emu::from_bits<T>(
        ::zc_emu::warp_collective(::zc_emu::WarpOp::Shfl, mask, ::zc_emu::to_bits(var), source));
}

// A lane may read from its own or an earlier group of `width` lanes; reading a later group returns its own value.
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    ::zc_emu::check_width("__shfl_xor_sync", width);
    const int lane = (int)::zc_emu::fiber().lane;
    const int xored = lane ^ lane_mask;
    const int source = (xored & 31) >= (lane & ~(width - 1)) + width ? lane : (xored & 31);
    return ::zc_emu::from_bits<T>(
        ::zc_emu::warp_collective(::zc_emu::WarpOp::Shfl, mask, ::zc_emu::to_bits(var), source));
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return (unsigned)::zc_emu::warp_collective(::zc_emu::WarpOp::Ballot, mask, predicate != 0, 0);
}
inline int __any_sync(unsigned mask, int predicate) {
    return (int)::zc_emu::warp_collective(::zc_emu::WarpOp::Any, mask, predicate != 0, 0);
}
inline int __all_sync(unsigned mask, int predicate) {
    return (int)::zc_emu::warp_collective(::zc_emu::WarpOp::All, mask, predicate != 0, 0);
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    return (unsigned)::zc_emu::warp_collective(::zc_emu::WarpOp::ReduceAdd, mask, v, 0);
}
inline int __reduce_add_sync(unsigned mask, int v) {
    return (int)::zc_emu::warp_collective(::zc_emu::WarpOp::ReduceAdd, mask, (unsigned)v, 0);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return (unsigned)::zc_emu::warp_collective(::zc_emu::WarpOp::ReduceMin, mask, v, 0);
}
inline int __reduce_min_sync(unsigned mask, int v) {
    return (int)::zc_emu::warp_collective(::zc_emu::WarpOp::ReduceMin, mask, (unsigned)v, 0, true);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return (unsigned)::zc_emu::warp_collective(::zc_emu::WarpOp::ReduceMax, mask, v, 0);
}
inline int __reduce_max_sync(unsigned mask, int v) {
    return (int)::zc_emu::warp_collective(::zc_emu::WarpOp::ReduceMax, mask, (unsigned)v, 0, true);
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
    return (unsigned)::zc_emu::warp_collective(::zc_emu::WarpOp::MatchAny, mask, ::zc_emu::to_bits(value), 0);
}

// Lanes run one at a time, so no subset of them is "active together"; the non-exited lanes are the best answer.
inline unsigned __activemask() {
    const ::zc_emu::BlockRun& r = ::zc_emu::run();
    const unsigned first = ::zc_emu::fiber().warp * 32;
    unsigned m = 0;
    for (unsigned l = 0; l < 32 && first + l < r.num_threads; ++l) {
        if (r.fibers[first + l].state != ::zc_emu::State::Exited) {
            m |= 1u << l;
        }
    }
    return m;
}

[[noreturn]] inline void __trap() { ::zc_emu::fail("__trap() called"); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics ----------------------------------------------------------------------------------------------------

#define ZC_EMU_INT_ATOMICS(T)                                                                                    \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }                        \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }                        \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }                      \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }                        \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                          \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }                        \
    inline T atomicCAS(T* p, T expected, T desired) {                                                            \
        __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
        return expected;                                                                                         \
    }                                                                                                            \
    inline T atomicMin(T* p, T v) {                                                                              \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                            \
        while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                                        \
        return old;                                                                                              \
    }                                                                                                            \
    inline T atomicMax(T* p, T v) {                                                                              \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                            \
        while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                                        \
        return old;                                                                                              \
    }
ZC_EMU_INT_ATOMICS(int)
ZC_EMU_INT_ATOMICS(unsigned)
ZC_EMU_INT_ATOMICS(unsigned long long)
ZC_EMU_INT_ATOMICS(long long)
#undef ZC_EMU_INT_ATOMICS

// Floating-point atomics as compare-and-swap loops on the bit pattern, as CUDA documents them.
#define ZC_EMU_FLOAT_ATOMIC_ADD(T, BITS)                                                                     \
    inline T atomicAdd(T* p, T v) {                                                                           \
        BITS* word = reinterpret_cast<BITS*>(p);                                                              \
        BITS old = __atomic_load_n(word, __ATOMIC_SEQ_CST);                                                   \
        for (;;) {                                                                                            \
            T sum = ::zc_emu::from_bits<T>(old) + v;                                                          \
            BITS desired = (BITS)::zc_emu::to_bits(sum);                                                      \
            if (__atomic_compare_exchange_n(word, &old, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
                return ::zc_emu::from_bits<T>(old);                                                           \
            }                                                                                                 \
        }                                                                                                     \
    }
ZC_EMU_FLOAT_ATOMIC_ADD(float, unsigned)
ZC_EMU_FLOAT_ATOMIC_ADD(double, unsigned long long)
#undef ZC_EMU_FLOAT_ATOMIC_ADD

inline unsigned atomicInc(unsigned* p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1u, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    return old;
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, (old == 0u || old > limit) ? limit : old - 1u, false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// ---- math and bit intrinsics ------------------------------------------------------------------------------------

template <class T>
inline T __ldg(const T* p) {
    return *p;
}

inline float __int_as_float(int x) { return ::zc_emu::from_bits<float>((unsigned)x); }
inline int __float_as_int(float x) { return (int)::zc_emu::to_bits(x); }
inline float __uint_as_float(unsigned x) { return ::zc_emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)::zc_emu::to_bits(x); }
inline double __longlong_as_double(long long x) { return ::zc_emu::from_bits<double>((unsigned long long)x); }
inline long long __double_as_longlong(double x) { return (long long)::zc_emu::to_bits(x); }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// CUDA's integer and float min/max overloads, for any pair of arithmetic types (usual conversions apply).
// Floating-point ones behave as fminf/fmaxf (a NaN operand is ignored), like CUDA's.
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point<C>::value) {
        return fmin((C)a, (C)b);
    } else {
        return (C)b < (C)a ? (C)b : (C)a;
    }
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point<C>::value) {
        return fmax((C)a, (C)b);
    } else {
        return (C)a < (C)b ? (C)b : (C)a;
    }
}

inline long long clock64() {
    static thread_local long long ticks = 0;
    return ++ticks;
}

// ---- the launcher -----------------------------------------------------------------------------------------------

namespace zc_emu {

// One entry of the table the emulator generates at the end of every module (see ZC_EMU_KERNEL); mirrored by
// `RawKernelInfo` in kernels/emulate/module.rs.
struct KernelInfo {
    const char* name;
    unsigned long long arity;
    const unsigned long long* param_sizes;
    const unsigned char* param_is_pointer;
    void (*invoke)(void**);
};

// Mirrored by `RawLaunchConfig` in kernels/emulate/module.rs.
struct LaunchConfig {
    unsigned grid[3];
    unsigned block[3];
    unsigned long long dynamic_shared_bytes;
    // 0: warp by warp, ascending; 1: warp by warp, descending; 2: lockstep passes over ascending thread ids;
    // 3: lockstep passes, each in a pseudo-random thread order (seeded). See run_block.
    unsigned thread_order;
    // 0: blocks in ascending order, 1: descending.
    unsigned block_order;
    unsigned long long seed;
};

template <class F>
struct Signature;

template <class... A>
struct Signature<void (*)(A...)> {
    static constexpr unsigned long long arity = sizeof...(A);
    static constexpr unsigned long long sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
    static constexpr unsigned char is_pointer[sizeof...(A) + 1] = {(unsigned char)std::is_pointer<A>::value..., 0};
    static_assert(((alignof(A) <= 16) && ...), "kernel parameters aligned past 16 bytes are not supported");

    // Every CUDA thread copies the parameters out of the argument array, as each GPU thread reads them from the
    // constant bank: a kernel that modifies a parameter changes only its own copy.
    template <void (*K)(A...), size_t... I>
    static void call(void** args, std::index_sequence<I...>) {
        K(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
};

template <auto K>
void invoke(void** args) {
    using S = Signature<decltype(K)>;
    S::template call<K>(args, std::make_index_sequence<S::arity>{});
}

template <auto K>
constexpr KernelInfo kernel_info(const char* name) {
    using S = Signature<decltype(K)>;
    return KernelInfo{name, S::arity, S::sizes, S::is_pointer, &invoke<K>};
}

constexpr size_t kStackBytes = 256 * 1024;

// Fiber stacks of this OS thread, kept between launches: mapped without reserve, so only the pages a kernel
// touches cost memory, with a guard page below each stack so an overflow faults instead of corrupting a neighbour.
struct StackPool {
    unsigned char* base = nullptr;
    size_t count = 0;
    size_t slot = kStackBytes + 4096;
    bool ensure(size_t n) {
        if (n <= count) {
            return true;
        }
        release();
        void* p = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            return false;
        }
        base = static_cast<unsigned char*>(p);
        count = n;
        for (size_t i = 0; i < n; ++i) {
            mprotect(base + i * slot, 4096, PROT_NONE);
        }
        return true;
    }
    unsigned char* stack(size_t i) { return base + i * slot + 4096; }
    void release() {
        if (base) {
            munmap(base, count * slot);
        }
        base = nullptr;
        count = 0;
    }
    ~StackPool() { release(); }
};

inline thread_local StackPool stack_pool;
inline thread_local std::vector<Fiber> fiber_pool;
inline thread_local std::vector<unsigned char> dynamic_shared_pool;

inline void fiber_entry() {
    BlockRun& r = run();
    r.invoke(r.args);
    if (!r.current->async_copies.empty()) {
        fail("exited with %zu cp.async copies never waited for (cp.async.wait_group)", r.current->async_copies.size());
    }
    r.current->state = State::Exited;
    context_switch(r.current->context, r.scheduler);
    abort();  // an exited fiber is never resumed
}

// xorshift64*, for the shuffled thread order.
inline unsigned long long next_random(unsigned long long& s) {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
}

inline std::string describe_thread(const Fiber& f) {
    char text[64];
    snprintf(text, sizeof text, "thread (%u,%u,%u)", f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
    return text;
}

inline void fail_scheduler(BlockRun& r, const std::string& msg) {
    if (!r.failed) {
        char where[160];
        snprintf(where, sizeof where, "%s, block (%u,%u,%u): ", r.kernel_name, r.block_idx.x, r.block_idx.y,
                 r.block_idx.z);
        r.error = where + msg;
        r.failed = true;
    }
}

// Resolves the warp collectives of one warp whose participants have all arrived. Returns false on misuse.
inline bool resolve_warp(BlockRun& r, unsigned warp, bool& progressed) {
    const unsigned first = warp * 32;
    const unsigned lanes = r.num_threads - first < 32 ? r.num_threads - first : 32;
    Fiber* w = r.fibers + first;
    unsigned handled = 0;
    for (unsigned l = 0; l < lanes; ++l) {
        if (w[l].state != State::AtWarp || (handled & (1u << l))) {
            continue;
        }
        const Fiber& leader = w[l];
        const unsigned mask = leader.mask;
        unsigned participants = 0;
        for (unsigned m = 0; m < lanes; ++m) {
            if (!(mask & (1u << m)) || w[m].state == State::Exited) {
                continue;
            }
            const Fiber& other = w[m];
            if (other.state == State::AtBarrier) {
                fail_scheduler(r, describe_thread(leader) + " waits at " + warp_op_name(leader.warp_op) +
                                      " for lane " + std::to_string(m) + ", which waits at __syncthreads: deadlock");
                return false;
            }
            if (other.warp_op != leader.warp_op || other.mask != leader.mask ||
                (leader.warp_op == WarpOp::Matrix && other.matrix_fn != leader.matrix_fn)) {
                char text[256];
                snprintf(text, sizeof text,
                         "lanes %u and %u of warp %u meet at different warp collectives (%s, mask 0x%08x vs %s, "
                         "mask 0x%08x): undefined behaviour",
                         l, m, warp, warp_op_name(leader.warp_op), leader.mask, warp_op_name(other.warp_op),
                         other.mask);
                fail_scheduler(r, text);
                return false;
            }
            participants |= 1u << m;
        }
        if (leader.warp_op == WarpOp::Matrix) {
            if (participants != 0xffffffffu) {
                char text[192];
                snprintf(text, sizeof text,
                         "warp %u: a warp matrix instruction (mma.sync, ldmatrix) reached by lanes 0x%08x only: every "
                         "lane of a full warp must execute it",
                         warp, participants);
                fail_scheduler(r, text);
                return false;
            }
            void* lanes_operands[32];
            for (unsigned m = 0; m < 32; ++m) {
                lanes_operands[m] = reinterpret_cast<void*>(w[m].value);
            }
            char text[256] = "";
            if (!leader.matrix_fn(lanes_operands, text, sizeof text)) {
                fail_scheduler(r, text);
                return false;
            }
            for (unsigned m = 0; m < 32; ++m) {
                w[m].result = 0;
                w[m].state = State::Ready;
            }
            handled |= participants;
            progressed = true;
            continue;
        }
        unsigned ballot = 0;
        unsigned long long sum = 0, lo = ~0ull, hi = 0;
        long long slo = 0, shi = 0;
        bool first_value = true;
        for (unsigned m = 0; m < lanes; ++m) {
            if (!(participants & (1u << m))) {
                continue;
            }
            const unsigned long long v = w[m].value;
            ballot |= (v != 0 ? 1u : 0u) << m;
            sum += v;
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
            const long long sv = (long long)(int)(unsigned)v;
            slo = first_value || sv < slo ? sv : slo;
            shi = first_value || sv > shi ? sv : shi;
            first_value = false;
        }
        for (unsigned m = 0; m < lanes; ++m) {
            if (!(participants & (1u << m))) {
                continue;
            }
            Fiber& f = w[m];
            switch (f.warp_op) {
                case WarpOp::Sync: f.result = 0; break;
                case WarpOp::Shfl: {
                    const int s = f.source_lane;
                    const bool readable = s >= 0 && (unsigned)s < lanes && (participants & (1u << s));
                    f.result = readable ? w[s].value : ~0ull;  // undefined in CUDA: poison
                    break;
                }
                case WarpOp::Ballot: f.result = ballot; break;
                case WarpOp::Any: f.result = ballot != 0; break;
                case WarpOp::All: f.result = ballot == participants; break;
                case WarpOp::ReduceAdd: f.result = (unsigned)sum; break;
                case WarpOp::ReduceMin: f.result = f.is_signed ? (unsigned long long)(unsigned)slo : lo; break;
                case WarpOp::ReduceMax: f.result = f.is_signed ? (unsigned long long)(unsigned)shi : hi; break;
                case WarpOp::MatchAny: {
                    unsigned same = 0;
                    for (unsigned k = 0; k < lanes; ++k) {
                        same |= ((participants & (1u << k)) && w[k].value == f.value ? 1u : 0u) << k;
                    }
                    f.result = same;
                    break;
                }
            }
            f.state = State::Ready;
        }
        handled |= participants;
        progressed = true;
    }
    return true;
}

// Runs one block to completion. Returns false when the launch failed (r.error says why).
inline bool run_block(BlockRun& r, const LaunchConfig& cfg, unsigned long long& rng) {
    const unsigned n = r.num_threads;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = r.fibers[i];
        f.linear = i;
        f.thread_idx = {i % r.block_dim.x, (i / r.block_dim.x) % r.block_dim.y, i / (r.block_dim.x * r.block_dim.y)};
        f.lane = i % 32;
        f.warp = i / 32;
        f.state = State::Ready;
        f.async_copies.clear();
        f.async_groups = 0;
        context_init(f.context, stack_pool.stack(i), kStackBytes, fiber_entry);
    }
    for (auto& var : shared_registry) {
        poison(var.first, var.second);
    }
    poison(r.dynamic_shared, cfg.dynamic_shared_bytes);

    const unsigned warps = (n + 31) / 32;
    const bool lockstep = cfg.thread_order >= 2;
    const bool descending = cfg.thread_order == 1;
    std::vector<unsigned> order(lockstep ? n : 0);
    for (unsigned i = 0; i < order.size(); ++i) {
        order[i] = i;
    }
    // Runs the ready fibers among threads [first, last) (in lockstep mode: order[first, last)), each until it
    // stops.
    auto run_ready = [&](unsigned first, unsigned last) {
        for (unsigned k = first; k < last; ++k) {
            Fiber& f = r.fibers[lockstep ? order[k] : (descending ? last - 1 - (k - first) : k)];
            if (f.state != State::Ready) {
                continue;
            }
            r.current = &f;
            f.state = State::Running;
            context_switch(r.scheduler, f.context);
            if (r.failed) {
                return false;
            }
        }
        return true;
    };
    for (;;) {
        if (!lockstep) {
            // Warp after warp, each as far as it can go (until its lanes wait at __syncthreads or exit), its warp
            // collectives completed as soon as its lanes arrive: the warps that run first get arbitrarily far
            // ahead of the others, which exposes a missing barrier between warps.
            for (unsigned k = 0; k < warps; ++k) {
                const unsigned w = descending ? warps - 1 - k : k;
                const unsigned first = w * 32, last = first + 32 < n ? first + 32 : n;
                for (;;) {
                    if (!run_ready(first, last)) {
                        return false;
                    }
                    bool progressed = false;
                    if (!resolve_warp(r, w, progressed)) {
                        return false;
                    }
                    if (!progressed) {
                        break;
                    }
                }
            }
        } else {
            // Every thread advances by one synchronisation point per pass, as if all warps ran side by side.
            if (cfg.thread_order == 3) {
                for (unsigned i = n; i > 1; --i) {
                    std::swap(order[i - 1], order[next_random(rng) % i]);
                }
            }
            if (!run_ready(0, n)) {
                return false;
            }
        }
        // Every fiber has now exited or stopped at a barrier or a warp collective.
        unsigned exited = 0, at_warp = 0;
        for (unsigned i = 0; i < n; ++i) {
            exited += r.fibers[i].state == State::Exited;
            at_warp += r.fibers[i].state == State::AtWarp;
        }
        if (exited == n) {
            return true;
        }
        if (at_warp > 0) {
            // Each waiting group either completes or is reported, so this always makes progress or fails.
            bool progressed = false;
            for (unsigned w = 0; w < warps; ++w) {
                if (!resolve_warp(r, w, progressed)) {
                    return false;
                }
            }
            if (!progressed) {
                fail_scheduler(r, "no warp collective can complete: deadlock");
                return false;
            }
            continue;
        }
        // Every live thread waits at __syncthreads.
        if (exited > 0) {
            const Fiber* waiting = nullptr;
            const Fiber* gone = nullptr;
            for (unsigned i = 0; i < n; ++i) {
                (r.fibers[i].state == State::Exited ? gone : waiting) = &r.fibers[i];
            }
            fail_scheduler(r, "__syncthreads() reached by " + std::to_string(n - exited) + " threads (e.g. " +
                                  describe_thread(*waiting) + ") after " + std::to_string(exited) +
                                  " threads of the block had exited (e.g. " + describe_thread(*gone) +
                                  "): a barrier must be reached by every thread of the block");
            return false;
        }
        int count = 0, all = 1, any = 0;
        for (unsigned i = 0; i < n; ++i) {
            if (r.fibers[i].barrier_op != r.fibers[0].barrier_op) {
                fail_scheduler(r, describe_thread(r.fibers[0]) + " and " + describe_thread(r.fibers[i]) +
                                      " wait at different kinds of block barrier (__syncthreads and its _count, "
                                      "_and, _or forms do not mix)");
                return false;
            }
            count += r.fibers[i].predicate;
            all &= r.fibers[i].predicate;
            any |= r.fibers[i].predicate;
        }
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = r.fibers[i];
            switch (f.barrier_op) {
                case BarrierOp::Plain: f.barrier_result = 0; break;
                case BarrierOp::Count: f.barrier_result = count; break;
                case BarrierOp::And: f.barrier_result = all; break;
                case BarrierOp::Or: f.barrier_result = any; break;
            }
            f.state = State::Ready;
        }
    }
}

inline int report(char* error, unsigned long long error_len, const std::string& msg) {
    if (error && error_len > 0) {
        snprintf(error, error_len, "%s", msg.c_str());
    }
    return 1;
}

}  // namespace zc_emu

#define ZC_EMU_KERNEL(k) ::zc_emu::kernel_info<&k>(#k)

// The module's C interface, loaded by kernels/emulate/module.rs.
extern "C" __attribute__((visibility("default"))) unsigned zc_emu_abi_version() { return 1; }

// Runs kernel `info` over the whole grid. Returns 0, or 1 with a message in `error`.
extern "C" __attribute__((visibility("default"))) int zc_emu_launch(const ::zc_emu::KernelInfo* info, void** args,
                                                                   const ::zc_emu::LaunchConfig* cfg, char* error,
                                                                   unsigned long long error_len) {
    using namespace zc_emu;
    char text[512];
    const unsigned long long threads = (unsigned long long)cfg->block[0] * cfg->block[1] * cfg->block[2];
    if (cfg->block[0] == 0 || cfg->block[1] == 0 || cfg->block[2] == 0 || cfg->grid[0] == 0 || cfg->grid[1] == 0 ||
        cfg->grid[2] == 0) {
        snprintf(text, sizeof text, "%s: grid (%u,%u,%u) and block (%u,%u,%u) must have no zero dimension", info->name,
                 cfg->grid[0], cfg->grid[1], cfg->grid[2], cfg->block[0], cfg->block[1], cfg->block[2]);
        return report(error, error_len, text);
    }
    if (threads > 1024 || cfg->block[2] > 64 || cfg->grid[1] > 65535 || cfg->grid[2] > 65535 ||
        cfg->grid[0] > 0x7fffffffu) {
        snprintf(text, sizeof text,
                 "%s: block (%u,%u,%u) or grid (%u,%u,%u) exceeds CUDA's limits (1024 threads per block, "
                 "block z <= 64, grid y, z <= 65535)",
                 info->name, cfg->block[0], cfg->block[1], cfg->block[2], cfg->grid[0], cfg->grid[1], cfg->grid[2]);
        return report(error, error_len, text);
    }
    if (cfg->dynamic_shared_bytes > 227 * 1024) {
        snprintf(text, sizeof text, "%s: %llu bytes of dynamic shared memory exceed the 227 KiB of any GPU",
                 info->name, cfg->dynamic_shared_bytes);
        return report(error, error_len, text);
    }
    if (current_run != nullptr) {
        return report(error, error_len, std::string(info->name) + ": launched from inside a kernel");
    }
    if (!stack_pool.ensure(threads)) {
        return report(error, error_len, std::string(info->name) + ": cannot map fiber stacks");
    }
    if (fiber_pool.size() < threads) {
        fiber_pool.resize(threads);
    }
    if (dynamic_shared_pool.size() < cfg->dynamic_shared_bytes + 16) {
        dynamic_shared_pool.resize(cfg->dynamic_shared_bytes + 16);
    }

    BlockRun r;
    r.invoke = info->invoke;
    r.args = args;
    r.kernel_name = info->name;
    r.grid_dim = ::dim3(cfg->grid[0], cfg->grid[1], cfg->grid[2]);
    r.block_dim = ::dim3(cfg->block[0], cfg->block[1], cfg->block[2]);
    r.fibers = fiber_pool.data();
    r.num_threads = (unsigned)threads;
    r.current = nullptr;
    // 16-byte aligned, as CUDA aligns dynamic shared memory at least that much.
    const uintptr_t raw = (uintptr_t)dynamic_shared_pool.data();
    r.dynamic_shared = (unsigned char*)((raw + 15) & ~(uintptr_t)15);
    r.dynamic_shared_bytes = cfg->dynamic_shared_bytes;
    r.failed = false;

    unsigned long long rng = cfg->seed * 0x9e3779b97f4a7c15ull + 1;
    const unsigned long long blocks = (unsigned long long)cfg->grid[0] * cfg->grid[1] * cfg->grid[2];
    current_run = &r;
    bool ok = true;
    for (unsigned long long k = 0; k < blocks && ok; ++k) {
        const unsigned long long b = cfg->block_order == 1 ? blocks - 1 - k : k;
        r.block_idx = {(unsigned)(b % cfg->grid[0]), (unsigned)((b / cfg->grid[0]) % cfg->grid[1]),
                       (unsigned)(b / ((unsigned long long)cfg->grid[0] * cfg->grid[1]))};
        ok = run_block(r, *cfg, rng);
    }
    current_run = nullptr;
    return ok ? 0 : report(error, error_len, r.error);
}
