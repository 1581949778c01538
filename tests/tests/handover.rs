//! Upgrades through the listener handover, with the real binary: a client opening a new
//! connection per request keeps asking while iamlet is replaced again and again; not one
//! request may be refused, reset, answered with an error, or take a second. Then the
//! half-done handovers: the new process killed before it takes over, the old one killed
//! while the new one syncs, a peer that takes the sockets and goes silent — one process
//! serves at every step. And a socket path in a shared directory is refused at start.

use iamlet_e2e::realapi::{RealApiServer, Scope, without_verb};
use iamlet_e2e::rig::data::{self as dataplane, POD, ip};
use iamlet_e2e::util::TempDir;
use iamlet_e2e::{FakeImds, Iamlet, Moto, drivers, try_request_from, wait_until};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An identity on the real API server that may not list pods yet (so an agent with it never
/// syncs until [`grant`]), and a kubeconfig for it: `(scope, identity, --kubeconfig=...)`.
fn refused_identity(test: &str, dir: &TempDir) -> (Scope, String, String) {
    let s = RealApiServer::shared().scope(test);
    let sa = s.own_identity(Some(&|r: &mut serde_json::Value| {
        without_verb(r, "", "pods", "list")
    }));
    let token = s.token("kube-system", &sa, 3600);
    let kubeconfig = format!(
        "--kubeconfig={}",
        s.kubeconfig_for(&token, dir.path()).display()
    );
    (s, sa, kubeconfig)
}

/// Gives the identity the shipped rules in full.
fn grant(s: &Scope, sa: &str) {
    s.apply_identity(sa, None);
}

const LIST: &[u8] = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";

/// A pod asking for its role listing on a new connection each time, as fast as it can
/// (bounded by `stop` and a count), recording every failure with when it happened.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, allow_not_found: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            for _ in 0..2_000_000u32 {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let t = Instant::now();
                let r = try_request_from(ip(POD), addr, LIST);
                let took = t.elapsed();
                let at = began.elapsed();
                match r {
                    Ok(r) if r.status == 200 && took < Duration::from_secs(1) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) if r.status == 404 && allow_not_found => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => f
                        .lock()
                        .unwrap()
                        .push(format!("{at:?}: {} after {took:?}", r.status)),
                    Err(e) => f.lock().unwrap().push(format!("{at:?}: {e}")),
                }
            }
        });
        Load {
            stop,
            ok,
            failures,
            thread: Some(thread),
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests succeeded (the load is flowing).
    fn wait_for_more(&self, n: u64) {
        let from = self.ok();
        wait_until!(
            Duration::from_secs(20),
            self.ok() >= from + n,
            "{n} more answered requests (failures: {:?})",
            self.failures.lock().unwrap()
        );
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        (self.ok(), self.failures.lock().unwrap().clone())
    }
}

fn agent(driver: &str, moto: &Moto, imds: &FakeImds, sock: &str) -> iamlet_e2e::IamletBuilder {
    dataplane::builder(
        driver,
        moto,
        imds,
        &[&format!("--handover-socket={sock}"), "--workers=2"],
    )
}

/// A root process speaking the handover protocol that takes the listening sockets and then
/// says nothing, ever (a new process that hung, or one that only wanted the sockets).
struct Rogue {
    stream: UnixStream,
    answer: String,
    fds: Vec<RawFd>,
}

