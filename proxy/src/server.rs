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

/// Picks the driver; `auto` probes the kernel for the io_uring ops monoio needs.
pub fn resolve_driver(d: IoDriver) -> Result<Driver, String> {
    let uring_ok = monoio::utils::detect_uring();
    match d {
        IoDriver::Epoll => Ok(Driver::Epoll),
        IoDriver::Uring if uring_ok => Ok(Driver::Uring),
        IoDriver::Uring => Err(
            "--io-driver=uring was requested but this kernel does not offer io_uring (too old, or disabled by kernel.io_uring_disabled or seccomp); use --io-driver=epoll or auto.".into(),
        ),
        IoDriver::Auto => Ok(if uring_ok { Driver::Uring } else { Driver::Epoll }),
    }
}

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Required by monoio's epoll driver (a blocking listener would block the thread).
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
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

fn run_worker(l: std::net::TcpListener, shared: Arc<Shared>, driver: Driver, admin_only: bool) {
    let result = match driver {
        Driver::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(1024)
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(accept_loop(l, shared, admin_only))),
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
                    if worker.open_connections() >= max {
                        worker.metrics.connections_rejected.inc();
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(conn::serve(stream, peer.ip().to_canonical(), worker.clone()));
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
