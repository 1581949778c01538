//! Listener handover, for upgrades that refuse no connection. A starting iamlet asks a running
//! one, over a unix socket only the same user may use (mode 0600, in a directory no other user
//! may write, and the peer's uid checked with `SO_PEERCRED`), for its listening sockets, and
//! receives the *same* sockets (`SCM_RIGHTS`): the connections queued on them stay queued,
//! whichever process accepts them. It syncs, starts accepting, then tells the old process to
//! stop; the old one stops accepting, finishes its in-flight requests and exits. A new
//! `SO_REUSEPORT` socket beside the old ones would not do: closing a listener resets the
//! connections in its queue.
//!
//! At every step one process serves: until `STOP` the old one keeps accepting (a new process
//! that dies mid-way changes nothing), and once the new one holds the sockets it accepts on
//! them (an old process that dies mid-way only stops sharing the work).
//!
//! The exchange, one line each way, then the descriptors:
//! ```text
//! new → old   IAMLET-HANDOVER/1 HELLO
//! old → new   IAMLET-HANDOVER/1 SOCKETS app=N admin=M      (+ N+M fds, SCM_RIGHTS)
//! new → old   IAMLET-HANDOVER/1 STARTING                   (every 250 ms until STOP, from
//!                                                             half of --shutdown-grace on)
//! new → old   IAMLET-HANDOVER/1 STOP                       (after the new one accepts)
//! old → new   IAMLET-HANDOVER/1 STOPPING
//! ```
//! While one new process holds the sockets, any other `HELLO` is answered at once with
//! `IAMLET-HANDOVER/1 BUSY` (and the connection closed), as is every connection still open
//! when the old one stops (the new one offers the sockets next); that process asks again
//! every 100 ms, for longer than the old one keeps a silent holder. The old one drops a holder
//! that sends no line for `--shutdown-grace` (at least 1 s) and goes on serving and offering:
//! a peer that took the sockets and hung must not keep a genuine upgrade waiting, and
//! `STARTING` tells a new process that is still syncing from one that hung.
//!
//! The socket's directory is created with mode 0700 when missing; an existing one is used only
//! if it is a directory (a symbolic link is not followed) owned by this process's user and
//! writable by nobody else, and is never changed: pointed at a shared directory such as /tmp,
//! iamlet refuses to start instead of taking the directory over. Only a socket is replaced at
//! the path.

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg, sockopt::PeerCredentials};
use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HELLO: &str = "IAMLET-HANDOVER/1 HELLO\n";
const STARTING: &str = "IAMLET-HANDOVER/1 STARTING\n";
const STOP: &str = "IAMLET-HANDOVER/1 STOP\n";
const STOPPING: &str = "IAMLET-HANDOVER/1 STOPPING\n";
const BUSY: &str = "IAMLET-HANDOVER/1 BUSY\n";
const SOCKETS: &str = "IAMLET-HANDOVER/1 SOCKETS";
/// Bound on each step of the exchange: a stuck peer must not stall a start.
const STEP: Duration = Duration::from_secs(5);
/// How often a new process holding the sockets says it is still starting.
const PROGRESS: Duration = Duration::from_millis(250);
/// The least silence after which a holder is dropped: several `PROGRESS` periods, so that a
/// loaded machine's scheduling delay is not taken for a hung peer.
const MIN_SILENCE: Duration = Duration::from_secs(1);
/// How often a new process asks again after `BUSY`.
const RETRY: Duration = Duration::from_millis(100);
/// Most connections the old process waits on for a `HELLO` at once; the rest wait in the
/// socket's backlog.
const MAX_WAITING: usize = 64;
/// Most descriptors one handover carries (workers are capped at 1024, plus admin).
const MAX_FDS: usize = 1100;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the handover socket {path} belongs to uid {uid}, not to this process's uid {ours}")]
    Foreign { path: PathBuf, uid: u32, ours: u32 },
    #[error(
        "the handover socket's directory {dir} {problem}: point --handover-socket into a directory owned by uid {ours} and writable by it alone (iamlet creates a missing one with mode 0700)"
    )]
    UnsafeDir {
        dir: PathBuf,
        problem: DirProblem,
        ours: u32,
    },
    #[error(
        "{path} is {kind}, not a socket, and iamlet replaces nothing but a stale handover socket: remove it or point --handover-socket elsewhere"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error(
        "handover over {path}: the running iamlet was still handing its sockets to another new process after {waited:?}; start this one again once that one has taken over or exited"
    )]
    Busy { path: PathBuf, waited: Duration },
    #[error("handover over {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    #[error("handover over {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Why the handover socket's directory is not this process's own.
