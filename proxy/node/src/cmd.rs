//! Running the node's tools (iptables, conntrack) with a time bound: a child that does not
//! finish is killed by PID.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

/// A tool that could not run, or ran and failed.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("{prog}: {error}")]
    Start { prog: String, error: std::io::Error },
    /// `what` is the command line as the sentence shows it; `reason` is [`Out::reason`].
    #[error("{what} failed ({reason})")]
    Failed { what: String, reason: String },
}

/// Runs `prog args...` like [`run`]; a non-zero exit is an error naming `what`.
pub fn run_ok(
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
    what: impl FnOnce() -> String,
) -> Result<Out, CommandError> {
    let out = run(prog, args, stdin).map_err(|error| CommandError::Start {
        prog: prog.to_owned(),
        error,
    })?;
    if out.ok() {
        Ok(out)
    } else {
        Err(CommandError::Failed {
            what: what(),
            reason: out.reason(),
        })
    }
}

/// Bound on one tool run (`-w` waits on the xtables lock for at most [`LOCK_WAIT_S`]).
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds iptables waits for the xtables lock (`-w N`).
pub const LOCK_WAIT_S: &str = "10";

/// A finished command.
#[derive(Debug, Clone)]
pub struct Out {
    /// Exit code; None when killed (timeout) or signalled.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// The first line of stderr (or stdout), for an error sentence.
    pub fn reason(&self) -> String {
        let line = self
            .stderr
            .lines()
            .chain(self.stdout.lines())
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("no output");
        match self.code {
            Some(c) => format!("exit {c}: {line}"),
            None => format!("timed out or killed: {line}"),
        }
    }
}

/// Finds `name` on `$PATH`, then in the sbin directories (often missing from a container's
/// PATH).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `prog args...` with `stdin` fed, at most [`TIMEOUT`]. Err when it cannot start.
pub fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> std::io::Result<Out> {
    let exe = which(prog).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{prog} not found on PATH or in /usr/sbin, /sbin"),
        )
    })?;
    let mut child = Command::new(exe)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.to_owned();
        std::thread::Builder::new()
            .name("iamlet-cmd-in".into())
            .spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            })?;
    }
    let out_pipe = child.stdout.take().expect("piped stdout");
    let err_pipe = child.stderr.take().expect("piped stderr");
    let read_all = |name: &str, mut pipe: Box<dyn Read + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut s = Vec::new();
                let _ = pipe.read_to_end(&mut s);
                s
            })
    };
    let out_reader = read_all("iamlet-cmd-out", Box::new(out_pipe))?;
    let err_reader = read_all("iamlet-cmd-err", Box::new(err_pipe))?;
    let deadline = Instant::now() + TIMEOUT;
    let code = loop {
        match child.try_wait()? {
            Some(status) => break status.code(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    Ok(Out {
        code,
        stdout: text(out_reader.join().unwrap_or_default()),
        stderr: text(err_reader.join().unwrap_or_default()),
    })
}
