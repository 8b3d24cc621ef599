/*
 * sim_runtime.cpp: kvrt-sim's runtime (tests/sim/kvrt_sim.h) and execution
 * engine (tests/sim/kvrt_sim_device.h). Built once per flavour: warp 32 as
 * the CUDA backend, warp 64 with KVRT_SIM_HIP as the HIP backend.
 *
 * Execution model:
 *   - Memory: device allocations are private anonymous mappings kept
 *     PROT_NONE except while queued work runs, so a host dereference of
 *     device memory faults. An allocation ends 256-byte aligned right
 *     before a guard page, and fresh device memory holds 0xff bytes (NaN),
 *     not zeros. The VMM entry points reserve address space and open only
 *     mapped ranges whose access was set. Pinned host memory is heap memory.
 *   - Streams: work is queued and runs only when the host must see it
 *     (stream, event or device synchronization, an event query, a blocking
 *     copy, freeing memory). The legacy stream orders against blocking
 *     streams as in CUDA. Host data of an asynchronous copy from pageable
 *     memory is taken at the call, as CUDA's staging does; pinned memory is
 *     read when the copy runs.
 *   - Capture: work queued on a capturing stream is recorded into its graph
 *     and replayed by cudaGraphLaunch. A synchronizing call that CUDA
 *     prohibits (per the thread's capture mode) fails with
 *     cudaErrorStreamCaptureUnsupported and invalidates the capture, whose
 *     end then fails with cudaErrorStreamCaptureInvalidated.
 *   - Kernels: blocks run in a seeded random order on a small pool of OS
 *     threads; a block's threads are fibers (own stacks with guard pages,
 *     x86-64 switch or ucontext elsewhere, ASan fiber annotations) resumed
 *     in a seeded random order after every barrier and collective. Kernel
 *     errors are sticky (cudaErrorLaunchFailure) and their message names
 *     kernel, block and thread.
 *   - Fault injection: the n-th allocation, copy or launch fails.
 *   - Races (KVRT_SIM_RACE, the race variant): the kernels are compiled
 *     with -fsanitize=thread's instrumentation only, and the __tsan_*
 *     entry points here (not libtsan) record each access to shared memory,
 *     dynamic and static, with its thread, in a shadow of a cell per byte;
 *     two threads touching a byte in one barrier interval, at least one
 *     writing and not both atomically, is a kernel error naming both
 *     threads, the address and where each access was (the instrumentation
 *     is the one the Linux kernel's KCSAN borrows the same way). A
 *     __syncthreads ends the block's interval; a __syncwarp orders the
 *     lanes of its warp. Modes (race_mode): KVRT_SIM_INTERLEAVE=1 switches
 *     threads at random before writes; KVRT_SIM_RACE_GLOBAL=1 also reports
 *     two blocks of one launch writing one byte of device memory; and the
 *     red zones (red_zone) are checked at every access.
 */
#include "kvrt_sim_device.h"
#undef warpSize /* the device property of that name below */

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(KVRT_SIM_RACE)
#  include <dlfcn.h>
#  include <link.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#  define KVRT_SIM_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define KVRT_SIM_ASAN 1
#  endif
#endif
#if defined(KVRT_SIM_ASAN)
#  include <sanitizer/asan_interface.h>
#  include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#  include <ucontext.h>
#endif

namespace kvrt_sim {

thread_local uint3 thread_idx, block_idx;
thread_local dim3 block_dim, grid_dim;

namespace {

constexpr int W = KVRT_SIM_WARP;
#if defined(KVRT_SIM_HIP)
constexpr bool kHip = true;
#else
constexpr bool kHip = false;
#endif
constexpr size_t kAllocAlign = 256;
constexpr size_t kGranularity = (size_t)2 << 20;
constexpr size_t kStack = (size_t)256 << 10;
constexpr size_t kMaxSmem = (size_t)228 << 10;
constexpr size_t kSmemPerBlock = (size_t)48 << 10;

size_t page_size() { static size_t p = (size_t)sysconf(_SC_PAGESIZE); return p; }
uintptr_t page_down(uintptr_t a) { return a & ~(uintptr_t)(page_size() - 1); }
uintptr_t page_up(uintptr_t a) { return (a + page_size() - 1) & ~(uintptr_t)(page_size() - 1); }

uint64_t splitmix(uint64_t &s)
{
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ------------------------------------------------------------------ */
/* Global state (one device)                                           */
/* ------------------------------------------------------------------ */

std::recursive_mutex g_mu;
thread_local cudaError_t t_last = cudaSuccess;
thread_local cudaStreamCaptureMode t_mode = cudaStreamCaptureModeGlobal;
std::atomic<int> g_sticky{0};
std::string g_sticky_msg;
std::atomic<long> g_kernel_errors{0};
uint64_t g_seed = 1;
uint64_t g_launches = 0;
long g_calls[KVRT_SIM_N_CALLS];
long g_fail_at[KVRT_SIM_N_CALLS];
std::map<std::string, long> g_launch_names; /* launches accepted, by kernel expression */

cudaError_t ret(cudaError_t e)
{
    if (e != cudaSuccess)
        t_last = e;
    return e;
}

struct init_env {
    init_env()
    {
        if (const char *s = getenv("KVRT_SIM_SEED"))
            g_seed = strtoull(s, NULL, 0);
        if (const char *f = getenv("KVRT_SIM_FAIL")) {
            static const char *const names[] = {"alloc:", "copy:", "launch:"};
            for (int k = 0; k < KVRT_SIM_N_CALLS; k++)
                if (strncmp(f, names[k], strlen(names[k])) == 0)
                    g_fail_at[k] = strtol(f + strlen(names[k]), NULL, 10);
        }
    }
} g_init_env;

/* True when this call of `kind` is the one armed to fail. */
bool inject(int kind)
{
    long n = ++g_calls[kind];
    return g_fail_at[kind] > 0 && n == g_fail_at[kind];
}

/* ---- memory ---- */

enum { A_DEVICE, A_RESERVE };
struct alloc_t {
    int       kind;
    uintptr_t map_lo;
    size_t    map_len;
    uintptr_t ptr;
    size_t    n;
    std::map<uintptr_t, uintptr_t> open; /* A_RESERVE: accessible [lo, hi) */
};
std::map<uintptr_t, alloc_t> g_dev;      /* by map_lo */
/* Red zones: device bytes no kernel may touch, though they are mapped: the
 * tail of an allocation up to its 256-byte end, and the guard after each
 * buffer the glue carves from a larger one (kvrt_sim_guard). Checked at
 * each kernel access in the race variant. Changed by host calls only,
 * never while a kernel runs. */
struct red_zone {
    uintptr_t   hi;   /* the zone is [lo, hi) */
    uintptr_t   buf;  /* the buffer it guards, and its size */
    size_t      n;
    const char *what;
};
std::map<uintptr_t, red_zone> g_red; /* by lo */

/* Drops the zones that overlap [lo, hi). */
void red_clear(uintptr_t lo, uintptr_t hi)
{
    auto it = g_red.lower_bound(lo);
    if (it != g_red.begin() && std::prev(it)->second.hi > lo)
        --it;
    while (it != g_red.end() && it->first < hi)
        it = g_red.erase(it);
}

void red_add(uintptr_t lo, uintptr_t hi, uintptr_t buf, size_t n, const char *what)
{
    red_clear(lo, hi);
    if (hi > lo)
        g_red[lo] = red_zone{hi, buf, n, what};
}

#if defined(KVRT_SIM_RACE)
/* The red zone that [a, a + n) touches, or NULL. */
const std::pair<const uintptr_t, red_zone> *red_find(uintptr_t a, size_t n)
{
    auto it = g_red.upper_bound(a + (n > 0 ? n - 1 : 0));
    if (it == g_red.begin())
        return nullptr;
    --it;
    return it->second.hi > a ? &*it : nullptr;
}
#endif
std::map<uintptr_t, size_t> g_pinned;    /* by pointer */
std::map<unsigned long long, size_t> g_handles;
unsigned long long g_next_handle = 1;
int g_open_depth = 0;

alloc_t *dev_find(uintptr_t a)
{
    auto it = g_dev.upper_bound(a);
    if (it == g_dev.begin())
        return nullptr;
    --it;
    return a < it->second.map_lo + it->second.map_len ? &it->second : nullptr;
}

bool is_pinned(uintptr_t a)
{
    auto it = g_pinned.upper_bound(a);
    if (it == g_pinned.begin())
        return false;
    --it;
    return a < it->first + (it->second > 0 ? it->second : 1);
}

/* [a, a + n) lies in device memory the device may touch. */
bool dev_range_ok(uintptr_t a, size_t n)
{
    alloc_t *al = dev_find(a);
    if (al == nullptr)
        return false;
    if (al->kind == A_DEVICE)
        return a >= al->ptr && a + n <= al->ptr + al->n;
    uintptr_t at = a, end = a + n;
    while (at < end) {
        auto it = al->open.upper_bound(at);
        if (it == al->open.begin())
            return false;
        --it;
        if (at >= it->second)
            return false;
        at = it->second;
    }
    return true;
}

void protect(uintptr_t lo, uintptr_t hi, int prot)
{
    lo = page_down(lo);
    hi = page_up(hi);
    if (hi > lo && mprotect((void *)lo, hi - lo, prot) != 0) {
        fprintf(stderr, "kvrt-sim: mprotect failed\n");
        abort();
    }
}

void set_all(int prot)
{
    for (auto &kv : g_dev) {
        alloc_t &a = kv.second;
        if (a.kind == A_DEVICE)
            protect(a.ptr, a.ptr + (a.n > 0 ? a.n : 1), prot);
        else
            for (auto &r : a.open)
                protect(r.first, r.second, prot);
    }
}

/* Device memory is accessible while one of these lives (queued work runs). */
struct opener {
    opener()
    {
        if (g_open_depth++ == 0)
            set_all(PROT_READ | PROT_WRITE);
    }
    ~opener()
    {
        if (--g_open_depth == 0)
            set_all(PROT_NONE);
    }
};

/* Asks for transparent huge pages where a mapping spans whole 2 MiB pages:
 * opening and closing device memory (mprotect, at every flush) then
 * changes one entry per 2 MiB instead of 512. */
void huge_pages(void *m, size_t len)
{
#if defined(MADV_HUGEPAGE)
    if (len >= kGranularity)
        (void)madvise(m, len, MADV_HUGEPAGE);
#else
    (void)m, (void)len;
#endif
}

void fault_handler_install();

cudaError_t dev_alloc(void **p, size_t n)
{
    fault_handler_install(); /* so that a host access is reported from the first allocation on */
    size_t body = (n + kAllocAlign - 1) / kAllocAlign * kAllocAlign;
    if (body == 0)
        body = kAllocAlign;
    size_t pages = page_up(body);
    size_t len = pages + page_size(); /* guard page after */
    void *m = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED)
        return cudaErrorMemoryAllocation;
    alloc_t a;
    a.kind = A_DEVICE;
    a.map_lo = (uintptr_t)m;
    a.map_len = len;
    a.ptr = a.map_lo + pages - body;
    a.n = n;
    huge_pages(m, len);
    protect(a.ptr, a.ptr + body, PROT_READ | PROT_WRITE);
    memset((void *)a.ptr, 0xff, body); /* what fresh device memory holds: not zeros */
    if (g_open_depth == 0)
        protect(a.ptr, a.ptr + body, PROT_NONE);
    g_dev[a.map_lo] = a;
    red_add(a.ptr + n, a.ptr + body, a.ptr, n, "device allocation");
    *p = (void *)a.ptr;
    return cudaSuccess;
}

void dev_release(alloc_t *a)
{
    red_clear(a->map_lo, a->map_lo + a->map_len);
    munmap((void *)a->map_lo, a->map_len);
    g_dev.erase(a->map_lo);
}

/* ---- streams, events, graphs ---- */

/* Device ranges a queued copy or memset touches (empty for a kernel). */
using ranges = std::vector<std::pair<uintptr_t, size_t>>;
struct item {
    uint64_t seq;
    std::function<void()> run;
    ranges touch;
};
struct graph_data {
    std::vector<std::function<void()>> items;
    std::vector<void *> owned; /* cudaMallocAsync under capture: freed with the graph */
    ~graph_data()
    {
        std::lock_guard<std::recursive_mutex> lk(g_mu);
        for (void *p : owned)
            if (alloc_t *a = dev_find((uintptr_t)p))
                dev_release(a);
    }
};
} // namespace
} // namespace kvrt_sim

