//! Command-line flags: every kube2iam flag with its name, default and syntax, plus iamlet's
//! own. Every flag also reads an `IAMLET_*` environment variable.

use crate::duration::parse_go_duration;
use clap::{ArgAction, Args as ClapArgs, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// A flag value of the wrong shape (clap prefixes the flag and the value).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FlagError {
    #[error("invalid boolean {0:?}: use true or false")]
    Bool(String),
}

/// Go/pflag boolean syntax: bare `--flag`, or `--flag=true|false|1|0|t|f`.
pub fn parse_go_bool(s: &str) -> Result<bool, FlagError> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(FlagError::Bool(s.to_owned())),
    }
}

/// Makes every flag that derive made a plain switch (a `bool` field) a Go/pflag boolean, as
/// kube2iam's are: `--flag` alone, or `--flag=true|false|1|0|t|f`, never a separate value.
fn go_bools(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        if !matches!(a.get_action(), ArgAction::SetTrue) {
            return a;
        }
        let name = a.get_id().as_str().to_uppercase();
        a.action(ArgAction::Set)
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .value_parser(parse_go_bool)
            .value_name(name)
    })
}

/// Which io driver the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoDriver {
    /// io_uring when the kernel supports it, else epoll.
    Auto,
    Uring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestrictionFormat {
    Glob,
    Regexp,
}

/// Kubernetes API access (kube2iam's flags).
#[derive(Debug, Clone, ClapArgs)]
pub struct KubeArgs {
    /// Path to a kubeconfig (default: in-cluster configuration)
    #[arg(long, env = "IAMLET_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Endpoint for the api server
    #[arg(long, env = "IAMLET_API_SERVER", value_name = "URL")]
    pub api_server: Option<String>,
    /// Token to authenticate with the api server
    #[arg(
        long,
        env = "IAMLET_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,
    /// Kubernetes server should be accessed without verifying the TLS. Testing only
    #[arg(long, env = "IAMLET_INSECURE", default_value = "false")]
    pub insecure: bool,
    /// Name of the node where iamlet is running (watch only its pods)
    #[arg(long, env = "IAMLET_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// Kubernetes caches resync period (accepted for compatibility; watches never need it)
    #[arg(long, env = "IAMLET_CACHE_RESYNC_PERIOD", default_value = "30m", value_parser = parse_go_duration, value_name = "DURATION")]
    pub cache_resync_period: Duration,
    /// Queries the k8s api server to find the source of truth when the pod cache contains multiple pods with the same IP (superseded: owners are decided by phase and age)
    #[arg(
        long,
        env = "IAMLET_RESOLVE_DUPLICATE_CACHE_IPS",
        default_value = "false"
    )]
    pub resolve_duplicate_cache_ips: bool,
    /// Read pods (and namespaces and ServiceAccounts) from this file instead of the API
    /// server: the output of `kubectl get pods,namespaces,serviceaccounts -A -o yaml` (YAML or
    /// JSON, List or multi-document), re-read when it changes
    #[arg(long, env = "IAMLET_PODS_FROM", value_name = "FILE")]
    pub pods_from: Option<PathBuf>,
}

