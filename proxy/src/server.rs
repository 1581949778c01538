//! Listeners and worker threads: one monoio runtime per worker, each with its own
//! SO_REUSEPORT listener per address family (IPv4, and IPv6 with `--ipv6`), io_uring or
//! epoll. One worker per core serves both families.

use crate::args::IoDriver;
use crate::conn;
use crate::worker::{Shared, Worker};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use thiserror::Error;

/// `--io-driver=uring` on a kernel without it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "--io-driver=uring was requested but this kernel does not offer io_uring (too old, or disabled by kernel.io_uring_disabled or seccomp); use --io-driver=epoll or auto."
)]
pub struct NoUring;

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
/// Without it every completion interrupts the worker through task_work, and io_uring serves
/// fewer requests per second than epoll at more CPU per request (loadtest/RESULTS.md).
pub fn resolve_driver(d: IoDriver) -> Result<Driver, NoUring> {
    let uring_ok = monoio::utils::detect_uring();
    match d {
        IoDriver::Epoll => Ok(Driver::Epoll),
        IoDriver::Uring if uring_ok => Ok(Driver::Uring),
        IoDriver::Uring => Err(NoUring),
        IoDriver::Auto if !uring_ok => {
            // Container runtimes' default seccomp profiles (Docker, containerd, podman) block
            // io_uring: say so once, so a slower node is explained by its log.
            tracing::info!(
                driver = "epoll",
                "io_uring unavailable (blocked by seccomp, disabled by kernel.io_uring_disabled, or the kernel is too old): serving on epoll"
            );
            Ok(Driver::Epoll)
        }
        IoDriver::Auto if !uring_fast() => {
            tracing::info!(
                driver = "epoll",
                "io_uring without COOP_TASKRUN (Linux before 5.19) is slower than epoll: serving on epoll"
            );
            Ok(Driver::Epoll)
        }
        IoDriver::Auto => Ok(Driver::Uring),
    }
}

/// `iamlet_io_driver_info{driver="uring"|"epoll"} 1`: the driver the workers run on.
pub fn register_driver_metric(registry: &mut prometheus_client::registry::Registry, d: Driver) {
    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct DriverLabel {
        driver: &'static str,
    }
    let family = prometheus_client::metrics::family::Family::<
        DriverLabel,
        prometheus_client::metrics::gauge::Gauge,
    >::default();
    family
        .get_or_create(&DriverLabel {
            driver: match d {
                Driver::Uring => "uring",
                Driver::Epoll => "epoll",
            },
        })
        .set(1);
    registry.sub_registry_with_prefix("iamlet").register(
        "io_driver_info",
        "The I/O driver the workers run on (1 for the one in use)",
        family,
    );
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

/// `count` SO_REUSEPORT listeners on `[::]:port`, IPv6 only (the IPv4 listeners serve
/// IPv4), for `--ipv6`.
pub fn bind_v6(port: u16, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let one = |port: u16| -> std::io::Result<std::net::TcpListener> {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        s.set_only_v6(true)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    let first = one(port)?;
    let bound = first.local_addr()?.port();
    let mut all = vec![first];
    for _ in 1..count.max(1) {
        all.push(one(bound)?);
    }
    Ok(all)
}

/// `0.0.0.0:port`, `count` listeners.
pub fn bind_v4(port: u16, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), count)
}

/// Spawns one named worker thread per entry; each worker accepts on every listener of its
/// entry (one per address family).
pub fn spawn(
    name: &str,
    per_worker: Vec<Vec<std::net::TcpListener>>,
    shared: Arc<Shared>,
    driver: Driver,
    admin_only: bool,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    per_worker
        .into_iter()
        .enumerate()
        .map(|(id, ls)| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{id}"))
                .spawn(move || run_worker(ls, shared, driver, admin_only))
        })
        .collect()
}

/// Spawns the app workers and, with its own listener, the admin worker.
pub fn spawn_all(
    app: Vec<Vec<std::net::TcpListener>>,
    admin: Option<Vec<std::net::TcpListener>>,
    shared: &Arc<Shared>,
    driver: Driver,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut threads = spawn("iamlet-worker", app, shared.clone(), driver, false)?;
    if let Some(admin) = admin {
        let bound = admin[0].local_addr()?;
        threads.extend(spawn(
            "iamlet-admin",
            vec![admin],
            shared.clone(),
            driver,
            true,
        )?);
        tracing::info!(addr = %bound, "admin listening");
    }
    Ok(threads)
}