#[derive(Debug, thiserror::Error)]
pub enum DirProblem {
    #[error("is a symbolic link, which iamlet does not follow")]
    Symlink,
    #[error("is not a directory")]
    NotDirectory,
    #[error("belongs to uid {0}")]
    Owner(u32),
    #[error("is writable by group or others (mode {0:o})")]
    Writable(u32),
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
    /// Says `STARTING` until `finish` (or until dropped: the old process then sees EOF).
    progress: Option<Progress>,
}

#[derive(Debug)]
struct Progress {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
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

/// How long the old process keeps a holder that says nothing, for `--shutdown-grace`.
fn silence_bound(grace: Duration) -> Duration {
    grace.max(MIN_SILENCE)
}

/// Checks at start-up, before anything else happens, that `path` can be served without
/// touching what is not iamlet's: its directory is made (mode 0700) or must already be this
/// user's alone, and whatever is at `path` is a socket.
pub fn prepare(path: &Path) -> Result<(), HandoverError> {
    own_dir(path)?;
    socket_at(path).map(|_| ())
}

/// The socket's directory, created with mode 0700 where missing. An existing one is only
/// checked, never chmod-ed: it may be shared (/tmp, /run, a hostPath), and the socket's own
/// mode already keeps other users out; what matters is that nobody else can replace it.
fn own_dir(path: &Path) -> Result<(), HandoverError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Each missing component is made 0700 by mkdir itself, so there is no moment at
            // which another user could open or fill it.
            if let Some(up) = dir.parent().filter(|u| !u.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(up)
                    .map_err(io(path))?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                // Made by someone else meanwhile: judged like any existing directory.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(path)(e)),
            }
        }
        Err(e) => return Err(io(path)(e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(io(path))?;
    let ours = nix::unistd::geteuid().as_raw();
    let problem = if m.file_type().is_symlink() {
        DirProblem::Symlink
    } else if !m.is_dir() {
        DirProblem::NotDirectory
    } else if m.uid() != ours {
        DirProblem::Owner(m.uid())
    } else if m.mode() & 0o022 != 0 {
        DirProblem::Writable(m.mode() & 0o7777)
    } else {
        return Ok(());
    };
    Err(HandoverError::UnsafeDir {
        dir: dir.to_owned(),
        problem,
        ours,
    })
}

/// Whether a socket is at `path` (the previous process's, or one left by a process that
/// died). Anything else there is refused, never followed or removed.
fn socket_at(path: &Path) -> Result<bool, HandoverError> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(path)(e)),
    };
    let t = m.file_type();
    let kind = if t.is_socket() {
        return Ok(true);
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    };
    Err(HandoverError::NotASocket {
        path: path.to_owned(),
        kind,
    })
}

/// What one `HELLO` got.
enum Answer {
    Sockets(Taken),
    /// Another new process holds the sockets.
    Busy,
    /// The peer closed without an answer: it is stopping (handed over, or signalled).
    Gone,
    /// Nobody listens at the path.
    Nobody,
}

/// Asks the iamlet serving at `path` for its listeners. `Ok(None)`: nobody serves there (no
/// socket, or a stale one), so this process binds its own. While the running one hands its
/// sockets to another new process, asks again, for longer than the running one keeps a silent
/// holder (given the same `--shutdown-grace`, `grace`); once a handover was under way, a
/// closed socket only means its winner has not offered yet.
pub fn take_over(path: &Path, grace: Duration) -> Result<Option<Taken>, HandoverError> {
    let patience = STEP + silence_bound(grace) + STEP;
    let began = Instant::now();
    let mut seen_busy = false;
    loop {
        let answer = ask(path, grace)?;
        let busy = matches!(answer, Answer::Busy);
        match answer {
            Answer::Sockets(t) => return Ok(Some(t)),
            Answer::Nobody if !seen_busy => return Ok(None),
            Answer::Busy if !seen_busy => tracing::info!(
                "handover: the running iamlet is handing its sockets to another new process; asking again"
            ),
            _ => {}
        }
        seen_busy |= busy;
        if began.elapsed() >= patience {
            return if busy {
                Err(HandoverError::Busy {
                    path: path.to_owned(),
                    waited: patience,
                })
            } else {
                Ok(None)
            };
        }
        std::thread::sleep(RETRY);
    }
}

