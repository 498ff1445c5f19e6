// ThreadSanitizer annotations for Debian's abseil and gRPC (issue 7).
//
// Debian's abseil and gRPC are not built with TSan, so the synchronization
// inside them (futexes, atomics, lock-free queues) is invisible to it:
// every field that lossguard guards with an absl::Mutex, and everything a
// gRPC reactor hands from the thread that starts an operation to the thread
// that runs its callback, would be reported as a race. Upstream abseil
// annotates its Mutex with TSan's mutex interface when it is built with
// TSan; this file does the same from outside, and adds the few
// happens-before edges that gRPC's documentation promises:
//
//  - absl::Mutex, CondVar, Notification, BlockingCounter: their out-of-line
//    members are redefined here; each brackets the real function (looked up
//    with dlsym(RTLD_NEXT)) with the __tsan_mutex_* annotations that
//    abseil's own mutex.cc makes under TSan.
//  - a gRPC operation and its completion: grpc_call_start_batch releases on
//    the operation's tag; the completion queue (next/pluck) and the callback
//    API's tag (CallbackWithSuccessTag::StaticRun) acquire it before the
//    completion is handed to its owner.
//  - a server call's OnDone: ServerCallbackCall::ScheduleOnDone acquires
//    the call's reference count, which every callback released (OnCancel,
//    run by libgrpc++, through a proxy reactor);
//  - the end of a server: every grpc_call_unref releases, Server::Wait()
//    acquires (Wait returns once every call is done, OnDone included).
//
// tests/tsan.sh compiles it with -fsanitize=thread and links it into every
// executable of build-tsan (CMAKE_EXE_LINKER_FLAGS): an executable's
// definitions take precedence over the shared libraries', for the calls
// that gRPC and abseil make themselves too (they call these functions
// through the PLT). Not part of any normal build.
#include <dlfcn.h>
#include <grpc/grpc.h>
#include <grpcpp/support/callback_common.h>
#include <grpcpp/support/server_callback.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace {

// The real function of that (mangled) name in the next object, i.e. in
// libabsl_synchronization.so, libgrpc.so or libgrpc++.so. Looked up on first
// use: calls may come from other libraries' static constructors, before this
// file's would run.
template <typename F>
F Real(std::atomic<F>& cache, const char* name) {
  F f = cache.load(std::memory_order_acquire);
  if (f == nullptr) {
    f = reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
    if (f == nullptr) {
      std::fprintf(stderr, "tsan_absl_sync: %s not found: %s\n", name,
                   dlerror());
      std::abort();
    }
    cache.store(f, std::memory_order_release);
  }
  return f;
}

#define LG_REAL(type, mangled)                  \
  ([]() -> type {                               \
    static std::atomic<type> cache{nullptr};    \
    return Real<type>(cache, mangled);          \
  }())

// Only the outermost wrapped call of a thread annotates: the library calls
// its own exported functions through the PLT, i.e. these wrappers (e.g.
// CondVar::WaitWithTimeout calls WaitWithDeadline, Notification::Notify
// locks its Mutex), and those inner calls are part of the outer operation.
thread_local int depth = 0;

class Scope {
 public:
  Scope() : outer_(depth++ == 0) {}
  ~Scope() { --depth; }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

  void PreLock(void* mu, unsigned flags) const {
    if (outer_) __tsan_mutex_pre_lock(mu, flags);
  }
  void PostLock(void* mu, unsigned flags) const {
    if (outer_) __tsan_mutex_post_lock(mu, flags, 0);
  }
  void PreUnlock(void* mu, unsigned flags) const {
    if (outer_) __tsan_mutex_pre_unlock(mu, flags);
  }
  void PostUnlock(void* mu, unsigned flags) const {
    if (outer_) __tsan_mutex_post_unlock(mu, flags);
  }
  void Acquire(void* addr) const {
    if (outer_) __tsan_acquire(addr);
  }
  void Release(void* addr) const {
    if (outer_) __tsan_release(addr);
  }
  void Destroy(void* mu) const {
    if (outer_) __tsan_mutex_destroy(mu, __tsan_mutex_not_static);
  }