/// Roles and credentials (kube2iam's flags).
#[derive(Debug, Clone, ClapArgs)]
pub struct IamArgs {
    /// Base role ARN
    #[arg(long, env = "IAMLET_BASE_ROLE_ARN", value_name = "ARN")]
    pub base_role_arn: Option<String>,
    /// Fallback role to use when annotation is not set
    #[arg(long, env = "IAMLET_DEFAULT_ROLE", value_name = "ROLE")]
    pub default_role: Option<String>,
    /// Pod annotation key used to retrieve the IAM role
    #[arg(
        long,
        env = "IAMLET_IAM_ROLE_KEY",
        default_value = "iam.amazonaws.com/role",
        value_name = "KEY"
    )]
    pub iam_role_key: String,
    /// Pod annotation key used to retrieve the IAM ExternalId
    #[arg(
        long,
        env = "IAMLET_IAM_EXTERNAL_ID",
        default_value = "iam.amazonaws.com/external-id",
        value_name = "KEY"
    )]
    pub iam_external_id: String,
    /// ServiceAccount annotation key holding the IAM role (a full ARN, used as is) of pods without the --iam-role-key annotation (EKS's IRSA annotation by default); the pod's annotation wins. Empty: ServiceAccounts are not read
    #[arg(
        long,
        env = "IAMLET_SERVICE_ACCOUNT_ROLE_KEY",
        default_value = "eks.amazonaws.com/role-arn",
        value_name = "KEY"
    )]
    pub service_account_role_key: String,
    /// TTL for the assume role session (sessions last twice this; refreshed when less is left)
    #[arg(long, env = "IAMLET_IAM_ROLE_SESSION_TTL", default_value = "15m", value_parser = parse_go_duration, value_name = "DURATION")]
    pub iam_role_session_ttl: Duration,
    /// How long an AssumeRole failure is served before STS is asked again
    #[arg(long, env = "IAMLET_IAM_ROLE_ERROR_TTL", default_value = "10s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub iam_role_error_ttl: Duration,
    /// Queries EC2 Metadata to determine the base ARN
    #[arg(long, env = "IAMLET_AUTO_DISCOVER_BASE_ARN", default_value = "false")]
    pub auto_discover_base_arn: bool,
    /// Queries EC2 Metadata to determine the default Iam Role and base ARN, cannot be used with --default-role, overwrites any previous setting for --base-role-arn
    #[arg(
        long,
        env = "IAMLET_AUTO_DISCOVER_DEFAULT_ROLE",
        default_value = "false"
    )]
    pub auto_discover_default_role: bool,
    /// Enable namespace restrictions
    #[arg(long, env = "IAMLET_NAMESPACE_RESTRICTIONS", default_value = "false")]
    pub namespace_restrictions: bool,
    /// Namespace Restriction Format (glob/regexp)
    #[arg(
        long,
        env = "IAMLET_NAMESPACE_RESTRICTION_FORMAT",
        value_enum,
        default_value = "glob"
    )]
    pub namespace_restriction_format: RestrictionFormat,
    /// Namespace annotation key used to retrieve the IAM roles allowed (value in annotation should be json array)
    #[arg(
        long,
        env = "IAMLET_NAMESPACE_KEY",
        default_value = "iam.amazonaws.com/allowed-roles",
        value_name = "KEY"
    )]
    pub namespace_key: String,
    /// use the regional sts endpoint if AWS_REGION is set (iamlet always does)
    #[arg(
        long,
        env = "IAMLET_USE_REGIONAL_STS_ENDPOINT",
        default_value = "false"
    )]
    pub use_regional_sts_endpoint: bool,
    /// Accepted for kube2iam compatibility, no effect: a request waiting for its pod or its
    /// credentials is woken when they arrive (no polling); --backoff-max-elapsed-time bounds it
    #[arg(long, env = "IAMLET_BACKOFF_MAX_INTERVAL", default_value = "1s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub backoff_max_interval: Duration,
    /// Max elapsed time for backoff when querying for role (how long a request from an unknown IP waits for the pod to appear)
    #[arg(long, env = "IAMLET_BACKOFF_MAX_ELAPSED_TIME", default_value = "2s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub backoff_max_elapsed_time: Duration,
}

