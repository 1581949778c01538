//! Listening: the sockets (one builder for both families), and opening the agent's
//! listeners, its own or those a running iamlet hands over.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use thiserror::Error;

/// One listening socket on `addr`, either family: SO_REUSEPORT (one per worker), IPv6 only
/// for an IPv6 address (the IPv4 listeners serve IPv4), non-blocking (monoio's epoll driver
/// needs it), and accepting once a request's first bytes are there (a connection that sends
/// nothing is still accepted after about a second, and then meets the idle timeout).
fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    crate::sockopt::defer_accept(&s, 1)?;
    Ok(s.into())
}

/// Binds `count` SO_REUSEPORT listeners on one port (port 0 picks a free one for all).
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = listener(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count.max(1) {
        all.push(listener(bound)?);
    }
    Ok(all)
}

/// `count` listeners on `[::]:port`, IPv6 only, for `--ipv6`.
pub fn bind_v6(port: u16, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), count)
}

/// `0.0.0.0:port`, `count` listeners.
pub fn bind_v4(port: u16, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), count)
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
