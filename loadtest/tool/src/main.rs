//! `iamlet-loadtool`: the load-test helpers that `oha` cannot be.
//!
//! - `load`: an HTTP/1.1 load client whose connections are bound to chosen 127.0.0.x sources
//!   (iamlet answers by source IP), keep-alive or a new connection per request, closed loop or
//!   a fixed rate, the IMDSv2 flow (token PUT, then the token-authenticated GET) chained on one
//!   connection, and per-source expected answers.
//! - `imds`: a small fake instance metadata service (token PUT, `instance-id`), keep-alive.
//! - `floor`: the least an epoll server can do for the cached-credentials load (a yardstick).
//! - `sts`: a fake STS answering AssumeRole concurrently after a fixed latency.
//! - `gen-pods`: a `--pods-from` file with N pods and M roles, plus a sources file for `load`.
//! - `storm`: 750 pods with distinct roles appear at once; time until all are cached, hits.
//! - `soak`: steady load while pods churn with IP reuse; RSS, errors, wrong-role answers.
//!
//! Loopback only: every address is checked to be in 127.0.0.0/8, every loop is bounded in
//! time (and `load` also in count).

mod args;
mod floor;
mod hist;
mod http;
mod imds;
mod load;
mod pods;
mod procfs;
mod server;
mod soak;
mod storm;
mod sts;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(cmd) = argv.next() else {
        eprintln!(
            "usage: iamlet-loadtool <load|imds|floor|sts|gen-pods|storm|soak|sts-rtt> [--flag value]…"
        );
        return ExitCode::from(64);
    };
    let a = match args::Args::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("iamlet-loadtool {cmd}: {e}");
            return ExitCode::from(64);
        }
    };
    let r = match cmd.as_str() {
        "load" => load::main(&a),
        "imds" => imds::main(&a),
        "floor" => floor::main(&a),
        "gen-pods" => pods::main(&a),
        "storm" => storm::main(&a),
        "soak" => soak::main(&a),
        "sts-rtt" => storm::sts_rtt_main(&a),
        "sts" => sts::main(&a),
        _ => Err(format!("unknown command {cmd}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iamlet-loadtool {cmd}: {e}");
            ExitCode::from(1)
        }
    }
}