/// Node and network (kube2iam's flags).
#[derive(Debug, Clone, ClapArgs)]
pub struct NodeArgs {
    /// iamlet server http port
    #[arg(
        long,
        env = "IAMLET_APP_PORT",
        default_value_t = 8181,
        value_name = "PORT"
    )]
    pub app_port: u16,
    /// Metrics server http port (default: same as the server port; 0: a separate listener on any free port)
    #[arg(long, env = "IAMLET_METRICS_PORT", value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Address for the ec2 metadata (host[:port])
    #[arg(
        long,
        env = "IAMLET_METADATA_ADDR",
        default_value = "169.254.169.254",
        value_name = "HOST[:PORT]"
    )]
    pub metadata_addr: String,
    /// Add iptables rule (also requires --host-ip)
    #[arg(long, env = "IAMLET_IPTABLES", default_value = "false")]
    pub iptables: bool,
    /// Host interface for proxying AWS metadata: a name, `name+` (prefix wildcard), `!name`
    /// (every interface but this one) or `auto` (detect the CNI's pod interfaces);
    /// comma-separated or repeated, one DNAT rule each
    #[arg(
        long,
        env = "IAMLET_HOST_INTERFACE",
        default_value = "docker0",
        value_name = "IFACE",
        value_delimiter = ',',
        action = ArgAction::Append
    )]
    pub host_interface: Vec<String>,
    /// IP address of host
    #[arg(long, env = "IAMLET_HOST_IP", value_name = "IP")]
    pub host_ip: Option<String>,
    /// How often the iptables rule is checked and restored if removed or moved
    #[arg(long, env = "IAMLET_IPTABLES_VERIFY_INTERVAL", default_value = "10s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub iptables_verify_interval: Duration,
    /// Remove the iptables rule on exit (fail-open: pods reach the node's role while iamlet is down); by default it stays (fail-closed)
    #[arg(long, env = "IAMLET_IPTABLES_REMOVE_ON_EXIT", default_value = "false")]
    pub iptables_remove_on_exit: bool,
    /// With --iptables, also redirect the container-credentials address 169.254.170.23 (fd00:ec2::23 with --ipv6) to iamlet, for pods using service-account tokens; false leaves it alone (e.g. where EKS's own agent serves it)
    #[arg(long, env = "IAMLET_CONTAINER_CREDENTIALS", default_value = "true")]
    pub container_credentials: bool,
    /// iptables backend: the one the host uses (auto), or nft / legacy
    #[arg(
        long,
        env = "IAMLET_IPTABLES_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    pub iptables_backend: IptablesBackend,
    /// Also serve the IPv6 metadata address fd00:ec2::254: listen on [::] and, with --iptables, redirect it with ip6tables
    #[arg(long, env = "IAMLET_IPV6", default_value = "false")]
    pub ipv6: bool,
    /// IPv6 address of host for the ip6tables DNAT (default: REDIRECT to --app-port on the arriving interface)
    #[arg(long, env = "IAMLET_HOST_IPV6", value_name = "IP")]
    pub host_ipv6: Option<String>,
}

/// Which iptables implementation `--iptables` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesBackend {
    /// The one the host already uses (rules present, kube-proxy's hint), else the system default.
    Auto,
    /// iptables-nft (nf_tables kernel API).
    Nft,
    /// iptables-legacy (x_tables kernel API).
    Legacy,
}

impl From<IptablesBackend> for iamlet_node::backend::Choice {
    fn from(b: IptablesBackend) -> Self {
        match b {
            IptablesBackend::Auto => Self::Auto,
            IptablesBackend::Nft => Self::Nft,
            IptablesBackend::Legacy => Self::Legacy,
        }
    }
}

/// Subcommands (kube2iam has none; without one, iamlet runs the agent).
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Remove every iptables rule and chain iamlet installed (IPv4 and IPv6, nft and legacy backends); exit 0 also when there was nothing
    Cleanup(CleanupArgs),
    /// Check this node's setup with the agent's flags: one line per check (OK, WARN or FAIL and what to do); exit 1 on any FAIL
    Doctor(DoctorArgs),
}

/// `iamlet cleanup`.
#[derive(Debug, Clone, ClapArgs)]
pub struct CleanupArgs {
    /// Also remove kube2iam's DNAT rules to the metadata address from nat PREROUTING
    #[arg(long, conflicts_with = "kube2iam_only")]
    pub kube2iam: bool,
    /// Remove only kube2iam's leftover DNAT rules and keep iamlet's: safe while iamlet runs
    #[arg(long)]
    pub kube2iam_only: bool,
}