 private:
  const bool outer_;
};

// As abseil's mutex.cc: the writer bit of Mutex::mu_ (kMuWriter).
constexpr intptr_t kMuWriter = 0x0008;

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

// --- Mutex ---------------------------------------------------------------

Mutex::~Mutex() {
  const Scope t;
  using F = void (*)(Mutex*);
  LG_REAL(F, "_ZN4absl7debian35MutexD2Ev")(this);
  t.Destroy(this);
}

void Mutex::Lock() {
  const Scope t;
  using F = void (*)(Mutex*);
  t.PreLock(this, 0);
  LG_REAL(F, "_ZN4absl7debian35Mutex4LockEv")(this);
  t.PostLock(this, 0);
}

void Mutex::ReaderLock() {
  const Scope t;
  using F = void (*)(Mutex*);
  t.PreLock(this, __tsan_mutex_read_lock);
  LG_REAL(F, "_ZN4absl7debian35Mutex10ReaderLockEv")(this);
  t.PostLock(this, __tsan_mutex_read_lock);
}

bool Mutex::TryLock() {
  const Scope t;
  using F = bool (*)(Mutex*);
  t.PreLock(this, __tsan_mutex_try_lock);
  const bool ok = LG_REAL(F, "_ZN4absl7debian35Mutex7TryLockEv")(this);
  t.PostLock(this, ok ? __tsan_mutex_try_lock : __tsan_mutex_try_lock_failed);
  return ok;
}

bool Mutex::ReaderTryLock() {
  const Scope t;
  using F = bool (*)(Mutex*);
  t.PreLock(this, __tsan_mutex_try_read_lock);
  const bool ok = LG_REAL(F, "_ZN4absl7debian35Mutex13ReaderTryLockEv")(this);
  t.PostLock(this, ok ? __tsan_mutex_try_read_lock
                    : __tsan_mutex_try_read_lock_failed);
  return ok;
}

void Mutex::Unlock() {
  const Scope t;
  using F = void (*)(Mutex*);
  t.PreUnlock(this, 0);
  LG_REAL(F, "_ZN4absl7debian35Mutex6UnlockEv")(this);
  t.PostUnlock(this, 0);
}

void Mutex::ReaderUnlock() {
  const Scope t;
  using F = void (*)(Mutex*);
  t.PreUnlock(this, __tsan_mutex_read_lock);
  LG_REAL(F, "_ZN4absl7debian35Mutex12ReaderUnlockEv")(this);
  t.PostUnlock(this, __tsan_mutex_read_lock);
}

// The *When functions return with the lock held, whatever they return.
void Mutex::LockWhen(const Condition& cond) {
  const Scope t;
  using F = void (*)(Mutex*, const Condition&);
  t.PreLock(this, 0);
  LG_REAL(F, "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE")(this, cond);
  t.PostLock(this, 0);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  const Scope t;
  using F = void (*)(Mutex*, const Condition&);
  t.PreLock(this, __tsan_mutex_read_lock);
  LG_REAL(F, "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE")(
      this, cond);
  t.PostLock(this, __tsan_mutex_read_lock);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  const Scope t;
  using F = bool (*)(Mutex*, const Condition&, absl::Duration);
  t.PreLock(this, 0);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE")(
      this, cond, timeout);
  t.PostLock(this, 0);
  return r;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond,
                                      absl::Duration timeout) {
  const Scope t;
  using F = bool (*)(Mutex*, const Condition&, absl::Duration);
  t.PreLock(this, __tsan_mutex_read_lock);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE")(
      this, cond, timeout);
  t.PostLock(this, __tsan_mutex_read_lock);
  return r;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  const Scope t;
  using F = bool (*)(Mutex*, const Condition&, absl::Time);
  t.PreLock(this, 0);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE")(
      this, cond, deadline);
  t.PostLock(this, 0);
  return r;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond,
                                       absl::Time deadline) {
  const Scope t;
  using F = bool (*)(Mutex*, const Condition&, absl::Time);
  t.PreLock(this, __tsan_mutex_read_lock);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE")(
      this, cond, deadline);
  t.PostLock(this, __tsan_mutex_read_lock);
  return r;
}

