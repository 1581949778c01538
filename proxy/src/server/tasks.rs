//! Connection tasks, reused. SDKs open a connection per request, so a task spawned per
//! accepted connection would be an allocation (the task and its future) per request. A task
//! whose connection ends waits here for the next one instead, up to [`MAX_IDLE`] per worker;
//! a new task is spawned only when none is waiting, so a steady load of new connections
//! allocates nothing once its concurrency has been reached.

use crate::conn;
use crate::fairness::SourcePermit;
use crate::worker::ConnGuard;
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Most tasks a worker keeps waiting for a connection. Each holds its future's state (a few
/// KiB), so a burst of thousands of connections leaves at most this many behind.
pub const MAX_IDLE: usize = 64;

/// What a connection task serves.
pub trait Served: 'static {
    fn serve(self) -> impl std::future::Future<Output = ()>;
}

/// An admitted connection, what [`conn::serve`] takes.
pub struct Admitted {
    pub stream: TcpStream,
    pub ip: IpAddr,
    pub stranger: bool,
    pub tracked: ConnGuard,
    pub permit: SourcePermit,
}

impl Served for Admitted {
    async fn serve(self) {
        conn::serve(
            self.stream,
            self.ip,
            self.stranger,
            self.tracked,
            self.permit,
        )
        .await
    }
}

/// Where a waiting task is handed its next connection; made once per task.
struct Handoff<C> {
    next: RefCell<Option<C>>,
    waker: Cell<Option<Waker>>,
    /// The worker is stopping: the task ends instead of waiting.
    closed: Cell<bool>,
}

/// One worker's waiting tasks.
pub struct Tasks<C> {
    idle: RefCell<Vec<Rc<Handoff<C>>>>,
    closed: Cell<bool>,
}

impl<C> Default for Tasks<C> {
    fn default() -> Self {
        Tasks {
            idle: RefCell::new(Vec::new()),
            closed: Cell::new(false),
        }
    }
}

impl<C: Served> Tasks<C> {
    /// Serves `c` on a waiting task, or on a new one when none waits.
    pub fn serve(self: &Rc<Self>, c: C) {
        let waiting = self.idle.borrow_mut().pop();
        match waiting {
            Some(h) => {
                *h.next.borrow_mut() = Some(c);
                if let Some(w) = h.waker.take() {
                    w.wake();
                }
            }
            None => {
                monoio::spawn(run(self.clone(), c));
            }
        }
    }

    /// Ends every waiting task, and lets no task wait from now on (the worker is stopping:
    /// a waiting task would outlive it).
    pub fn close(&self) {
        self.closed.set(true);
        for h in self.idle.borrow_mut().drain(..) {
            h.closed.set(true);
            if let Some(w) = h.waker.take() {
                w.wake();
            }
        }
    }

    /// Tasks waiting for a connection now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.idle.borrow().len()
    }
}

/// A connection task: serves `first`, then whatever connection it is handed next, until
/// none comes (too many wait already, or the worker stops).
async fn run<C: Served>(tasks: Rc<Tasks<C>>, first: C) {
    let handoff = Rc::new(Handoff {
        next: RefCell::new(None),
        waker: Cell::new(None),
        closed: Cell::new(false),
    });
    let mut next = Some(first);
    while let Some(c) = next.take() {
        c.serve().await;
        {
            let mut idle = tasks.idle.borrow_mut();
            if tasks.closed.get() || idle.len() >= MAX_IDLE {
                return;
            }
            idle.push(handoff.clone());
        }
        next = std::future::poll_fn(|cx| {
            if let Some(c) = handoff.next.borrow_mut().take() {
                return Poll::Ready(Some(c));
            }
            if handoff.closed.get() {
                return Poll::Ready(None);
            }
            handoff.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that is served until the test lets it go.
    struct Held(Rc<crate::notify::LocalNotify>, Rc<Cell<u32>>);

    impl Served for Held {
        async fn serve(self) {
            self.1.set(self.1.get() + 1);
            self.0.notified().await;
        }
    }

    /// Waits (a bounded number of turns of the runtime) until `cond` holds; panics with
    /// `what` if it never does. A task that wakes itself runs again before the others in
    /// monoio, so each turn is a zero-length timer, which lets every other ready task run.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            monoio::time::sleep(std::time::Duration::ZERO).await;
        }
        panic!("never: {what}");
    }

    #[test]
    fn a_finished_task_serves_the_next_connection_and_at_most_max_idle_wait() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(test());
    }

    async fn test() {
        let tasks: Rc<Tasks<Held>> = Rc::new(Tasks::default());
        let release = Rc::new(crate::notify::LocalNotify::default());
        let served = Rc::new(Cell::new(0));
        // One connection, then another after it: the second is served by the first's task
        // (one task alive and waiting after each, not two).
        for n in 1..=2 {
            tasks.serve(Held(release.clone(), served.clone()));
            until("the connection is served", || served.get() == n).await;
            assert_eq!(tasks.idle(), 0, "the task is busy with its connection");
            release.notify_all();
            until("its task waits for the next", || tasks.idle() == 1).await;
            // Each task holds the pool once.
            assert_eq!(Rc::strong_count(&tasks), 2, "one task in all");
        }
        // A burst: more connections at once than tasks may wait afterwards.
        let burst = MAX_IDLE + 10;
        for _ in 0..burst {
            tasks.serve(Held(release.clone(), served.clone()));
        }
        until("the burst is served", || served.get() as usize == 2 + burst).await;
        assert_eq!(Rc::strong_count(&tasks), 1 + burst, "a task per connection");
        release.notify_all();
        until("the burst's tasks are done", || {
            Rc::strong_count(&tasks) == 1 + MAX_IDLE
        })
        .await;
        assert_eq!(tasks.idle(), MAX_IDLE, "the rest ended");
        // The worker stops: every waiting task ends.
        tasks.close();
        until("every task ended", || Rc::strong_count(&tasks) == 1).await;
        assert_eq!(tasks.idle(), 0);
    }
}