/// Pairs the n-th listener of each family, so that worker n accepts on both (`open` binds
/// as many IPv6 listeners as IPv4 ones).
pub fn per_worker(
    v4: Vec<std::net::TcpListener>,
    v6: Option<Vec<std::net::TcpListener>>,
) -> Vec<Vec<std::net::TcpListener>> {
    let mut v6 = v6.unwrap_or_default().into_iter();
    let paired = v4
        .into_iter()
        .map(|l| std::iter::once(l).chain(v6.next()).collect())
        .collect();
    debug_assert!(v6.next().is_none(), "an IPv6 listener without a worker");
    paired
}

/// An io_uring setup: its name (logged) and the flags it sets on the builder.
type UringSetup = (&'static str, fn(&mut io_uring::Builder));

/// io_uring setups, best first. With the kernel's default setup, a completion that arrives
/// for a worker is delivered as task_work with a signal-style notification, so a busy worker
/// spends its time in spin-lock slow paths under `io_run_task_work` and `get_signal` and pays
/// more CPU per request than epoll (perf profiles in loadtest/RESULTS.md). DEFER_TASKRUN
/// (Linux 6.1+; needs SINGLE_ISSUER, which holds: only this thread touches its ring) queues
/// completions on a lock-free list that the worker drains when it enters the ring to wait;
/// COOP_TASKRUN (5.19+) drops the interrupt; either brings io_uring to epoll's CPU per
/// request. Kernels that refuse a flag (EINVAL) get the next setup.
const URING_SETUPS: [UringSetup; 3] = [
    ("defer_taskrun", |b| {
        b.setup_single_issuer().setup_defer_taskrun();
    }),
    ("coop_taskrun", |b| {
        b.setup_coop_taskrun();
    }),
    ("default", |_| {}),
];

fn run_worker(
    ls: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    driver: Driver,
    admin_only: bool,
) {
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
            let s = shared.clone();
            built.map(|mut rt| rt.block_on(worker_main(ls, s, admin_only)))
        }
        Driver::Epoll => {
            let s = shared.clone();
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .map(|mut rt| rt.block_on(worker_main(ls, s, admin_only)))
        }
    };
    if let Err(e) = result {
        shared.fail(format!(
            "the {driver} runtime of a worker failed to start: {e}"
        ));
    }
}

/// How often a worker looks for connections waiting in its listener's queue while
/// `Shared::sweeping` is set.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

enum Step {
    Accepted(std::io::Result<(monoio::net::TcpStream, SocketAddr)>),
    Sweep,
    Stop,
}

/// Accepts, without waiting, whatever is queued on the listener. Right after a listener
/// handover the previous process cancels its pending accepts on the same sockets; an
/// io_uring accept wakes one waiter per connection, and a wake-up taken by an accept being
/// cancelled can leave a connection queued with no waiter woken for it (until the next
/// connection arrives, which may never come from a client waiting on this one).
fn sweep(worker: &Rc<Worker>, listener: &std::net::TcpListener, max: usize) {
    for _ in 0..1024 {
        let Ok((s, peer)) = listener.accept() else {
            return;
        };
        let stream = s
            .set_nonblocking(true)
            .and_then(|()| monoio::net::TcpStream::from_std(s));
        if let Ok(stream) = stream {
            admit(worker, stream, peer, max);
        }
    }
}

