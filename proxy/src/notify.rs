//! A wake-up for tasks of one worker (`!Send`): many tasks wait on one event and are woken
//! together, instead of each arming a wait of its own on a cross-thread primitive.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Tasks wait with [`LocalNotify::notified`]; [`LocalNotify::notify_all`] wakes every one
/// waiting at that moment.
#[derive(Debug, Default)]
pub struct LocalNotify {
    generation: Cell<u64>,
    /// Registered wakers by slot; a waiter keeps its slot, so re-polls replace, not grow.
    wakers: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl LocalNotify {
    /// Resolves at the next [`LocalNotify::notify_all`] after this call.
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            generation: self.generation.get(),
            slot: None,
        }
    }

    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        let woken: Vec<Waker> = self
            .wakers
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        woken.into_iter().for_each(Waker::wake);
    }

    /// Tasks waiting now.
    pub fn waiting(&self) -> usize {
        self.wakers.borrow().iter().filter(|w| w.is_some()).count()
    }
}

/// One wait on a [`LocalNotify`].
#[derive(Debug)]
pub struct Notified<'a> {
    notify: &'a LocalNotify,
    generation: u64,
    slot: Option<usize>,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let n = self.notify;
        if n.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut wakers = n.wakers.borrow_mut();
        let slot = match self.slot {
            Some(s) => s,
            None => {
                let s = n.free.borrow_mut().pop().unwrap_or_else(|| {
                    wakers.push(None);
                    wakers.len() - 1
                });
                self.slot = Some(s);
                s
            }
        };
        wakers[slot] = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            self.notify.wakers.borrow_mut()[s] = None;
            self.notify.free.borrow_mut().push(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once(f: Pin<&mut Notified<'_>>) -> Poll<()> {
        let mut cx = Context::from_waker(Waker::noop());
        f.poll(&mut cx)
    }

    #[test]
    fn every_waiter_wakes_on_one_notification_and_slots_are_reused() {
        let n = LocalNotify::default();
        let mut waits: Vec<_> = (0..3).map(|_| Box::pin(n.notified())).collect();
        for w in &mut waits {
            assert_eq!(poll_once(w.as_mut()), Poll::Pending);
            // A second poll replaces the waker in its slot.
            assert_eq!(poll_once(w.as_mut()), Poll::Pending);
        }
        assert_eq!(n.waiting(), 3);
        n.notify_all();
        assert_eq!(n.waiting(), 0);
        for w in &mut waits {
            assert_eq!(poll_once(w.as_mut()), Poll::Ready(()));
        }
        drop(waits);
        // A wait that starts after a notification waits for the next one, in a freed slot.
        let mut later = Box::pin(n.notified());
        assert_eq!(poll_once(later.as_mut()), Poll::Pending);
        assert_eq!(n.wakers.borrow().len(), 3, "no slot grows for a new waiter");
        n.notify_all();
        assert_eq!(poll_once(later.as_mut()), Poll::Ready(()));
    }
}