impl Rogue {
    fn take(sock: &str) -> Rogue {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::io::Write;
        let stream = UnixStream::connect(sock).expect("connect to the handover socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (&stream)
            .write_all(b"IAMLET-HANDOVER/1 HELLO\n")
            .expect("HELLO");
        let mut line = [0u8; 128];
        let mut iov = [std::io::IoSliceMut::new(&mut line)];
        let mut space = nix::cmsg_space!([RawFd; 16]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("the answer to HELLO");
        let mut fds = Vec::new();
        for c in msg.cmsgs().expect("control messages") {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(raw);
            }
        }
        let n = msg.bytes;
        Rogue {
            answer: String::from_utf8_lossy(&line[..n]).into_owned(),
            stream,
            fds,
        }
    }

    /// Waits (bounded) for the old process to close the connection: it dropped this peer.
    fn wait_dropped(&self, timeout: Duration) -> bool {
        use std::io::Read;
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        matches!((&self.stream).read(&mut [0u8; 64]), Ok(0))
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        for fd in self.fds.drain(..) {
            let _ = nix::unistd::close(fd);
        }
    }
}

#[test]
fn upgrades_hand_the_listening_sockets_over_and_refuse_no_connection() {
    for driver in drivers() {
        let dir = TempDir::new("handover");
        let sock = dir.path().join("run/handover.sock").display().to_string();
        let (moto, imds) = (Moto::start(), FakeImds::start());
        let mut old = agent(driver, &moto, &imds, &sock).start();
        let addr = old.addr();
        let load = Load::start(addr, false);
        load.wait_for_more(50);
        let upgrades = 5;
        for i in 0..upgrades {
            let new = agent(driver, &moto, &imds, &sock).start();
            assert!(
                new.log()
                    .contains("handover: took the running iamlet's listening sockets"),
                "driver {driver}: upgrade {i}: {}",
                new.log()
            );
            assert_eq!(new.addr(), addr, "driver {driver}: the same socket");
            let (code, timed_out) = old.wait_exit(Duration::from_secs(20));
            assert_eq!(
                (code, timed_out),
                (Some(0), false),
                "driver {driver}: upgrade {i}: the old process drains and exits: {}",
                old.log()
            );
            assert!(
                old.wait_for_log(
                    "handover: the new process accepts on our sockets",
                    Duration::from_secs(5)
                ),
                "driver {driver}: {}",
                old.log()
            );
            old = new;
            load.wait_for_more(50);
        }
        let (ok, failures) = load.finish();
        println!(
            "driver {driver}: {upgrades} upgrades under load: {ok} requests, {} failed",
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "driver {driver}: {} of {} requests failed across {upgrades} upgrades: {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(10)]
        );
        let mode = std::fs::metadata(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600, "driver {driver}");
    }
}

#[test]
fn a_new_process_killed_before_it_takes_over_leaves_the_old_one_serving() {
    let driver = drivers()[0];
    let dir = TempDir::new("handover-kill-new");
    let sock = dir.path().join("handover.sock").display().to_string();
    let (moto, imds) = (Moto::start(), FakeImds::start());
    let mut old = agent(driver, &moto, &imds, &sock).start();
    let addr = old.addr();
    let load = Load::start(addr, false);
    load.wait_for_more(50);
    // A new process that holds the sockets but never syncs (RBAC refuses it the pod list).
    let (s, _sa, kubeconfig) = refused_identity("handover-stuck", &dir);
    let mut stuck = Iamlet::builder()
        .sts(&moto)
        .imds(&imds)
        .arg(kubeconfig)
        .arg(format!("--node={}", s.node))
        .arg(format!("--handover-socket={sock}"))
        .until("handover: waiting for the first pod list")
        .start();
    load.wait_for_more(50);
    stuck.kill_9();
    load.wait_for_more(50);
    assert!(
        old.try_exit_status().is_none(),
        "the old process must keep serving: {}",
        old.log()
    );
    assert!(
        old.wait_for_log("handover abandoned; still serving", Duration::from_secs(5)),
        "{}",
        old.log()
    );
    // The next upgrade still works.
    let new = agent(driver, &moto, &imds, &sock).start();
    let (code, _) = old.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", old.log());
    load.wait_for_more(50);
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {ok} failed: {failures:?}",
        failures.len()
    );
    drop(new);
}