/// Takes an accepted connection, or closes it at once when its source is at its cap, it is a
/// stranger (not a known pod) and the strangers' share is taken, or the worker is full of
/// pods' busy connections.
fn admit(worker: &Rc<Worker>, stream: monoio::net::TcpStream, peer: SocketAddr, max: usize) {
    worker.metrics.connections.inc();
    let ip = peer.ip().to_canonical();
    // One source may not hold every slot: past its cap it is refused, and the others keep
    // theirs.
    let Some(permit) = worker.shared.sources.try_acquire(ip) else {
        worker.metrics.rejected_per_source.inc();
        return;
    };
    // The admin listener answers anyone (kubelet probes, Prometheus); on the app port a
    // source that is not a known pod draws on a small share of its own, so a burst from
    // anywhere that reaches the port never takes the slots pods need.
    let stranger = !worker.admin_only && !worker.is_known(&ip);
    if stranger && worker.stranger_connections() >= worker.shared.limits.max_stranger_connections {
        worker.metrics.rejected_strangers.inc();
        return;
    }
    // At the worker's cap one connection makes room: a stranger's first (waiting for its
    // address or not), then the keep-alive idle the longest. A newcomer is refused only when
    // every connection is a pod's, busy with a request.
    if worker.live_connections() >= max {
        if worker.evict_one(stranger) {
            worker.metrics.connections_evicted.inc();
        } else {
            worker.metrics.rejected_worker_full.inc();
            return;
        }
    }
    let tracked = worker.track(stream.as_raw_fd(), stranger);
    monoio::spawn(conn::serve(stream, ip, stranger, tracked, permit));
}

/// One worker: an accept loop per listener on one runtime, then the graceful stop.
async fn worker_main(ls: Vec<std::net::TcpListener>, shared: Arc<Shared>, admin_only: bool) {
    let worker = Rc::new(Worker::new(shared, admin_only));
    let loops: Vec<_> = ls
        .into_iter()
        .map(|l| monoio::spawn(accept_loop(l, worker.clone())))
        .collect();
    for l in loops {
        l.await;
    }
    // Graceful stop: no more accepts; idle keep-alive connections are closed, busy ones
    // finish their answer, bounded by --shutdown-grace.
    worker.close_reads();
    let deadline = std::time::Instant::now() + worker.shared.shutdown_grace;
    while worker.unfinished_connections() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn accept_loop(l: std::net::TcpListener, worker: Rc<Worker>) {
    // A non-blocking handle on the same socket for sweeps (see `Shared::sweeping`).
    let sweeper = l
        .try_clone()
        .and_then(|d| d.set_nonblocking(true).map(|()| d));
    let listener = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            worker.shared.fail(format!(
                "cannot register a listener with the worker's runtime: {e}"
            ));
            return;
        }
    };
    let max = worker.shared.limits.max_connections;
    let mut stop = std::pin::pin!(stopped(worker.clone()));
    {
        // One accept in flight at a time, kept across sweeps: dropping it would cancel it. The
        // next one takes the same pinned slot, and one canceller serves them all (it is only
        // used at the stop), so an accepted connection allocates nothing here.
        let canceller = monoio::io::Canceller::new();
        let mut accept = std::pin::pin!(listener.cancelable_accept(canceller.handle()));
        loop {
            let step = if worker
                .shared
                .sweeping
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                monoio::select! {
                    a = &mut accept => Step::Accepted(a),
                    _ = &mut stop => Step::Stop,
                    _ = monoio::time::sleep(SWEEP_EVERY) => Step::Sweep,
                }
            } else {
                monoio::select! {
                    a = &mut accept => Step::Accepted(a),
                    _ = &mut stop => Step::Stop,
                }
            };
            match step {
                Step::Accepted(a) => {
                    accept.set(listener.cancelable_accept(canceller.handle()));
                    match a {
                        Ok((stream, peer)) => admit(&worker, stream, peer, max),
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            monoio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    }
                }
                Step::Sweep => {
                    if let Ok(s) = &sweeper {
                        sweep(&worker, s, max);
                    }
                }
                Step::Stop => {
                    // Cancelled, then awaited: an accept the kernel already completed yields its
                    // connection, which is served (dropping it would reset a client).
                    let _ = canceller.cancel();
                    if let Ok((stream, peer)) = accept.await {
                        admit(&worker, stream, peer, max);
                    }
                    break;
                }
            }
        }
    }
    drop(listener);
    // The socket must stop listening with the workers, not linger on a spare handle.
    drop(sweeper);
}

