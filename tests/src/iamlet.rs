//! `Iamlet`: the real `iamlet` binary as a child process, configured for loopback tests
//! (pods from a file, STS = moto, upstream IMDS = the fake), its log captured line by line.

use crate::imds::FakeImds;
use crate::moto::Moto;
use crate::process::{Lines, Output, run_bounded, wait_bounded};
use crate::util::{TempDir, workspace_root};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long iamlet may take to log that it is listening.
const STARTUP: Duration = Duration::from_secs(30);
/// Bound on `run_cli` commands.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The binary under test: `$IAMLET_BIN`, else `<workspace>/target/debug/iamlet`.
pub fn binary() -> PathBuf {
    let bin = std::env::var_os("IAMLET_BIN").map_or_else(
        || workspace_root().join("target/debug/iamlet"),
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "iamlet binary not found at {}: run `cargo build -p iamlet` first",
        bin.display()
    );
    bin
}

/// A command for the binary with a hermetic environment: inherited `AWS_*`, `IAMLET_*` and
/// `RUST_LOG` removed; test region and credentials set; IMDS lookups by the SDK disabled;
/// `/metrics` rendered on every scrape (`IAMLET_METRICS_MAX_AGE=0s`), since tests read a
/// counter right after the event it counts (a flag given to the builder overrides it; the
/// hostile tests run the default).
fn command(bin: PathBuf) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("IAMLET_") || k == "RUST_LOG" {
            cmd.env_remove(&*k);
        }
    }
    cmd.envs([
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("NO_COLOR", "1"),
        ("IAMLET_METRICS_MAX_AGE", "0s"),
    ]);
    cmd
}

/// Builder for [`Iamlet`]; see [`Iamlet::builder`].
#[derive(Debug, Default, Clone)]
pub struct IamletBuilder {
    binary: Option<PathBuf>,
    pods_yaml: Option<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// Return from `start` once listening, without waiting for the first pod list.
    unsynced: bool,
    /// Return from `start` once the log has this line, listening or not.
    until: Option<String>,
}

impl IamletBuilder {
    /// Pods (a `kubectl get pods -o yaml` List or multi-document YAML), written to a file
    /// passed as `--pods-from`.
    pub fn pods_yaml(mut self, yaml: &str) -> Self {
        self.pods_yaml = Some(yaml.to_string());
        self
    }

    /// Runs `path` instead of [`binary()`] (used by the support self-tests).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// One extra command-line argument (repeatable).
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// One environment variable (applied after the defaults, so it can override them).
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// Use `moto` as STS (`AWS_ENDPOINT_URL_STS`).
    pub fn sts(self, moto: &Moto) -> Self {
        self.env("AWS_ENDPOINT_URL_STS", moto.endpoint())
    }

    /// Use `imds` as the upstream metadata service (`--metadata-addr`).
    pub fn imds(self, imds: &FakeImds) -> Self {
        self.arg(format!("--metadata-addr=127.0.0.1:{}", imds.addr().port()))
    }

    /// `--io-driver=epoll|uring`.
    pub fn driver(self, driver: &str) -> Self {
        self.arg(format!("--io-driver={driver}"))
    }

    /// `start` returns once iamlet listens, before its first pod list (for tests of what
    /// pods see before the first sync).
    pub fn unsynced(mut self) -> Self {
        self.unsynced = true;
        self
    }

    /// `start` returns as soon as the log has a line containing `needle` (e.g. a step of a
    /// handover, before the new process listens); [`Iamlet::addr`] is then unknown.
    pub fn until(mut self, needle: &str) -> Self {
        self.until = Some(needle.to_owned());
        self
    }

    /// Spawns iamlet and waits (bounded) for its `listening ... addr=` log line and, unless
    /// [`IamletBuilder::unsynced`], for its `ready:` line (the first pod list is published).
    /// Panics with the exit status and full log if it exits first or never gets there.
    pub fn start(self) -> Iamlet {
        let dir = TempDir::new("iamlet");
        let mut cmd = command(self.binary.unwrap_or_else(binary));
        let pods_file = self.pods_yaml.map(|yaml| {
            let p = dir.path().join("pods.yaml");
            std::fs::write(&p, yaml).expect("write pods.yaml");
            cmd.arg(format!("--pods-from={}", p.display()));
            p
        });
        if !self.args.iter().any(|a| a.starts_with("--app-port")) {
            cmd.arg("--app-port=0");
        }
        // Never the real metadata address from the test's namespace: without an upstream
        // chosen by the test, pass-through goes to the discard port on loopback (refused).
        if !self.args.iter().any(|a| a.starts_with("--metadata-addr")) {
            cmd.arg("--metadata-addr=127.0.0.1:9");
        }
        cmd.args(&self.args).envs(self.envs);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn iamlet: {e}"));
        let log = Lines::default();
        log.follow(child.stdout.take().expect("piped stdout"));
        log.follow(child.stderr.take().expect("piped stderr"));
        let mut me = Iamlet {
            child,
            log,
            port: 0,
            admin_port: None,
            pods_file,
            _dir: dir,
        };
        if let Some(needle) = &self.until {
            if !me.wait_for_log(needle, STARTUP) {
                let log = me.log();
                drop(me);
                panic!("iamlet did not log `{needle}` within {STARTUP:?}; log:\n{log}");
            }
            return me;
        }
        match me.wait_listening() {
            Ok(port) => me.port = port,
            Err(msg) => {
                drop(me); // kill and clean up before panicking: the log is in the message
                panic!("{msg}");
            }
        }
        if !self.unsynced && !me.wait_for_log("ready: the first pod list", STARTUP) {
            let log = me.log();
            drop(me);
            panic!("iamlet did not log `ready:` within {STARTUP:?}; log:\n{log}");
        }
        me
    }
}

