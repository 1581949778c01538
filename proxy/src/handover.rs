//! Listener handover, for upgrades that refuse no connection. A starting iamlet asks a running
//! one, over a unix socket only the same user may use (mode 0600 in a 0700 directory, and the
//! peer's uid checked with `SO_PEERCRED`), for its listening sockets, and receives the *same*
//! sockets (`SCM_RIGHTS`): the connections queued on them stay queued, whichever process
//! accepts them. It syncs, starts accepting, then tells the old process to stop; the old one
//! stops accepting, finishes its in-flight requests and exits. A new `SO_REUSEPORT` socket
//! beside the old ones would not do: closing a listener resets the connections in its queue.
//!
//! At every step one process serves: until `STOP` the old one keeps accepting (a new process
//! that dies mid-way changes nothing), and once the new one holds the sockets it accepts on
//! them (an old process that dies mid-way only stops sharing the work).
//!
//! The exchange, one line each way, then the descriptors:
//! ```text
//! new → old   IAMLET-HANDOVER/1 HELLO
//! old → new   IAMLET-HANDOVER/1 SOCKETS app=N admin=M      (+ N+M fds, SCM_RIGHTS)
//! new → old   IAMLET-HANDOVER/1 STOP                       (after the new one accepts)
//! old → new   IAMLET-HANDOVER/1 STOPPING
//! ```

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg, sockopt::PeerCredentials,
};
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const HELLO: &str = "IAMLET-HANDOVER/1 HELLO\n";
const STOP: &str = "IAMLET-HANDOVER/1 STOP\n";
const STOPPING: &str = "IAMLET-HANDOVER/1 STOPPING\n";
const SOCKETS: &str = "IAMLET-HANDOVER/1 SOCKETS";
/// Bound on each step of the exchange: a stuck peer must not stall a start.
const STEP: Duration = Duration::from_secs(5);
/// Most descriptors one handover carries (workers are capped at 1024, plus admin).
const MAX_FDS: usize = 1100;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the handover socket {path} belongs to uid {uid}, not to this process's uid {ours}")]
    Foreign { path: PathBuf, uid: u32, ours: u32 },
    #[error("handover over {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    #[error("handover over {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The listening sockets a process serves on.
#[derive(Debug, Default)]
pub struct Listeners {
    pub app: Vec<TcpListener>,
    pub admin: Vec<TcpListener>,
}

/// Sockets received from a running iamlet; [`Taken::finish`] tells it to stop.
#[derive(Debug)]
pub struct Taken {
    path: PathBuf,
    stream: UnixStream,
    pub listeners: Listeners,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> HandoverError + '_ {
    move |error| HandoverError::Io {
        path: path.to_owned(),
        error,
    }
}

fn protocol(path: &Path, what: impl Into<String>) -> HandoverError {
    HandoverError::Protocol {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn check_peer(stream: &UnixStream, path: &Path) -> Result<(), HandoverError> {
    let cred =
        nix::sys::socket::getsockopt(stream, PeerCredentials).map_err(|e| io(path)(e.into()))?;
    let ours = nix::unistd::geteuid().as_raw();
    if cred.uid() != ours {
        return Err(HandoverError::Foreign {
            path: path.to_owned(),
            uid: cred.uid(),
            ours,
        });
    }
    Ok(())
}

/// Asks the iamlet serving at `path` for its listeners. `Ok(None)`: nobody serves there (no
/// socket, or a stale one), so this process binds its own.
pub fn take_over(path: &Path) -> Result<Option<Taken>, HandoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io(path)(e)),
    };
    check_peer(&stream, path)?;
    stream.set_read_timeout(Some(STEP)).map_err(io(path))?;
    stream.set_write_timeout(Some(STEP)).map_err(io(path))?;
    (&stream).write_all(HELLO.as_bytes()).map_err(io(path))?;
    let mut line = [0u8; 128];
    let mut iov = [IoSliceMut::new(&mut line)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    // A signal may interrupt the wait (EINTR): ask again.
    let msg = loop {
        match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(|e| io(path)(e.into()))?,
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(|e| io(path)(e.into()))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(owned));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(protocol(path, "the descriptors were truncated"));
    }
    let n = msg.bytes;
    let text = std::str::from_utf8(&line[..n]).map_err(|_| protocol(path, "not text"))?;
    let (app, admin) = parse_sockets(text).ok_or_else(|| protocol(path, text.trim()))?;
    if app + admin != fds.len() || app == 0 {
        return Err(protocol(
            path,
            format!("{} descriptors for app={app} admin={admin}", fds.len()),
        ));
    }
    let mut listeners: Vec<TcpListener> = fds.into_iter().map(TcpListener::from).collect();
    for l in &listeners {
        // monoio's epoll driver needs non-blocking listeners (a blocking accept would stall
        // the worker); the flag lives on the shared file description, so it is set already,
        // but a peer of another build must not decide that.
        l.set_nonblocking(true).map_err(io(path))?;
    }
    let admin_l = listeners.split_off(app);
    Ok(Some(Taken {
        path: path.to_owned(),
        stream,
        listeners: Listeners {
            app: listeners,
            admin: admin_l,
        },
    }))
}