// Await* release the lock while they wait and hold it again on return: an
// unlock and a lock, in the mode the lock is held in (as AwaitCommon).
void Mutex::Await(const Condition& cond) {
  const Scope t;
  using F = void (*)(Mutex*, const Condition&);
  const unsigned how = (mu_.load(std::memory_order_relaxed) & kMuWriter)
                           ? 0
                           : __tsan_mutex_read_lock;
  t.PreUnlock(this, how);
  LG_REAL(F, "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE")(this, cond);
  t.PostUnlock(this, how);
  t.PreLock(this, how);
  t.PostLock(this, how);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  const Scope t;
  using F = bool (*)(Mutex*, const Condition&, absl::Duration);
  const unsigned how = (mu_.load(std::memory_order_relaxed) & kMuWriter)
                           ? 0
                           : __tsan_mutex_read_lock;
  t.PreUnlock(this, how);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE")(
      this, cond, timeout);
  t.PostUnlock(this, how);
  t.PreLock(this, how);
  t.PostLock(this, how);
  return r;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  const Scope t;
  using F = bool (*)(Mutex*, const Condition&, absl::Time);
  const unsigned how = (mu_.load(std::memory_order_relaxed) & kMuWriter)
                           ? 0
                           : __tsan_mutex_read_lock;
  t.PreUnlock(this, how);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE")(
      this, cond, deadline);
  t.PostUnlock(this, how);
  t.PreLock(this, how);
  t.PostLock(this, how);
  return r;
}

// --- CondVar: Wait* unlock and relock the mutex ----------------------------

void CondVar::Wait(Mutex* mu) {
  const Scope t;
  using F = void (*)(CondVar*, Mutex*);
  const unsigned how = (mu->mu_.load(std::memory_order_relaxed) & kMuWriter)
                           ? 0
                           : __tsan_mutex_read_lock;
  t.PreUnlock(mu, how);
  LG_REAL(F, "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE")(this, mu);
  t.PostUnlock(mu, how);
  t.PreLock(mu, how);
  t.PostLock(mu, how);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  const Scope t;
  using F = bool (*)(CondVar*, Mutex*, absl::Duration);
  const unsigned how = (mu->mu_.load(std::memory_order_relaxed) & kMuWriter)
                           ? 0
                           : __tsan_mutex_read_lock;
  t.PreUnlock(mu, how);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE")(
      this, mu, timeout);
  t.PostUnlock(mu, how);
  t.PreLock(mu, how);
  t.PostLock(mu, how);
  return r;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  const Scope t;
  using F = bool (*)(CondVar*, Mutex*, absl::Time);
  const unsigned how = (mu->mu_.load(std::memory_order_relaxed) & kMuWriter)
                           ? 0
                           : __tsan_mutex_read_lock;
  t.PreUnlock(mu, how);
  const bool r = LG_REAL(
      F, "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE")(
      this, mu, deadline);
  t.PostUnlock(mu, how);
  t.PreLock(mu, how);
  t.PostLock(mu, how);
  return r;
}

// --- Notification and BlockingCounter --------------------------------------
// Their fast paths are atomics inside the library: what happens before
// Notify() / DecrementCount() happens before a wait that returns true. (The
// inline HasBeenNotified() cannot be annotated from here.)