// === impl Iamlet ===

/// A running iamlet; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Iamlet {
    child: Child,
    log: Lines,
    port: u16,
    admin_port: Option<u16>,
    pods_file: Option<PathBuf>,
    _dir: TempDir,
}

impl Iamlet {
    pub fn builder() -> IamletBuilder {
        IamletBuilder::default()
    }

    /// Runs the binary to completion (at most 60 s) with the test environment, for
    /// `--help`, `--check-config`, bad flags and subcommands.
    pub fn run_cli(args: &[&str]) -> Output {
        let mut cmd = command(binary());
        cmd.args(args);
        run_bounded(cmd, CLI_TIMEOUT)
    }

    /// As [`Iamlet::run_cli`], through `program` (a wrapper that execs the binary, e.g. an
    /// in-cluster one) with `envs` added to the test environment.
    pub fn run_cli_via(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut cmd = command(program.to_path_buf());
        cmd.args(args).envs(envs.iter().copied());
        run_bounded(cmd, CLI_TIMEOUT)
    }

    /// The port from the `listening` line, or why there is none (with the full log).
    fn wait_listening(&mut self) -> anyhow::Result<u16> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let lines = self.log.snapshot();
            if let Some(port) = lines.iter().find_map(|l| listening_port(l, Listener::App)) {
                self.admin_port = lines
                    .iter()
                    .find_map(|l| listening_port(l, Listener::Admin));
                return Ok(port);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200)); // let the readers drain
                anyhow::bail!(
                    "iamlet exited before listening ({status}); log:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                self.kill_9();
                anyhow::bail!(
                    "iamlet did not log `listening addr=` within {STARTUP:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pod-facing address (127.0.0.1 and the port iamlet logged).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The separate admin address, when iamlet logged `admin listening addr=` before its
    /// pod-facing `listening` line (None: admin paths are served on [`Iamlet::addr`]).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_port
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file given as `--pods-from`; rewrite it to change the pods. Panics if the
    /// builder was given no pods.
    pub fn pods_file_path(&self) -> &Path {
        self.pods_file
            .as_deref()
            .expect("iamlet was started without .pods_yaml(..)")
    }

    /// Everything iamlet printed so far (stdout and stderr lines, colours stripped).
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits at most `timeout` for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        crate::wait::poll(timeout, || {
            self.log.snapshot().iter().any(|l| l.contains(needle))
        })
        .is_ok()
    }

    /// The exit status if iamlet has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits at most `timeout` for iamlet to exit by itself (killing it after that);
    /// returns its exit code (None if signalled or killed) and whether it timed out.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, bool) {
        wait_bounded(&mut self.child, timeout)
    }

    /// SIGKILL now and reap.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Iamlet {
    fn drop(&mut self) {
        self.kill_9();
        if std::thread::panicking() {
            eprintln!(
                "--- iamlet log (pid {}) ---\n{}\n--- end ---",
                self.pid(),
                self.log()
            );
        }
    }
}

/// Which listener a log line announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// The pod-facing port: `listening addr=...`.
    App,
    /// The separate admin port, when there is one: `admin listening addr=...`.
    Admin,
}

/// The port in a `[admin ]listening ... addr=IP:PORT` line (text or JSON log format).
fn listening_port(line: &str, which: Listener) -> Option<u16> {
    let admin = line.contains("admin listening");
    if !line.contains("listening") || admin != (which == Listener::Admin) {
        return None;
    }
    let (_, rest) = line
        .split_once("addr=")
        .or_else(|| line.split_once("\"addr\":\""))?;
    let token = rest
        .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .next()?;
    token
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.port())
        .filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::{Listener, listening_port};

    #[test]
    fn listening_port_is_parsed_from_text_and_json_logs() {
        let l = "2026-11-28T22:00:00.000000Z  INFO iamlet: listening addr=0.0.0.0:41234 workers=2";
        assert_eq!(listening_port(l, Listener::App), Some(41234));
        assert_eq!(listening_port(l, Listener::Admin), None);
        let l = "INFO listening addr=127.0.0.1:8181";
        assert_eq!(listening_port(l, Listener::App), Some(8181));
        let j = r#"{"level":"INFO","fields":{"message":"listening","addr":"[::]:9000"}}"#;
        assert_eq!(listening_port(j, Listener::App), Some(9000));
        assert_eq!(
            listening_port("INFO other addr=0.0.0.0:1", Listener::App),
            None
        );
        assert_eq!(
            listening_port("INFO listening addr=0.0.0.0:0", Listener::App),
            None
        );
    }

    #[test]
    fn admin_listening_line_is_not_the_app_port() {
        let l = "2026-11-28T22:00:00Z  INFO iamlet: admin listening addr=0.0.0.0:8182";
        assert_eq!(listening_port(l, Listener::App), None);
        assert_eq!(listening_port(l, Listener::Admin), Some(8182));
    }
}