struct kvrt_sim_stream {
    bool nonblocking = false;
    std::deque<kvrt_sim::item> q;
    int cap_status = cudaStreamCaptureStatusNone;
    cudaStreamCaptureMode cap_mode = cudaStreamCaptureModeGlobal;
    std::thread::id cap_thread;
    std::shared_ptr<kvrt_sim::graph_data> graph;
};
struct kvrt_sim_event_state {
    int      state = 0; /* 0 never recorded, 1 pending, 2 done, 3 recorded under capture */
    kvrt_sim_stream *stream = nullptr;
    uint64_t seq = 0;
    double   ms = 0;
};
struct kvrt_sim_event {
    unsigned flags;
    std::shared_ptr<kvrt_sim_event_state> st;
};
struct kvrt_sim_graph {
    std::shared_ptr<kvrt_sim::graph_data> d;
};
struct kvrt_sim_graph_exec {
    std::shared_ptr<kvrt_sim::graph_data> d;
};

namespace kvrt_sim {
namespace {

kvrt_sim_stream g_legacy;
std::set<kvrt_sim_stream *> g_streams;
uint64_t g_seq = 0;

kvrt_sim_stream *resolve(cudaStream_t s) { return s == nullptr ? &g_legacy : s; }

void for_each_stream(const std::function<void(kvrt_sim_stream *)> &f)
{
    f(&g_legacy);
    for (auto *s : g_streams)
        f(s);
}

void invalidate_captures()
{
    for_each_stream([](kvrt_sim_stream *s) {
        if (s->cap_status == cudaStreamCaptureStatusActive)
            s->cap_status = cudaStreamCaptureStatusInvalidated;
    });
}

bool any_capture()
{
    bool any = false;
    for_each_stream([&](kvrt_sim_stream *s) { any |= s->cap_status != cudaStreamCaptureStatusNone; });
    return any;
}

/* CUDA's rule for "potentially unsafe" calls (allocation, synchronization,
 * event queries) while a capture is under way. */
cudaError_t unsafe_call()
{
    if (t_mode == cudaStreamCaptureModeRelaxed)
        return cudaSuccess;
    bool prohibited = false;
    std::thread::id me = std::this_thread::get_id();
    for_each_stream([&](kvrt_sim_stream *s) {
        if (s->cap_status == cudaStreamCaptureStatusNone)
            return;
        if (s->cap_thread == me && s->cap_mode != cudaStreamCaptureModeRelaxed)
            prohibited = true;
        if (t_mode == cudaStreamCaptureModeGlobal && s->cap_mode == cudaStreamCaptureModeGlobal)
            prohibited = true;
    });
    if (!prohibited)
        return cudaSuccess;
    invalidate_captures();
    return cudaErrorStreamCaptureUnsupported;
}

bool pending_before(const kvrt_sim_stream *s, uint64_t seq)
{
    return !s->q.empty() && s->q.front().seq < seq;
}

/* Runs the work of a flush that is one copy or memset waiting for nothing,
 * opening only the device ranges it touches; false when the flush is more. */
bool flush_one_copy(kvrt_sim_stream *s, uint64_t upto)
{
    if (g_open_depth > 0 || s->q.front().touch.empty() || (s->q.size() > 1 && s->q[1].seq <= upto))
        return false;
    const uint64_t seq = s->q.front().seq;
    if (s == &g_legacy) {
        for (auto *b : g_streams)
            if (!b->nonblocking && pending_before(b, seq))
                return false;
    } else if (!s->nonblocking && pending_before(&g_legacy, seq)) {
        return false;
    }
    item it = std::move(s->q.front());
    s->q.pop_front();
    for (auto &r : it.touch)
        protect(r.first, r.first + r.second, PROT_READ | PROT_WRITE);
    it.run();
    for (auto &r : it.touch)
        protect(r.first, r.first + r.second, PROT_NONE);
    return true;
}

/* Runs s's queued work up to sequence number upto, with what it waits for
 * first. Device memory is opened once for all of it (each opening and
 * closing is an mprotect of every mapped range), or only the ranges of a
 * lone copy. */
void flush(kvrt_sim_stream *s, uint64_t upto)
{
    if (s->q.empty() || s->q.front().seq > upto || flush_one_copy(s, upto))
        return;
    opener o;
    while (!s->q.empty() && s->q.front().seq <= upto) {
        item it = std::move(s->q.front());
        s->q.pop_front();
        if (s == &g_legacy) {
            for (auto *b : g_streams)
                if (!b->nonblocking)
                    flush(b, it.seq);
        } else if (!s->nonblocking) {
            flush(&g_legacy, it.seq);
        }
        it.run();
    }
}

void flush_all()
{
    flush(&g_legacy, UINT64_MAX);
    for (auto *s : g_streams)
        flush(s, UINT64_MAX);
}

/* Queues fn on s (or records it into s's capture). */
cudaError_t enqueue(cudaStream_t stream, std::function<void()> fn, uint64_t *seq = nullptr,
                    std::shared_ptr<graph_data> *graph = nullptr, ranges touch = ranges())
{
    kvrt_sim_stream *s = resolve(stream);
    if (s->cap_status == cudaStreamCaptureStatusInvalidated)
        return cudaErrorStreamCaptureInvalidated;
    if (s->cap_status == cudaStreamCaptureStatusActive) {
        s->graph->items.push_back(std::move(fn));
        if (graph)
            *graph = s->graph;
        return cudaSuccess;
    }
    if (s == &g_legacy) {
        bool implicit = false;
        for (auto *b : g_streams)
            if (!b->nonblocking && b->cap_status != cudaStreamCaptureStatusNone)
                implicit = true;
        if (implicit) {
            invalidate_captures();
            return cudaErrorStreamCaptureImplicit;
        }
    }
    s->q.push_back(item{++g_seq, std::move(fn), std::move(touch)});
    if (seq)
        *seq = g_seq;
    return cudaSuccess;
}

bool capturing(cudaStream_t stream)
{
    return resolve(stream)->cap_status != cudaStreamCaptureStatusNone;
}

double now_ms()
{
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

/* ------------------------------------------------------------------ */
/* Kernel errors                                                       */
/* ------------------------------------------------------------------ */

std::mutex g_err_mu;

void kernel_error_set(const std::string &msg)
{
    std::lock_guard<std::mutex> lk(g_err_mu);
    g_kernel_errors++;
    if (g_sticky.load() == 0) {
        g_sticky_msg = "unspecified launch failure: kvrt-sim: " + msg;
        g_sticky = cudaErrorLaunchFailure;
    }
    fprintf(stderr, "kvrt-sim: kernel error: %s\n", msg.c_str());
    if (getenv("KVRT_SIM_ABORT") != NULL)
        abort();
}

/* ------------------------------------------------------------------ */
/* Fibers                                                              */
/* ------------------------------------------------------------------ */

enum { F_RUN, F_BAR, F_COLL, F_DONE };

struct fiber {
#if defined(__x86_64__)
    void *sp = nullptr;
#else
    ucontext_t uc;
#endif
    char *stack = nullptr; /* usable part, above the guard page */
    int   state = F_RUN;
    const char *file = nullptr;
    int   line = 0;
    uint3 tid;
    int   linear = 0;
    void *fake = nullptr;
    int   ckind = 0, carg = 0, cwidth = 0;
    unsigned long long cmask = 0;
    uint64_t cval = 0, cres = 0;
};

struct launch_t {
    launch_config c;
    std::function<void()> body;
    uint64_t id;
};

#if defined(KVRT_SIM_RACE)
struct race_cell;
#endif

struct worker {
    std::vector<std::unique_ptr<fiber>> fibers;
#if defined(__x86_64__)
    void *sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
    const void *sched_bottom = nullptr;
    size_t sched_size = 0;
    void *sched_fake = nullptr;
    char *smem_map = nullptr;
    char *smem_end = nullptr;   /* guard page starts here */
    char *smem = nullptr;
    size_t smem_n = 0;
    const launch_t *L = nullptr;
    int n = 0, live = 0, at_bar = 0;
    const char *bar_file = nullptr;
    int bar_line = 0;
    std::vector<int> runnable;
    uint64_t rng = 0;
    bool failed = false;
    fiber *cur = nullptr;
#if defined(KVRT_SIM_RACE)
    uint32_t race_iv = 0;          /* barrier interval: new at each block and barrier */
    std::vector<uint32_t> warp_iv; /* per warp: __syncwarps completed in the block */
    std::vector<race_cell> smem_shadow, tls_shadow;
    uintptr_t tls_lo = 0, tls_hi = 0; /* this OS thread's static TLS: __shared__ variables */
#endif
};
thread_local worker *t_worker = nullptr;

#if defined(__x86_64__)
extern "C" void kvrt_sim_switch(void **save_sp, void *to_sp);
asm(".text\n"
    ".globl kvrt_sim_switch\n"
    ".type kvrt_sim_switch,@function\n"
    "kvrt_sim_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size kvrt_sim_switch, .-kvrt_sim_switch\n");
#endif

void fiber_main();

void asan_start(void **fake, const void *bottom, size_t size)
{
#if defined(KVRT_SIM_ASAN)
    __sanitizer_start_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
}
void asan_finish(void *fake, const void **bottom, size_t *size)
{
#if defined(KVRT_SIM_ASAN)
    __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
}

void fiber_prepare(fiber *f)
{
    if (f->stack == nullptr) {
        size_t guard = page_size();
        char *m = (char *)mmap(NULL, kStack + guard, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "kvrt-sim: no memory for fiber stacks\n");
            abort();
        }
        mprotect(m, guard, PROT_NONE);
        f->stack = m + guard;
    }
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)(f->stack + kStack)) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 64 - 8);
    uint32_t csr[2] = {0x1f80u, 0x037fu};
    memcpy(&sp[0], csr, 8);
    for (int i = 1; i <= 6; i++)
        sp[i] = 0;
    sp[7] = (uint64_t)(uintptr_t)&fiber_main;
    sp[8] = 0;
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = kStack;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, (void (*)())fiber_main, 0);
#endif
}