/// `iamlet doctor`.
#[derive(Debug, Clone, ClapArgs)]
pub struct DoctorArgs {
    /// Role (name or ARN) to AssumeRole as a test (default: --default-role; skipped without one)
    #[arg(long, value_name = "ROLE")]
    pub test_role: Option<String>,
}

/// IMDSv2 handling for pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Imdsv2Mode {
    /// Tokens are minted and checked when sent; tokenless requests are served.
    Optional,
    /// Requests without a valid token get 401.
    Required,
    /// The token PUT gets 403, so SDKs fall back to IMDSv1.
    Disabled,
}

/// What happens to non-credential metadata paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetadataPolicy {
    /// Forward everything except credential paths.
    Passthrough,
    /// Forward only paths matching --allow-metadata-path; everything else 404.
    Allowlist,
}

/// Session naming for AssumeRole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SessionName {
    /// One session per (role, external ID) on the node, named `<node>-<role>`.
    Node,
    /// One session per pod, named `<namespace>.<pod>`.
    Pod,
}

/// Data-plane tuning (iamlet's own).
#[derive(Debug, Clone, ClapArgs)]
pub struct ProxyArgs {
    /// Worker threads, one io runtime each (default: one per core)
    #[arg(long, env = "IAMLET_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Worker io driver
    #[arg(long, env = "IAMLET_IO_DRIVER", value_enum, default_value = "auto")]
    pub io_driver: IoDriver,
    /// IMDSv2 session tokens for pods
    #[arg(long, env = "IAMLET_IMDSV2", value_enum, default_value = "optional")]
    pub imdsv2: Imdsv2Mode,
    /// File holding the key that signs pod tokens (created if missing), so tokens survive a restart
    #[arg(long, env = "IAMLET_IMDS_TOKEN_KEY_FILE", value_name = "PATH")]
    pub imds_token_key_file: Option<PathBuf>,
    /// Which non-credential metadata paths are forwarded
    #[arg(
        long,
        env = "IAMLET_METADATA_POLICY",
        value_enum,
        default_value = "passthrough"
    )]
    pub metadata_policy: MetadataPolicy,
    /// With --metadata-policy=allowlist: a regular expression a canonical path must match to be forwarded (repeatable)
    #[arg(
        long,
        env = "IAMLET_ALLOW_METADATA_PATH",
        value_name = "REGEX",
        value_delimiter = ','
    )]
    pub allow_metadata_path: Vec<String>,
    /// Never forward user-data (the default; kept for kube2iam's flag)
    #[arg(long, env = "IAMLET_BLOCK_USER_DATA", default_value = "false")]
    pub block_user_data: bool,
    /// Forward user-data to pods, as kube2iam does (it often holds the node's bootstrap secrets)
    #[arg(long, env = "IAMLET_ALLOW_USER_DATA", default_value = "false")]
    pub allow_user_data: bool,
    /// Forward the node's signed identity (dynamic/instance-identity/pkcs7, signature, rsa2048) to pods, as kube2iam does
    #[arg(
        long,
        env = "IAMLET_ALLOW_INSTANCE_IDENTITY_SIGNATURE",
        default_value = "false"
    )]
    pub allow_instance_identity_signature: bool,
    /// Largest request line plus headers, in bytes
    #[arg(
        long,
        env = "IAMLET_MAX_REQUEST_HEAD",
        default_value_t = 8192,
        value_name = "BYTES"
    )]
    pub max_request_head: usize,
    /// Largest request body (only PUT may have one), in bytes
    #[arg(
        long,
        env = "IAMLET_MAX_REQUEST_BODY",
        default_value_t = 1024,
        value_name = "BYTES"
    )]
    pub max_request_body: usize,
    /// How long a client may take to send a request's head
    #[arg(long, env = "IAMLET_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive connection is kept
    #[arg(long, env = "IAMLET_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,
    /// A write to a client that makes no progress for this long closes the connection
    #[arg(long, env = "IAMLET_WRITE_TIMEOUT", default_value = "5s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub write_timeout: Duration,
    /// Most concurrent connections from one source address, over all workers; more are closed at accept
    #[arg(
        long,
        env = "IAMLET_MAX_CONNECTIONS_PER_IP",
        default_value_t = 256,
        value_name = "N"
    )]
    pub max_connections_per_ip: u32,
    /// /metrics is rendered at most once per this interval and shared by the scrapes in it
    #[arg(long, env = "IAMLET_METRICS_MAX_AGE", default_value = "1s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub metrics_max_age: Duration,
    /// Most concurrent connections per worker; more are closed at once
    #[arg(
        long,
        env = "IAMLET_MAX_CONNECTIONS_PER_WORKER",
        default_value_t = 4096,
        value_name = "N"
    )]
    pub max_connections_per_worker: usize,
    /// Bound on connecting to --metadata-addr
    #[arg(long, env = "IAMLET_UPSTREAM_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub upstream_connect_timeout: Duration,
    /// Bound on the metadata service's answer
    #[arg(long, env = "IAMLET_UPSTREAM_TIMEOUT", default_value = "3s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub upstream_timeout: Duration,
    /// On SIGTERM/SIGINT: how long in-flight requests may finish before exit; with
    /// --handover-socket, also how long a new iamlet that took the listening sockets may go
    /// silent before this one drops it and goes on serving (at least 1s)
    #[arg(long, env = "IAMLET_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub shutdown_grace: Duration,
    /// Unix socket for upgrades without a refused connection: a starting iamlet takes the
    /// running one's listening sockets over it, then the old one drains and exits (the
    /// manifests use /run/iamlet/handover.sock on a hostPath). A missing directory is created
    /// with mode 0700; an existing one must be a real directory owned by iamlet's user and
    /// writable by no one else, or the start is refused. Off when not set
    #[arg(long, env = "IAMLET_HANDOVER_SOCKET", value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,
}

