//! Listeners and worker threads: one monoio runtime per worker, each with its own
//! SO_REUSEPORT listener per address family (IPv4, and IPv6 with `--ipv6`), io_uring or
//! epoll. One worker per core serves both families.
//!
//! - [`listen`]: the sockets and opening them (or taking them over);
//! - [`runtime`]: the driver, the worker threads and their runtimes;
//! - [`accept`]: the accept loop and admission;
//! - [`tasks`]: the connection tasks, reused from one connection to the next.

mod accept;
mod listen;
mod runtime;
mod tasks;

pub use listen::{ListenError, Opened, bind, bind_v4, bind_v6, open, per_worker};
pub use runtime::{
    Driver, NoUring, join, register_driver_metric, resolve_driver, spawn, spawn_all,
};