void to_fiber(worker *w, fiber *f)
{
    w->cur = f;
    thread_idx = f->tid;
    asan_start(&w->sched_fake, f->stack, kStack);
#if defined(__x86_64__)
    kvrt_sim_switch(&w->sched_sp, f->sp);
#else
    swapcontext(&w->sched_uc, &f->uc);
#endif
    asan_finish(w->sched_fake, nullptr, nullptr);
    w->cur = nullptr;
}

void to_scheduler(worker *w, fiber *f, bool exiting)
{
    asan_start(exiting ? nullptr : &f->fake, w->sched_bottom, w->sched_size);
#if defined(__x86_64__)
    kvrt_sim_switch(&f->sp, w->sched_sp);
#else
    swapcontext(&f->uc, &w->sched_uc);
#endif
    asan_finish(f->fake, &w->sched_bottom, &w->sched_size);
}

void where_buf(const worker *w, const fiber *f, char *buf, size_t size)
{
    snprintf(buf, size, "kernel %s (launched at %s:%d), block (%u,%u,%u), thread (%u,%u,%u)",
             w->L->c.name, w->L->c.file, w->L->c.line, block_idx.x, block_idx.y, block_idx.z,
             f->tid.x, f->tid.y, f->tid.z);
}

std::string where(const worker *w, const fiber *f)
{
    char buf[512];
    where_buf(w, f, buf, sizeof buf);
    return buf;
}

void fail(worker *w, const fiber *f, const char *fmt, ...)
{
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    w->failed = true;
    kernel_error_set(where(w, f) + ": " + buf);
}

void make_runnable(worker *w, int i)
{
    w->fibers[i]->state = F_RUN;
    w->runnable.push_back(i);
    size_t j = splitmix(w->rng) % w->runnable.size();
    std::swap(w->runnable[j], w->runnable.back());
}

const char *kind_name(int k)
{
    static const char *const n[] = {"shfl", "shfl_up", "shfl_down", "shfl_xor",
                                    "ballot", "any", "all", "syncwarp"};
    return k >= 0 && k <= SYNCWARP ? n[k] : "?";
}

/* Lanes of warp `warp` that exist in the block. */
unsigned long long warp_lanes(const worker *w, int warp)
{
    int first = warp * W, n = std::min(W, w->n - first);
    return n >= 64 ? ~0ull : ((1ull << n) - 1ull);
}

/* Completes the collective of the waiting lanes of `warp` whose mask is
 * `mask`, when every live lane of it has arrived. */
void try_complete(worker *w, int warp, unsigned long long mask)
{
    const int first = warp * W;
    unsigned long long part = 0;
    fiber *lead = nullptr;
    for (int l = 0; l < W; l++) {
        if (!((mask >> l) & 1ull) || first + l >= w->n)
            continue;
        fiber *g = w->fibers[first + l].get();
        if (g->state == F_DONE)
            continue;
        if (g->state != F_COLL || g->cmask != mask)
            return; /* still to come */
        part |= 1ull << l;
        if (lead == nullptr)
            lead = g;
    }
    if (lead == nullptr)
        return;
    unsigned long long ballot = 0;
    for (int l = 0; l < W; l++)
        if (((part >> l) & 1ull) && w->fibers[first + l]->cval != 0)
            ballot |= 1ull << l;
    for (int l = 0; l < W; l++) {
        if (!((part >> l) & 1ull))
            continue;
        fiber *g = w->fibers[first + l].get();
        const int width = g->cwidth;
        const int seg = l & ~(width - 1);
        int src = l;
        switch (g->ckind) {
        case SHFL: src = seg + (g->carg & (width - 1)); break;
        case SHFL_UP: src = l - g->carg < seg ? l : l - g->carg; break;
        case SHFL_DOWN: src = l + g->carg >= seg + width ? l : l + g->carg; break;
        case SHFL_XOR: src = l ^ g->carg; if (src >= seg + width || src >= W) src = l; break;
        default: break;
        }
        if (g->ckind <= SHFL_XOR) {
            if (!((part >> src) & 1ull)) {
                fail(w, g, "%s at %s:%d reads lane %d, which does not take part (mask %#llx)",
                     kind_name(g->ckind), g->file, g->line, src, mask);
                return;
            }
            g->cres = w->fibers[first + src]->cval;
        } else if (g->ckind == BALLOT) {
            g->cres = ballot;
        } else if (g->ckind == ANY) {
            g->cres = ballot != 0;
        } else if (g->ckind == ALL) {
            g->cres = ballot == part;
        } else {
            g->cres = 0;
        }
    }
#if defined(KVRT_SIM_RACE)
    if (lead->ckind == SYNCWARP)
        w->warp_iv[warp]++;
#endif
    for (int l = 0; l < W; l++)
        if ((part >> l) & 1ull)
            make_runnable(w, first + l);
}

void fiber_main()
{
    worker *w = t_worker;
    asan_finish(nullptr, &w->sched_bottom, &w->sched_size);
    w->L->body();
    fiber *f = w->cur;
    f->state = F_DONE;
    w->live--;
    /* collectives of its warp that waited for it only */
    const int warp = f->linear / W;
    for (int l = 0; l < W && !w->failed; l++) {
        int i = warp * W + l;
        if (i < w->n && w->fibers[i]->state == F_COLL)
            try_complete(w, warp, w->fibers[i]->cmask);
    }
    to_scheduler(w, f, true);
    abort(); /* never resumed */
}

/* ---- faults: a SIGSEGV or SIGBUS in a kernel names the kernel, block and
 * thread; one in host code on device memory names the allocation. Then the
 * handler that was there before (ASan's, or the default) takes over. */

struct sigaction g_old_segv, g_old_bus;

/* What address a is, for a fault message. */
void describe_address(const worker *w, uintptr_t a, char *buf, size_t size)
{
    const alloc_t *al = dev_find(a);
    if (al != nullptr && al->kind == A_DEVICE && a >= al->ptr + al->n)
        snprintf(buf, size, "%zu bytes past the end of a device allocation of %zu bytes at %#lx",
                 (size_t)(a - (al->ptr + al->n)), al->n, (unsigned long)al->ptr);
    else if (al != nullptr && al->kind == A_DEVICE && a < al->ptr)
        snprintf(buf, size, "%zu bytes before a device allocation of %zu bytes at %#lx",
                 (size_t)(al->ptr - a), al->n, (unsigned long)al->ptr);
    else if (al != nullptr && al->kind == A_DEVICE)
        snprintf(buf, size, "a device allocation of %zu bytes at %#lx", al->n, (unsigned long)al->ptr);
    else if (al != nullptr)
        snprintf(buf, size, "a reserved device range at %#lx (%s)", (unsigned long)al->ptr,
                 a >= al->ptr && a < al->ptr + al->n ? "not mapped, or its access not set" : "outside it");
    else if (w != nullptr && w->cur != nullptr && a < (uintptr_t)w->cur->stack &&
             a + page_size() >= (uintptr_t)w->cur->stack)
        snprintf(buf, size, "the guard page of the thread's stack (%zu KiB): a stack overflow",
                 kStack >> 10);
    else if (w != nullptr && a >= (uintptr_t)w->smem_end && a < (uintptr_t)w->smem_end + page_size())
        snprintf(buf, size, "past the end of the launch's dynamic shared memory (%zu bytes)",
                 w->L != nullptr ? w->L->c.smem : (size_t)0);
    else
        snprintf(buf, size, "not device memory");
}

void on_fault(int sig, siginfo_t *si, void *uc)
{
    const uintptr_t a = (uintptr_t)si->si_addr;
    const worker *w = t_worker;
    const bool in_kernel = w != nullptr && w->cur != nullptr && w->L != nullptr;
    char what[256], at[512], msg[1024];
    describe_address(w, a, what, sizeof what);
    int n = 0;
    if (in_kernel) {
        where_buf(w, w->cur, at, sizeof at);
        n = snprintf(msg, sizeof msg, "kvrt-sim: device memory fault (%s) at %#lx, %s, in %s\n",
                     sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", (unsigned long)a, what, at);
    } else if (dev_find(a) != nullptr) {
        n = snprintf(msg, sizeof msg,
                     "kvrt-sim: host code touched device memory at %#lx, %s: only kernels and "
                     "copies may (outside queued work, device memory is inaccessible)\n",
                     (unsigned long)a, what);
    }
    if (n > 0)
        (void)!write(2, msg, (size_t)std::min(n, (int)sizeof msg - 1));
    const struct sigaction *old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
    if ((old->sa_flags & SA_SIGINFO) != 0 && old->sa_sigaction != nullptr) {
        old->sa_sigaction(sig, si, uc);
        return;
    }
    if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
        old->sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL); /* the access repeats and ends the process */
}

/* Installs on_fault once; gives the calling thread an alternate signal
 * stack, so that a fiber's stack overflow is reported too. */
void fault_handler_install()
{
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
    });
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && (cur.ss_flags & SS_DISABLE) == 0)
        return; /* one is set (ASan's, or ours) */
    stack_t ss;
    ss.ss_size = (size_t)64 << 10;
    ss.ss_sp = mmap(NULL, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ss.ss_flags = 0;
    if (ss.ss_sp != MAP_FAILED)
        sigaltstack(&ss, nullptr);
}

#if defined(KVRT_SIM_RACE)
/* ---- races on shared memory (KVRT_SIM_RACE; the top comment says how) ---- */

/* What the block's threads did to one byte of shared memory in the current
 * barrier interval (cells of older intervals are as good as empty). */
struct race_cell {
    uint32_t  w_iv = 0, w_wiv = 0;   /* last write: interval, its warp's __syncwarp count */
    int32_t   w_tid = -1;            /* its thread (linear) */
    uint32_t  r_iv = 0, r_wiv = 0;   /* reads: interval, the highest __syncwarp count */
    int32_t   r_tid = -1, r_warp = -1; /* reader, or kManyReaders; their warp, or -1 */
    int32_t   r_first = -1, r_last = -1; /* the first and the latest reader */
    bool      w_atomic = false, r_plain = false;
    const void *w_pc = nullptr, *r_first_pc = nullptr, *r_last_pc = nullptr;
};
constexpr int32_t kManyReaders = -2;
enum race_kind { R_READ, R_WRITE, R_ATOMIC_READ, R_ATOMIC_RMW };

/* The static TLS block of the program on this OS thread: the kernels'
 * __shared__ variables are thread_local there (x86-64: it ends at the
 * thread pointer; elsewhere static shared memory is not watched). */
int race_tls_segment(struct dl_phdr_info *info, size_t, void *data)
{
    if (info->dlpi_name != nullptr && info->dlpi_name[0] != '\0')
        return 0; /* the program itself comes first, unnamed */
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            ((size_t *)data)[0] = info->dlpi_phdr[i].p_memsz;
            ((size_t *)data)[1] = info->dlpi_phdr[i].p_align;
        }
    return 1;
}