/// STS tuning (iamlet's own).
#[derive(Debug, Clone, ClapArgs)]
pub struct StsArgs {
    /// Session naming: one shared session per role on the node, or one per pod
    #[arg(long, env = "IAMLET_SESSION_NAME", value_enum, default_value = "node")]
    pub session_name: SessionName,
    /// Add kubernetes-namespace, kubernetes-pod-name, kubernetes-service-account, kubernetes-pod-uid (and eks-cluster-name with --cluster-name) session tags (EKS Pod Identity's names; needs sts:TagSession; implies per-pod sessions)
    #[arg(long, env = "IAMLET_SESSION_TAGS", default_value = "false")]
    pub session_tags: bool,
    /// The cluster's name, added as the eks-cluster-name session tag with --session-tags (as EKS Pod Identity tags sessions)
    #[arg(long, env = "IAMLET_CLUSTER_NAME", value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// Most AssumeRole calls per second from this node
    #[arg(
        long,
        env = "IAMLET_STS_RATE_LIMIT",
        default_value_t = 20.0,
        value_name = "PER_SECOND"
    )]
    pub sts_rate_limit: f64,
    /// Most AssumeRole calls in flight at once (each holds one STS connection); more queue
    #[arg(
        long,
        env = "IAMLET_STS_MAX_IN_FLIGHT",
        default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..=4096),
        value_name = "N"
    )]
    pub sts_max_in_flight: u32,
    /// Bound on one AssumeRole call
    #[arg(long, env = "IAMLET_STS_TIMEOUT", default_value = "5s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub sts_timeout: Duration,
}

/// Logging and debugging (kube2iam's flags).
#[derive(Debug, Clone, ClapArgs)]
pub struct LogArgs {
    /// Log format (text/json)
    #[arg(
        long,
        env = "IAMLET_LOG_FORMAT",
        value_enum,
        default_value = "text",
        ignore_case = true
    )]
    pub log_format: LogFormat,
    /// Log level (trace, debug, info, warn, error; logrus names accepted)
    #[arg(
        long,
        env = "IAMLET_LOG_LEVEL",
        default_value = "info",
        value_name = "LEVEL"
    )]
    pub log_level: String,
    /// Enable debug features (/debug/store)
    #[arg(long, env = "IAMLET_DEBUG", default_value = "false")]
    pub debug: bool,
    /// Verbose (log level debug)
    #[arg(long, env = "IAMLET_VERBOSE", default_value = "false")]
    pub verbose: bool,
}

