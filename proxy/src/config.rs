//! Validation: turns parsed flags into a checked configuration, or one sentence naming the
//! flag and the fix (exit code 64, like linkerd's EX_USAGE).

use crate::args::{Args, IoDriver};
use iamlet_resolver::roles::is_valid_base_arn;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use thiserror::Error;

/// Exit code for bad usage.
pub const EX_USAGE: i32 = 64;

/// A configuration problem, phrased as one sentence with the fix.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(s: impl Into<String>) -> ConfigError {
    ConfigError(s.into())
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub args: Args,
    pub workers: usize,
    pub metrics_port: u16,
    pub host_ip: Option<IpAddr>,
    /// `host:port` with the default port 80 filled in.
    pub metadata_hostport: String,
    /// tracing filter directive derived from --log-level/--verbose.
    pub log_filter: String,
}

impl Config {
    /// Validates flags without touching the network (beyond parsing literal addresses).
    pub fn validate(args: Args) -> Result<Config, ConfigError> {
        let a = &args;
        if let Some(base) = a.iam.base_role_arn.as_deref().filter(|b| !b.is_empty()) {
            if !is_valid_base_arn(base) {
                return Err(err(format!(
                    "--base-role-arn {base:?} is not a role ARN prefix; use the form arn:aws:iam::123456789012:role/ (12-digit account, optional path)."
                )));
            }
            if a.iam.auto_discover_base_arn {
                return Err(err(
                    "--auto-discover-base-arn cannot be used with --base-role-arn; drop one of them.",
                ));
            }
        }
        if a.iam.auto_discover_default_role
            && a.iam.default_role.as_deref().is_some_and(|d| !d.is_empty())
        {
            return Err(err(
                "--default-role and --auto-discover-default-role cannot be used together; drop one of them.",
            ));
        }
        let host_ip = match a.node.host_ip.as_deref().filter(|h| !h.is_empty()) {
            Some(h) => Some(h.parse::<IpAddr>().map_err(|_| {
                err(format!("--host-ip {h:?} is not an IP address; pass the node's IP, e.g. --host-ip=$(HOST_IP) from status.hostIP."))
            })?),
            None => None,
        };
        if a.node.iptables && host_ip.is_none() {
            return Err(err(
                "--iptables needs --host-ip to know where to redirect metadata traffic; add --host-ip=$(HOST_IP) (status.hostIP from the Downward API).",
            ));
        }
        crate::node::validate(&a.node, host_ip).map_err(err)?;
        let metadata_hostport = metadata_hostport(&a.node.metadata_addr)?;
        let workers = match a.proxy.workers {
            Some(0) => {
                return Err(err(
                    "--workers must be at least 1; omit it for one worker per core.",
                ));
            }
            Some(n) if n > 1024 => {
                return Err(err(
                    "--workers is larger than 1024; omit it for one worker per core.",
                ));
            }
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let log_filter = log_filter(&a.log.log_level, a.log.verbose)?;
        if a.iam.backoff_max_elapsed_time.is_zero() {
            return Err(err(
                "--backoff-max-elapsed-time must be greater than 0; use e.g. 2s (how long a new pod's first request may wait).",
            ));
        }
        if a.kube.pods_from.is_some()
            && (a.kube.api_server.is_some() || a.kube.kubeconfig.is_some())
        {
            return Err(err(
                "--pods-from cannot be combined with --api-server or --kubeconfig; use the file (local mode) or the API server, not both.",
            ));
        }
        let metrics_port = a.node.metrics_port.unwrap_or(a.node.app_port);
        allow_paths(&a.proxy.allow_metadata_path)?;
        if a.proxy.metadata_policy == crate::args::MetadataPolicy::Allowlist
            && a.proxy.allow_metadata_path.is_empty()
        {
            return Err(err(
                "--metadata-policy=allowlist forwards nothing without --allow-metadata-path; add at least one pattern, e.g. --allow-metadata-path='^/latest/meta-data/placement/'.",
            ));
        }
        if a.proxy.max_request_head < 256 || a.proxy.max_request_body > 64 * 1024 {
            return Err(err(
                "--max-request-head must be at least 256 and --max-request-body at most 65536; the defaults (8192, 1024) suit every AWS SDK.",
            ));
        }
        if a.proxy.block_user_data && a.proxy.allow_user_data {
            return Err(err(
                "--block-user-data and --allow-user-data contradict each other; user-data is blocked by default, so drop --block-user-data.",
            ));
        }
        if a.proxy.write_timeout.is_zero() || a.proxy.max_connections_per_ip == 0 {
            return Err(err(
                "--write-timeout and --max-connections-per-ip must be greater than 0; the defaults (5s, 256) suit every pod.",
            ));
        }
        if a.proxy.io_driver == IoDriver::Uring && !cfg!(target_os = "linux") {
            return Err(err(
                "--io-driver=uring needs Linux; use --io-driver=epoll or auto.",
            ));
        }
        Ok(Config {
            workers,
            metrics_port,
            host_ip,
            metadata_hostport,
            log_filter,
            args,
        })
    }
}

/// `--metadata-addr` is `host[:port]` (kube2iam accepts a bare host); port 80 by default.
pub fn metadata_hostport(addr: &str) -> Result<String, ConfigError> {
    let a = addr
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let bad = || {
        err(format!(
            "--metadata-addr {addr:?} is not host[:port]; use e.g. 169.254.169.254 or 127.0.0.1:1338."
        ))
    };
    if a.is_empty() || a.contains('/') || a.contains(char::is_whitespace) {
        return Err(bad());
    }
    if a.parse::<SocketAddr>().is_ok() {
        return Ok(a.to_owned());
    }
    if let Ok(ip) = a
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, 80).to_string());
    }
    match a.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(a.to_owned()),
        Some(_) => Err(bad()),
        None => Ok(format!("{a}:80")),
    }
}