/// One `HELLO`.
fn ask(path: &Path, grace: Duration) -> Result<Answer, HandoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Answer::Nobody);
        }
        Err(e) => return Err(io(path)(e)),
    };
    check_peer(&stream, path)?;
    stream.set_read_timeout(Some(STEP)).map_err(io(path))?;
    stream.set_write_timeout(Some(STEP)).map_err(io(path))?;
    let gone = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    };
    match (&stream).write_all(HELLO.as_bytes()) {
        Ok(()) => {}
        Err(e) if gone(&e) => return Ok(Answer::Gone),
        Err(e) => return Err(io(path)(e)),
    }
    let mut line = [0u8; 128];
    let msg = match crate::sockopt::recv_with_fds(&stream, &mut line, MAX_FDS) {
        Ok(m) => m,
        Err(e) if gone(&e) => return Ok(Answer::Gone),
        Err(e) => return Err(io(path)(e)),
    };
    let fds = msg.fds;
    if msg.truncated {
        return Err(protocol(path, "the descriptors were truncated"));
    }
    let n = msg.bytes;
    if n == 0 {
        return Ok(Answer::Gone);
    }
    let text = std::str::from_utf8(&line[..n]).map_err(|_| protocol(path, "not text"))?;
    if text == BUSY {
        return Ok(Answer::Busy);
    }
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
    let progress = Some(say_starting(&stream, silence_bound(grace) / 2).map_err(io(path))?);
    Ok(Answer::Sockets(Taken {
        path: path.to_owned(),
        stream,
        listeners: Listeners {
            app: listeners,
            admin: admin_l,
        },
        progress,
    }))
}

