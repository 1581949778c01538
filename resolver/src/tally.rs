//! Counters that every thread adds to in cache lines of its own, summed when read.
//!
//! A shared atomic counter is one cache line that every core writing it must own in turn:
//! with many workers counting the same event, the line moves between cores on every
//! increment. Here each thread owns a table of cells (allocated on its first increment and
//! never written by another thread), a counter is an index into every table, and reading a
//! counter sums its cell over the tables. An increment is a relaxed load and store to the
//! thread's own memory, no read-modify-write.
//!
//! Tables outlive their threads (a counter never goes down): a thread that exits hands its
//! table to the next thread that starts counting, which continues from its values.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Aligns (and pads) `T` to 128 bytes: two 64-byte lines, since x86 prefetches lines in
/// adjacent pairs. Nothing else shares a cache line with it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Cells per chunk of a thread's table.
const CHUNK: usize = 512;
/// Chunks per table: counters that can have per-thread cells, over the whole process.
const CHUNKS: usize = 128;
/// Indices at or above this count in the counter's shared overflow cell instead.
const CAPACITY: usize = CHUNK * CHUNKS;

type Chunk = CachePadded<[AtomicU64; CHUNK]>;

/// One thread's cells: chunks allocated on first use, written by their owner only.
#[derive(Debug)]
struct Table {
    chunks: Box<CachePadded<[OnceLock<Box<Chunk>>; CHUNKS]>>,
}

impl Table {
    fn new() -> Self {
        Table {
            chunks: Box::new(CachePadded(std::array::from_fn(|_| OnceLock::new()))),
        }
    }

    /// Adds one to cell `i`; the caller is this table's owner (the only writer).
    #[inline]
    fn inc(&self, i: usize) {
        let chunk = self.chunks[i / CHUNK]
            .get_or_init(|| Box::new(CachePadded(std::array::from_fn(|_| AtomicU64::new(0)))));
        let cell = &chunk[i % CHUNK];
        cell.store(
            cell.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }

    fn get(&self, i: usize) -> u64 {
        self.chunks[i / CHUNK]
            .get()
            .map_or(0, |c| c[i % CHUNK].load(Ordering::Relaxed))
    }
}

/// Every table ever made, and those whose thread has exited (free for the next thread).
struct Tables {
    all: Vec<Arc<Table>>,
    free: Vec<Arc<Table>>,
}

static TABLES: Mutex<Tables> = Mutex::new(Tables {
    all: Vec::new(),
    free: Vec::new(),
});

fn tables() -> MutexGuard<'static, Tables> {
    TABLES.lock().unwrap_or_else(|e| e.into_inner())
}

static NEXT_INDEX: AtomicUsize = AtomicUsize::new(0);

/// The current thread's table, held until the thread exits.
struct Local(Arc<Table>);

impl Local {
    fn claim() -> Self {
        let mut t = tables();
        let table = t.free.pop().unwrap_or_else(|| {
            let table = Arc::new(Table::new());
            t.all.push(table.clone());
            table
        });
        Local(table)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // The lock orders this thread's last stores before the next owner's first.
        tables().free.push(self.0.clone());
    }
}

thread_local! {
    static LOCAL: Local = Local::claim();
}

/// A monotonic counter with one cell per thread.
#[derive(Debug)]
pub struct ThreadCounter {
    index: usize,
    /// Increments that cannot use a thread's table: past [`CAPACITY`] counters, or from a
    /// thread whose thread-locals are being destroyed.
    overflow: AtomicU64,
}

impl Default for ThreadCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl ThreadCounter {
    pub fn new() -> Self {
        ThreadCounter {
            index: NEXT_INDEX.fetch_add(1, Ordering::Relaxed),
            overflow: AtomicU64::new(0),
        }
    }

    /// Adds one, in the calling thread's own cell.
    #[inline]
    pub fn inc(&self) {
        if self.index >= CAPACITY || LOCAL.try_with(|l| l.0.inc(self.index)).is_err() {
            self.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sum over every thread.
    pub fn get(&self) -> u64 {
        let mut n = self.overflow.load(Ordering::Relaxed);
        if self.index < CAPACITY {
            for t in &tables().all {
                n = n.wrapping_add(t.get(self.index));
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increments_from_many_threads_are_summed() {
        let c = Arc::new(ThreadCounter::new());
        let other = ThreadCounter::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..1000).for_each(|_| c.inc()));
            }
        });
        c.inc();
        assert_eq!(c.get(), 4001);
        assert_eq!(other.get(), 0);
    }

    #[test]
    fn a_table_keeps_its_counts_after_its_thread_exits() {
        let c = ThreadCounter::new();
        for _ in 0..3 {
            std::thread::scope(|s| {
                s.spawn(|| c.inc());
            });
        }
        assert_eq!(c.get(), 3);
    }

    #[test]
    fn counters_past_the_capacity_still_count() {
        let c = ThreadCounter {
            index: CAPACITY,
            overflow: AtomicU64::new(0),
        };
        c.inc();
        c.inc();
        assert_eq!(c.get(), 2);
    }

    #[test]
    fn padded_values_own_their_lines() {
        assert_eq!(std::mem::align_of::<CachePadded<AtomicU64>>(), 128);
        assert_eq!(std::mem::size_of::<CachePadded<AtomicU64>>(), 128);
    }
}