/// Compiles `--allow-metadata-path` patterns.
pub fn allow_paths(patterns: &[String]) -> Result<Vec<regex::Regex>, ConfigError> {
    patterns
        .iter()
        .map(|p| {
            regex::Regex::new(p).map_err(|e| {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or("invalid").trim().to_owned();
                err(format!("--allow-metadata-path {p:?} is not a regular expression ({first}); fix the pattern, e.g. ^/latest/meta-data/placement/.*"))
            })
        })
        .collect()
}

/// Resolves the metadata address once at start-up.
pub fn resolve_metadata(hostport: &str) -> Result<SocketAddr, ConfigError> {
    hostport.to_socket_addrs().ok().and_then(|mut it| it.next()).ok_or_else(|| {
        err(format!("--metadata-addr {hostport:?} does not resolve; use an IP address such as 169.254.169.254."))
    })
}

/// Maps logrus level names to a tracing filter.
pub fn log_filter(level: &str, verbose: bool) -> Result<String, ConfigError> {
    let lvl = match level.to_ascii_lowercase().as_str() {
        "panic" | "fatal" | "error" => "error",
        "warn" | "warning" => "warn",
        "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        _ => {
            return Err(err(format!(
                "--log-level {level:?} is not a level; use one of trace, debug, info, warn, error."
            )));
        }
    };
    let lvl = if verbose && matches!(lvl, "error" | "warn" | "info") {
        "debug"
    } else {
        lvl
    };
    Ok(format!("warn,iamlet={lvl},iamlet_resolver={lvl}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn check(args: &[&str]) -> Result<Config, ConfigError> {
        Config::validate(
            Args::try_parse_from(std::iter::once("iamlet").chain(args.iter().copied())).unwrap(),
        )
    }

    #[test]
    fn seed_daemonset_args_pass_check_config() {
        let c = check(&crate::args::tests::SEED_ARGS).unwrap();
        assert_eq!(c.metrics_port, 8181);
        assert_eq!(c.metadata_hostport, "169.254.169.254:80");
    }

    #[test]
    fn kube2iam_validations_name_the_flag_and_the_fix() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--base-role-arn=arn:aws:iam::123:role/"],
                "--base-role-arn",
            ),
            (
                &[
                    "--base-role-arn=arn:aws:iam::123456789012:role/",
                    "--auto-discover-base-arn",
                ],
                "--auto-discover-base-arn cannot be used with --base-role-arn",
            ),
            (
                &["--default-role=x", "--auto-discover-default-role"],
                "--default-role and --auto-discover-default-role",
            ),
            (&["--iptables"], "--iptables needs --host-ip"),
            (&["--host-ip=node-1"], "--host-ip"),
            (&["--metadata-addr=http://1.2.3.4/x"], "--metadata-addr"),
            (&["--log-level=loud"], "--log-level"),
            (&["--workers=0"], "--workers"),
            (&["--pods-from=/p", "--api-server=https://x"], "--pods-from"),
        ];
        for (args, want) in cases {
            let e = check(args).unwrap_err().0;
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(!e.contains('\n') && e.ends_with('.'), "one sentence: {e}");
        }
    }

    #[test]
    fn metadata_addr_forms() {
        assert_eq!(
            metadata_hostport("169.254.169.254").unwrap(),
            "169.254.169.254:80"
        );
        assert_eq!(
            metadata_hostport("127.0.0.1:1338").unwrap(),
            "127.0.0.1:1338"
        );
        assert_eq!(metadata_hostport("localhost:99").unwrap(), "localhost:99");
        assert_eq!(
            metadata_hostport("[fd00:ec2::254]").unwrap(),
            "[fd00:ec2::254]:80"
        );
        assert_eq!(metadata_hostport("imds").unwrap(), "imds:80");
        assert!(metadata_hostport("a:b").is_err());
    }

    #[test]
    fn logrus_levels_map_to_tracing() {
        assert_eq!(
            log_filter("warning", false).unwrap(),
            "warn,iamlet=warn,iamlet_resolver=warn"
        );
        assert_eq!(
            log_filter("info", true).unwrap(),
            "warn,iamlet=debug,iamlet_resolver=debug"
        );
        assert_eq!(
            log_filter("FATAL", false).unwrap(),
            "warn,iamlet=error,iamlet_resolver=error"
        );
    }
}
