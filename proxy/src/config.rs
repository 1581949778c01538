//! Validation: turns parsed flags into a checked configuration, or one sentence naming the
//! flag and the fix (exit code 64, like linkerd's EX_USAGE). Everything derived from the
//! flags is computed here once — addresses parsed, patterns compiled, the node's redirect
//! and the resolver's settings — so the rest of the program takes typed values.

use crate::args::{Args, IoDriver, MetadataPolicy, RestrictionFormat, SessionName};
use crate::worker::Limits;
use iamlet_node::iface::{self, IfaceError};
use iamlet_node::{MetadataAddr, RedirectConfig};
use iamlet_resolver::roles::is_valid_base_arn;
use iamlet_resolver::source::kube::KubeOptions;
use iamlet_resolver::{AnnotationKeys, CredPolicy, PodSource, RoleRules, SessionMode};
use std::net::{IpAddr, Ipv6Addr};
use thiserror::Error;

/// Exit code for bad usage.
pub const EX_USAGE: i32 = 64;

/// A configuration problem, phrased as one sentence with the fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// What clap said (its first line), for a flag it could not parse.
    #[error("{0}; run `iamlet --help` for the flags.")]
    Flags(String),
    #[error(
        "--base-role-arn {0:?} is not a role ARN prefix; use the form arn:aws:iam::123456789012:role/ (12-digit account, optional path)."
    )]
    BaseRoleArn(String),
    #[error("--auto-discover-base-arn cannot be used with --base-role-arn; drop one of them.")]
    DiscoverWithBaseArn,
    #[error(
        "--token-jwks-file and --token-issuer go together (the keys and the issuer their tokens name); give both or neither."
    )]
    TokenKeysWithoutIssuer,
    #[error(
        "--default-role and --auto-discover-default-role cannot be used together; drop one of them."
    )]
    DiscoverWithDefaultRole,
    #[error(
        "--host-ip {0:?} is not an IP address; pass the node's IP, e.g. --host-ip=$(HOST_IP) from status.hostIP."
    )]
    HostIp(String),
    #[error(
        "--host-ipv6 {0:?} is not an IPv6 address; pass the node's IPv6 address (status.hostIPs) or omit it to REDIRECT to --app-port."
    )]
    HostIpv6(String),
    #[error(transparent)]
    MetadataAddr(#[from] iamlet_node::imds::MetadataAddrError),
    #[error(
        "--iptables needs --host-ip to know where to redirect metadata traffic; add --host-ip=$(HOST_IP) (status.hostIP from the Downward API)."
    )]
    IptablesNeedsHostIp,
    #[error(
        "--host-ip must be the node's IPv4 address for the iptables rule; give the IPv6 one with --host-ipv6 (and --ipv6)."
    )]
    HostIpNotV4,
    #[error("--host-ipv6 is only used with --ipv6; add --ipv6 or drop --host-ipv6.")]
    HostIpv6WithoutIpv6,
    #[error(
        "--iptables-verify-interval must be greater than 0; use e.g. 10s (how often the rule is checked and restored)."
    )]
    VerifyInterval,
    #[error(
        "--app-port=0 picks a random port, which the iptables rule cannot point at; give --iptables a fixed --app-port (e.g. 8181)."
    )]
    RandomPortWithIptables,
    #[error(transparent)]
    Interfaces(#[from] IfaceError),
    #[error("--workers must be at least 1; omit it for one worker per core.")]
    NoWorkers,
    #[error("--workers is larger than 1024; omit it for one worker per core.")]
    TooManyWorkers,
    #[error("--log-level {0:?} is not a level; use one of trace, debug, info, warn, error.")]
    LogLevel(String),
    #[error(
        "--backoff-max-elapsed-time must be greater than 0; use e.g. 2s (how long a new pod's first request may wait)."
    )]
    NoWait,
    #[error(
        "--pods-from cannot be combined with --api-server or --kubeconfig; use the file (local mode) or the API server, not both."
    )]
    PodsFromWithApiServer,
    #[error(
        "--allow-metadata-path {pattern:?} is not a regular expression ({why}); fix the pattern, e.g. ^/latest/meta-data/placement/.*"
    )]
    AllowPath { pattern: String, why: String },
    #[error(
        "--metadata-policy=allowlist forwards nothing without --allow-metadata-path; add at least one pattern, e.g. --allow-metadata-path='^/latest/meta-data/placement/'."
    )]
    EmptyAllowlist,
    #[error(
        "--max-request-head must be at least 256 and --max-request-body at most 65536; the defaults (8192, 1024) suit every AWS SDK."
    )]
    RequestLimits,
    #[error(
        "--block-user-data and --allow-user-data contradict each other; user-data is blocked by default, so drop --block-user-data."
    )]
    UserDataContradiction,
    #[error(
        "--write-timeout and --max-connections-per-ip must be greater than 0; the defaults (5s, 256) suit every pod."
    )]
    ConnectionLimits,
    #[error("--io-driver=uring needs Linux; use --io-driver=epoll or auto.")]
    UringNeedsLinux,
}