/// Tells the old process, every `PROGRESS` from `first` on, that this one is still starting
/// (syncing, or waiting for the xtables lock), so that it is not dropped as a hung holder.
/// Nothing is said before `first` (half the old one's patience): a start that is done by
/// then sends only `STOP`, which is all an iamlet from before `STARTING` understands, so an
/// upgrade from one keeps its handover in the usual case.
fn say_starting(stream: &UnixStream, first: Duration) -> std::io::Result<Progress> {
    let s = stream.try_clone()?;
    let (stop, rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("iamlet-handover-progress".into())
        .spawn(move || {
            if !matches!(rx.recv_timeout(first), Err(mpsc::RecvTimeoutError::Timeout)) {
                return;
            }
            if (&s).write_all(STARTING.as_bytes()).is_err() {
                return;
            }
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(PROGRESS) {
                if (&s).write_all(STARTING.as_bytes()).is_err() {
                    return;
                }
            }
        })?;
    Ok(Progress { stop, thread })
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
            let watcher = std::thread::Builder::new().name("iamlet-handover-watch".into());
            let _ = watcher.spawn(move || {
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
    pub fn complete(self, shared: &crate::shared::Shared, sweep_for: Duration) {
        shared.life.sweep_for(sweep_for);
        match self.finish() {
            Ok(()) => tracing::info!("handover: the previous iamlet stopped accepting"),
            Err(e) => {
                tracing::warn!(error = %e, "handover: the previous iamlet did not confirm; both accept until it exits")
            }
        }
    }

    /// Tells the old process to stop accepting (this one accepts on the same sockets now)
    /// and waits for its acknowledgement.
    pub fn finish(mut self) -> Result<(), HandoverError> {
        // Joined first: a STARTING written after STOP would be read as a broken exchange.
        if let Some(p) = self.progress.take() {
            drop(p.stop);
            let _ = p.thread.join();
        }
        let path = &self.path;
        (&self.stream)
            .write_all(STOP.as_bytes())
            .map_err(io(path))?;
        // `watch_old` cleared the read timeout on this same socket.
        self.stream.set_read_timeout(Some(STEP)).map_err(io(path))?;
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
/// would keep the sockets listening after the workers stop. `grace` is `--shutdown-grace`.
pub fn offer_to_next(
    path: Option<&Path>,
    listeners: Listeners,
    stopping: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    grace: Duration,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, HandoverError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let handed_over = std::sync::Arc::new(AtomicBool::new(false));
    let Some(path) = path else {
        return Ok(handed_over);
    };
    let flag = handed_over.clone();
    offer(path, listeners, stopping.clone(), grace, move || {
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
/// workers, not linger here. A holder silent for `grace` (`--shutdown-grace`, at least 1 s)
/// is dropped.
pub fn offer(
    path: &Path,
    listeners: Listeners,
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    grace: Duration,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, HandoverError> {
    own_dir(path)?;
    // The socket of the process this one took over from (or of one that died): replaced.
    // Checked and removed in a directory nobody else may write, so it cannot be swapped
    // for something else in between.
    if socket_at(path)? {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    // Non-blocking, so the thread notices `stopping` (checked every POLL).
    listener.set_nonblocking(true).map_err(io(path))?;
    let path = path.to_owned();
    let silence = silence_bound(grace);
    std::thread::Builder::new()
        .name("iamlet-handover".into())
        .spawn(move || serve(&listener, &path, listeners, &stopping, silence, on_stop))
        .map_err(|e| HandoverError::Io {
            path: PathBuf::new(),
            error: e,
        })
}

/// How often the offering thread checks whether the process is stopping anyway, and reads
/// what its peers sent.
const POLL: Duration = Duration::from_millis(20);

/// A connection to the offering thread, read without blocking: one thread answers every
/// peer, so that no peer can hold up another.
struct Peer {
    conn: UnixStream,
    got: Vec<u8>,
    /// When it is dropped unless it speaks.
    until: Instant,
}

enum Heard {
    Line(String),
    Nothing,
    Gone,
    Failed(std::io::Error),
}

impl Peer {
    fn admit(conn: UnixStream, path: &Path) -> Result<Peer, HandoverError> {
        check_peer(&conn, path)?;
        conn.set_nonblocking(true).map_err(io(path))?;
        Ok(Peer {
            conn,
            got: Vec::new(),
            until: Instant::now() + STEP,
        })
    }

    /// The next whole line it sent, if one has arrived.
    fn hear(&mut self) -> Heard {
        loop {
            if let Some(i) = self.got.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.got.drain(..=i).collect();
                return Heard::Line(String::from_utf8_lossy(&line).into_owned());
            }
            if self.got.len() >= 128 {
                // No line of the protocol is this long.
                return Heard::Line(String::from_utf8_lossy(&self.got).into_owned());
            }
            let mut b = [0u8; 128];
            match (&self.conn).read(&mut b) {
                Ok(0) => return Heard::Gone,
                Ok(n) => self.got.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Heard::Nothing,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Heard::Failed(e),
            }
        }
    }

    /// `HELLO` (Some(Ok)), a failure (Some(Err)), or nothing yet.
    fn hello(&mut self, path: &Path, now: Instant) -> Option<Result<(), HandoverError>> {
        match self.hear() {
            Heard::Line(l) if l == HELLO => Some(Ok(())),
            Heard::Line(l) => Some(Err(protocol(path, l.trim()))),
            Heard::Nothing if now < self.until => None,
            Heard::Nothing => Some(Err(protocol(path, "no HELLO in time"))),
            Heard::Gone => Some(Err(protocol(path, "the peer went away before HELLO"))),
            Heard::Failed(e) => Some(Err(io(path)(e))),
        }
    }

    /// For the holder of the sockets: `STOP` (true), still starting (false), or a failure.
    fn stop(
        &mut self,
        path: &Path,
        now: Instant,
        silence: Duration,
    ) -> Result<bool, HandoverError> {
        loop {
            match self.hear() {
                Heard::Line(l) if l == STARTING => self.until = now + silence,
                Heard::Line(l) if l == STOP => return Ok(true),
                Heard::Line(l) => return Err(protocol(path, l.trim())),
                Heard::Nothing if now < self.until => return Ok(false),
                Heard::Nothing => {
                    return Err(protocol(
                        path,
                        format!(
                            "the new process took the sockets and then sent nothing for {silence:?}; dropped it"
                        ),
                    ));
                }
                Heard::Gone => {
                    return Err(protocol(
                        path,
                        "the new process went away before taking over",
                    ));
                }
                Heard::Failed(e) => return Err(io(path)(e)),
            }
        }
    }

    /// Another new process holds the sockets (or this one is stopping): ask again. Never
    /// blocks: a fresh connection's buffer has room for one line.
    fn busy(&self) {
        let _ = (&self.conn).write(BUSY.as_bytes());
    }
}

fn serve(
    listener: &UnixListener,
    path: &Path,
    listeners: Listeners,
    stopping: &std::sync::atomic::AtomicBool,
    silence: Duration,
    on_stop: impl FnOnce(),
) {
    let abandoned =
        |e: HandoverError| tracing::warn!(error = %e, "handover abandoned; still serving");
    let mut waiting: Vec<Peer> = Vec::new();
    let mut holder: Option<Peer> = None;
    loop {
        if stopping.load(std::sync::atomic::Ordering::SeqCst) {
            drop(listeners);
            return;
        }
        while waiting.len() < MAX_WAITING {
            match listener.accept() {
                Ok((c, _)) => match Peer::admit(c, path) {
                    Ok(p) => waiting.push(p),
                    Err(e) => abandoned(e),
                },
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < waiting.len() {
            let Some(hello) = waiting[i].hello(path, now) else {
                i += 1;
                continue;
            };
            let mut p = waiting.swap_remove(i);
            match hello {
                Err(e) => abandoned(e),
                Ok(()) if holder.is_some() => p.busy(),
                Ok(()) => match send_sockets(&p.conn, path, &listeners) {
                    Ok(()) => {
                        p.until = now + silence;
                        holder = Some(p);
                    }
                    Err(e) => abandoned(e),
                },
            }
        }
        if let Some(h) = &mut holder {
            match h.stop(path, now, silence) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!("handover: the new process accepts on our sockets; stopping");
                    on_stop();
                    let _ = (&h.conn).write_all(STOPPING.as_bytes());
                    // They get their sockets from the new process, which offers them next.
                    for p in &waiting {
                        p.busy();
                    }
                    return;
                }
                Err(e) => {
                    abandoned(e);
                    holder = None;
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `SOCKETS` and the descriptors, to the peer that said `HELLO` first.
fn send_sockets(
    conn: &UnixStream,
    path: &Path,
    listeners: &Listeners,
) -> Result<(), HandoverError> {
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
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    /// The `--shutdown-grace` the tests' old processes run with: the least silence bound.
    const GRACE: Duration = MIN_SILENCE;

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
            GRACE,
            move || tx.send(()).unwrap(),
        )
        .unwrap();
        (t, rx)
    }

    /// A fresh directory of this test's own under the temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("iamlet-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
            Scratch(dir)
        }

        fn mkdir(&self, name: &str, mode: u32) -> PathBuf {
            let d = self.0.join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            d
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn offered(path: &Path) -> Result<(), HandoverError> {
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = offer(
            path,
            Listeners {
                app: vec![app],
                admin: vec![],
            },
            stopping.clone(),
            GRACE,
            || {},
        )?;
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        t.join().unwrap();
        Ok(())
    }

    /// A peer that says HELLO and keeps what it gets: the answer line and any descriptors.
    fn hello(path: &Path) -> (UnixStream, String, Vec<OwnedFd>) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        (&s).write_all(HELLO.as_bytes()).unwrap();
        let mut line = [0u8; 128];
        let msg = crate::sockopt::recv_with_fds(&s, &mut line, 4).unwrap();
        let text = String::from_utf8_lossy(&line[..msg.bytes]).into_owned();
        (s, text, msg.fds)
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
        let taken = take_over(&path, GRACE).unwrap().expect("a peer serves");
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
        assert!(take_over(&path, GRACE).unwrap().is_none());
        // A stale socket file nobody listens on is no peer either.
        let l = UnixListener::bind(&path).unwrap();
        drop(l);
        assert!(take_over(&path, GRACE).unwrap().is_none());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_new_process_that_goes_away_before_stop_leaves_the_old_one_serving() {
        let dir = std::env::temp_dir().join(format!("iamlet-abandon-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let (_t, stopped_rx) = offer_one(&path, &app);
        // Takes the sockets, then dies (drops everything) before STOP.
        let taken = take_over(&path, GRACE).unwrap().unwrap();
        drop(taken);
        // The old one still offers: the next new process gets the sockets.
        let again = take_over(&path, GRACE).unwrap().expect("still offered");
        assert_eq!(
            again.listeners.app[0].local_addr().unwrap(),
            app.local_addr().unwrap()
        );
        assert!(stopped_rx.try_recv().is_err());
        again.finish().unwrap();
        stopped_rx.recv_timeout(STEP).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_silent_holder_is_dropped_after_the_bound_and_a_later_hello_gets_the_sockets() {
        let dir = Scratch::new("silent");
        let path = dir.0.join("handover.sock");
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let (t, stopped_rx) = offer_one(&path, &app);
        // Takes the sockets and then says nothing, ever.
        let (rogue, line, fds) = hello(&path);
        assert_eq!(
            (line.as_str(), fds.len()),
            ("IAMLET-HANDOVER/1 SOCKETS app=1 admin=0\n", 1)
        );
        let took = Instant::now();
        // Meanwhile another HELLO is answered at once, not left waiting on the holder.
        let (_s, line, fds) = hello(&path);
        assert_eq!((line.as_str(), fds.len()), (BUSY, 0));
        assert!(took.elapsed() < GRACE, "BUSY after {:?}", took.elapsed());
        // A genuine new process asks again until the silent one is dropped.
        let taken = take_over(&path, GRACE)
            .unwrap()
            .expect("the sockets, once dropped");
        assert!(
            took.elapsed() >= GRACE,
            "dropped after {:?}",
            took.elapsed()
        );
        assert_eq!(
            taken.listeners.app[0].local_addr().unwrap(),
            app.local_addr().unwrap()
        );
        // The old one closed the silent holder's connection (EOF), and never stopped for it.
        let mut b = [0u8; 8];
        assert_eq!((&rogue).read(&mut b).unwrap(), 0);
        assert!(stopped_rx.try_recv().is_err());
        taken.finish().unwrap();
        stopped_rx.recv_timeout(STEP).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_holder_still_starting_is_not_dropped() {
        let dir = Scratch::new("starting");
        let path = dir.0.join("handover.sock");
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let (t, stopped_rx) = offer_one(&path, &app);
        let taken = take_over(&path, GRACE).unwrap().unwrap();
        // Syncing for three silence bounds: the old one keeps waiting for STOP.
        let old_gone = taken.watch_old();
        assert!(
            old_gone.recv_timeout(3 * GRACE).is_err(),
            "dropped while starting"
        );
        assert!(stopped_rx.try_recv().is_err());
        taken.finish().unwrap();
        stopped_rx.recv_timeout(STEP).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_shared_directory_is_refused_and_left_as_it_is() {
        let dir = Scratch::new("shared-dir");
        let tmp = dir.mkdir("tmp", 0o1777);
        let path = tmp.join("handover.sock");
        let e = offered(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the handover socket's directory {} is writable by group or others (mode 1777): point --handover-socket into a directory owned by uid {} and writable by it alone (iamlet creates a missing one with mode 0700)",
                tmp.display(),
                nix::unistd::geteuid()
            )
        );
        assert_eq!(mode(&tmp), 0o1777);
        assert!(!path.exists());
        assert_eq!(prepare(&path).unwrap_err().to_string(), e.to_string());
    }

    #[test]
    fn a_symlinked_directory_is_refused_and_its_target_left_as_it_is() {
        let dir = Scratch::new("symlink-dir");
        let real = dir.mkdir("real", 0o755);
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = offered(&link.join("handover.sock")).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "the handover socket's directory {} is a symbolic link, which iamlet does not follow: ",
                link.display()
            )),
            "{e}"
        );
        assert_eq!(mode(&real), 0o755);
        assert!(!real.join("handover.sock").exists());
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let dir = Scratch::new("foreign-dir");
        let theirs = dir.mkdir("theirs", 0o700);
        if std::os::unix::fs::chown(&theirs, Some(65534), None).is_err() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let e = offered(&theirs.join("handover.sock")).unwrap_err();
        assert!(e.to_string().contains("belongs to uid 65534: "), "{e}");
        assert_eq!(mode(&theirs), 0o700);
    }

    #[test]
    fn missing_directories_are_created_0700() {
        let dir = Scratch::new("missing-dir");
        let path = dir.0.join("a/b/handover.sock");
        offered(&path).unwrap();
        assert_eq!(mode(&dir.0.join("a")), 0o700);
        assert_eq!(mode(&dir.0.join("a/b")), 0o700);
    }

    #[test]
    fn an_existing_private_directory_is_used_as_it_is() {
        let dir = Scratch::new("private-dir");
        let run = dir.mkdir("run", 0o755);
        let path = run.join("handover.sock");
        offered(&path).unwrap();
        assert_eq!(mode(&run), 0o755);
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert_eq!(mode(&path), 0o600);
        // The next start replaces the stale socket.
        offered(&path).unwrap();
    }

    #[test]
    fn only_a_socket_is_replaced_at_the_path() {
        let dir = Scratch::new("not-a-socket");
        let target = dir.0.join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.0.join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = offered(&link).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "{} is a symbolic link, not a socket",
                link.display()
            )),
            "{e}"
        );
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let e = offered(&target).unwrap_err();
        assert!(
            e.to_string().contains("is a regular file, not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