void Notification::Notify() {
  const Scope t;
  using F = void (*)(Notification*);
  t.Release(this);
  LG_REAL(F, "_ZN4absl7debian312Notification6NotifyEv")(this);
}

void Notification::WaitForNotification() const {
  const Scope t;
  using F = void (*)(const Notification*);
  LG_REAL(F, "_ZNK4absl7debian312Notification19WaitForNotificationEv")(this);
  t.Acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(
    absl::Duration timeout) const {
  const Scope t;
  using F = bool (*)(const Notification*, absl::Duration);
  const bool r = LG_REAL(
      F, "_ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE")(
      this, timeout);
  if (r) t.Acquire(const_cast<Notification*>(this));
  return r;
}

bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  const Scope t;
  using F = bool (*)(const Notification*, absl::Time);
  const bool r = LG_REAL(
      F, "_ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE")(
      this, deadline);
  if (r) t.Acquire(const_cast<Notification*>(this));
  return r;
}

bool BlockingCounter::DecrementCount() {
  const Scope t;
  using F = bool (*)(BlockingCounter*);
  t.Release(this);
  return LG_REAL(F, "_ZN4absl7debian315BlockingCounter14DecrementCountEv")(
      this);
}

void BlockingCounter::Wait() {
  const Scope t;
  using F = void (*)(BlockingCounter*);
  LG_REAL(F, "_ZN4absl7debian315BlockingCounter4WaitEv")(this);
  t.Acquire(this);
}

ABSL_NAMESPACE_END
}  // namespace absl

// --- gRPC ------------------------------------------------------------------
// Not Scopes: the abseil calls inside these are annotated as usual.

namespace {
char calls_done;  // the synchronization object of Server::Wait (its address)
}  // namespace

// An operation happens before its completion is seen.
extern "C" grpc_call_error grpc_call_start_batch(grpc_call* call,
                                                 const grpc_op* ops,
                                                 size_t nops, void* tag,
                                                 void* reserved) {
  using F = grpc_call_error (*)(grpc_call*, const grpc_op*, size_t, void*,
                                void*);
  if (tag != nullptr) __tsan_release(tag);
  return LG_REAL(F, "grpc_call_start_batch")(call, ops, nops, tag, reserved);
}

extern "C" grpc_event grpc_completion_queue_next(grpc_completion_queue* cq,
                                                 gpr_timespec deadline,
                                                 void* reserved) {
  using F = grpc_event (*)(grpc_completion_queue*, gpr_timespec, void*);
  const grpc_event e =
      LG_REAL(F, "grpc_completion_queue_next")(cq, deadline, reserved);
  if (e.type == GRPC_OP_COMPLETE && e.tag != nullptr) __tsan_acquire(e.tag);
  return e;
}

extern "C" grpc_event grpc_completion_queue_pluck(grpc_completion_queue* cq,
                                                  void* tag,
                                                  gpr_timespec deadline,
                                                  void* reserved) {
  using F = grpc_event (*)(grpc_completion_queue*, void*, gpr_timespec, void*);
  const grpc_event e =
      LG_REAL(F, "grpc_completion_queue_pluck")(cq, tag, deadline, reserved);
  if (e.type == GRPC_OP_COMPLETE && e.tag != nullptr) __tsan_acquire(e.tag);
  return e;
}

// The callback API: gRPC core runs the tag's functor_run, which
// CallbackWithSuccessTag::Set() points at its StaticRun (an inline function,
// so this strong definition replaces every copy). Same body as grpcpp's,
// after the acquire.
extern "C" void LgCallbackStaticRun(grpc_completion_queue_functor* cb, int ok)
    __asm__("_ZN4grpc8internal22CallbackWithSuccessTag9StaticRunEP29grpc_completion_queue_functori");
extern "C" void LgCallbackStaticRun(grpc_completion_queue_functor* cb,
                                    int ok) {
  __tsan_acquire(cb);
  static_cast<grpc::internal::CallbackWithSuccessTag*>(cb)->force_run(ok != 0);
}