/// Token identity: the container-credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`,
/// 169.254.170.23) and the service-account tokens it verifies (iamlet's own).
#[derive(Debug, Clone, ClapArgs)]
pub struct TokenArgs {
    /// The audience a service-account token must carry to get credentials from the container-credentials endpoint (the AWS pod-identity webhook's default)
    #[arg(
        long,
        env = "IAMLET_TOKEN_AUDIENCE",
        default_value = "pods.eks.amazonaws.com",
        value_name = "AUDIENCE"
    )]
    pub token_audience: String,
    /// Local mode: a JWKS file holding the keys service-account tokens are signed with (with --token-issuer); re-read when it changes. In a cluster the API server's keys are used
    #[arg(long, env = "IAMLET_TOKEN_JWKS_FILE", value_name = "PATH")]
    pub token_jwks_file: Option<PathBuf>,
    /// Local mode: the issuer (iss) service-account tokens must name, with --token-jwks-file
    #[arg(long, env = "IAMLET_TOKEN_ISSUER", value_name = "URL")]
    pub token_issuer: Option<String>,
    /// Where the API server's service-account keys are kept between runs (0600), so an agent restarted while the API server is unreachable still verifies tokens. Off when not set
    #[arg(long, env = "IAMLET_TOKEN_KEYS_CACHE", value_name = "PATH")]
    pub token_keys_cache: Option<PathBuf>,
    /// Ask the API server (TokenReview) about a token whose signing key is not in the published set even after a refetch, instead of refusing it, and about a token whose pod is not known at the request's address (a deleted pod's token is then refused, not retried); needs create on tokenreviews (authentication.k8s.io) in iamlet's ClusterRole. Cluster mode only
    #[arg(long, env = "IAMLET_TOKEN_REVIEW", default_value = "false")]
    pub token_review: bool,
}

/// Per-pod AWS IAM credentials for Kubernetes nodes (a kube2iam drop-in).
#[derive(Debug, Clone, Parser)]
#[command(name = "iamlet", version, about, max_term_width = 100)]
pub struct Args {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub iam: IamArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
    #[command(flatten)]
    pub sts: StsArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Parse and validate the flags, touch no network, exit 0 (valid) or 64 (invalid)
    #[arg(long, env = "IAMLET_CHECK_CONFIG", default_value = "false")]
    pub check_config: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Args {
    /// Parses `argv` (program name first) as the binary does.
    pub fn try_parse_go<I, T>(argv: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let mut matches = go_bools(Args::command()).try_get_matches_from(argv)?;
        Args::from_arg_matches_mut(&mut matches)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_go(std::iter::once("iamlet").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_kube2iam() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.node.app_port, 8181);
        assert_eq!(a.node.metadata_addr, "169.254.169.254");
        assert_eq!(a.node.host_interface, ["docker0"]);
        assert!(!a.node.iptables);
        assert_eq!(a.iam.iam_role_key, "iam.amazonaws.com/role");
        assert_eq!(a.iam.iam_external_id, "iam.amazonaws.com/external-id");
        assert_eq!(a.iam.service_account_role_key, "eks.amazonaws.com/role-arn");
        assert_eq!(
            parse(&["--service-account-role-key="])
                .unwrap()
                .iam
                .service_account_role_key,
            "",
            "empty turns ServiceAccount roles off"
        );
        assert_eq!(a.iam.namespace_key, "iam.amazonaws.com/allowed-roles");
        assert_eq!(a.iam.namespace_restriction_format, RestrictionFormat::Glob);
        assert_eq!(a.iam.iam_role_session_ttl, Duration::from_secs(900));
        assert_eq!(a.kube.cache_resync_period, Duration::from_secs(1800));
        assert_eq!(a.iam.backoff_max_interval, Duration::from_secs(1));
        assert_eq!(a.iam.backoff_max_elapsed_time, Duration::from_secs(2));
        assert_eq!(a.log.log_format, LogFormat::Text);
        assert_eq!(a.log.log_level, "info");
    }

    /// The kube2iam rollout guide's DaemonSet args, from the one list the deploy tests and
    /// the end-to-end tests read too, with a literal host IP for the Downward API's.
    pub(crate) fn seed_args() -> Vec<&'static str> {
        include_str!("../../deploy/tests/seed-args.txt")
            .split_whitespace()
            .map(|a| match a {
                "--host-ip=$(HOST_IP)" => "--host-ip=10.0.0.1",
                a => a,
            })
            .collect()
    }

