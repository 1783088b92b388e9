//! A deterministic, single-threaded, virtual-time runtime for tests (feature `test-util`).
//!
//! [`SimRuntime::block_on`] runs a future together with every task spawned on the runtime. When
//! every task is idle, the clock jumps to the next timer deadline, so rules measured in hours run
//! in milliseconds of real time, and the same seed always gives the same jitter.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use cache_core::sim::SimRuntime;
//!
//! let sim = SimRuntime::new(7);
//! let start = sim.now();
//! sim.block_on(async {
//!     sim.sleep(Duration::from_secs(72 * 3600)).await;
//! });
//! assert_eq!(sim.now() - start, Duration::from_secs(72 * 3600));
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_task::Runnable;

use crate::runtime::{BoxFuture, Runtime, Sleep, Timer};

/// The virtual-time runtime. Cheap to clone; clones share one clock and run queue.
#[derive(Clone)]
pub struct SimRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    base: Instant,
    state: Mutex<State>,
}

struct State {
    elapsed: Duration,
    queue: VecDeque<Runnable>,
    timers: BTreeMap<(Instant, u64), Waker>,
    next_timer_id: u64,
    rng: fastrand::Rng,
    spawned: u64,
}

impl SimRuntime {
    /// A runtime at virtual time zero whose jitter comes from `seed`.
    pub fn new(seed: u64) -> Self {
        // The base is the only real clock reading; from here on time is virtual.
        #[allow(clippy::disallowed_methods)]
        let base = Instant::now();
        Self {
            inner: Arc::new(Inner {
                base,
                state: Mutex::new(State {
                    elapsed: Duration::ZERO,
                    queue: VecDeque::new(),
                    timers: BTreeMap::new(),
                    next_timer_id: 0,
                    rng: fastrand::Rng::with_seed(seed),
                    spawned: 0,
                }),
            }),
        }
    }

    /// This runtime as the shared handle the cache takes.
    pub fn handle(&self) -> Arc<dyn Runtime> {
        Arc::new(self.clone())
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.inner.now()
    }

    /// Virtual time elapsed since the runtime was created.
    pub fn elapsed(&self) -> Duration {
        self.inner.lock().elapsed
    }

    /// How many tasks have been spawned so far.
    pub fn spawned(&self) -> u64 {
        self.inner.lock().spawned
    }

    /// Timers currently armed (a leak check for tests).
    pub fn pending_timers(&self) -> usize {
        self.inner.lock().timers.len()
    }

    /// Spawns a detached task on this runtime.
    pub fn spawn_detached(&self, future: impl Future<Output = ()> + Send + 'static) {
        Runtime::spawn(self, Box::pin(future));
    }

    /// A future that completes after `duration` of virtual time.
    pub fn sleep(&self, duration: Duration) -> Sleep {
        Sleep::after(self, duration)
    }

    /// Runs `future` and every spawned task until `future` completes.
    ///
    /// # Panics
    ///
    /// Panics when `future` is still pending but no task can run and no timer is armed: nothing
    /// could ever wake it (a deadlock in the code under test).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let main_flag = Arc::new(MainFlag(AtomicBool::new(true)));
        let waker = Waker::from(main_flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut future = pin!(future);
        loop {
            if main_flag.0.swap(false, Ordering::SeqCst) {
                if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                    return output;
                }
            }
            self.run_ready(&main_flag);
            if main_flag.0.load(Ordering::SeqCst) {
                continue;
            }
            self.advance_to_next_timer();
        }
    }

    /// Runs queued tasks until the queue is empty or the main future was woken.
    fn run_ready(&self, main_flag: &MainFlag) {
        loop {
            let next = self.inner.lock().queue.pop_front();
            match next {
                Some(runnable) => {
                    runnable.run();
                }
                None => return,
            }
            if main_flag.0.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    fn advance_to_next_timer(&self) {
        let wakers: Vec<Waker> = {
            let mut state = self.inner.lock();
            if !state.queue.is_empty() {
                return;
            }
            let Some(&(deadline, _)) = state.timers.keys().next() else {
                drop(state);
                panic!("SimRuntime: every task is idle and no timer is armed (deadlock)");
            };
            let now = self.inner.base + state.elapsed;
            if deadline > now {
                state.elapsed = deadline - self.inner.base;
            }
            let now = self.inner.base + state.elapsed;
            let later = state.timers.split_off(&(now, u64::MAX));
            let due = std::mem::replace(&mut state.timers, later);
            due.into_values().collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }
}

impl Default for SimRuntime {
    fn default() -> Self {
        Self::new(0)
    }
}

impl fmt::Debug for SimRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimRuntime")
            .field("elapsed", &self.elapsed())
            .finish_non_exhaustive()
    }
}