void race_worker_init(worker *w)
{
    w->smem_shadow.resize((size_t)(w->smem_end - w->smem_map));
#if defined(__x86_64__)
    size_t seg[2] = {0, 1};
    dl_iterate_phdr(race_tls_segment, seg);
    uintptr_t tp;
    __asm__("mov %%fs:0, %0" : "=r"(tp));
    const size_t align = seg[1] > 0 ? seg[1] : 1, span = (seg[0] + align - 1) / align * align;
    w->tls_lo = tp - span;
    w->tls_hi = w->tls_lo + seg[0];
    const uintptr_t probe = (uintptr_t)&t_worker; /* one of the program's thread_locals */
    if (seg[0] == 0 || probe < w->tls_lo || probe >= w->tls_hi) {
        fprintf(stderr, "kvrt-sim: races: the program's TLS block was not found; static "
                        "__shared__ variables are not watched\n");
        w->tls_lo = w->tls_hi = 0;
    }
    w->tls_shadow.resize(w->tls_hi - w->tls_lo);
#endif
}

/* "thread (x,y,z) at function+offset" for a report. */
std::string race_who(const worker *w, int32_t tid, const void *pc)
{
    const dim3 b = w->L->c.block;
    char buf[256];
    Dl_info info;
    if (pc != nullptr && dladdr(pc, &info) != 0 && info.dli_sname != nullptr)
        snprintf(buf, sizeof buf, "thread (%u,%u,%u) at %s+%#lx", (unsigned)tid % b.x,
                 ((unsigned)tid / b.x) % b.y, (unsigned)tid / (b.x * b.y), info.dli_sname,
                 (unsigned long)((uintptr_t)pc - (uintptr_t)info.dli_saddr));
    else if (pc != nullptr && dladdr(pc, &info) != 0)
        snprintf(buf, sizeof buf, "thread (%u,%u,%u) at %s+%#lx", (unsigned)tid % b.x,
                 ((unsigned)tid / b.x) % b.y, (unsigned)tid / (b.x * b.y),
                 info.dli_fname != nullptr ? info.dli_fname : "?",
                 (unsigned long)((uintptr_t)pc - (uintptr_t)info.dli_fbase));
    else
        snprintf(buf, sizeof buf, "thread (%u,%u,%u)", (unsigned)tid % b.x,
                 ((unsigned)tid / b.x) % b.y, (unsigned)tid / (b.x * b.y));
    return buf;
}

void race_report(worker *w, const fiber *f, const char *space, uintptr_t a, uintptr_t base,
                 const char *what, const void *pc, const char *other_what, int32_t other,
                 const void *other_pc)
{
    fail(w, f, "data race on %s memory at %#lx (byte %lu of it): this %s (%s) and a %s by %s, "
               "with no barrier between them",
         space, (unsigned long)a, (unsigned long)(a - base), what,
         race_who(w, f->linear, pc).c_str(), other_what, race_who(w, other, other_pc).c_str());
}

void race_byte(worker *w, race_cell &c, const char *space, uintptr_t a, uintptr_t base, int kind,
               const void *pc)
{
    const fiber *f = w->cur;
    const int32_t t = f->linear, warp = t / W;
    const uint32_t iv = w->race_iv, wiv = w->warp_iv[(size_t)warp];
    /* an access of the interval by another thread and not ordered by a
     * __syncwarp of this thread's warp since */
    auto unordered = [&](uint32_t c_iv, int32_t c_warp, uint32_t c_wiv) {
        return c_iv == iv && !(c_warp == warp && c_wiv < wiv);
    };
    const bool write = kind == R_WRITE || kind == R_ATOMIC_RMW;
    const bool atomic = kind == R_ATOMIC_READ || kind == R_ATOMIC_RMW;
    if (c.w_tid != t && unordered(c.w_iv, c.w_tid / W, c.w_wiv) && !(atomic && c.w_atomic)) {
        race_report(w, f, space, a, base, write ? "write" : "read", pc,
                    c.w_atomic ? "atomic write" : "write", c.w_tid, c.w_pc);
        return;
    }
    if (write && c.r_tid != t && unordered(c.r_iv, c.r_warp, c.r_wiv) && !(atomic && !c.r_plain)) {
        const bool first = c.r_first != t; /* name a reader that is not this thread */
        race_report(w, f, space, a, base, "write", pc, "read", first ? c.r_first : c.r_last,
                    first ? c.r_first_pc : c.r_last_pc);
        return;
    }
    if (write) {
        c.w_iv = iv, c.w_wiv = wiv, c.w_tid = t, c.w_atomic = atomic, c.w_pc = pc;
    } else if (c.r_iv != iv) {
        c.r_iv = iv, c.r_wiv = wiv, c.r_tid = t, c.r_warp = warp, c.r_plain = !atomic;
        c.r_first = c.r_last = t, c.r_first_pc = c.r_last_pc = pc;
    } else {
        if (c.r_tid != t)
            c.r_tid = kManyReaders;
        if (c.r_warp != warp)
            c.r_warp = -1;
        c.r_wiv = std::max(c.r_wiv, wiv);
        c.r_plain = c.r_plain || !atomic;
        if (t != c.r_first)
            c.r_last = t, c.r_last_pc = pc;
    }
}

/* KVRT_SIM_RACE_GLOBAL=1: device-memory writes of each launch by block,
 * so that two blocks writing one byte (not both atomically) is a kernel
 * error. Blocks run on several OS threads: one lock, a map cleared at each
 * launch (slow; for the dedicated tests). */
struct global_write {
    uint64_t    launch;
    uint32_t    block;
    int32_t     tid;
    bool        atomic;
    const void *pc;
};
std::mutex g_global_mu;
std::unordered_map<uintptr_t, global_write> g_global;
uint64_t g_global_launch = 0;

void global_check(worker *w, uintptr_t a, size_t n, bool atomic, const void *pc)
{
    const dim3 g = w->L->c.grid;
    const uint32_t block = block_idx.x + g.x * (block_idx.y + g.y * block_idx.z);
    std::lock_guard<std::mutex> lk(g_global_mu);
    if (g_global_launch != w->L->id) {
        g_global.clear();
        g_global_launch = w->L->id;
    }
    for (size_t i = 0; i < n; i++) {
        auto it = g_global.find(a + i);
        if (it != g_global.end() && it->second.launch == w->L->id && it->second.block != block &&
            !(atomic && it->second.atomic)) {
            const global_write o = it->second;
            fail(w, w->cur,
                 "data race on device memory at %#lx: this block's write (%s) and one by block "
                 "%u's thread (%u,%u,%u) in the same launch",
                 (unsigned long)(a + i), race_who(w, w->cur->linear, pc).c_str(), o.block,
                 (unsigned)o.tid % w->L->c.block.x,
                 ((unsigned)o.tid / w->L->c.block.x) % w->L->c.block.y,
                 (unsigned)o.tid / (w->L->c.block.x * w->L->c.block.y));
            return;
        }
        g_global[a + i] = global_write{w->L->id, block, w->cur->linear, atomic, pc};
    }
}

/* A kernel access that touches a red zone: a kernel error. */
void red_check(worker *w, uintptr_t a, size_t n, int kind, const void *pc)
{
    const auto *z = red_find(a, n);
    if (z == nullptr)
        return;
    const uintptr_t end = z->second.buf + z->second.n;
    fail(w, w->cur, "%s of %zu bytes at %#lx, %lu bytes past the end of a %s of %zu bytes at "
                    "%#lx (%s)",
         kind == R_READ || kind == R_ATOMIC_READ ? "read" : "write", n, (unsigned long)a,
         (unsigned long)(a >= end ? a - end : 0), z->second.what, z->second.n,
         (unsigned long)z->second.buf, race_who(w, w->cur->linear, pc).c_str());
}

/* The race variant's modes, from the environment: KVRT_SIM_RACECHECK=0
 * turns the reports off; KVRT_SIM_INTERLEAVE=1 switches to another thread
 * of the block, at random, just before a write (after the thread's read
 * of the value it is about to store), so that a read-modify-write race
 * loses updates as on hardware and shows as a wrong number. */
struct race_modes {
    bool check = true, interleave = false, global = false;
};
const race_modes &race_mode()
{
    static const race_modes m = [] {
        race_modes r;
        const char *c = getenv("KVRT_SIM_RACECHECK"), *i = getenv("KVRT_SIM_INTERLEAVE");
        const char *g = getenv("KVRT_SIM_RACE_GLOBAL");
        r.check = c == nullptr || strcmp(c, "0") != 0;
        r.interleave = i != nullptr && strcmp(i, "0") != 0;
        r.global = g != nullptr && strcmp(g, "0") != 0;
        return r;
    }();
    return m;
}

inline void race_access(const volatile void *p, size_t n, int kind, const void *pc)
{
    worker *w = t_worker;
    if (w == nullptr || w->cur == nullptr || w->failed)
        return; /* host code, or a block already failed */
    const race_modes &mode = race_mode();
    if (mode.interleave && (kind == R_WRITE || kind == R_ATOMIC_RMW) && (splitmix(w->rng) & 1)) {
        fiber *f = w->cur;
        make_runnable(w, f->linear);
        to_scheduler(w, f, false); /* resumed by to_fiber, which sets w->cur */
    }
    if (!mode.check)
        return;
    const uintptr_t a = (uintptr_t)p;
    if (a >= (uintptr_t)w->smem_map && a < (uintptr_t)w->smem_end) {
        const uintptr_t base = (uintptr_t)w->smem;
        for (size_t i = 0; i < n && a + i < (uintptr_t)w->smem_end && !w->failed; i++)
            race_byte(w, w->smem_shadow[a + i - (uintptr_t)w->smem_map], "dynamic shared", a + i,
                      base, kind, pc);
    } else if (a >= w->tls_lo && a < w->tls_hi) {
        for (size_t i = 0; i < n && a + i < w->tls_hi && !w->failed; i++)
            race_byte(w, w->tls_shadow[a + i - w->tls_lo], "static shared", a + i, w->tls_lo, kind,
                      pc);
    } else {
        if (!g_red.empty())
            red_check(w, a, n, kind, pc);
        if (mode.global && (kind == R_WRITE || kind == R_ATOMIC_RMW) && !w->failed &&
            dev_find(a) != nullptr)
            global_check(w, a, n, kind == R_ATOMIC_RMW, pc);
    }
}
#endif /* KVRT_SIM_RACE */

