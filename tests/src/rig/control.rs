//! The control-plane rig (control_plane, churn): the real `iamlet` binary watching an API
//! server — the real kube-apiserver ([`real`], with the shipped ServiceAccount's rights) or
//! the stand-in that injects faults ([`rig`]) — moto as STS, the fake IMDS upstream, raw
//! clients from pod IPs.

use crate::apiserver::ApiServer;
use crate::realapi::Scope;
use crate::{FakeImds, Iamlet, Moto, Response, get_from};
use std::net::Ipv4Addr;
use std::time::Duration;

pub const BASE: &str = "arn:aws:iam::123456789012:role/";
pub const NODE: &str = "node-a";
pub const LIST: &str = "/latest/meta-data/iam/security-credentials/";

pub struct Rig<A = ApiServer> {
    pub api: A,
    pub iamlet: Iamlet,
    _moto: Moto,
    _imds: FakeImds,
}

/// Starts moto, the fake IMDS and iamlet against `api` (already holding the initial pods).
pub fn rig(api: ApiServer, extra: &[&str]) -> Rig {
    let url = format!("--api-server={}", api.url());
    with_agent(api, |b| {
        let mut b = b
            .arg(url)
            .arg(format!("--node={NODE}"))
            .arg(format!("--base-role-arn={BASE}"))
            .arg("--debug");
        for a in extra {
            b = b.arg(*a);
        }
        b
    })
}

/// Starts moto and the fake IMDS, then iamlet from the builder `f` makes of one already
/// pointed at them; `api` is what the test drives.
pub fn with_agent<A>(
    api: A,
    f: impl FnOnce(crate::IamletBuilder) -> crate::IamletBuilder,
) -> Rig<A> {
    let moto = Moto::start();
    let imds = FakeImds::start();
    let iamlet = f(Iamlet::builder().sts(&moto).imds(&imds)).start();
    Rig {
        iamlet,
        api,
        _moto: moto,
        _imds: imds,
    }
}

/// Starts moto, the fake IMDS and iamlet against the real API server, for `scope`'s node,
/// with the shipped ServiceAccount's token (`--kubeconfig`): exactly the manifests' rights.
pub fn real(scope: Scope, extra: &[&str]) -> Rig<Scope> {
    real_with(scope, extra, |b| b)
}

/// As [`real`], with the builder adjusted by `f` first (an STS that fails, say).
pub fn real_with(
    scope: Scope,
    extra: &[&str],
    f: impl FnOnce(crate::IamletBuilder) -> crate::IamletBuilder,
) -> Rig<Scope> {
    let id = scope.api.shipped_identity();
    let kubeconfig = format!("--kubeconfig={}", id.kubeconfig.display());
    real_via(scope, &[kubeconfig.as_str()], extra, f)
}

/// As [`real_with`], reaching the API server the way `access` says instead of with the
/// shipped identity's kubeconfig: `["--kubeconfig=PATH"]` of another identity, or nothing
/// with an in-cluster wrapper given to the builder by `f`
/// ([`crate::realapi::InCluster`]).
pub fn real_via(
    scope: Scope,
    access: &[&str],
    extra: &[&str],
    f: impl FnOnce(crate::IamletBuilder) -> crate::IamletBuilder,
) -> Rig<Scope> {
    let node = format!("--node={}", scope.node);
    with_agent(scope, |b| {
        let mut b = f(b);
        for a in access {
            b = b.arg(*a);
        }
        let mut b = b
            .arg(node)
            .arg(format!("--base-role-arn={BASE}"))
            .arg("--debug");
        for a in extra {
            b = b.arg(*a);
        }
        b
    })
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

impl<A> Rig<A> {
    pub fn get(&self, src: &str, path: &str) -> Response {
        get_from(ip(src), self.iamlet.addr(), path)
    }

    /// `/debug/store` as JSON.
    pub fn store(&self) -> serde_json::Value {
        let r = get_from(Ipv4Addr::LOCALHOST, self.iamlet.addr(), "/debug/store");
        assert_eq!(r.status, 200, "{}", r.body_str());
        serde_json::from_slice(&r.body).unwrap()
    }

    /// Asks `path` from `src` until `cond` holds for the answer (at most `timeout`), and
    /// returns the last answer: the caller's assertions on it say what was expected.
    pub fn eventually(
        &self,
        src: &str,
        path: &str,
        timeout: Duration,
        cond: impl Fn(&Response) -> bool,
    ) -> Response {
        let mut last = None;
        let held = crate::wait::poll(timeout, || {
            let r = self.get(src, path);
            let ok = cond(&r);
            last = Some(r);
            ok
        });
        let last = last.expect("polled at least once");
        if held.is_err() {
            eprintln!("{path} from {src}: condition not met within {timeout:?}");
        }
        last
    }

    pub fn metrics(&self) -> String {
        get_from(Ipv4Addr::LOCALHOST, self.iamlet.addr(), "/metrics").body_str()
    }
}
