//! Accepting: each worker's accept loop (with the lifecycle's tick: stop, and the sweep
//! after a handover), and admission of a new connection.

use super::tasks::{Admitted, Tasks};
use crate::worker::{Shared, Worker};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

/// How often an accept loop looks at the lifecycle: whether the process is stopping, and
/// whether to sweep its listener's queue (`Lifecycle::sweeping`). One timer per loop for its
/// whole life, nothing per connection.
const TICK: std::time::Duration = std::time::Duration::from_millis(50);

enum Step {
    Accepted(std::io::Result<(monoio::net::TcpStream, SocketAddr)>),
    Tick,
}

/// Accepts, without waiting, whatever is queued on the listener. Right after a listener
/// handover the previous process cancels its pending accepts on the same sockets; an
/// io_uring accept wakes one waiter per connection, and a wake-up taken by an accept being
/// cancelled can leave a connection queued with no waiter woken for it (until the next
/// connection arrives, which may never come from a client waiting on this one).
fn sweep(
    worker: &Rc<Worker>,
    tasks: &Rc<Tasks<Admitted>>,
    listener: &std::net::TcpListener,
    max: usize,
) {
    for _ in 0..1024 {
        let Ok((s, peer)) = listener.accept() else {
            return;
        };
        let stream = s
            .set_nonblocking(true)
            .and_then(|()| monoio::net::TcpStream::from_std(s));
        if let Ok(stream) = stream {
            admit(worker, tasks, stream, peer, max);
        }
    }
}

/// Takes an accepted connection, or closes it at once when its source is at its cap, it is a
/// stranger (not a known pod) and the strangers' share is taken, or the worker is full of
/// pods' busy connections.
fn admit(
    worker: &Rc<Worker>,
    tasks: &Rc<Tasks<Admitted>>,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    max: usize,
) {
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
    if stranger
        && worker.stranger_connections() >= worker.shared.settings.limits.max_stranger_connections
    {
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
    tasks.serve(Admitted {
        stream,
        ip,
        stranger,
        tracked,
        permit,
    });
}

/// One worker: an accept loop per listener on one runtime, then the graceful stop.
pub(super) async fn worker_main(
    ls: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    admin_only: bool,
) {
    let worker = Rc::new(Worker::new(shared, admin_only));
    let tasks: Rc<Tasks<Admitted>> = Rc::new(Tasks::default());
    let loops: Vec<_> = ls
        .into_iter()
        .map(|l| monoio::spawn(accept_loop(l, worker.clone(), tasks.clone())))
        .collect();
    for l in loops {
        l.await;
    }
    tasks.close();
    // Graceful stop: no more accepts; idle keep-alive connections are closed, busy ones
    // finish their answer, bounded by --shutdown-grace.
    worker.close_reads();
    let deadline = std::time::Instant::now() + worker.shared.settings.shutdown_grace;
    while worker.unfinished_connections() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn accept_loop(l: std::net::TcpListener, worker: Rc<Worker>, tasks: Rc<Tasks<Admitted>>) {
    // A non-blocking handle on the same socket for sweeps (see `Lifecycle::sweeping`).
    let sweeper = l
        .try_clone()
        .and_then(|d| d.set_nonblocking(true).map(|()| d));
    let listener = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            worker.shared.life.fail(format!(
                "cannot register a listener with the worker's runtime: {e}"
            ));
            return;
        }
    };
    let max = worker.shared.settings.limits.max_connections;
    {
        // One accept in flight at a time, kept across ticks and sweeps: dropping it would
        // cancel it. The next one takes the same pinned slot, and one canceller serves them all
        // (it is only used at the stop), so an accepted connection allocates nothing here.
        let canceller = monoio::io::Canceller::new();
        let mut accept = std::pin::pin!(listener.cancelable_accept(canceller.handle()));
        let mut tick = std::pin::pin!(monoio::time::sleep(TICK));
        loop {
            let step = monoio::select! {
                a = &mut accept => Step::Accepted(a),
                _ = &mut tick => Step::Tick,
            };
            match step {
                Step::Accepted(a) => {
                    accept.set(listener.cancelable_accept(canceller.handle()));
                    match a {
                        Ok((stream, peer)) => admit(&worker, &tasks, stream, peer, max),
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            monoio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    }
                }
                Step::Tick if worker.stopping() => {
                    // Cancelled, then awaited: an accept the kernel already completed yields
                    // its connection, which is served (dropping it would reset a client).
                    let _ = canceller.cancel();
                    if let Ok((stream, peer)) = accept.await {
                        admit(&worker, &tasks, stream, peer, max);
                    }
                    break;
                }
                Step::Tick => {
                    if worker.shared.life.sweeping()
                        && let Ok(s) = &sweeper
                    {
                        sweep(&worker, &tasks, s, max);
                    }
                    tick.set(monoio::time::sleep(TICK));
                }
            }
        }
    }
    drop(listener);
    // The socket must stop listening with the workers, not linger on a spare handle.
    drop(sweeper);
}
