//! Bounded waits on state: the one way the rig and the tests wait for something to become
//! true. A wait polls its condition, returns as soon as it holds, and panics with a message
//! (and how long it waited) when the bound passes — it never goes on regardless.
//!
//! ```ignore
//! wait_until!(Duration::from_secs(5), rig.store()["pods"] == 2, "the second pod in the store");
//! let body = wait_until!(Duration::from_secs(5), {
//!     let r = rig.get(src, path);
//!     (r.status == 200).then_some(r.body)
//! });
//! ```

use std::time::{Duration, Instant};

/// How often a wait re-evaluates its condition: short enough that a test does not wait
/// noticeably after the state changed, long enough not to load a 2-core machine.
pub const POLL: Duration = Duration::from_millis(20);

/// What a wait's condition gives: `true`/`Some(v)`/`Ok(v)` end the wait with a value.
pub trait Ready {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

impl<T, E> Ready for Result<T, E> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self.ok()
    }
}

/// Evaluates `cond` every [`POLL`] until it is ready or `timeout` has passed (it is always
/// evaluated at least once, and once more at the deadline). `Err` carries the time waited.
pub fn poll<R: Ready>(
    timeout: Duration,
    mut cond: impl FnMut() -> R,
) -> Result<R::Value, Duration> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        if let Some(v) = cond().ready() {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(now - start);
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

/// Waits at most `$timeout` until `$cond` (an expression, re-evaluated each time: `bool`,
/// `Option<T>` or `Result<T, E>`) is ready, and yields its value; panics when the bound
/// passes, with the message (format arguments are evaluated only then) or the condition's
/// source text.
#[macro_export]
macro_rules! wait_until {
    ($timeout:expr, $cond:expr $(,)?) => {
        $crate::wait_until!($timeout, $cond, "{}", stringify!($cond))
    };
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        match $crate::wait::poll(timeout, || $cond) {
            Ok(v) => v,
            Err(waited) => panic!(
                "timed out after {:?} (bound {:?}) waiting for: {}",
                waited,
                timeout,
                format_args!($($msg)+)
            ),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_wait_returns_the_value_as_soon_as_it_is_ready() {
        let n = Cell::new(0);
        let v = wait_until!(Duration::from_secs(5), {
            n.set(n.get() + 1);
            (n.get() == 3).then_some("three")
        });
        assert_eq!((v, n.get()), ("three", 3));
        wait_until!(Duration::ZERO, true);
        let r: Result<u8, ()> = Ok(7);
        assert_eq!(wait_until!(Duration::ZERO, r), 7);
    }

    #[test]
    fn a_wait_that_never_holds_panics_with_its_message_after_the_bound() {
        let err = std::panic::catch_unwind(|| {
            wait_until!(Duration::from_millis(60), false, "the {} thing", "awaited")
        })
        .expect_err("must panic");
        let msg = err.downcast_ref::<String>().expect("a formatted message");
        assert!(msg.contains("waiting for: the awaited thing"), "{msg}");
        assert!(msg.contains("bound 60ms"), "{msg}");
    }

    #[test]
    fn the_condition_is_checked_once_more_at_the_deadline() {
        let n = Cell::new(0);
        let r = poll(Duration::ZERO, || {
            n.set(n.get() + 1);
            false
        });
        assert_eq!((r.is_err(), n.get()), (true, 1));
    }
}
