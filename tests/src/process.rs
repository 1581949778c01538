//! Child-process plumbing: capture a child's output line by line in background threads and
//! run short commands with a hard time bound (killed by PID on timeout).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The result of a bounded command. `code` is `None` when it was killed by a signal or timed
/// out (`timed_out` tells which).
#[derive(Debug, Clone)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Output {
    /// True when the command exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

// === impl Lines ===

/// Lines read from one or more pipes by background threads, ANSI colour escapes stripped.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    /// Starts a thread that appends every line of `pipe` (lossy UTF-8) until EOF.
    pub fn follow(&self, pipe: impl Read + Send + 'static) -> JoinHandle<()> {
        let lines = Arc::clone(&self.lines);
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&buf);
                        let s = strip_ansi(s.trim_end_matches(['\n', '\r']));
                        lines.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                    }
                }
            }
        })
    }

    /// A copy of all lines so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All lines so far, joined with `\n`.
    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }
}

/// Removes ANSI CSI escape sequences (`ESC [ ... final-byte`), as tracing's colours.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits for `child` at most `timeout` (polling every 20 ms); kills it by PID on timeout.
/// Returns the exit code (None if signalled) and whether it timed out.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> (Option<i32>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (status.code(), false),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return (None, true);
            }
        }
    }
}

/// Runs `cmd` (stdin null, stdout and stderr captured) for at most `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let (out, err) = (Lines::default(), Lines::default());
    let readers = [
        out.follow(child.stdout.take().expect("piped stdout")),
        err.follow(child.stderr.take().expect("piped stderr")),
    ];
    let (code, timed_out) = wait_bounded(&mut child, timeout);
    // The pipes close when the child is gone; a grandchild holding them could keep a reader
    // alive, so only join readers that finish within a short, fixed bound.
    let deadline = Instant::now() + Duration::from_secs(2);
    for r in readers {
        while !r.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if r.is_finished() {
            let _ = r.join();
        }
    }
    Output {
        code,
        stdout: out.text(),
        stderr: err.text(),
        timed_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_ansi_removes_tracing_colours() {
        let s =
            "\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m \x1b[3maddr\x1b[0m\x1b[2m=\x1b[0m0.0.0.0:1";
        assert_eq!(strip_ansi(s), "2026  INFO addr=0.0.0.0:1");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn run_bounded_captures_both_streams_and_code() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let o = run_bounded(cmd, Duration::from_secs(10));
        assert_eq!(
            (o.code, o.stdout.as_str(), o.stderr.as_str()),
            (Some(3), "out", "err")
        );
        assert!(!o.timed_out);
    }

    #[test]
    fn run_bounded_kills_on_timeout() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let t = Instant::now();
        let o = run_bounded(cmd, Duration::from_millis(200));
        assert!(o.timed_out && o.code.is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
