//! Runtimes: the I/O driver (io_uring or epoll), one monoio runtime per worker thread,
//! spawning them and joining them.

use super::accept::worker_main;
use crate::args::IoDriver;
use crate::worker::Shared;
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
        shared.life.fail(format!(
            "the {driver} runtime of a worker failed to start: {e}"
        ));
    }
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
