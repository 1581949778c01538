//! `Moto`: a `moto_server` process on 127.0.0.1 standing in for STS (AssumeRole accepts any
//! role). Started on a free port, waited for, killed by PID on drop.

use crate::util::{TempDir, find_on_path, free_port, workspace_root};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long moto may take to answer its first request: its imports take seconds, and far
/// longer on a machine whose cores are busy with a build.
const STARTUP: Duration = Duration::from_secs(90);

/// A running moto server; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Moto {
    /// The `moto_server` executable: `$MOTO_SERVER`, else `<workspace>/.venv/bin/moto_server`,
    /// else `moto_server` on `$PATH`.
    pub fn find_executable() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("MOTO_SERVER") {
            return Some(PathBuf::from(p));
        }
        let venv = workspace_root().join(".venv/bin/moto_server");
        if venv.is_file() {
            return Some(venv);
        }
        find_on_path("moto_server")
    }

    /// Starts moto and waits (at most 30 s) until `GET /moto-api/` answers. Panics with the
    /// server's log if it exits or never answers.
    pub fn start() -> Moto {
        Moto::start_on("127.0.0.1")
    }

    /// As [`Moto::start`], listening on `host` (`0.0.0.0`: every address of the network
    /// namespace it starts in, which only a test's own namespace may do, so pods there reach
    /// it through their veth); checked and addressed on 127.0.0.1 still.
    pub fn start_on(host: &str) -> Moto {
        let exe = Moto::find_executable()
            .expect("moto_server not found: run .ci/run or `pip install 'moto[server]'`");
        // A free port can be taken by a parallel test before moto binds it: try a few.
        let mut last = String::new();
        for _ in 0..3 {
            let dir = TempDir::new("moto");
            let log = std::fs::File::create(dir.path().join("moto.log")).expect("create moto.log");
            let port = free_port();
            let child = Command::new(&exe)
                .args(["-H", host, "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut moto = Moto { child, addr, dir };
            match moto.wait_ready() {
                Ok(()) => return moto,
                Err(e) => last = e.to_string(),
            }
        }
        panic!("{last}");
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let answered = crate::wait::poll(STARTUP, || match self.child.try_wait() {
            Ok(Some(status)) => Some(Err(format!("moto_server exited early ({status})"))),
            // Ours, not a stranger that got the port first: still running once it answers.
            _ if answers(self.addr) => Some(match self.child.try_wait() {
                Ok(None) => Ok(()),
                _ => Err("moto_server exited early".to_owned()),
            }),
            _ => None,
        });
        match answered {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => anyhow::bail!("{why}; log:\n{}", self.log()),
            Err(waited) => anyhow::bail!(
                "moto_server did not answer on {} within {waited:?}; log:\n{}",
                self.addr,
                self.log()
            ),
        }
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL_STS` and SDK clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's stdout and stderr so far (its request log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when an HTTP request to `/moto-api/` gets any HTTP status line back.
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /moto-api/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
}