// A server call's OnDone runs once its last callback has dropped its
// reference (ServerCallbackCall::callbacks_outstanding_, an atomic whose
// decrement is inline, so instrumented where our code does it but not where
// libgrpc++ does): ScheduleOnDone, called by the last one, acquires what the
// other callbacks released there; gRPC's executor (abseil mutexes) then
// carries it to the thread that runs OnDone.
namespace {
struct ServerCallbackCallLayout {  // grpcpp/support/server_callback.h
  void* vptr;
  std::atomic_int on_cancel_conditions_remaining;
  std::atomic_int callbacks_outstanding;
};
static_assert(sizeof(ServerCallbackCallLayout) ==
              sizeof(grpc::internal::ServerCallbackCall));
}  // namespace

extern "C" void LgScheduleOnDone(void* call, bool inline_ondone)
    __asm__("_ZN4grpc8internal18ServerCallbackCall14ScheduleOnDoneEb");
extern "C" void LgScheduleOnDone(void* call, bool inline_ondone) {
  using F = void (*)(void*, bool);
  __tsan_acquire(&static_cast<ServerCallbackCallLayout*>(call)
                      ->callbacks_outstanding);
  LG_REAL(F, "_ZN4grpc8internal18ServerCallbackCall14ScheduleOnDoneEb")(
      call, inline_ondone);
}

// OnCancel: libgrpc++ runs the reactor's OnCancel (on an executor thread)
// and then drops the call's reference itself, uninstrumented. The reactor is
// handed to it wrapped, so that what OnCancel did is released on the
// reference count, which ScheduleOnDone acquires (OnDone may free what
// OnCancel used: gRPC runs OnDone after OnCancel has returned).
namespace {
class CancelProxy final : public grpc::internal::ServerReactor {
 public:
  CancelProxy(grpc::internal::ServerReactor* reactor, void* call)
      : reactor_(reactor), call_(static_cast<ServerCallbackCallLayout*>(call)) {}
  void OnDone() override {}  // never called: only CallOnCancel sees it
  void OnCancel() override {
    reactor_->OnCancel();
    __tsan_release(&call_->callbacks_outstanding);
    delete this;
  }
  bool InternalInlineable() override { return reactor_->InternalInlineable(); }

 private:
  grpc::internal::ServerReactor* const reactor_;
  ServerCallbackCallLayout* const call_;
};
}  // namespace

extern "C" void LgCallOnCancel(void* call,
                               grpc::internal::ServerReactor* reactor)
    __asm__("_ZN4grpc8internal18ServerCallbackCall12CallOnCancelEPNS0_13ServerReactorE");
extern "C" void LgCallOnCancel(void* call,
                               grpc::internal::ServerReactor* reactor) {
  using F = void (*)(void*, grpc::internal::ServerReactor*);
  LG_REAL(F, "_ZN4grpc8internal18ServerCallbackCall12CallOnCancelEPNS0_13ServerReactorE")(
      call, new CancelProxy(reactor, call));
}

// Every call of a server, its reactor's OnDone() included, happens before
// grpc::Server::Wait() returns: the handler runs OnDone, grpc_call_unref,
// then drops the server's reference (an atomic counter in libgrpc++).
extern "C" void grpc_call_unref(grpc_call* call) {
  using F = void (*)(grpc_call*);
  __tsan_release(&calls_done);
  LG_REAL(F, "grpc_call_unref")(call);
}

// grpc::Server::Wait(), called through its vtable, which libgrpc++ fills by
// symbol: this definition is the one called.
extern "C" void LgGrpcServerWait(void* server) __asm__("_ZN4grpc6Server4WaitEv");
extern "C" void LgGrpcServerWait(void* server) {
  using F = void (*)(void*);
  LG_REAL(F, "_ZN4grpc6Server4WaitEv")(server);
  __tsan_acquire(&calls_done);
}