impl Runtime for SimRuntime {
    fn spawn(&self, future: BoxFuture<'static, ()>) {
        let weak = Arc::downgrade(&self.inner);
        let schedule = move |runnable: Runnable| {
            if let Some(inner) = weak.upgrade() {
                inner.lock().queue.push_back(runnable);
            }
            // Otherwise the runtime is gone: dropping the runnable cancels the task.
        };
        let (runnable, task) = async_task::spawn(future, schedule);
        self.inner.lock().spawned += 1;
        task.detach();
        runnable.schedule();
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        Box::pin(SimTimer {
            sim: Arc::downgrade(&self.inner),
            deadline,
            registered: None,
        })
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn jitter(&self) -> f64 {
        self.inner.lock().rng.f64()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> Instant {
        self.base + self.lock().elapsed
    }
}

struct MainFlag(AtomicBool);

impl Wake for MainFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct SimTimer {
    sim: Weak<Inner>,
    deadline: Instant,
    registered: Option<(Instant, u64)>,
}

impl SimTimer {
    fn unregister(&mut self) {
        if let (Some(key), Some(sim)) = (self.registered.take(), self.sim.upgrade()) {
            let waker = sim.lock().timers.remove(&key);
            drop(waker);
        }
    }
}

impl fmt::Debug for SimTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTimer")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Timer for SimTimer {
    fn poll_elapsed(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(sim) = self.sim.upgrade() else {
            return Poll::Pending;
        };
        let mut state = sim.lock();
        if sim.base + state.elapsed >= self.deadline {
            if let Some(key) = self.registered.take() {
                let waker = state.timers.remove(&key);
                drop(state);
                drop(waker);
            }
            return Poll::Ready(());
        }
        let key = match self.registered {
            Some(key) if key.0 == self.deadline => key,
            previous => {
                if let Some(previous) = previous {
                    state.timers.remove(&previous);
                }
                state.next_timer_id += 1;
                (self.deadline, state.next_timer_id)
            }
        };
        let old = state.timers.insert(key, cx.waker().clone());
        drop(state);
        drop(old);
        self.registered = Some(key);
        Poll::Pending
    }

    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.unregister();
        self.deadline = deadline;
    }
}

impl Drop for SimTimer {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn clock_jumps_to_timers_in_order() {
        let sim = SimRuntime::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        for secs in [30u64, 10, 20] {
            let sim2 = sim.clone();
            let order = order.clone();
            sim.spawn(Box::pin(async move {
                sim2.sleep(Duration::from_secs(secs)).await;
                order.lock().unwrap().push((secs, sim2.elapsed()));
            }));
        }
        sim.block_on(sim.sleep(Duration::from_secs(100)));
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order,
            vec![
                (10, Duration::from_secs(10)),
                (20, Duration::from_secs(20)),
                (30, Duration::from_secs(30))
            ]
        );
        assert_eq!(sim.elapsed(), Duration::from_secs(100));
        assert_eq!(sim.pending_timers(), 0);
    }

    #[test]
    fn reset_timer_moves_deadline() {
        let sim = SimRuntime::new(1);
        sim.block_on(async {
            let mut sleep = sim.sleep(Duration::from_secs(3600));
            sleep.reset(sim.now() + Duration::from_secs(5));
            sleep.await;
        });
        assert_eq!(sim.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn dropped_timer_does_not_advance_clock() {
        let sim = SimRuntime::new(1);
        sim.block_on(async {
            drop(sim.sleep(Duration::from_secs(3600)));
            sim.sleep(Duration::from_secs(1)).await;
        });
        assert_eq!(sim.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn same_seed_same_jitter() {
        let a = SimRuntime::new(42);
        let b = SimRuntime::new(42);
        let xs: Vec<f64> = (0..5).map(|_| a.jitter()).collect();
        let ys: Vec<f64> = (0..5).map(|_| b.jitter()).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    #[should_panic(expected = "deadlock")]
    fn deadlock_is_reported() {
        // The main future waits on a channel nobody will ever send to.
        let sim = SimRuntime::new(1);
        let (_tx, rx) = futures::channel::oneshot::channel::<()>();
        let _ = sim.block_on(rx);
    }

    #[test]
    fn spawned_tasks_run_before_time_moves() {
        let sim = SimRuntime::new(1);
        let count = Arc::new(AtomicU32::new(0));
        for _ in 0..10 {
            let count = count.clone();
            sim.spawn(Box::pin(async move {
                count.fetch_add(1, Ordering::SeqCst);
            }));
        }
        sim.block_on(sim.sleep(Duration::from_millis(1)));
        assert_eq!(count.load(Ordering::SeqCst), 10);
        assert_eq!(sim.spawned(), 10);
    }
}
