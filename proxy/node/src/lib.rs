//! iamlet's node plane: everything that touches the node rather than a pod's request — the
//! nat redirect of pods' metadata traffic to iamlet (`--iptables`), its removal
//! (`iamlet cleanup`), pod-interface detection (`--host-interface auto`), who holds a port,
//! the node's own metadata service (discovery at start-up) and `iamlet doctor`'s checks.
//! The data plane calls in at start-up and on exit, never per request.

pub mod backend;
pub mod cleanup;
pub mod cmd;
pub mod doctor;
pub mod iface;
pub mod imds;
pub mod metrics;
pub mod port;
pub mod redirect;
pub mod rules;

pub use imds::MetadataAddr;
pub use metrics::NodeMetrics;
pub use redirect::{Redirect, RedirectError};

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// The instance metadata service's IPv4 address, as pods use it.
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The IPv6 one (Nitro instances).
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// The container-credentials address pods' SDKs use with `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub const CONTAINER_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// Its IPv6 form.
pub const CONTAINER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);

/// `--iptables` and its flags, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Where the rule sends pods (`--app-port`).
    pub app_port: u16,
    /// `--host-ip`: the IPv4 DNAT target.
    pub host_ip: Ipv4Addr,
    /// `--host-ipv6`: the IPv6 DNAT target; None: REDIRECT on the arriving interface.
    pub host_ipv6: Option<Ipv6Addr>,
    /// `--host-interface` values (`auto`, names, `prefix+`, `!name`).
    pub interfaces: Vec<String>,
    pub backend: backend::Choice,
    /// `--ipv6`: also redirect fd00:ec2::254 with ip6tables.
    pub ipv6: bool,
    pub remove_on_exit: bool,
    pub verify_interval: Duration,
    /// `--container-credentials`: also redirect 169.254.170.23 (fd00:ec2::23 with `--ipv6`).
    pub container_credentials: bool,
}

/// Before binding, with `--iptables`: resolves the interfaces and picks the backend (touches
/// no rule); `ready` is set once the redirect is installed.
pub fn prepare(
    config: Option<&RedirectConfig>,
    ready: &Arc<AtomicBool>,
) -> Result<Option<Arc<Redirect>>, RedirectError> {
    config
        .map(|c| Redirect::prepare(c, NodeMetrics::default(), ready.clone()).map(Arc::new))
        .transpose()
}

/// Once the listeners are bound: installs the redirect and starts re-verifying it every
/// `--iptables-verify-interval`.
pub fn start(redirect: &Arc<Redirect>, interval: Duration) -> Result<(), RedirectError> {
    redirect.install()?;
    redirect
        .spawn_verifier(interval)
        .map_err(RedirectError::Verifier)?;
    Ok(())
}