worker *get_worker()
{
    if (t_worker == nullptr) {
        fault_handler_install();
        worker *w = new worker();
        size_t guard = page_size();
        size_t len = page_up(kMaxSmem) + guard;
        w->smem_map = (char *)mmap(NULL, len, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (w->smem_map == (char *)MAP_FAILED) {
            fprintf(stderr, "kvrt-sim: no memory for shared memory\n");
            abort();
        }
        w->smem_end = w->smem_map + page_up(kMaxSmem);
        mprotect(w->smem_end, guard, PROT_NONE);
#if defined(KVRT_SIM_RACE)
        race_worker_init(w);
#endif
        t_worker = w;
    }
    return t_worker;
}

std::string deadlock_text(worker *w, fiber **who)
{
    int n_coll = 0;
    fiber *first_coll = nullptr, *first_bar = nullptr;
    for (int i = 0; i < w->n; i++) {
        fiber *g = w->fibers[i].get();
        if (g->state == F_COLL && n_coll++ == 0)
            first_coll = g;
        if (g->state == F_BAR && first_bar == nullptr)
            first_bar = g;
    }
    char buf[512];
    if (first_coll != nullptr) {
        *who = first_coll;
        snprintf(buf, sizeof buf,
                 "warp collective %s at %s:%d (mask %#llx) never completes: a lane of its mask "
                 "waits elsewhere (%d threads at a barrier%s%s)",
                 kind_name(first_coll->ckind), first_coll->file, first_coll->line,
                 first_coll->cmask, w->at_bar, first_bar ? ", first at " : "",
                 first_bar ? first_bar->file : "");
    } else {
        *who = first_bar;
        snprintf(buf, sizeof buf, "barrier at %s:%d never releases", first_bar ? first_bar->file : "?",
                 first_bar ? first_bar->line : 0);
    }
    return buf;
}

void run_block(worker *w, const launch_t *L, uint32_t linear_block)
{
    const dim3 g = L->c.grid, b = L->c.block;
    block_idx = uint3{linear_block % g.x, (linear_block / g.x) % g.y, linear_block / (g.x * g.y)};
    block_dim = b;
    grid_dim = g;
    w->L = L;
    w->n = (int)(b.x * b.y * b.z);
    while ((int)w->fibers.size() < w->n)
        w->fibers.emplace_back(new fiber());
    /* dynamic shared memory: NaN bytes, ending at the guard page */
    size_t sm = (L->c.smem + 15) / 16 * 16;
    w->smem = w->smem_end - sm;
#if defined(KVRT_SIM_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(w->smem_map, w->smem_end - w->smem_map);
#endif
    memset(w->smem, 0xff, sm);
#if defined(KVRT_SIM_ASAN)
    ASAN_POISON_MEMORY_REGION(w->smem_map, w->smem - w->smem_map);
    ASAN_POISON_MEMORY_REGION(w->smem + L->c.smem, sm - L->c.smem);
#endif
    uint64_t s = g_seed ^ (L->id * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)linear_block << 32);
    w->rng = s;
    w->runnable.clear();
    w->live = w->n;
    w->at_bar = 0;
    w->bar_file = nullptr;
#if defined(KVRT_SIM_RACE)
    w->race_iv++;
    w->warp_iv.assign((size_t)(w->n + W - 1) / W, 0);
#endif
    for (int i = 0; i < w->n; i++) {
        fiber *f = w->fibers[i].get();
        fiber_prepare(f);
        f->state = F_RUN;
        f->linear = i;
        f->tid = uint3{(unsigned)i % b.x, ((unsigned)i / b.x) % b.y, (unsigned)i / (b.x * b.y)};
        f->fake = nullptr;
        make_runnable(w, i);
    }
    while (!w->failed) {
        while (!w->runnable.empty() && !w->failed) {
            int i = w->runnable.back();
            w->runnable.pop_back();
            to_fiber(w, w->fibers[i].get());
        }
        if (w->failed || w->live == 0)
            break;
        if (w->at_bar == w->live) { /* every live thread at the barrier: release in random order */
#if defined(KVRT_SIM_RACE)
            w->race_iv++;
#endif
            w->at_bar = 0;
            w->bar_file = nullptr;
            for (int i = 0; i < w->n; i++)
                if (w->fibers[i]->state == F_BAR)
                    make_runnable(w, i);
            continue;
        }
        fiber *who = nullptr;
        std::string text = deadlock_text(w, &who);
        w->failed = true;
        kernel_error_set(where(w, who != nullptr ? who : w->fibers[0].get()) + ": " + text);
    }
    if (w->failed) {
#if defined(KVRT_SIM_ASAN)
        for (int i = 0; i < w->n; i++)
            ASAN_UNPOISON_MEMORY_REGION(w->fibers[i]->stack, kStack);
#endif
    }
}

/* ---- the pool of OS threads that run blocks ---- */

struct pool_t {
    std::mutex m;
    std::condition_variable cv, done;
    std::vector<std::thread> threads;
    const launch_t *L = nullptr;
    const std::vector<uint32_t> *order = nullptr;
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    int busy = 0;
    uint64_t gen = 0;
};
pool_t &g_pool = *new pool_t(); /* never destroyed: its threads wait on it at exit */

void run_blocks(worker *w, const launch_t *L, const std::vector<uint32_t> &order)
{
    for (;;) {
        if (g_pool.failed.load())
            return;
        size_t i = g_pool.next.fetch_add(1);
        if (i >= order.size())
            return;
        w->failed = false;
        run_block(w, L, order[i]);
        if (w->failed)
            g_pool.failed = true;
    }
}

void pool_thread(uint64_t seen)
{
    worker *w = get_worker();
    std::unique_lock<std::mutex> lk(g_pool.m);
    for (;;) {
        g_pool.cv.wait(lk, [&] { return g_pool.gen != seen; });
        seen = g_pool.gen;
        const launch_t *L = g_pool.L;
        const std::vector<uint32_t> *order = g_pool.order;
        lk.unlock();
        run_blocks(w, L, *order);
        lk.lock();
        if (--g_pool.busy == 0)
            g_pool.done.notify_all();
    }
}

int pool_size()
{
    static int n = [] {
        int hw = (int)std::thread::hardware_concurrency();
        if (const char *s = getenv("KVRT_SIM_THREADS"))
            hw = atoi(s);
        return std::max(1, std::min(hw, 8));
    }();
    return n;
}

void execute(const launch_t *L)
{
    const dim3 g = L->c.grid;
    const size_t n = (size_t)g.x * g.y * g.z;
    std::vector<uint32_t> order(n);
    for (size_t i = 0; i < n; i++)
        order[i] = (uint32_t)i;
    uint64_t s = g_seed * 0x2545f4914f6cdd1dull + L->id;
    for (size_t i = n; i > 1; i--)
        std::swap(order[i - 1], order[splitmix(s) % i]);
    worker *w = get_worker();
    g_pool.next = 0;
    g_pool.failed = false;
    const int extra = n > 1 ? std::min(pool_size(), (int)n) - 1 : 0;
    if (extra > 0) {
        std::unique_lock<std::mutex> lk(g_pool.m);
        while ((int)g_pool.threads.size() < extra) {
            g_pool.threads.emplace_back(pool_thread, g_pool.gen);
            g_pool.threads.back().detach();
        }
        g_pool.L = L;
        g_pool.order = &order;
        g_pool.busy = (int)g_pool.threads.size();
        g_pool.gen++;
        g_pool.cv.notify_all();
    }
    run_blocks(w, L, order);
    if (extra > 0) {
        std::unique_lock<std::mutex> lk(g_pool.m);
        g_pool.done.wait(lk, [] { return g_pool.busy == 0; });
    }
    (void)kHip;
}

} // namespace

/* ------------------------------------------------------------------ */
/* Device side                                                         */
/* ------------------------------------------------------------------ */

/* Call sites' file names are literals: the same pointer, nearly always. */
static bool same_file(const char *a, const char *b) { return a == b || strcmp(a, b) == 0; }

void syncthreads(const char *file, int line)
{
    worker *w = t_worker;
    fiber *f = w != nullptr ? w->cur : nullptr;
    if (f == nullptr) {
        fprintf(stderr, "kvrt-sim: __syncthreads outside a kernel (%s:%d)\n", file, line);
        abort();
    }
    if (w->bar_file != nullptr && (w->bar_line != line || !same_file(w->bar_file, file))) {
        fail(w, f, "threads wait at different barriers: this one at %s:%d, others at %s:%d", file,
             line, w->bar_file, w->bar_line);
    } else {
        w->bar_file = file;
        w->bar_line = line;
        f->state = F_BAR;
        f->file = file;
        f->line = line;
        w->at_bar++;
    }
    to_scheduler(w, f, false);
}

uint64_t collective(int kind, unsigned long long mask, uint64_t value, int arg, int width,
                    const char *file, int line)
{
    worker *w = t_worker;
    fiber *f = w != nullptr ? w->cur : nullptr;
    if (f == nullptr) {
        fprintf(stderr, "kvrt-sim: warp collective outside a kernel (%s:%d)\n", file, line);
        abort();
    }
    const int lane = f->linear % W, warp = f->linear / W, first = warp * W;
    const unsigned long long lanes = warp_lanes(w, warp);
    if (mask == kImplicitMask) {
        mask = 0;
        for (int l = 0; l < W; l++)
            if (((lanes >> l) & 1ull) && w->fibers[first + l]->state != F_DONE)
                mask |= 1ull << l;
    }
    if constexpr (W < 64)
        mask &= (1ull << (W % 64)) - 1ull;
    if (width <= 0 || width > W || (width & (width - 1)) != 0) {
        fail(w, f, "%s at %s:%d: width %d is not a power of two up to %d", kind_name(kind), file,
             line, width, W);
        to_scheduler(w, f, false);
        return 0;
    }
    if (!((mask >> lane) & 1ull)) {
        fail(w, f, "lane %d calls %s at %s:%d with mask %#llx, which leaves it out", lane,
             kind_name(kind), file, line, mask);
        to_scheduler(w, f, false);
        return 0;
    }
    for (int l = 0; l < W; l++) {
        if (first + l >= w->n || l == lane)
            continue;
        fiber *g = w->fibers[first + l].get();
        if (g->state != F_COLL || !(((mask >> l) & 1ull) || ((g->cmask >> lane) & 1ull)))
            continue;
        if (g->ckind != kind || g->cmask != mask || g->line != line || !same_file(g->file, file)) {
            fail(w, f, "lanes of one mask reach different warp collectives: lane %d at %s %s:%d "
                       "(mask %#llx), lane %d at %s %s:%d (mask %#llx)",
                 lane, kind_name(kind), file, line, mask, l, kind_name(g->ckind), g->file,
                 g->line, g->cmask);
            to_scheduler(w, f, false);
            return 0;
        }
    }
    f->state = F_COLL;
    f->ckind = kind;
    f->cmask = mask;
    f->cval = value;
    f->carg = arg;
    f->cwidth = width;
    f->file = file;
    f->line = line;
    try_complete(w, warp, mask);
    to_scheduler(w, f, false);
    return f->cres;
}

unsigned long long active_mask()
{
    worker *w = t_worker;
    fiber *f = w->cur;
    const int warp = f->linear / W, first = warp * W;
    unsigned long long m = 0;
    for (int l = 0; l < W && first + l < w->n; l++)
        if (w->fibers[first + l]->state != F_DONE)
            m |= 1ull << l;
    return m;
}

void *dynamic_shared() { return t_worker->smem; }

void launch(const launch_config &c, std::function<void()> body)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (g_sticky.load() != 0) {
        ret((cudaError_t)g_sticky.load());
        return;
    }
    const unsigned long long threads = (unsigned long long)c.block.x * c.block.y * c.block.z;
    if (threads == 0 || threads > 1024 || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64 ||
        c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 0x7fffffffu ||
        c.grid.y > 65535 || c.grid.z > 65535) {
        ret(cudaErrorInvalidConfiguration);
        return;
    }
    if (c.smem > kSmemPerBlock) {
        ret(cudaErrorInvalidValue);
        return;
    }
    if (inject(KVRT_SIM_LAUNCH)) {
        ret(cudaErrorLaunchOutOfResources);
        return;
    }
    g_launch_names[c.name != nullptr ? c.name : ""]++;
    auto L = std::make_shared<launch_t>();
    L->c = c;
    L->body = std::move(body);
    L->id = 0;
    cudaError_t e = enqueue(c.stream, [L]() {
        if (g_sticky.load() != 0)
            return;
        launch_t run = *L;
        run.id = ++g_launches;
        execute(&run);
    });
    if (e != cudaSuccess)
        ret(e);
}

} // namespace kvrt_sim