#[test]
fn an_old_process_killed_during_the_handover_leaves_the_new_one_accepting() {
    let driver = drivers()[0];
    let dir = TempDir::new("handover-kill-old");
    let sock = dir.path().join("handover.sock").display().to_string();
    let (moto, imds) = (Moto::start(), FakeImds::start());
    let mut old = agent(driver, &moto, &imds, &sock).start();
    let addr = old.addr();
    // The new process syncs from an API server that refuses it for now (RBAC), so the old
    // one dies while the new one waits: the new one must take the connections at once (they
    // wait for the pod list and get 404 meanwhile, never a refused or reset connection).
    let (s, sa, kubeconfig) = refused_identity("handover-old-dies", &dir);
    let ns = s.ns("shop");
    s.create_pod(
        &iamlet_e2e::PodBuilder::running(&ns, "app", &s.node, "127.0.0.11").role("app-role"),
    );
    let new = Iamlet::builder()
        .sts(&moto)
        .imds(&imds)
        .arg(kubeconfig)
        .arg(format!("--node={}", s.node))
        .arg(format!("--base-role-arn={}", dataplane::BASE))
        .arg("--backoff-max-elapsed-time=200ms")
        .arg(format!("--handover-socket={sock}"))
        .until("handover: waiting for the first pod list")
        .start();
    let load = Load::start(addr, true);
    load.wait_for_more(20);
    let killed_at = load.ok();
    old.kill_9();
    assert!(
        new.wait_for_log("previous iamlet went away", Duration::from_secs(5)),
        "{}",
        new.log()
    );
    load.wait_for_more(20);
    grant(&s, &sa);
    wait_until!(
        Duration::from_secs(60),
        try_request_from(ip(POD), addr, LIST).is_ok_and(|r| r.status == 200),
        "the new process's pods once its API server answers"
    );
    let (ok, failures) = load.finish();
    // The client asks one request at a time: the one the killed process was answering, if
    // any, dies with it. Nothing else may fail.
    assert!(
        failures.len() <= 1,
        "{} of {ok} failed (killed after {killed_at} answers): {failures:?}",
        failures.len()
    );
}

#[test]
fn a_peer_that_takes_the_sockets_and_goes_silent_only_delays_the_next_upgrade() {
    let driver = drivers()[0];
    let dir = TempDir::new("handover-silent");
    let sock = dir.path().join("handover.sock").display().to_string();
    let (moto, imds) = (Moto::start(), FakeImds::start());
    // The old process drops a holder that stays silent for --shutdown-grace.
    let agent = || {
        dataplane::builder(
            driver,
            &moto,
            &imds,
            &[
                &format!("--handover-socket={sock}"),
                "--workers=2",
                "--shutdown-grace=2s",
            ],
        )
    };
    let mut old = agent().start();
    let addr = old.addr();
    let load = Load::start(addr, false);
    load.wait_for_more(50);
    let rogue = Rogue::take(&sock);
    assert!(
        rogue.answer.starts_with("IAMLET-HANDOVER/1 SOCKETS ") && !rogue.fds.is_empty(),
        "{:?} with {} descriptors",
        rogue.answer,
        rogue.fds.len()
    );
    // A genuine upgrade meanwhile: it waits for the old process to drop the silent holder,
    // then takes over as usual.
    let new = agent().start();
    assert!(
        new.log()
            .contains("handover: took the running iamlet's listening sockets"),
        "{}",
        new.log()
    );
    println!(
        "the new process met BUSY: {}",
        new.log()
            .contains("handing its sockets to another new process")
    );
    let (code, timed_out) = old.wait_exit(Duration::from_secs(20));
    assert_eq!(
        (code, timed_out),
        (Some(0), false),
        "the old process hands over and exits: {}",
        old.log()
    );
    assert!(
        old.log()
            .contains("the new process took the sockets and then sent nothing for 2s"),
        "{}",
        old.log()
    );
    assert!(
        rogue.wait_dropped(Duration::from_secs(5)),
        "the old process closed the silent peer's connection"
    );
    load.wait_for_more(50);
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {ok} failed: {failures:?}",
        failures.len()
    );
    drop(new);
}

#[test]
fn a_handover_socket_in_a_shared_directory_is_refused_at_start_and_the_directory_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("handover-shared-dir");
    let shared = dir.path().join("tmp");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = Iamlet::run_cli(&[
        "--app-port=0",
        "--metadata-addr=127.0.0.1:9",
        "--pods-from=/dev/null",
        &format!("--handover-socket={}/handover.sock", shared.display()),
    ]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("iamlet: "))
        .collect();
    assert_eq!(
        lines,
        [format!(
            "iamlet: the handover socket's directory {} is writable by group or others (mode 1777): point --handover-socket into a directory owned by uid {} and writable by it alone (iamlet creates a missing one with mode 0700)",
            shared.display(),
            nix::unistd::geteuid()
        )],
        "{}",
        out.stderr
    );
    let mode = std::fs::symlink_metadata(&shared)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o1777);
    assert!(!shared.join("handover.sock").exists());
}