    #[test]
    fn seed_daemonset_args_parse() {
        let a = parse(&seed_args()).unwrap();
        assert!(a.iam.auto_discover_base_arn && a.node.iptables && a.iam.use_regional_sts_endpoint);
        assert!(a.iam.auto_discover_default_role);
        assert_eq!(a.node.host_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(a.node.host_interface, ["weave"]);
    }

    #[test]
    fn value_flags_take_equals_or_a_separate_value() {
        let a = parse(&[
            "--app-port",
            "9000",
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            "--iam-role-session-ttl",
            "1h30m",
        ])
        .unwrap();
        assert_eq!(a.node.app_port, 9000);
        assert_eq!(a.iam.iam_role_session_ttl, Duration::from_secs(5400));
        let b = parse(&["--app-port=9001", "--backoff-max-elapsed-time=500ms"]).unwrap();
        assert_eq!(b.node.app_port, 9001);
        assert_eq!(b.iam.backoff_max_elapsed_time, Duration::from_millis(500));
    }

    #[test]
    fn booleans_accept_bare_and_explicit_values() {
        assert!(parse(&["--iptables"]).unwrap().node.iptables);
        assert!(parse(&["--iptables=true"]).unwrap().node.iptables);
        assert!(!parse(&["--iptables=false"]).unwrap().node.iptables);
        assert!(parse(&["--debug=1"]).unwrap().log.debug);
        assert!(!parse(&["--verbose=F"]).unwrap().log.verbose);
        assert!(parse(&["--iptables=maybe"]).is_err());
    }

    #[test]
    fn every_kube2iam_flag_is_accepted() {
        let all = [
            "--kubeconfig=/k",
            "--api-server=https://10.0.0.1:6443",
            "--api-token=t",
            "--insecure",
            "--app-port=8181",
            "--metrics-port=8182",
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            "--default-role=d",
            "--iam-role-key=k",
            "--iam-external-id=e",
            "--iam-role-session-ttl=15m",
            "--iam-role-error-ttl=5s",
            "--metadata-addr=127.0.0.1:1",
            "--iptables",
            "--host-interface=cali+",
            "--host-ip=10.0.0.1",
            "--auto-discover-base-arn=false",
            "--auto-discover-default-role=false",
            "--namespace-restrictions",
            "--namespace-restriction-format=regexp",
            "--namespace-key=n",
            "--cache-resync-period=1h",
            "--resolve-duplicate-cache-ips",
            "--node=n1",
            "--backoff-max-interval=1s",
            "--backoff-max-elapsed-time=2s",
            "--log-format=json",
            "--log-level=debug",
            "--use-regional-sts-endpoint",
            "--debug",
            "--verbose",
        ];
        let a = parse(&all).unwrap();
        assert_eq!(
            a.iam.namespace_restriction_format,
            RestrictionFormat::Regexp
        );
        assert_eq!(a.node.metrics_port, Some(8182));
        assert_eq!(a.kube.node.as_deref(), Some("n1"));
        assert!(
            parse(&["--version"])
                .is_err_and(|e| e.kind() == clap::error::ErrorKind::DisplayVersion)
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["--app-port=http"]).is_err());
        assert!(parse(&["--iam-role-session-ttl=15"]).is_err());
        assert!(parse(&["--io-driver=kqueue"]).is_err());
        assert!(parse(&["--no-such-flag"]).is_err());
    }
}