/* ------------------------------------------------------------------ */
/* Runtime API                                                         */
/* ------------------------------------------------------------------ */

using namespace kvrt_sim;

#define SIM_ENTER()                                                                          \
    std::lock_guard<std::recursive_mutex> sim_lock_(g_mu);                                   \
    if (g_sticky.load() != 0)                                                                \
    return ret((cudaError_t)g_sticky.load())

#define SIM_TRY(expr)                                                                        \
    do {                                                                                     \
        cudaError_t sim_e_ = (expr);                                                         \
        if (sim_e_ != cudaSuccess)                                                           \
            return ret(sim_e_);                                                              \
    } while (0)

extern "C" {

const char *cudaGetErrorName(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return kHip ? "hipSuccess" : "cudaSuccess";
    case cudaErrorInvalidValue: return kHip ? "hipErrorInvalidValue" : "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return kHip ? "hipErrorOutOfMemory" : "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return kHip ? "hipErrorNotInitialized" : "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return kHip ? "hipErrorInvalidConfiguration" : "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return kHip ? "hipErrorInvalidDevicePointer" : "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return kHip ? "hipErrorInvalidMemcpyDirection" : "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInsufficientDriver: return kHip ? "hipErrorInsufficientDriver" : "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return kHip ? "hipErrorNoDevice" : "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return kHip ? "hipErrorInvalidDevice" : "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return kHip ? "hipErrorInvalidHandle" : "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalState: return kHip ? "hipErrorIllegalState" : "cudaErrorIllegalState";
    case cudaErrorNotReady: return kHip ? "hipErrorNotReady" : "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return kHip ? "hipErrorIllegalAddress" : "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return kHip ? "hipErrorLaunchOutOfResources" : "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return kHip ? "hipErrorLaunchFailure" : "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return kHip ? "hipErrorStreamCaptureUnsupported" : "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return kHip ? "hipErrorStreamCaptureInvalidated" : "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureUnmatched: return kHip ? "hipErrorStreamCaptureUnmatched" : "cudaErrorStreamCaptureUnmatched";
    case cudaErrorStreamCaptureImplicit: return kHip ? "hipErrorStreamCaptureImplicit" : "cudaErrorStreamCaptureImplicit";
    default: return kHip ? "hipErrorUnknown" : "cudaErrorUnknown";
    }
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: {
        std::lock_guard<std::mutex> lk(g_err_mu);
        return g_sticky_msg.empty() ? "unspecified launch failure" : g_sticky_msg.c_str();
    }
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureUnmatched: return "capture was not initiated in this stream";
    case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
    default: return "unknown error";
    }
}

cudaError_t cudaGetLastError(void)
{
    if (g_sticky.load() != 0)
        return (cudaError_t)g_sticky.load();
    cudaError_t e = t_last;
    t_last = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void)
{
    return g_sticky.load() != 0 ? (cudaError_t)g_sticky.load() : t_last;
}

cudaError_t cudaGetDeviceCount(int *count)
{
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device)
{
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device)
{
    return device == 0 ? cudaSuccess : ret(cudaErrorInvalidDevice);
}

static int sim_sms()
{
    static int n = [] {
        const char *s = getenv("KVRT_SIM_SMS");
        int v = s != NULL ? atoi(s) : 132;
        return v > 0 ? v : 132;
    }();
    return n;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device)
{
    if (device != 0)
        return ret(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "kvrt-sim, CPU SIMT emulator, warp %d", W);
    snprintf(p->gcnArchName, sizeof p->gcnArchName, "%s", kHip ? "gfx942" : "");
    p->totalGlobalMem = (size_t)80 << 30;
    p->sharedMemPerBlock = kSmemPerBlock;
    p->sharedMemPerBlockOptin = kMaxSmem - 1024;
    p->sharedMemPerMultiprocessor = kMaxSmem;
    p->regsPerBlock = 65536;
    p->warpSize = W;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024, p->maxThreadsDim[1] = 1024, p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 0x7fffffff, p->maxGridSize[1] = 65535, p->maxGridSize[2] = 65535;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = sim_sms();
    p->maxThreadsPerMultiProcessor = 2048;
    p->l2CacheSize = 50 << 20;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device)
{
    struct cudaDeviceProp p;
    SIM_TRY(cudaGetDeviceProperties(&p, device));
    switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrWarpSize: *value = p.warpSize; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = (int)p.sharedMemPerMultiprocessor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)p.sharedMemPerBlockOptin; break;
    default: return ret(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
    SIM_ENTER();
    if (any_capture()) {
        invalidate_captures();
        return ret(cudaErrorStreamCaptureUnsupported);
    }
    flush_all();
    return g_sticky.load() != 0 ? ret((cudaError_t)g_sticky.load()) : cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes)
{
    SIM_ENTER();
    size_t used = 0;
    for (auto &kv : g_dev)
        used += kv.second.kind == A_DEVICE ? kv.second.n : 0;
    *total_bytes = (size_t)80 << 30;
    *free_bytes = *total_bytes - std::min(used, *total_bytes);
    return cudaSuccess;
}

/* ---- streams ---- */

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags)
{
    SIM_ENTER();
    kvrt_sim_stream *s = new kvrt_sim_stream();
    s->nonblocking = (flags & cudaStreamNonBlocking) != 0;
    g_streams.insert(s);
    *stream = s;
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *stream) { return cudaStreamCreateWithFlags(stream, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    SIM_ENTER();
    if (stream == nullptr || g_streams.count(stream) == 0)
        return ret(cudaErrorInvalidResourceHandle);
    if (stream->cap_status != cudaStreamCaptureStatusNone) {
        invalidate_captures();
        return ret(cudaErrorStreamCaptureUnsupported);
    }
    flush(stream, UINT64_MAX); /* queued work completes */
    g_streams.erase(stream);
    delete stream;
    return cudaSuccess;
}

static cudaError_t stream_known(cudaStream_t s)
{
    return s == nullptr || g_streams.count(s) ? cudaSuccess : cudaErrorInvalidResourceHandle;
}

/* cudaStreamSynchronize and cudaStreamQuery: the host looks at the stream,
 * so its work runs now (a query therefore always finds it complete); both
 * are prohibited on a capturing stream and, per the capture mode, while
 * another stream captures. */
static cudaError_t stream_wait(cudaStream_t stream)
{
    SIM_TRY(stream_known(stream));
    if (capturing(stream)) {
        invalidate_captures();
        return ret(cudaErrorStreamCaptureUnsupported);
    }
    SIM_TRY(unsafe_call());
    flush(resolve(stream), UINT64_MAX);
    return g_sticky.load() != 0 ? ret((cudaError_t)g_sticky.load()) : cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    SIM_ENTER();
    return stream_wait(stream);
}

cudaError_t cudaStreamQuery(cudaStream_t stream)
{
    SIM_ENTER();
    return stream_wait(stream);
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *status)
{
    SIM_ENTER();
    SIM_TRY(stream_known(stream));
    *status = (enum cudaStreamCaptureStatus)resolve(stream)->cap_status;
    return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode *mode)
{
    enum cudaStreamCaptureMode old = t_mode;
    t_mode = *mode;
    *mode = old;
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, enum cudaStreamCaptureMode mode)
{
    SIM_ENTER();
    SIM_TRY(stream_known(stream));
    if (stream == nullptr) /* the legacy stream cannot be captured */
        return ret(cudaErrorStreamCaptureUnsupported);
    if (stream->cap_status != cudaStreamCaptureStatusNone)
        return ret(cudaErrorIllegalState);
    stream->cap_status = cudaStreamCaptureStatusActive;
    stream->cap_mode = mode;
    stream->cap_thread = std::this_thread::get_id();
    stream->graph = std::make_shared<graph_data>();
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    *graph = nullptr;
    SIM_TRY(stream_known(stream));
    kvrt_sim_stream *s = resolve(stream);
    if (s->cap_status == cudaStreamCaptureStatusNone)
        return ret(cudaErrorIllegalState);
    bool invalid = s->cap_status == cudaStreamCaptureStatusInvalidated;
    std::shared_ptr<graph_data> d = std::move(s->graph);
    s->cap_status = cudaStreamCaptureStatusNone;
    if (invalid)
        return ret(cudaErrorStreamCaptureInvalidated);
    if (g_sticky.load() != 0)
        return ret((cudaError_t)g_sticky.load());
    *graph = new kvrt_sim_graph{d};
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags)
{
    (void)flags;
    SIM_ENTER();
    if (graph == nullptr)
        return ret(cudaErrorInvalidValue);
    *exec = new kvrt_sim_graph_exec{graph->d};
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream)
{
    SIM_ENTER();
    if (exec == nullptr)
        return ret(cudaErrorInvalidResourceHandle);
    SIM_TRY(stream_known(stream));
    std::shared_ptr<graph_data> d = exec->d;
    SIM_TRY(enqueue(stream, [d]() {
        for (auto &fn : d->items)
            fn();
    }));
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph)
{
    delete graph;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec)
{
    delete exec;
    return cudaSuccess;
}

/* ---- events ---- */

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags)
{
    SIM_ENTER();
    *event = new kvrt_sim_event{flags, std::make_shared<kvrt_sim_event_state>()};
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *event) { return cudaEventCreateWithFlags(event, 0); }

cudaError_t cudaEventDestroy(cudaEvent_t event)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (event == nullptr)
        return ret(cudaErrorInvalidResourceHandle);
    delete event;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream)
{
    SIM_ENTER();
    if (event == nullptr)
        return ret(cudaErrorInvalidResourceHandle);
    SIM_TRY(stream_known(stream));
    kvrt_sim_stream *s = resolve(stream);
    if (s->cap_status == cudaStreamCaptureStatusInvalidated)
        return ret(cudaErrorStreamCaptureInvalidated);
    if (s->cap_status == cudaStreamCaptureStatusActive) {
        event->st = std::make_shared<kvrt_sim_event_state>();
        event->st->state = 3;
        return cudaSuccess;
    }
    auto st = std::make_shared<kvrt_sim_event_state>();
    st->state = 1;
    st->stream = s;
    event->st = st;
    SIM_TRY(enqueue(stream, [st]() {
        st->state = 2;
        st->ms = now_ms();
    }, &st->seq));
    return cudaSuccess;
}

static cudaError_t event_wait(cudaEvent_t event)
{
    if (event == nullptr)
        return cudaErrorInvalidResourceHandle;
    auto st = event->st;
    if (st->state == 3) {
        invalidate_captures();
        return cudaErrorStreamCaptureUnsupported;
    }
    SIM_TRY(unsafe_call());
    if (st->state == 1 && g_streams.count(st->stream) + (st->stream == &g_legacy) > 0)
        flush(st->stream, st->seq);
    if (g_sticky.load() != 0)
        return (cudaError_t)g_sticky.load();
    return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event)
{
    SIM_ENTER();
    return ret(event_wait(event));
}