fn owned(fd: RawFd) -> OwnedFd {
    crate::sockopt::own_received_fd(fd)
}

/// `IAMLET-HANDOVER/1 SOCKETS app=N admin=M` → (N, M).
fn parse_sockets(line: &str) -> Option<(usize, usize)> {
    let rest = line.trim_end().strip_prefix(SOCKETS)?.trim();
    let mut app = None;
    let mut admin = None;
    for kv in rest.split_whitespace() {
        match kv.split_once('=')? {
            ("app", n) => app = n.parse().ok(),
            ("admin", n) => admin = n.parse().ok(),
            _ => return None,
        }
    }
    Some((app?, admin?))
}

impl Taken {
    /// A channel that receives once the old process went away before `finish` (its end of
    /// the handover connection closed): this one must then accept at once, synced or not.
    pub fn watch_old(&self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(s) = self.stream.try_clone() {
            let _ = s.set_read_timeout(None);
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                // The old process writes nothing before STOP, so a return means it went
                // away. A peek, so that `finish` still reads the answer to STOP.
                let _ = nix::sys::socket::recv(s.as_raw_fd(), &mut b, MsgFlags::MSG_PEEK);
                let _ = tx.send(());
            });
        }
        rx
    }

    /// The old process serves until this one has its pod list: waits for the list (true),
    /// or until the old process went away (false: nobody accepts on the sockets now, so
    /// this one must, and connections wait for the pod list as at any start).
    pub fn wait_for_sync(
        &self,
        resolver: &iamlet_resolver::Resolver,
    ) -> Result<bool, iamlet_resolver::StartError> {
        tracing::info!("handover: waiting for the first pod list before accepting");
        let old_gone = self.watch_old();
        loop {
            if let Some(r) = resolver.wait_first_sync_for(Duration::from_millis(50)) {
                return r.map(|()| true);
            }
            if old_gone.try_recv().is_ok() {
                tracing::warn!(
                    "handover: the previous iamlet went away before this one was ready; accepting now"
                );
                return Ok(false);
            }
        }
    }

    /// Synced and accepting on the same sockets: the old process may stop now. Its
    /// cancelled accepts may take a connection's wake-up with them, so the workers sweep
    /// the listeners' queues for `sweep_for`, until it is surely gone.
    pub fn complete(self, shared: &std::sync::Arc<crate::worker::Shared>, sweep_for: Duration) {
        use std::sync::atomic::Ordering;
        shared.sweeping.store(true, Ordering::Relaxed);
        let s = shared.clone();
        std::thread::spawn(move || {
            std::thread::sleep(sweep_for);
            s.sweeping.store(false, Ordering::Relaxed);
        });
        match self.finish() {
            Ok(()) => tracing::info!("handover: the previous iamlet stopped accepting"),
            Err(e) => {
                tracing::warn!(error = %e, "handover: the previous iamlet did not confirm; both accept until it exits")
            }
        }
    }

    /// Tells the old process to stop accepting (this one accepts on the same sockets now)
    /// and waits for its acknowledgement.
    pub fn finish(self) -> Result<(), HandoverError> {
        let path = &self.path;
        (&self.stream)
            .write_all(STOP.as_bytes())
            .map_err(io(path))?;
        let mut reply = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut reply)
            .map_err(io(path))?;
        if reply != STOPPING {
            return Err(protocol(path, reply.trim()));
        }
        Ok(())
    }
}