/// Parses the command line (flags, then `IAMLET_*` variables); help and version requests
/// come back as clap errors to print as they are.
pub fn parse_args<I, T>(argv: I) -> Result<Args, Result<clap::Error, ConfigError>>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Args::try_parse_go(argv).map_err(|e| {
        if matches!(
            e.kind(),
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
        ) {
            return Ok(e);
        }
        let text = e.to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or("invalid arguments")
            .trim_start_matches("error: ");
        Err(ConfigError::Flags(first.to_owned()))
    })
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub args: Args,
    pub workers: usize,
    pub metrics_port: u16,
    /// A separate admin listener: `--metrics-port` differs from `--app-port`, or is 0 (any
    /// free port) given explicitly.
    pub separate_admin: bool,
    /// `--metadata-addr`, parsed (resolved at start-up, not here).
    pub metadata: MetadataAddr,
    /// `--host-ip`, parsed; None when unset or empty.
    pub host_ip: Option<IpAddr>,
    /// The redirect `--iptables` installs; None without it.
    pub redirect: Option<RedirectConfig>,
    /// `--allow-metadata-path`, compiled.
    pub allow_paths: Vec<regex::Regex>,
    pub limits: Limits,
    /// tracing filter directive derived from --log-level/--verbose.
    pub log_filter: String,
}