cudaError_t cudaEventSynchronize(cudaEvent_t event)
{
    SIM_ENTER();
    return ret(event_wait(event));
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
    SIM_ENTER();
    if (start == nullptr || end == nullptr || (start->flags & cudaEventDisableTiming) ||
        (end->flags & cudaEventDisableTiming))
        return ret(cudaErrorInvalidResourceHandle);
    if (start->st->state != 2 || end->st->state != 2)
        return ret(cudaErrorNotReady);
    *ms = (float)(end->st->ms - start->st->ms);
    return cudaSuccess;
}

/* ---- memory ---- */

cudaError_t cudaMalloc(void **p, size_t n)
{
    SIM_ENTER();
    *p = nullptr;
    SIM_TRY(unsafe_call());
    if (inject(KVRT_SIM_ALLOC))
        return ret(cudaErrorMemoryAllocation);
    return ret(dev_alloc(p, n));
}

cudaError_t cudaFree(void *p)
{
    SIM_ENTER();
    if (p == nullptr)
        return cudaSuccess;
    SIM_TRY(unsafe_call());
    alloc_t *a = dev_find((uintptr_t)p);
    if (a == nullptr || a->kind != A_DEVICE || a->ptr != (uintptr_t)p)
        return ret(cudaErrorInvalidValue);
    flush_all(); /* cudaFree waits for the device */
    a = dev_find((uintptr_t)p);
    if (a != nullptr)
        dev_release(a);
    return cudaSuccess;
}

cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t stream)
{
    SIM_ENTER();
    *p = nullptr;
    SIM_TRY(stream_known(stream));
    if (inject(KVRT_SIM_ALLOC))
        return ret(cudaErrorMemoryAllocation);
    SIM_TRY(dev_alloc(p, n));
    if (resolve(stream)->cap_status == cudaStreamCaptureStatusActive)
        resolve(stream)->graph->owned.push_back(*p);
    return cudaSuccess;
}

cudaError_t cudaFreeAsync(void *p, cudaStream_t stream)
{
    SIM_ENTER();
    SIM_TRY(stream_known(stream));
    alloc_t *a = dev_find((uintptr_t)p);
    if (a == nullptr || a->kind != A_DEVICE || a->ptr != (uintptr_t)p)
        return ret(cudaErrorInvalidValue);
    kvrt_sim_stream *s = resolve(stream);
    if (s->cap_status == cudaStreamCaptureStatusActive) /* freed with the graph */
        return cudaSuccess;
    SIM_TRY(enqueue(stream, [p]() {
        if (alloc_t *x = dev_find((uintptr_t)p))
            dev_release(x);
    }));
    return cudaSuccess;
}

cudaError_t cudaHostAlloc(void **p, size_t n, unsigned int flags)
{
    (void)flags;
    SIM_ENTER();
    *p = nullptr;
    SIM_TRY(unsafe_call());
    if (inject(KVRT_SIM_ALLOC))
        return ret(cudaErrorMemoryAllocation);
    void *m = aligned_alloc(4096, (n + 4095) / 4096 * 4096 + (n == 0 ? 4096 : 0));
    if (m == nullptr)
        return ret(cudaErrorMemoryAllocation);
    g_pinned[(uintptr_t)m] = n;
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }

cudaError_t cudaFreeHost(void *p)
{
    SIM_ENTER();
    if (p == nullptr)
        return cudaSuccess;
    SIM_TRY(unsafe_call());
    auto it = g_pinned.find((uintptr_t)p);
    if (it == g_pinned.end())
        return ret(cudaErrorInvalidValue);
    flush_all(); /* waits for work that reads it */
    g_pinned.erase(it);
    free(p);
    return cudaSuccess;
}

/* Checks a copy's ranges; resolves cudaMemcpyDefault. */
static cudaError_t copy_check(void *dst, const void *src, size_t n, enum cudaMemcpyKind *kind)
{
    const bool dd = dev_find((uintptr_t)dst) != nullptr, sd = dev_find((uintptr_t)src) != nullptr;
    if (*kind == cudaMemcpyDefault)
        *kind = dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                   : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
    const bool want_dd = *kind == cudaMemcpyHostToDevice || *kind == cudaMemcpyDeviceToDevice;
    const bool want_sd = *kind == cudaMemcpyDeviceToHost || *kind == cudaMemcpyDeviceToDevice;
    if (want_dd != dd || want_sd != sd)
        return cudaErrorInvalidValue;
    if ((dd && !dev_range_ok((uintptr_t)dst, n)) || (sd && !dev_range_ok((uintptr_t)src, n)))
        return cudaErrorInvalidValue;
    return cudaSuccess;
}

static cudaError_t memcpy_queue(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                                cudaStream_t stream, bool blocking)
{
    SIM_TRY(stream_known(stream));
    if (blocking)
        SIM_TRY(unsafe_call());
    if (inject(KVRT_SIM_COPY))
        return ret(cudaErrorInvalidValue);
    if (n == 0)
        return cudaSuccess;
    SIM_TRY(copy_check(dst, src, n, &kind));
    const bool cap = capturing(stream);
    const bool host_src = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost;
    const bool host_dst = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost;
    const bool pageable = (host_src && !is_pinned((uintptr_t)src)) || (host_dst && !is_pinned((uintptr_t)dst));
    if (cap && pageable) { /* a graph cannot copy pageable memory */
        invalidate_captures();
        return ret(cudaErrorStreamCaptureUnsupported);
    }
    ranges touch;
    if (!host_dst)
        touch.emplace_back((uintptr_t)dst, n);
    if (!host_src)
        touch.emplace_back((uintptr_t)src, n);
    if (host_src && !is_pinned((uintptr_t)src) && !blocking) {
        /* pageable source: CUDA stages it before returning */
        auto copy = std::make_shared<std::vector<char>>((const char *)src, (const char *)src + n);
        SIM_TRY(enqueue(stream, [dst, copy]() { memcpy(dst, copy->data(), copy->size()); },
                        nullptr, nullptr, touch));
    } else {
        SIM_TRY(enqueue(stream, [dst, src, n]() { memcpy(dst, src, n); }, nullptr, nullptr, touch));
    }
    if (blocking || (host_dst && !is_pinned((uintptr_t)dst)))
        flush(resolve(stream), UINT64_MAX);
    return g_sticky.load() != 0 ? ret((cudaError_t)g_sticky.load()) : cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                            cudaStream_t stream)
{
    SIM_ENTER();
    return memcpy_queue(dst, src, n, kind, stream, false);
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind)
{
    SIM_ENTER();
    return memcpy_queue(dst, src, n, kind, nullptr, true);
}

static cudaError_t memset_queue(void *p, int value, size_t n, cudaStream_t stream, bool blocking)
{
    SIM_TRY(stream_known(stream));
    if (blocking)
        SIM_TRY(unsafe_call());
    if (inject(KVRT_SIM_COPY))
        return ret(cudaErrorInvalidValue);
    if (n == 0)
        return cudaSuccess;
    if (!dev_range_ok((uintptr_t)p, n))
        return ret(cudaErrorInvalidValue);
    SIM_TRY(enqueue(stream, [p, value, n]() { memset(p, value, n); }, nullptr, nullptr,
                    ranges{{(uintptr_t)p, n}}));
    if (blocking)
        flush(resolve(stream), UINT64_MAX);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t stream)
{
    SIM_ENTER();
    return memset_queue(p, value, n, stream, false);
}

cudaError_t cudaMemset(void *p, int value, size_t n)
{
    SIM_ENTER();
    return memset_queue(p, value, n, nullptr, true);
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *attr, const void *p)
{
    SIM_ENTER();
    memset(attr, 0, sizeof *attr);
    attr->device = -1;
    if (dev_find((uintptr_t)p) != nullptr) {
        attr->type = cudaMemoryTypeDevice;
        attr->memoryType = cudaMemoryTypeDevice;
        attr->device = 0;
        attr->devicePointer = (void *)p;
        return cudaSuccess;
    }
    if (is_pinned((uintptr_t)p)) {
        attr->type = cudaMemoryTypeHost;
        attr->memoryType = cudaMemoryTypeHost;
        attr->device = 0;
        attr->hostPointer = (void *)p;
        return cudaSuccess;
    }
    if (kHip) /* HIP: memory it does not know is an invalid argument */
        return ret(cudaErrorInvalidValue);
    attr->type = cudaMemoryTypeUnregistered;
    attr->hostPointer = (void *)p;
    return cudaSuccess;
}

/* ---- driver VMM entry points ---- */

static CUresult cu_device_get(CUdevice *d, int ordinal)
{
    if (ordinal != 0)
        return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}