/// With `--handover-socket`, offers `listeners` to the next iamlet; when one takes them the
/// process stops gracefully (SIGTERM to itself) and the returned flag is set, so the
/// redirect is left to the new process. Without, the copies are closed at once: kept, they
/// would keep the sockets listening after the workers stop.
pub fn offer_to_next(
    path: Option<&Path>,
    listeners: Listeners,
    stopping: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, HandoverError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let handed_over = std::sync::Arc::new(AtomicBool::new(false));
    let Some(path) = path else {
        return Ok(handed_over);
    };
    let flag = handed_over.clone();
    offer(path, listeners, stopping.clone(), move || {
        flag.store(true, Ordering::SeqCst);
        // Process-directed, so the main thread's sigwait sees it: the usual graceful stop
        // (no new accepts, in-flight requests finish), with the rule untouched.
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM);
    })?;
    Ok(handed_over)
}

/// Serves handovers of `listeners` at `path` on a thread of its own, for the next iamlet.
/// `on_stop` runs when a new process, holding the sockets and accepting, asks this one to
/// stop; the thread then ends. It also ends, closing its copies of the sockets, once
/// `stopping` is set otherwise (a plain SIGTERM): the sockets must stop listening with the
/// workers, not linger here.
pub fn offer(
    path: &Path,
    listeners: Listeners,
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, HandoverError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(path))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    // The socket of the process this one took over from (or of one that died): replaced.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    // Non-blocking, so the thread notices `stopping` (checked every POLL).
    listener.set_nonblocking(true).map_err(io(path))?;
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("iamlet-handover".into())
        .spawn(move || serve(&listener, &path, listeners, &stopping, on_stop))
        .map_err(|e| HandoverError::Io {
            path: PathBuf::new(),
            error: e,
        })
}

/// How often the offering thread checks whether the process is stopping anyway.
const POLL: Duration = Duration::from_millis(20);

fn serve(
    listener: &UnixListener,
    path: &Path,
    listeners: Listeners,
    stopping: &std::sync::atomic::AtomicBool,
    on_stop: impl FnOnce(),
) {
    loop {
        if stopping.load(std::sync::atomic::Ordering::SeqCst) {
            drop(listeners);
            return;
        }
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(_) => continue,
        };
        if conn.set_nonblocking(false).is_err() {
            continue;
        }
        match hand_over(&conn, path, &listeners) {
            Ok(()) => {
                tracing::info!("handover: the new process accepts on our sockets; stopping");
                on_stop();
                let _ = (&conn).write_all(STOPPING.as_bytes());
                return;
            }
            // Still serving: a new process that fails half-way changes nothing here.
            Err(e) => tracing::warn!(error = %e, "handover abandoned; still serving"),
        }
    }
}

