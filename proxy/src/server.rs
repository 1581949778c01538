//! Listeners and worker threads: one monoio runtime per worker, each with its own
//! SO_REUSEPORT listener, io_uring or epoll.

use crate::args::IoDriver;
use crate::conn;
use crate::worker::{Shared, Worker};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The driver actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Uring,
    Epoll,
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::Uring => "uring",
            Driver::Epoll => "epoll",
        })
    }
}

/// Picks the driver. `auto` takes io_uring only where it is at least as fast as epoll: the
/// kernel must offer the ops monoio needs and accept `IORING_SETUP_COOP_TASKRUN` (Linux 5.19+).
/// Without it every completion interrupts the worker through task_work, and io_uring served
/// ~28 % fewer requests per second than epoll at ~40 % more CPU per request (loadtest/RESULTS.md).
pub fn resolve_driver(d: IoDriver) -> Result<Driver, String> {
    let uring_ok = monoio::utils::detect_uring();
    match d {
        IoDriver::Epoll => Ok(Driver::Epoll),
        IoDriver::Uring if uring_ok => Ok(Driver::Uring),
        IoDriver::Uring => Err(
            "--io-driver=uring was requested but this kernel does not offer io_uring (too old, or disabled by kernel.io_uring_disabled or seccomp); use --io-driver=epoll or auto.".into(),
        ),
        IoDriver::Auto => Ok(if uring_ok && uring_fast() {
            Driver::Uring
        } else {
            Driver::Epoll
        }),
    }
}

/// Whether the kernel accepts the ring setup that makes io_uring competitive (see
/// [`URING_SETUPS`]): a probe ring with COOP_TASKRUN.
fn uring_fast() -> bool {
    io_uring::IoUring::<io_uring::squeue::Entry>::builder()
        .setup_coop_taskrun()
        .build(4)
        .is_ok()
}

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Required by monoio's epoll driver (a blocking listener would block the thread).
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    // Accept once the request's first bytes are there (a connection that sends nothing is
    // still accepted after about a second, and then meets the idle timeout).
    crate::sockopt::defer_accept(&s, 1)?;
    Ok(s.into())
}

/// Binds `count` SO_REUSEPORT listeners on one port (port 0 picks a free one for all).
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = listener(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(listener(bound)?);
    }
    Ok(all)
}

/// Spawns one named worker thread per listener.
pub fn spawn(
    name: &str,
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    driver: Driver,
    admin_only: bool,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    listeners
        .into_iter()
        .enumerate()
        .map(|(id, l)| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{id}"))
                .spawn(move || run_worker(l, shared, driver, admin_only))
        })
        .collect()
}

/// An io_uring setup: its name (logged) and the flags it sets on the builder.
type UringSetup = (&'static str, fn(&mut io_uring::Builder));

/// io_uring setups, best first. With the kernel's default setup, a completion that arrives
/// for a worker is delivered as task_work with a signal-style notification; under load the
/// worker spent ~18 % of its CPU in `__pv_queued_spin_lock_slowpath` under `io_run_task_work`
/// and `get_signal` (perf, loadtest/RESULTS.md) and used ~40 % more CPU per request than
/// epoll. DEFER_TASKRUN (Linux 6.1+; needs SINGLE_ISSUER, which holds: only this thread
/// touches its ring) queues completions on a lock-free list that the worker drains when it
/// enters the ring to wait; COOP_TASKRUN (5.19+) drops the interrupt. Both measured at epoll's
/// CPU per request. Kernels that refuse a flag (EINVAL) get the next setup.
const URING_SETUPS: [UringSetup; 3] = [
    ("defer_taskrun", |b| {
        b.setup_single_issuer().setup_defer_taskrun();
    }),
    ("coop_taskrun", |b| {
        b.setup_coop_taskrun();
    }),
    ("default", |_| {}),
];

fn run_worker(l: std::net::TcpListener, shared: Arc<Shared>, driver: Driver, admin_only: bool) {
    let result = match driver {
        Driver::Uring => {
            let mut built = Err(std::io::Error::other("no io_uring setup tried"));
            for (name, setup) in URING_SETUPS {
                let mut urb = io_uring::IoUring::<io_uring::squeue::Entry>::builder();
                setup(&mut urb);
                built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(1024)
                    .uring_builder(urb)
                    .enable_timer()
                    .build();
                match &built {
                    Ok(_) => {
                        tracing::debug!(setup = name, "io_uring ring built");
                        break;
                    }
                    Err(e) => tracing::debug!(setup = name, error = %e, "io_uring setup refused"),
                }
            }
            built.map(|mut rt| rt.block_on(accept_loop(l, shared, admin_only)))
        }
        Driver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(accept_loop(l, shared, admin_only))),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, %driver, "worker runtime failed to start");
        std::process::exit(1);
    }
}

async fn accept_loop(l: std::net::TcpListener, shared: Arc<Shared>, admin_only: bool) {
    let listener = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listener with the runtime");
            std::process::exit(1);
        }
    };
    let worker = Rc::new(Worker::new(shared, admin_only));
    let max = worker.shared.limits.max_connections;
    let mut stop = std::pin::pin!(stopped(worker.clone()));
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    worker.metrics.connections.inc();
                    let ip = peer.ip().to_canonical();
                    // One source may not hold every slot: past its cap it is refused, and
                    // the others keep theirs.
                    let Some(permit) = worker.shared.sources.try_acquire(ip) else {
                        worker.metrics.rejected_per_source.inc();
                        drop(stream);
                        continue;
                    };
                    // At the worker's cap, the connection idle the longest makes room: a
                    // newcomer is refused only when every connection is mid-request.
                    if worker.live_connections() >= max {
                        if worker.evict_idlest() {
                            worker.metrics.connections_evicted.inc();
                        } else {
                            worker.metrics.rejected_worker_full.inc();
                            drop(stream);
                            continue;
                        }
                    }
                    monoio::spawn(conn::serve(stream, ip, worker.clone(), permit));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    monoio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            _ = &mut stop => break,
        }
    }
    // Graceful stop: no more accepts; idle keep-alive connections are closed, busy ones
    // finish their answer, bounded by --shutdown-grace.
    drop(listener);
    worker.close_reads();
    let deadline = std::time::Instant::now() + worker.shared.shutdown_grace;
    while worker.open_connections() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Resolves once the process is stopping. Checks a flag every 50 ms: one timer per worker
/// for its whole life, nothing per connection or request.
async fn stopped(worker: Rc<Worker>) {
    while !worker.stopping() {
        monoio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