impl Config {
    /// Validates flags without touching the network.
    pub fn validate(args: Args) -> Result<Config, ConfigError> {
        let a = &args;
        if let Some(base) = a.iam.base_role_arn.as_deref().filter(|b| !b.is_empty()) {
            if !is_valid_base_arn(base) {
                return Err(ConfigError::BaseRoleArn(base.to_owned()));
            }
            if a.iam.auto_discover_base_arn {
                return Err(ConfigError::DiscoverWithBaseArn);
            }
        }
        if a.iam.auto_discover_default_role
            && a.iam.default_role.as_deref().is_some_and(|d| !d.is_empty())
        {
            return Err(ConfigError::DiscoverWithDefaultRole);
        }
        if a.token.token_jwks_file.is_some() != a.token.token_issuer.is_some() {
            return Err(ConfigError::TokenKeysWithoutIssuer);
        }
        let (host_ip, redirect) = node_flags(&args)?;
        let metadata = MetadataAddr::parse(&a.node.metadata_addr)?;
        let workers = match a.proxy.workers {
            Some(0) => return Err(ConfigError::NoWorkers),
            Some(n) if n > 1024 => return Err(ConfigError::TooManyWorkers),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let log_filter = log_filter(&a.log.log_level, a.log.verbose)?;
        if a.iam.backoff_max_elapsed_time.is_zero() {
            return Err(ConfigError::NoWait);
        }
        if a.kube.pods_from.is_some()
            && (a.kube.api_server.is_some() || a.kube.kubeconfig.is_some())
        {
            return Err(ConfigError::PodsFromWithApiServer);
        }
        let metrics_port = a.node.metrics_port.unwrap_or(a.node.app_port);
        let allow_paths = allow_paths(&a.proxy.allow_metadata_path)?;
        if a.proxy.metadata_policy == MetadataPolicy::Allowlist
            && a.proxy.allow_metadata_path.is_empty()
        {
            return Err(ConfigError::EmptyAllowlist);
        }
        if a.proxy.max_request_head < 256 || a.proxy.max_request_body > 64 * 1024 {
            return Err(ConfigError::RequestLimits);
        }
        if a.proxy.block_user_data && a.proxy.allow_user_data {
            return Err(ConfigError::UserDataContradiction);
        }
        if a.proxy.write_timeout.is_zero() || a.proxy.max_connections_per_ip == 0 {
            return Err(ConfigError::ConnectionLimits);
        }
        if a.proxy.io_driver == IoDriver::Uring && !cfg!(target_os = "linux") {
            return Err(ConfigError::UringNeedsLinux);
        }
        let limits = Limits {
            max_head: a.proxy.max_request_head,
            max_body: a.proxy.max_request_body,
            header_timeout: a.proxy.header_read_timeout,
            idle_timeout: a.proxy.idle_timeout,
            write_timeout: a.proxy.write_timeout,
            max_connections: a.proxy.max_connections_per_worker,
            max_stranger_connections: Limits::stranger_share(a.proxy.max_connections_per_worker),
        };
        Ok(Config {
            workers,
            metrics_port,
            separate_admin: metrics_port != a.node.app_port || a.node.metrics_port == Some(0),
            metadata,
            host_ip,
            redirect,
            allow_paths,
            limits,
            log_filter,
            args,
        })
    }

    /// Where pods come from: `--pods-from`, else the API server.
    pub fn pod_source(&self) -> PodSource {
        match &self.args.kube.pods_from {
            Some(path) => PodSource::File {
                path: path.clone(),
                node: self.args.kube.node.clone(),
            },
            None => PodSource::Kube(self.kube_options()),
        }
    }

    pub fn kube_options(&self) -> KubeOptions {
        kube_options(&self.args.kube)
    }

    /// The resolver's settings. Node-wide sessions are named after the node (`--node`, else
    /// the host name).
    pub fn resolver(&self, rules: RoleRules) -> iamlet_resolver::Config {
        let a = &self.args;
        let session_prefix = (a.kube.node.clone())
            .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
            .unwrap_or_else(|| "iamlet".into());
        iamlet_resolver::Config {
            rules,
            keys: AnnotationKeys {
                role: a.iam.iam_role_key.clone(),
                external_id: a.iam.iam_external_id.clone(),
                service_account_role: a.iam.service_account_role_key.trim().to_owned(),
            },
            restrictions: a.iam.namespace_restrictions.then(|| {
                iamlet_resolver::NamespaceRestrictions {
                    key: a.iam.namespace_key.clone(),
                    format: match a.iam.namespace_restriction_format {
                        RestrictionFormat::Glob => iamlet_resolver::RestrictionFormat::Glob,
                        RestrictionFormat::Regexp => iamlet_resolver::RestrictionFormat::Regexp,
                    },
                }
            }),
            source: self.pod_source(),
            creds: CredPolicy {
                session_ttl: a.iam.iam_role_session_ttl,
                error_ttl: a.iam.iam_role_error_ttl,
                session_prefix,
                rate_limit: a.sts.sts_rate_limit,
                max_in_flight: a.sts.sts_max_in_flight as usize,
            },
            metadata_addr: self.metadata.hostport().to_owned(),
            sts_timeout: a.sts.sts_timeout,
            sessions: match (a.sts.session_name, a.sts.session_tags) {
                (SessionName::Node, false) => SessionMode::Node,
                (_, tags) => SessionMode::Pod { tags },
            },
            cluster_name: a.sts.cluster_name.clone().filter(|c| !c.is_empty()),
            tokens: iamlet_resolver::tokens::TokenConfig {
                review_audience: a.token.token_review.then(|| a.token.token_audience.clone()),
                jwks_file: a.token.token_jwks_file.clone(),
                issuer: a.token.token_issuer.clone(),
                keys_cache: a.token.token_keys_cache.clone(),
            },
        }
    }
}

/// What the workers share that is not a flag: made at start-up, after the flags.
pub struct Runtime {
    pub handle: iamlet_resolver::Handle,
    pub rules: RoleRules,
    /// `--metadata-addr`, resolved.
    pub upstream: std::net::SocketAddr,
    pub registry: prometheus_client::registry::Registry,
    pub metrics: crate::metrics::ProxyMetrics,
    pub token_key: crate::token::TokenKey,
    pub admin_on_app_port: bool,
    pub node_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Config {
    /// What the workers share: the settings from the flags, and `rt`.
    pub fn shared(&self, rt: Runtime) -> crate::shared::Shared {
        use crate::shared::{Admin, Lifecycle, Readiness, Settings, Shared, UpstreamConfig};
        let (a, p) = (&self.args, &self.args.proxy);
        let readiness = Readiness::new(rt.handle.clone(), rt.node_ready);
        let renders = rt.metrics.metrics_renders.clone();
        Shared {
            settings: Settings {
                rules: rt.rules,
                upstream: UpstreamConfig {
                    addr: rt.upstream,
                    host: self.metadata.hostport().to_owned(),
                    connect_timeout: p.upstream_connect_timeout,
                    response_timeout: p.upstream_timeout,
                },
                wait_ip: a.iam.backoff_max_elapsed_time,
                token_audience: a.token.token_audience.clone(),
                node_name: a.kube.node.clone().filter(|n| !n.is_empty()),
                debug: a.log.debug,
                admin_on_app_port: rt.admin_on_app_port,
                limits: self.limits.clone(),
                imdsv2: p.imdsv2,
                policy: p.metadata_policy,
                allow_paths: self.allow_paths.clone(),
                forward_user_data: p.allow_user_data,
                forward_identity_signature: p.allow_instance_identity_signature,
                shutdown_grace: p.shutdown_grace,
            },
            handle: rt.handle,
            token_key: rt.token_key,
            sources: crate::fairness::SourceLimiter::new(p.max_connections_per_ip),
            metrics: rt.metrics,
            admin: Admin::new(rt.registry, readiness, p.metrics_max_age, renders),
            life: Lifecycle::new(rt.stopping),
        }
    }

    /// Logs to stderr as `--log-format` says, at `--log-level` (`IAMLET_LOG` overrides).
    pub fn init_tracing(&self) {
        let filter = std::env::var("IAMLET_LOG").unwrap_or_else(|_| self.log_filter.clone());
        let filter = tracing_subscriber::EnvFilter::try_new(&filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match self.args.log.log_format {
            crate::args::LogFormat::Json => builder.json().init(),
            crate::args::LogFormat::Text => builder.with_ansi(false).init(),
        }
    }
}

/// `--auto-discover-*` could not learn the node's role, or the role flags do not make rules.
#[derive(Debug, Error)]
pub enum RolesError {
    #[error(transparent)]
    Discovery(#[from] iamlet_node::imds::ImdsError),
    #[error(transparent)]
    Rules(#[from] iamlet_resolver::roles::RoleConfigError),
}

impl Config {
    /// The role rules: `--base-role-arn` and `--default-role`, or what the node's metadata
    /// service says with `--auto-discover-base-arn` / `--auto-discover-default-role`.
    pub fn role_rules(&self, imds: &iamlet_node::imds::Client) -> Result<RoleRules, RolesError> {
        let iam = &self.args.iam;
        let (mut base_arn, mut default_role) =
            (iam.base_role_arn.clone(), iam.default_role.clone());
        if iam.auto_discover_base_arn || iam.auto_discover_default_role {
            let arn = imds.base_arn()?;
            tracing::info!(base_arn = %arn, "base ARN discovered");
            base_arn = Some(arn);
            if iam.auto_discover_default_role {
                let role = imds.instance_role()?;
                tracing::info!(default_role = %role, "using the instance's role as the default role");
                default_role = Some(role);
            }
        }
        Ok(RoleRules::new(
            base_arn.as_deref(),
            default_role.as_deref(),
        )?)
    }
}

/// How to reach the API server.
pub fn kube_options(k: &crate::args::KubeArgs) -> KubeOptions {
    KubeOptions {
        kubeconfig: k.kubeconfig.clone(),
        api_server: k.api_server.clone(),
        api_token: k.api_token.clone(),
        insecure: k.insecure,
        node: k.node.clone(),
    }
}

/// The node flags, checked in kube2iam's order: `--host-ip`, then the interfaces, the
/// intervals and the IPv6 address; with `--iptables`, the redirect. An empty address is unset.
fn node_flags(a: &Args) -> Result<(Option<IpAddr>, Option<RedirectConfig>), ConfigError> {
    let n = &a.node;
    let host_ip = match n.host_ip.as_deref().filter(|h| !h.is_empty()) {
        Some(h) => Some(
            h.parse::<IpAddr>()
                .map_err(|_| ConfigError::HostIp(h.to_owned()))?,
        ),
        None => None,
    };
    if n.iptables && host_ip.is_none() {
        return Err(ConfigError::IptablesNeedsHostIp);
    }
    iface::validate_values(&n.host_interface)?;
    if n.iptables_verify_interval.is_zero() {
        return Err(ConfigError::VerifyInterval);
    }
    if n.iptables && n.app_port == 0 {
        return Err(ConfigError::RandomPortWithIptables);
    }
    if n.iptables && host_ip.is_some_and(|ip| ip.is_ipv6()) {
        return Err(ConfigError::HostIpNotV4);
    }
    let host_ipv6 = match n.host_ipv6.as_deref().filter(|h| !h.is_empty()) {
        Some(h) => {
            let ip = h
                .parse::<Ipv6Addr>()
                .map_err(|_| ConfigError::HostIpv6(h.to_owned()))?;
            if !n.ipv6 {
                return Err(ConfigError::HostIpv6WithoutIpv6);
            }
            Some(ip)
        }
        None => None,
    };
    let redirect = match host_ip {
        Some(IpAddr::V4(v4)) if n.iptables => Some(RedirectConfig {
            app_port: n.app_port,
            host_ip: v4,
            host_ipv6,
            interfaces: n.host_interface.clone(),
            backend: n.iptables_backend.into(),
            ipv6: n.ipv6,
            remove_on_exit: n.iptables_remove_on_exit,
            verify_interval: n.iptables_verify_interval,
            container_credentials: n.container_credentials,
        }),
        _ => None,
    };
    Ok((host_ip, redirect))
}

/// Compiles `--allow-metadata-path` patterns.
pub fn allow_paths(patterns: &[String]) -> Result<Vec<regex::Regex>, ConfigError> {
    patterns
        .iter()
        .map(|p| {
            regex::Regex::new(p).map_err(|e| {
                let first = e.to_string();
                let why = first.lines().last().unwrap_or("invalid").trim().to_owned();
                ConfigError::AllowPath {
                    pattern: p.clone(),
                    why,
                }
            })
        })
        .collect()
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
            return Err(ConfigError::LogLevel(level.to_owned()));
        }
    };
    let lvl = if verbose && matches!(lvl, "error" | "warn" | "info") {
        "debug"
    } else {
        lvl
    };
    // kube-runtime's watcher warns on every refused (403) list, each retry: the resolver says
    // it itself, once per refusal streak where that is the point (ServiceAccounts), and per
    // failure for pods and namespaces.
    Ok(format!(
        "warn,kube_runtime::watcher=error,iamlet={lvl},iamlet_resolver={lvl}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(args: &[&str]) -> Result<Config, ConfigError> {
        let args = parse_args(std::iter::once("iamlet").chain(args.iter().copied()))
            .map_err(|e| e.unwrap_err())?;
        Config::validate(args)
    }

    fn node(args: &[&str]) -> crate::args::NodeArgs {
        Args::try_parse_go(std::iter::once("iamlet").chain(args.iter().copied()))
            .unwrap()
            .node
    }

    #[test]
    fn seed_daemonset_args_pass_check_config() {
        let c = check(&crate::args::tests::seed_args()).unwrap();
        assert_eq!(c.metrics_port, 8181);
        assert_eq!(c.metadata.hostport(), "169.254.169.254:80");
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
            let e = check(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(!e.contains('\n') && e.ends_with('.'), "one sentence: {e}");
        }
    }

    #[test]
    fn node_validations_are_one_sentence() {
        let cases: &[(&[&str], &str)] = &[
            (&["--host-interface="], "--host-interface is empty"),
            (&["--host-interface=!a,!b"], "at most one !negated"),
            (
                &["--iptables-verify-interval=0s"],
                "--iptables-verify-interval",
            ),
            (
                &["--iptables", "--host-ip=fd00::1"],
                "--host-ip must be the node's IPv4 address",
            ),
            (
                &["--host-ipv6=10.0.0.1", "--ipv6"],
                "--host-ipv6 \"10.0.0.1\"",
            ),
            (&["--host-ipv6=fd00::1"], "only used with --ipv6"),
            (
                &["--iptables", "--host-ip=10.0.0.1", "--app-port=0"],
                "--app-port=0",
            ),
        ];
        for (args, want) in cases {
            let e = check(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(e.ends_with('.') && !e.contains('\n'), "{e}");
        }
        // Empty addresses are unset, as in kube2iam (`--host-ip=$(HOST_IP)` with it empty).
        let c = check(&["--host-ip=", "--host-ipv6="]).unwrap();
        assert_eq!((c.host_ip, c.redirect), (None, None));
        let c = check(&["--iptables", "--host-interface=auto", "--host-ip=10.0.0.1"]).unwrap();
        assert_eq!(
            c.redirect.map(|r| (r.host_ip, r.interfaces)),
            Some(("10.0.0.1".parse().unwrap(), vec!["auto".to_owned()]))
        );
    }

    #[test]
    fn node_flags_parse_with_kube2iam_defaults() {
        let n = node(&[]);
        assert_eq!(n.host_interface, ["docker0"]);
        assert_eq!(n.iptables_verify_interval, Duration::from_secs(10));
        assert!(!n.iptables_remove_on_exit && !n.ipv6);
        let n = node(&[
            "--host-interface=cali+,!eth0",
            "--host-interface",
            "weave",
            "--iptables-verify-interval=500ms",
            "--iptables-remove-on-exit",
            "--iptables-backend=legacy",
            "--ipv6",
            "--host-ipv6=fd00::1",
        ]);
        assert_eq!(n.host_interface, ["cali+", "!eth0", "weave"]);
        assert_eq!(n.iptables_verify_interval, Duration::from_millis(500));
        assert!(n.iptables_remove_on_exit && n.ipv6);
        assert_eq!(n.iptables_backend, crate::args::IptablesBackend::Legacy);
    }

    #[test]
    fn subcommands_parse_after_the_agent_flags() {
        use crate::args::Command;
        let a = Args::try_parse_go(["iamlet", "--app-port=9", "cleanup", "--kube2iam"]).unwrap();
        assert!(matches!(a.command, Some(Command::Cleanup(c)) if c.kube2iam));
        assert_eq!(a.node.app_port, 9);
        let a = Args::try_parse_go(["iamlet", "doctor", "--test-role=r"]).unwrap();
        assert!(
            matches!(a.command, Some(Command::Doctor(d)) if d.test_role.as_deref() == Some("r"))
        );
        assert!(Args::try_parse_go(["iamlet"]).unwrap().command.is_none());
    }

    #[test]
    fn logrus_levels_map_to_tracing() {
        assert_eq!(
            log_filter("warning", false).unwrap(),
            "warn,kube_runtime::watcher=error,iamlet=warn,iamlet_resolver=warn"
        );
        assert_eq!(
            log_filter("info", true).unwrap(),
            "warn,kube_runtime::watcher=error,iamlet=debug,iamlet_resolver=debug"
        );
        assert_eq!(
            log_filter("FATAL", false).unwrap(),
            "warn,kube_runtime::watcher=error,iamlet=error,iamlet_resolver=error"
        );
    }
}