/// One handover: HELLO in, sockets out, then waits for STOP.
fn hand_over(conn: &UnixStream, path: &Path, listeners: &Listeners) -> Result<(), HandoverError> {
    check_peer(conn, path)?;
    conn.set_read_timeout(Some(STEP)).map_err(io(path))?;
    conn.set_write_timeout(Some(STEP)).map_err(io(path))?;
    let mut reader = BufReader::new(conn);
    let mut hello = String::new();
    reader.read_line(&mut hello).map_err(io(path))?;
    if hello != HELLO {
        return Err(protocol(path, hello.trim()));
    }
    let fds: Vec<RawFd> = listeners
        .app
        .iter()
        .chain(&listeners.admin)
        .map(AsRawFd::as_raw_fd)
        .collect();
    let line = format!(
        "{SOCKETS} app={} admin={}\n",
        listeners.app.len(),
        listeners.admin.len()
    );
    let cmsg = [ControlMessage::ScmRights(&fds)];
    loop {
        match sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(line.as_bytes())],
            &cmsg,
            MsgFlags::empty(),
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => {
                other.map_err(|e| io(path)(e.into()))?;
                break;
            }
        }
    }
    // The new process syncs before it asks: give it as long as a start takes, bounded.
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io(path))?;
    let mut stop = String::new();
    reader.read_line(&mut stop).map_err(io(path))?;
    if stop != STOP {
        return Err(protocol(
            path,
            if stop.is_empty() {
                "the new process went away before taking over".to_owned()
            } else {
                stop.trim().to_owned()
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers a copy of `app` at `path`; the receiver gets a message when asked to stop.
    fn offer_one(
        path: &Path,
        app: &TcpListener,
    ) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = offer(
            path,
            Listeners {
                app: vec![app.try_clone().unwrap()],
                admin: vec![],
            },
            Default::default(),
            move || tx.send(()).unwrap(),
        )
        .unwrap();
        (t, rx)
    }

    #[test]
    fn the_sockets_line_is_parsed_strictly() {
        assert_eq!(
            parse_sockets("IAMLET-HANDOVER/1 SOCKETS app=2 admin=1\n"),
            Some((2, 1))
        );
        assert_eq!(parse_sockets("IAMLET-HANDOVER/1 SOCKETS app=2\n"), None);
        assert_eq!(
            parse_sockets("IAMLET-HANDOVER/1 SOCKETS app=2 admin=0 x=1\n"),
            None
        );
        assert_eq!(
            parse_sockets("IAMLET-HANDOVER/2 SOCKETS app=1 admin=0"),
            None
        );
    }

    #[test]
    fn the_same_listening_sockets_change_hands_and_keep_their_queue() {
        let dir = std::env::temp_dir().join(format!("iamlet-handover-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = app.local_addr().unwrap();
        // A client queued on the old listener before the handover.
        let mut queued = std::net::TcpStream::connect(addr).unwrap();
        let (t, stopped_rx) = offer_one(&path, &app);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let taken = take_over(&path).unwrap().expect("a peer serves");
        assert_eq!(taken.listeners.app.len(), 1);
        let new = &taken.listeners.app[0];
        assert_eq!(new.local_addr().unwrap(), addr);
        // The old process closes its copies: the socket, and the queued client, live on.
        drop(app);
        new.set_nonblocking(false).unwrap();
        let (mut s, _) = new.accept().unwrap();
        queued.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        assert_eq!(&b, b"x");
        assert!(stopped_rx.try_recv().is_err(), "not stopped before STOP");
        taken.finish().unwrap();
        stopped_rx.recv_timeout(STEP).unwrap();
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_peer_means_start_as_usual() {
        let path = std::env::temp_dir().join(format!("iamlet-none-{}.sock", std::process::id()));
        assert!(take_over(&path).unwrap().is_none());
        // A stale socket file nobody listens on is no peer either.
        let l = UnixListener::bind(&path).unwrap();
        drop(l);
        assert!(take_over(&path).unwrap().is_none());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_new_process_that_goes_away_before_stop_leaves_the_old_one_serving() {
        let dir = std::env::temp_dir().join(format!("iamlet-abandon-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let (_t, stopped_rx) = offer_one(&path, &app);
        // Takes the sockets, then dies (drops everything) before STOP.
        let taken = take_over(&path).unwrap().unwrap();
        drop(taken);
        // The old one still offers: the next new process gets the sockets.
        let again = take_over(&path).unwrap().expect("still offered");
        assert_eq!(
            again.listeners.app[0].local_addr().unwrap(),
            app.local_addr().unwrap()
        );
        assert!(stopped_rx.try_recv().is_err());
        again.finish().unwrap();
        stopped_rx.recv_timeout(STEP).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
