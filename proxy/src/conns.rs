//! A worker's open connections, ordered for eviction: when the worker is full, the first to go
//! is a connection from a source that was not a known pod when it connected (a stranger,
//! whether it waits for its address to become known or not), oldest first, then the pods'
//! keep-alive connection idle the longest. A pod's connection busy with a request is never
//! chosen. Every operation is O(1): a slab of entries threaded on one intrusive list per
//! class, in the order they joined it.

use std::os::fd::RawFd;

/// Eviction classes, first evicted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// From a source address that was not a known pod when accepted.
    Stranger = 0,
    /// A pod's keep-alive connection between requests.
    Idle = 1,
}

const CLASSES: [Class; 2] = [Class::Stranger, Class::Idle];
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Entry {
    fd: RawFd,
    stranger: bool,
    /// Waiting for the next request (or the first): what a graceful stop closes.
    idle: bool,
    evicted: bool,
    /// The list it is on, if any.
    on: Option<Class>,
    prev: u32,
    next: u32,
}

/// The table. Ids are slab indices, reused after [`ConnTable::remove`].
#[derive(Debug, Default)]
pub struct ConnTable {
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    heads: [u32; 2],
    tails: [u32; 2],
    lens: [usize; 2],
    open: usize,
    evicting: usize,
}

impl ConnTable {
    pub fn new() -> Self {
        ConnTable {
            heads: [NIL; 2],
            tails: [NIL; 2],
            ..Default::default()
        }
    }

    /// Tracks a new connection; a stranger is on the stranger list for its whole life.
    pub fn insert(&mut self, fd: RawFd, stranger: bool) -> u32 {
        let e = Entry {
            fd,
            stranger,
            idle: false,
            evicted: false,
            on: None,
            prev: NIL,
            next: NIL,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = Some(e);
                id
            }
            None => {
                self.entries.push(Some(e));
                (self.entries.len() - 1) as u32
            }
        };
        self.open += 1;
        if stranger {
            self.push(id, Class::Stranger);
        }
        id
    }

    pub fn remove(&mut self, id: u32) {
        self.unlink(id);
        if let Some(e) = self.entries[id as usize].take() {
            self.open -= 1;
            if e.evicted {
                self.evicting -= 1;
            }
            self.free.push(id);
        }
    }

    /// The connection waits for its next request (true) or has one in progress (false).
    pub fn set_idle(&mut self, id: u32, idle: bool) {
        let Some(e) = self.entry(id) else { return };
        e.idle = idle;
        let (stranger, evicted) = (e.stranger, e.evicted);
        if stranger || evicted {
            return;
        }
        self.unlink(id);
        if idle {
            self.push(id, Class::Idle);
        }
    }

    /// Picks the connection to close to make room, in class order (`for_stranger`: room for
    /// a stranger, which only another stranger makes), marks it evicted and returns its
    /// descriptor (the caller shuts it down; its task then ends and removes it).
    pub fn evict(&mut self, for_stranger: bool) -> Option<RawFd> {
        let classes = if for_stranger {
            &CLASSES[..1]
        } else {
            &CLASSES[..]
        };
        let class = *classes.iter().find(|&&c| self.heads[c as usize] != NIL)?;
        let id = self.heads[class as usize];
        self.unlink(id);
        let e = self.entry(id)?;
        e.evicted = true;
        let fd = e.fd;
        self.evicting += 1;
        Some(fd)
    }

    /// Open connections not already being closed to make room.
    pub fn live(&self) -> usize {
        self.open - self.evicting
    }

    pub fn open(&self) -> usize {
        self.open
    }

    /// Strangers open and not yet evicted.
    pub fn strangers(&self) -> usize {
        self.lens[Class::Stranger as usize]
    }

    /// Descriptors of the connections waiting for a request.
    pub fn idle_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.entries
            .iter()
            .flatten()
            .filter(|e| e.idle)
            .map(|e| e.fd)
    }

    fn entry(&mut self, id: u32) -> Option<&mut Entry> {
        self.entries.get_mut(id as usize)?.as_mut()
    }

    fn push(&mut self, id: u32, class: Class) {
        let c = class as usize;
        let tail = self.tails[c];
        if let Some(e) = self.entry(id) {
            e.on = Some(class);
            e.prev = tail;
            e.next = NIL;
        }
        match self.entry(tail) {
            Some(t) => t.next = id,
            None => self.heads[c] = id,
        }
        self.tails[c] = id;
        self.lens[c] += 1;
    }

    fn unlink(&mut self, id: u32) {
        let Some(e) = self.entry(id) else { return };
        let Some(class) = e.on.take() else { return };
        let (prev, next) = (e.prev, e.next);
        let c = class as usize;
        match self.entry(prev) {
            Some(p) => p.next = next,
            None => self.heads[c] = next,
        }
        match self.entry(next) {
            Some(n) => n.prev = prev,
            None => self.tails[c] = prev,
        }
        self.lens[c] -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_go_first_oldest_first_then_the_longest_idle() {
        let mut t = ConnTable::new();
        let idle_a = t.insert(10, false);
        let idle_b = t.insert(11, false);
        let busy = t.insert(12, false);
        let stranger = t.insert(13, true);
        let stranger_busy = t.insert(14, true);
        t.set_idle(idle_a, true);
        t.set_idle(idle_b, true);
        t.set_idle(stranger, true);
        assert_eq!(t.strangers(), 2);
        assert_eq!(t.evict(true), Some(13));
        assert_eq!(t.evict(false), Some(14), "a stranger goes even when busy");
        assert_eq!(
            t.evict(true),
            None,
            "a stranger never makes a pod's connection go"
        );
        assert_eq!(t.evict(false), Some(10), "idle the longest");
        assert_eq!(t.evict(false), Some(11));
        assert_eq!(
            t.evict(false),
            None,
            "a pod's busy connection is never evicted"
        );
        assert_eq!((t.open(), t.live()), (5, 1));
        for id in [idle_a, idle_b, stranger, stranger_busy] {
            t.remove(id);
        }
        assert_eq!((t.open(), t.live(), t.strangers()), (1, 1, 0));
        t.remove(busy);
        assert_eq!(t.open(), 0);
    }

    #[test]
    fn an_idle_connection_that_gets_a_request_leaves_the_idle_order() {
        let mut t = ConnTable::new();
        let a = t.insert(1, false);
        let b = t.insert(2, false);
        t.set_idle(a, true);
        t.set_idle(b, true);
        t.set_idle(a, false);
        t.set_idle(a, true);
        // a went idle again after b: b has been idle longer.
        assert_eq!(t.evict(false), Some(2));
        assert_eq!(t.evict(false), Some(1));
        assert_eq!(t.evict(false), None);
    }

    #[test]
    fn ids_are_reused_and_a_removed_entry_leaves_no_trace_in_the_order() {
        let mut t = ConnTable::new();
        let ids: Vec<_> = (0..4).map(|fd| t.insert(fd, fd % 2 == 0)).collect();
        t.remove(ids[0]);
        t.remove(ids[2]);
        assert_eq!(t.strangers(), 0);
        let again = t.insert(7, true);
        assert!(ids.contains(&again), "a freed slot is reused");
        assert_eq!(t.evict(false), Some(7));
        assert_eq!(t.idle_fds().count(), 0);
        t.set_idle(ids[1], true);
        assert_eq!(t.idle_fds().collect::<Vec<_>>(), vec![1]);
    }
}