/// Resolves once the process is stopping. Checks a flag every 50 ms: one timer per worker
/// for its whole life, nothing per connection or request.
async fn stopped(worker: Rc<Worker>) {
    while !worker.stopping() {
        monoio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A listener could not be opened.
#[derive(Debug, Error)]
pub enum ListenError {
    #[error(transparent)]
    InUse(#[from] iamlet_node::port::PortInUse),
    #[error("cannot listen on {flag} {port}: {error}")]
    Bind {
        flag: &'static str,
        port: u16,
        error: std::io::Error,
    },
    #[error("cannot copy the listening sockets for the next iamlet: {0}")]
    Dup(std::io::Error),
    #[error("cannot read the listener's address: {0}")]
    Address(std::io::Error),
}

impl ListenError {
    fn bind(e: std::io::Error, port: u16, flag: &'static str) -> ListenError {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            ListenError::InUse(iamlet_node::port::PortInUse {
                port,
                flag,
                holders: iamlet_node::port::holder_of(port),
            })
        } else {
            ListenError::Bind {
                flag,
                port,
                error: e,
            }
        }
    }
}

/// The agent's listening sockets.
#[derive(Debug)]
pub struct Opened {
    /// Per worker: IPv4, and IPv6 with `--ipv6`.
    pub app: Vec<Vec<std::net::TcpListener>>,
    pub app_addr: SocketAddr,
    /// The separate admin listener (`--metrics-port`), if any.
    pub admin: Option<Vec<std::net::TcpListener>>,
    /// Copies, for handing them to the next iamlet.
    pub offered: crate::handover::Listeners,
}

/// Opens the listeners: the running iamlet's own (`taken`, an upgrade), else ours, bound now.
pub fn open(
    config: &crate::config::Config,
    taken: Option<crate::handover::Listeners>,
) -> Result<Opened, ListenError> {
    let (app_port, metrics_port, workers) = (
        config.args.node.app_port,
        config.metrics_port,
        config.workers,
    );
    let (app, taken_admin) = match taken {
        Some(l) => {
            tracing::info!(
                app = l.app.len(),
                admin = l.admin.len(),
                "handover: took the running iamlet's listening sockets; it serves until this one is ready"
            );
            (l.app, Some(l.admin).filter(|a| !a.is_empty()))
        }
        None => {
            // A listener with SO_REUSEPORT (ours have it) would silently share the port
            // with another process.
            iamlet_node::port::check_not_shared(app_port, "--app-port")?;
            iamlet_node::port::check_not_shared(metrics_port, "--metrics-port")?;
            let app = bind_v4(app_port, workers)
                .map_err(|e| ListenError::bind(e, app_port, "--app-port"))?;
            (app, None)
        }
    };
    let app_addr = app[0].local_addr().map_err(ListenError::Address)?;
    let app6 = if config.args.node.ipv6 {
        Some(
            bind_v6(app_addr.port(), app.len())
                .map_err(|e| ListenError::bind(e, app_addr.port(), "--app-port"))?,
        )
    } else {
        None
    };
    let admin = match taken_admin {
        Some(l) if config.separate_admin => Some(l),
        _ if config.separate_admin => Some(
            bind_v4(metrics_port, 1)
                .map_err(|e| ListenError::bind(e, metrics_port, "--metrics-port"))?,
        ),
        _ => None,
    };
    let dup = |ls: &[std::net::TcpListener]| -> Result<Vec<_>, ListenError> {
        ls.iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<std::io::Result<_>>()
            .map_err(ListenError::Dup)
    };
    let offered = crate::handover::Listeners {
        app: dup(&app)?,
        admin: admin.as_deref().map(dup).transpose()?.unwrap_or_default(),
    };
    Ok(Opened {
        app: per_worker(app, app6),
        app_addr,
        admin,
        offered,
    })
}

/// Waits for the worker threads to end, at most `bound`; false when they did not.
pub fn join(threads: Vec<JoinHandle<()>>, bound: std::time::Duration) -> bool {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let joiner = std::thread::Builder::new().name("iamlet-join".into());
    // Not spawned (no threads left to make): the wait below runs out, as for a hung worker.
    let _ = joiner.spawn(move || {
        threads.into_iter().for_each(|t| drop(t.join()));
        let _ = done_tx.send(());
    });
    done_rx.recv_timeout(bound).is_ok()
}