static CUresult cu_device_get_attribute(int *v, CUdevice_attribute a, CUdevice d)
{
    if (d != 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (a == CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
        *v = 1;
    else if (a == CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        *v = sim_sms();
    else
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

static CUresult cu_granularity(size_t *g, const CUmemAllocationProp *prop,
                               CUmemAllocationGranularity_flags f)
{
    (void)prop, (void)f;
    *g = kGranularity;
    return CUDA_SUCCESS;
}

static CUresult cu_address_reserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr,
                                   unsigned long long flags)
{
    (void)addr, (void)flags;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (size == 0 || size % kGranularity != 0)
        return CUDA_ERROR_INVALID_VALUE;
    size_t a = align > kGranularity ? align : kGranularity;
    size_t len = size + a;
    char *m = (char *)mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == (char *)MAP_FAILED)
        return CUDA_ERROR_OUT_OF_MEMORY;
    uintptr_t base = ((uintptr_t)m + a - 1) / a * a;
    alloc_t r;
    r.kind = A_RESERVE;
    r.map_lo = (uintptr_t)m;
    r.map_len = len;
    r.ptr = base;
    r.n = size;
    g_dev[r.map_lo] = r;
    *p = (CUdeviceptr)base;
    return CUDA_SUCCESS;
}

static CUresult cu_address_free(CUdeviceptr p, size_t size)
{
    (void)size;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    alloc_t *a = dev_find((uintptr_t)p);
    if (a == nullptr || a->kind != A_RESERVE || a->ptr != (uintptr_t)p)
        return CUDA_ERROR_INVALID_VALUE;
    dev_release(a);
    return CUDA_SUCCESS;
}

static CUresult cu_mem_create(CUmemGenericAllocationHandle *h, size_t size,
                              const CUmemAllocationProp *prop, unsigned long long flags)
{
    (void)prop, (void)flags;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (size == 0 || size % kGranularity != 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (inject(KVRT_SIM_ALLOC))
        return CUDA_ERROR_OUT_OF_MEMORY;
    *h = g_next_handle++;
    g_handles[*h] = size;
    return CUDA_SUCCESS;
}

static CUresult cu_mem_release(CUmemGenericAllocationHandle h)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    return g_handles.erase(h) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

static CUresult cu_mem_map(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                           unsigned long long flags)
{
    (void)flags;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    alloc_t *a = dev_find((uintptr_t)p);
    auto hit = g_handles.find(h);
    if (a == nullptr || a->kind != A_RESERVE || hit == g_handles.end() || hit->second != size ||
        offset != 0 || (uintptr_t)p < a->ptr || (uintptr_t)p + size > a->ptr + a->n)
        return CUDA_ERROR_INVALID_VALUE;
    /* fresh pages holding 0xff bytes; inaccessible until cuMemSetAccess */
    void *m = mmap((void *)p, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (m == MAP_FAILED)
        return CUDA_ERROR_OUT_OF_MEMORY;
    huge_pages(m, size);
    memset(m, 0xff, size);
    mprotect(m, size, PROT_NONE);
    return CUDA_SUCCESS;
}

static CUresult cu_mem_unmap(CUdeviceptr p, size_t size)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    alloc_t *a = dev_find((uintptr_t)p);
    if (a == nullptr || a->kind != A_RESERVE)
        return CUDA_ERROR_INVALID_VALUE;
    uintptr_t lo = (uintptr_t)p, hi = lo + size;
    std::map<uintptr_t, uintptr_t> keep;
    for (auto &r : a->open) {
        if (r.second <= lo || r.first >= hi) {
            keep.insert(r);
            continue;
        }
        if (r.first < lo)
            keep[r.first] = lo;
        if (r.second > hi)
            keep[hi] = r.second;
    }
    a->open.swap(keep);
    mmap((void *)p, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return CUDA_SUCCESS;
}

static CUresult cu_mem_set_access(CUdeviceptr p, size_t size, const CUmemAccessDesc *desc, size_t count)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    alloc_t *a = dev_find((uintptr_t)p);
    if (a == nullptr || a->kind != A_RESERVE || count != 1 || desc == nullptr ||
        desc->flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        return CUDA_ERROR_INVALID_VALUE;
    uintptr_t lo = (uintptr_t)p, hi = lo + size;
    /* merge with touching ranges */
    auto it = a->open.lower_bound(lo);
    if (it != a->open.begin()) {
        auto prev = std::prev(it);
        if (prev->second >= lo) {
            lo = prev->first;
            hi = std::max(hi, prev->second);
            it = a->open.erase(prev);
        }
    }
    while (it != a->open.end() && it->first <= hi) {
        hi = std::max(hi, it->second);
        it = a->open.erase(it);
    }
    a->open[lo] = hi;
    if (g_open_depth > 0)
        protect(lo, hi, PROT_READ | PROT_WRITE);
    return CUDA_SUCCESS;
}

static CUresult cu_get_error_string(CUresult r, const char **s)
{
    *s = r == CUDA_SUCCESS ? "no error" : r == CUDA_ERROR_OUT_OF_MEMORY ? "out of memory"
                                                                         : "invalid argument";
    return CUDA_SUCCESS;
}

cudaError_t cudaGetDriverEntryPointByVersion(const char *symbol, void **fn, unsigned int version,
                                             unsigned long long flags,
                                             enum cudaDriverEntryPointQueryResult *status)
{
    (void)version, (void)flags;
    struct entry {
        const char *name;
        void *fn;
    };
    static const entry entries[] = {
        {"cuDeviceGet", (void *)&cu_device_get},
        {"cuDeviceGetAttribute", (void *)&cu_device_get_attribute},
        {"cuMemGetAllocationGranularity", (void *)&cu_granularity},
        {"cuMemAddressReserve", (void *)&cu_address_reserve},
        {"cuMemAddressFree", (void *)&cu_address_free},
        {"cuMemCreate", (void *)&cu_mem_create},
        {"cuMemRelease", (void *)&cu_mem_release},
        {"cuMemMap", (void *)&cu_mem_map},
        {"cuMemUnmap", (void *)&cu_mem_unmap},
        {"cuMemSetAccess", (void *)&cu_mem_set_access},
        {"cuGetErrorString", (void *)&cu_get_error_string},
    };
    *fn = nullptr;
    if (status != nullptr)
        *status = cudaDriverEntryPointSymbolNotFound;
    if (kHip) /* HIP has no driver entry points */
        return cudaSuccess;
    for (const entry &e : entries)
        if (strcmp(e.name, symbol) == 0) {
            *fn = e.fn;
            if (status != nullptr)
                *status = cudaDriverEntryPointSuccess;
        }
    return cudaSuccess;
}

cudaError_t cudaGetDriverEntryPoint(const char *symbol, void **fn, unsigned long long flags,
                                    enum cudaDriverEntryPointQueryResult *status)
{
    return cudaGetDriverEntryPointByVersion(symbol, fn, 12000, flags, status);
}

/* ---- controls ---- */

long kvrt_sim_calls(int kind)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    return kind >= 0 && kind < KVRT_SIM_N_CALLS ? g_calls[kind] : 0;
}

void kvrt_sim_guard(const void *p, size_t n, size_t guard)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    const uintptr_t a = (uintptr_t)p;
    red_clear(a, a + n + guard);
    red_add(a + n, a + n + guard, a, n, "buffer carved from a larger one");
}

int kvrt_sim_mutant(void)
{
    static const int n = [] {
        const char *e = getenv("KVRT_SIM_MUTANT");
        return e != nullptr ? atoi(e) : 0;
    }();
    return n;
}

long kvrt_sim_launches_of(const char *name_part)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    long n = 0;
    for (const auto &e : g_launch_names)
        if (name_part == NULL || strstr(e.first.c_str(), name_part) != NULL)
            n += e.second;
    return n;
}

void kvrt_sim_fail_at(int kind, long nth)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (kind >= 0 && kind < KVRT_SIM_N_CALLS)
        g_fail_at[kind] = nth;
}

void kvrt_sim_set_seed(uint64_t seed)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    g_seed = seed;
}

long kvrt_sim_kernel_errors(void) { return g_kernel_errors.load(); }

void kvrt_sim_reset_error(void)
{
    std::lock_guard<std::mutex> lk(g_err_mu);
    g_sticky = 0;
    g_sticky_msg.clear();
    t_last = cudaSuccess;
}

#if defined(KVRT_SIM_HIP)
/* The HIP names that tests/fuzzer looks up with dlsym. */
cudaError_t hipMalloc(void **p, size_t n) { return cudaMalloc(p, n); }
cudaError_t hipFree(void *p) { return cudaFree(p); }
cudaError_t hipMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind)
{
    return cudaMemcpy(dst, src, n, kind);
}
#endif

} /* extern "C" */

#if defined(KVRT_SIM_RACE)
/* ---- the entry points of -fsanitize=thread's instrumentation ----
 * The race variant's kernels call these for each access; they keep the
 * record of shared memory (race_access) and do each atomic operation. */
extern "C" {
#define KVRT_RACE_PC __builtin_return_address(0)
void __tsan_init(void) {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit(void) {}
void __tsan_vptr_update(void **, void *) {}
void __tsan_vptr_read(void **) {}
void __tsan_read_range(void *p, unsigned long n) { kvrt_sim::race_access(p, n, kvrt_sim::R_READ, KVRT_RACE_PC); }
void __tsan_write_range(void *p, unsigned long n) { kvrt_sim::race_access(p, n, kvrt_sim::R_WRITE, KVRT_RACE_PC); }
#define KVRT_RACE_RW(N)                                                                        \
    void __tsan_read##N(void *p) { kvrt_sim::race_access(p, N, kvrt_sim::R_READ, KVRT_RACE_PC); } \
    void __tsan_write##N(void *p) { kvrt_sim::race_access(p, N, kvrt_sim::R_WRITE, KVRT_RACE_PC); } \
    void __tsan_unaligned_read##N(void *p) { kvrt_sim::race_access(p, N, kvrt_sim::R_READ, KVRT_RACE_PC); } \
    void __tsan_unaligned_write##N(void *p) { kvrt_sim::race_access(p, N, kvrt_sim::R_WRITE, KVRT_RACE_PC); } \
    void __tsan_volatile_read##N(void *p) { kvrt_sim::race_access(p, N, kvrt_sim::R_READ, KVRT_RACE_PC); } \
    void __tsan_volatile_write##N(void *p) { kvrt_sim::race_access(p, N, kvrt_sim::R_WRITE, KVRT_RACE_PC); }
KVRT_RACE_RW(1)
KVRT_RACE_RW(2)
KVRT_RACE_RW(4)
KVRT_RACE_RW(8)
KVRT_RACE_RW(16)
#undef KVRT_RACE_RW

/* Atomics: the operation itself (blocks run on several OS threads), and
 * the access recorded as atomic. Memory orders are taken as seq_cst. */
#define KVRT_RACE_ATOMIC(BITS, T)                                                              \
    T __tsan_atomic##BITS##_load(const volatile T *a, int)                                     \
    {                                                                                          \
        kvrt_sim::race_access(a, sizeof(T), kvrt_sim::R_ATOMIC_READ, KVRT_RACE_PC);            \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                           \
    }                                                                                          \
    void __tsan_atomic##BITS##_store(volatile T *a, T v, int)                                  \
    {                                                                                          \
        kvrt_sim::race_access(a, sizeof(T), kvrt_sim::R_ATOMIC_RMW, KVRT_RACE_PC);             \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                              \
    }                                                                                          \
    KVRT_RACE_FETCH(BITS, T, exchange, __atomic_exchange_n)                                    \
    KVRT_RACE_FETCH(BITS, T, fetch_add, __atomic_fetch_add)                                    \
    KVRT_RACE_FETCH(BITS, T, fetch_sub, __atomic_fetch_sub)                                    \
    KVRT_RACE_FETCH(BITS, T, fetch_and, __atomic_fetch_and)                                    \
    KVRT_RACE_FETCH(BITS, T, fetch_or, __atomic_fetch_or)                                      \
    KVRT_RACE_FETCH(BITS, T, fetch_xor, __atomic_fetch_xor)                                    \
    KVRT_RACE_FETCH(BITS, T, fetch_nand, __atomic_fetch_nand)                                  \
    int __tsan_atomic##BITS##_compare_exchange_strong(volatile T *a, T *c, T v, int, int)       \
    {                                                                                          \
        kvrt_sim::race_access(a, sizeof(T), kvrt_sim::R_ATOMIC_RMW, KVRT_RACE_PC);             \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                          \
    int __tsan_atomic##BITS##_compare_exchange_weak(volatile T *a, T *c, T v, int, int)         \
    {                                                                                          \
        kvrt_sim::race_access(a, sizeof(T), kvrt_sim::R_ATOMIC_RMW, KVRT_RACE_PC);             \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    }                                                                                          \
    T __tsan_atomic##BITS##_compare_exchange_val(volatile T *a, T c, T v, int, int)             \
    {                                                                                          \
        kvrt_sim::race_access(a, sizeof(T), kvrt_sim::R_ATOMIC_RMW, KVRT_RACE_PC);             \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);      \
        return c;                                                                              \
    }
#define KVRT_RACE_FETCH(BITS, T, NAME, OP)                                                     \
    T __tsan_atomic##BITS##_##NAME(volatile T *a, T v, int)                                    \
    {                                                                                          \
        kvrt_sim::race_access(a, sizeof(T), kvrt_sim::R_ATOMIC_RMW, KVRT_RACE_PC);             \
        return OP(a, v, __ATOMIC_SEQ_CST);                                                     \
    }
KVRT_RACE_ATOMIC(8, char)
KVRT_RACE_ATOMIC(16, short)
KVRT_RACE_ATOMIC(32, int)
KVRT_RACE_ATOMIC(64, long long)
#undef KVRT_RACE_FETCH
#undef KVRT_RACE_ATOMIC
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#undef KVRT_RACE_PC
} /* extern "C" */
#endif /* KVRT_SIM_RACE */
