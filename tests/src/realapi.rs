//! The real control plane: kube-apiserver and etcd built from their Go modules
//! (`tests/kube/build.sh`) and started on loopback by `tests/kube/start.sh`, once per test
//! binary (they stop when it exits). Tests share one server, so each takes a [`Scope`]: a node
//! and namespaces of its own. There is no kubelet and no controller manager: nodes and pods
//! are plain API objects, a pod's IPs and phase are set through the `status` subresource,
//! and the ServiceAccounts pods name are created here.

use crate::apiserver::PodBuilder;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The running server, and an admin client for the tests' own calls.
pub struct RealApiServer {
    /// The run directory (`tests/kube/stop.sh` and `restart.sh` take it).
    pub dir: PathBuf,
    /// Every request a ServiceAccount made (the agent's), as audit events, one JSON per line.
    pub audit: PathBuf,
    pub kubeconfig: PathBuf,
    pub ca: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// The admin bearer token (`system:masters`).
    pub token: String,
    /// etcd's client URL (`http://127.0.0.1:PORT`).
    pub etcd: String,
    pub issuer: String,
    rt: tokio::runtime::Runtime,
    client: Client,
    identity: OnceLock<ShippedIdentity>,
}

static SERVER: OnceLock<RealApiServer> = OnceLock::new();
static SCOPES: AtomicU32 = AtomicU32::new(0);

impl RealApiServer {
    /// The test binary's server, started on first use (builds the binaries if needed, which
    /// takes minutes once per machine; then seconds).
    pub fn shared() -> &'static RealApiServer {
        SERVER.get_or_init(|| RealApiServer::start(&[]))
    }

    /// A server of the caller's own, with more kube-apiserver flags (for a test that
    /// restarts it); it lives until [`RealApiServer::stop`] or the test binary's exit.
    pub fn private(apiserver_args: &[&str]) -> &'static RealApiServer {
        Box::leak(Box::new(RealApiServer::start(apiserver_args)))
    }

    fn start(apiserver_args: &[&str]) -> RealApiServer {
        let script = crate::workspace_root().join("tests/kube/start.sh");
        let mut cmd = Command::new(&script);
        cmd.arg("--owner-pid").arg(std::process::id().to_string());
        for a in apiserver_args {
            cmd.arg("--apiserver-arg").arg(a);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "tests/kube/start.sh failed ({}):\n{}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let kv: BTreeMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| -> String {
            kv.get(k)
                .unwrap_or_else(|| panic!("start.sh printed no {k}=: {stdout}"))
                .to_string()
        };
        let kubeconfig = PathBuf::from(get("kubeconfig"));
        // Current-thread: every call blocks on it, and tests on several threads may do so at
        // once (the runtime's drivers go to whichever caller holds them).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("admin kubeconfig");
            let config =
                Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                    .await
                    .expect("admin config");
            Client::try_from(config).expect("admin client")
        });
        RealApiServer {
            dir: PathBuf::from(get("dir")),
            audit: PathBuf::from(get("audit")),
            kubeconfig,
            ca: PathBuf::from(get("ca")),
            server: get("server"),
            token: get("token"),
            etcd: get("etcd"),
            issuer: get("issuer"),
            rt,
            client,
            identity: OnceLock::new(),
        }
    }

    /// Restarts kube-apiserver alone (same etcd, flags and port) and waits until it is ready:
    /// every watch breaks, and the new server's watch cache starts from etcd as it is now.
    pub fn restart(&self) {
        let script = crate::workspace_root().join("tests/kube/restart.sh");
        let out = Command::new(&script)
            .arg(&self.dir)
            .output()
            .expect("run restart.sh");
        assert!(
            out.status.success(),
            "tests/kube/restart.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops kube-apiserver alone (etcd keeps running): every watch breaks and no request is
    /// answered until [`RealApiServer::start_apiserver`]. For a private server.
    pub fn stop_apiserver(&self) {
        self.restart_phase("--down");
    }

    /// Starts kube-apiserver again after [`RealApiServer::stop_apiserver`] (same etcd, flags
    /// and port) and waits until it is ready.
    pub fn start_apiserver(&self) {
        self.restart_phase("--up");
    }

    fn restart_phase(&self, phase: &str) {
        let script = crate::workspace_root().join("tests/kube/restart.sh");
        let out = Command::new(&script)
            .arg(&self.dir)
            .arg(phase)
            .output()
            .expect("run restart.sh");
        assert!(
            out.status.success(),
            "tests/kube/restart.sh {phase} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {}", self.server))
    }

    /// The API server's published signing keys (`/openid/v1/jwks`), as an agent without
    /// access to it would be given them (`--token-jwks-file`).
    pub fn jwks(&self) -> String {
        let req = http::Request::get("/openid/v1/jwks")
            .body(Vec::new())
            .expect("request");
        self.block_on(self.client.request_text(req))
            .expect("GET /openid/v1/jwks")
    }

    /// The PEM private key the API server signs service-account tokens with (made for this
    /// run), for tests that forge what only a key holder could.
    pub fn signing_key_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("pki/sa.key")).expect("the run's signing key")
    }

    /// The PEM public key tokens verify with.
    pub fn verifying_key_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("pki/sa.pub")).expect("the run's public key")
    }

    /// Stops a [`RealApiServer::private`] server.
    pub fn stop(&self) {
        let _ = Command::new(crate::workspace_root().join("tests/kube/stop.sh"))
            .arg(&self.dir)
            .status();
    }

    /// The audit events of requests made with `user`'s credentials (e.g.
    /// `system:serviceaccount:kube-system:iamlet`).
    pub fn audit_of(&self, user: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["user"]["username"] == user)
            .collect()
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs a future on the server's runtime (the tests themselves are synchronous).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A node and namespace prefix of the calling test's own.
    pub fn scope(&'static self, test: &str) -> Scope {
        let n = SCOPES.fetch_add(1, Ordering::SeqCst);
        let slug: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(30)
            .collect();
        let id = format!("{}-{}-{n}", slug.trim_matches('-'), std::process::id());
        let s = Scope {
            api: self,
            node: format!("node-{id}"),
            id,
        };
        s.create_node(&s.node.clone());
        s
    }

    /// etcd's current revision.
    pub fn etcd_revision(&self) -> i64 {
        let v = self.etcd_post("/v3/kv/range", &json!({"key": "AA==", "limit": 1}));
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {v}"))
    }

    /// Compacts etcd's history up to now: watches from older resourceVersions get `410 Gone`.
    pub fn compact_etcd(&self) -> i64 {
        let rev = self.etcd_revision();
        self.etcd_post(
            "/v3/kv/compaction",
            &json!({"revision": rev.to_string(), "physical": true}),
        );
        rev
    }

    fn etcd_post(&self, path: &str, body: &Value) -> Value {
        let addr: std::net::SocketAddr = self
            .etcd
            .trim_start_matches("http://")
            .parse()
            .expect("etcd address");
        let body = body.to_string();
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = crate::request_from(std::net::Ipv4Addr::LOCALHOST, addr, raw.as_bytes());
        assert_eq!(r.status, 200, "etcd {path}: {}", r.body_str());
        serde_json::from_slice(&r.body).expect("etcd JSON")
    }
}

/// One test's part of the shared server: a node of its own (so iamlet's `spec.nodeName`
/// field selector sees only this test's pods) and namespaces named after it.
pub struct Scope {
    pub api: &'static RealApiServer,
    /// The node this test's iamlet serves.
    pub node: String,
    id: String,
}

impl Scope {
    /// A namespace name of this test's: `<short>-<scope id>`.
    pub fn ns(&self, short: &str) -> String {
        let name = format!("{short}-{}", self.id);
        name.chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches('-')
            .to_owned()
    }

    pub fn create_node(&self, name: &str) {
        let nodes: Api<Node> = Api::all(self.api.client());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name}
        }))
        .unwrap();
        self.api
            .block_on(nodes.create(&PostParams::default(), &node))
            .unwrap_or_else(|e| panic!("create node {name}: {e}"));
    }

    /// Creates (or annotates) namespace `name` with `annotations`.
    pub fn set_namespace(&self, name: &str, annotations: &[(&str, &str)]) {
        let nss: Api<Namespace> = Api::all(self.api.client());
        let ann: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let patch = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": ann}
        });
        self.api
            .block_on(nss.patch(
                name,
                &PatchParams::apply("iamlet-tests").force(),
                &Patch::Apply(&patch),
            ))
            .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        self.ensure_service_account(name, "default");
    }

    pub fn delete_namespace(&self, name: &str) {
        let nss: Api<Namespace> = Api::all(self.api.client());
        let _ = self
            .api
            .block_on(nss.delete(name, &DeleteParams::default()));
    }

    /// Creates ServiceAccount `ns/name` if missing (no controller manager makes them here).
    pub fn ensure_service_account(&self, ns: &str, name: &str) {
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        let sa: ServiceAccount = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}
        }))
        .unwrap();
        match self.api.block_on(sas.create(&PostParams::default(), &sa)) {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("service account {ns}/{name}: {e}"),
        }
    }

    /// Creates ServiceAccount `ns/name` (and its namespace) when missing, then merges
    /// `annotations` into its own: `Some(value)` sets a key, `None` removes it.
    pub fn annotate_service_account(
        &self,
        ns: &str,
        name: &str,
        annotations: &[(&str, Option<&str>)],
    ) {
        let nss: Api<Namespace> = Api::all(self.api.client());
        if self.api.block_on(nss.get_opt(ns)).ok().flatten().is_none() {
            self.set_namespace(ns, &[]);
        }
        self.ensure_service_account(ns, name);
        let ann: BTreeMap<&str, Option<&str>> = annotations.iter().copied().collect();
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        self.api
            .block_on(sas.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": ann}})),
            ))
            .unwrap_or_else(|e| panic!("annotate service account {ns}/{name}: {e}"));
    }

    /// Creates the pod (its namespace and ServiceAccount first, when missing), then sets its
    /// phase and IPs through the `status` subresource, as a kubelet would. Returns its UID.
    pub fn create_pod(&self, p: &PodBuilder) -> String {
        let nss: Api<Namespace> = Api::all(self.api.client());
        if self
            .api
            .block_on(nss.get_opt(&p.namespace))
            .ok()
            .flatten()
            .is_none()
        {
            self.set_namespace(&p.namespace, &[]);
        }
        self.ensure_service_account(&p.namespace, &p.service_account);
        let mut meta = json!({"name": p.name, "namespace": p.namespace});
        if !p.annotations.is_empty() {
            meta["annotations"] = json!(p.annotations);
        }
        if !p.labels.is_empty() {
            meta["labels"] = json!(p.labels);
        }
        let mut spec = json!({
            "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
            "serviceAccountName": p.service_account,
        });
        if let Some(n) = &p.node {
            spec["nodeName"] = json!(n);
        }
        if p.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let pod: Pod = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}),
        )
        .unwrap();
        let pods: Api<Pod> = Api::namespaced(self.api.client(), &p.namespace);
        let created = self
            .api
            .block_on(pods.create(&PostParams::default(), &pod))
            .unwrap_or_else(|e| panic!("create pod {}/{}: {e}", p.namespace, p.name));
        self.set_pod_status(&p.namespace, &p.name, &p.phase, &p.ips);
        created.metadata.uid.unwrap_or_default()
    }

    /// Sets a pod's phase and IPs (`status.podIP`, `status.podIPs`).
    pub fn set_pod_status(&self, ns: &str, name: &str, phase: &str, ips: &[String]) {
        let mut status = json!({"phase": phase});
        if let Some(first) = ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
            status["hostIP"] = json!("127.0.0.1");
        }
        let pods: Api<Pod> = Api::namespaced(self.api.client(), ns);
        self.api
            .block_on(pods.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            ))
            .unwrap_or_else(|e| panic!("status of pod {ns}/{name}: {e}"));
    }

    /// Sets only a pod's phase.
    pub fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) {
        let pods: Api<Pod> = Api::namespaced(self.api.client(), ns);
        self.api
            .block_on(pods.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": phase}})),
            ))
            .unwrap_or_else(|e| panic!("phase of pod {ns}/{name}: {e}"));
    }

    /// Merges `annotations` into a pod's.
    pub fn annotate_pod(&self, ns: &str, name: &str, annotations: &[(&str, &str)]) {
        let ann: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let pods: Api<Pod> = Api::namespaced(self.api.client(), ns);
        self.api
            .block_on(pods.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": ann}})),
            ))
            .unwrap_or_else(|e| panic!("annotate pod {ns}/{name}: {e}"));
    }

    /// Deletes a pod at once (grace period 0: no kubelet is there to finish a graceful one).
    pub fn delete_pod(&self, ns: &str, name: &str) {
        let pods: Api<Pod> = Api::namespaced(self.api.client(), ns);
        self.api
            .block_on(pods.delete(name, &DeleteParams::default().grace_period(0)))
            .unwrap_or_else(|e| panic!("delete pod {ns}/{name}: {e}"));
    }

    /// The events on `pod`, found as `kubectl get events --field-selector
    /// involvedObject.name=POD` finds them (core/v1 events), as JSON.
    pub fn events_for(&self, ns: &str, pod: &str) -> Vec<Value> {
        let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(self.api.client(), ns);
        let lp = ListParams::default().fields(&format!("involvedObject.name={pod}"));
        self.api
            .block_on(events.list(&lp))
            .unwrap_or_else(|e| panic!("events of {ns}/{pod}: {e}"))
            .items
            .into_iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect()
    }

    /// A token for ServiceAccount `ns/sa` from the TokenRequest API (audience: the API
    /// server's own), valid for `seconds`.
    pub fn token(&self, ns: &str, sa: &str, seconds: i64) -> String {
        self.token_request(ns, sa, json!({"expirationSeconds": seconds}))
    }

    /// A TokenRequest for ServiceAccount `ns/sa` with `spec`; the token.
    fn token_request(&self, ns: &str, sa: &str, spec: Value) -> String {
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        let req: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec
        }))
        .unwrap();
        let r = self
            .api
            .block_on(sas.create_token_request(sa, &PostParams::default(), &req))
            .unwrap_or_else(|e| panic!("token for {ns}/{sa} ({spec}): {e}"));
        r.status.map(|s| s.token).unwrap_or_default()
    }

    /// Whether the API server accepts `token` now: a pod list (limit 1) with it answers, or
    /// the status it was refused with (401: not authenticated).
    pub fn accepts(&self, token: &str) -> Result<(), u16> {
        let dir = crate::util::TempDir::new("accepts");
        let path = self.kubeconfig_for(token, dir.path());
        self.api.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
            let config =
                Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                    .await
                    .expect("config");
            let client = Client::try_from(config).expect("client");
            match Api::<Pod>::all(client)
                .list(&ListParams::default().limit(1))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) => Err(s.code),
                Err(e) => panic!("pod list with a token: {e}"),
            }
        })
    }

    /// Deletes ServiceAccount `ns/name` and creates it again (a new UID): every token issued
    /// for the old one is rejected from then on (a bound token names its ServiceAccount's UID).
    pub fn recreate_service_account(&self, ns: &str, name: &str) {
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        self.api
            .block_on(sas.delete(name, &DeleteParams::default()))
            .unwrap_or_else(|e| panic!("delete service account {ns}/{name}: {e}"));
        crate::wait_until!(
            std::time::Duration::from_secs(10),
            self.api
                .block_on(sas.get_opt(name))
                .is_ok_and(|sa| sa.is_none()),
            "service account {ns}/{name} gone"
        );
        self.ensure_service_account(ns, name);
    }

    /// The agent's identity under a name of this scope's own: the shipped ServiceAccount
    /// (`kube-system/<name>`), ClusterRole and ClusterRoleBinding renamed, `edit` applied to
    /// the role first ([`shipped_rbac`]). Tests that change the rules use this, never the
    /// shared `iamlet` role the other tests run with. Returns the name.
    pub fn own_identity(&self, edit: Option<&dyn Fn(&mut Value)>) -> String {
        let name: String = format!("iamlet-{}", self.id).chars().take(63).collect();
        let name = name.trim_end_matches('-').to_owned();
        self.apply_identity(&name, edit);
        name
    }

    /// Applies [`shipped_rbac_named`]`(name, edit)` (again): a later call replaces the role's
    /// rules, the way `kubectl apply` of an edited manifest does.
    pub fn apply_identity(&self, name: &str, edit: Option<&dyn Fn(&mut Value)>) {
        for obj in shipped_rbac_named(name, edit) {
            self.api.apply_object(&obj);
        }
    }

    /// A token for ServiceAccount `ns/sa` bound to pod `pod` (as a projected volume gets
    /// it): the `kubernetes.io` claim names the pod (and its node), and the token is valid
    /// only while the pod exists. `audience`: e.g. the container-credentials audience.
    pub fn pod_token(&self, ns: &str, sa: &str, pod: &str, audience: &str, seconds: i64) -> String {
        let pods: Api<Pod> = Api::namespaced(self.api.client(), ns);
        let uid = self
            .api
            .block_on(pods.get(pod))
            .unwrap_or_else(|e| panic!("pod {ns}/{pod}: {e}"))
            .metadata
            .uid
            .unwrap_or_default();
        self.token_request(
            ns,
            sa,
            json!({
                "audiences": [audience],
                "expirationSeconds": seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}
            }),
        )
    }

    /// Namespace `ns`'s pods and ServiceAccounts as `kubectl get pods,serviceaccounts -n NS
    /// -o json` prints them: a `List` of the server's own objects (their UIDs included), for
    /// an agent in local mode (`--pods-from`).
    pub fn objects_list_json(&self, ns: &str) -> String {
        let pods: Api<Pod> = Api::namespaced(self.api.client(), ns);
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        let mut items: Vec<Value> = Vec::new();
        for p in self
            .api
            .block_on(pods.list(&ListParams::default()))
            .expect("list pods")
            .items
        {
            let mut v = serde_json::to_value(p).unwrap();
            v["kind"] = json!("Pod");
            v["apiVersion"] = json!("v1");
            items.push(v);
        }
        for sa in self
            .api
            .block_on(sas.list(&ListParams::default()))
            .expect("list service accounts")
            .items
        {
            let mut v = serde_json::to_value(sa).unwrap();
            v["kind"] = json!("ServiceAccount");
            v["apiVersion"] = json!("v1");
            items.push(v);
        }
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    }

    /// A token for `ns/sa` with `audience` and no bound object (not a pod's).
    pub fn unbound_token(&self, ns: &str, sa: &str, audience: &str) -> String {
        self.token_request(
            ns,
            sa,
            json!({"audiences": [audience], "expirationSeconds": 3600}),
        )
    }

    /// A kubeconfig for `token` (a ServiceAccount's), beside the admin one.
    pub fn kubeconfig_for(&self, token: &str, dir: &Path) -> PathBuf {
        self.kubeconfig_at(&self.api.server, &format!("token: {token}"), dir)
    }

    /// A kubeconfig for `server` (the API server's own address, or a [`Gate`]'s) whose user
    /// is `user` (one line of a kubeconfig's `user:`, e.g. `token: ...` or
    /// `tokenFile: /path`), written into `dir`.
    pub fn kubeconfig_at(&self, server: &str, user: &str, dir: &Path) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = dir.join(format!(
            "kubeconfig-{}-{}",
            self.id,
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    {user}\ncontexts:\n- name: test\n  context: {{cluster: test, user: sa}}\ncurrent-context: test\n",
            self.api.ca.display()
        );
        std::fs::write(&path, kc).expect("write kubeconfig");
        path
    }
}

/// The agent's own identity, as shipped: `deploy/manifests/iamlet.yaml`'s ServiceAccount,
/// ClusterRole and ClusterRoleBinding applied to the server (once per test binary; the
/// chart's rules are the manifest's, checked by the deploy tests), and a kubeconfig holding a
/// TokenRequest token of that ServiceAccount. iamlet started with it has exactly the rights
/// the manifests grant.
pub fn shipped_identity() -> &'static ShippedIdentity {
    RealApiServer::shared().shipped_identity()
}

impl RealApiServer {
    /// [`shipped_identity`] on this server.
    pub fn shipped_identity(&'static self) -> &'static ShippedIdentity {
        self.identity.get_or_init(|| self.make_identity())
    }

    fn make_identity(&'static self) -> ShippedIdentity {
        let api = self;
        let scope = api.scope("shipped-identity");
        for obj in shipped_rbac(None) {
            api.apply_object(&obj);
        }
        let token = scope.token("kube-system", "iamlet", 6 * 3600);
        let dir = std::env::temp_dir().join(format!("iamlet-e2e-shipped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("kubeconfig dir");
        let kubeconfig = scope.kubeconfig_for(&token, &dir);
        ShippedIdentity { kubeconfig, token }
    }
}

/// See [`shipped_identity`].
pub struct ShippedIdentity {
    pub kubeconfig: PathBuf,
    pub token: String,
}

/// The RBAC objects of `deploy/manifests/iamlet.yaml` (ServiceAccount, ClusterRole,
/// ClusterRoleBinding), with `edit` applied to the ClusterRole's rules first (a test removing
/// a verb).
pub fn shipped_rbac(edit: Option<&dyn Fn(&mut Value)>) -> Vec<Value> {
    let path = crate::workspace_root().join("deploy/manifests/iamlet.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/manifests/iamlet.yaml");
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = match serde::Deserialize::deserialize(doc) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let kind = v["kind"].as_str().unwrap_or("").to_owned();
        if !["ServiceAccount", "ClusterRole", "ClusterRoleBinding"].contains(&kind.as_str()) {
            continue;
        }
        let mut v = v;
        if kind == "ClusterRole"
            && let Some(f) = edit
        {
            f(&mut v);
        }
        out.push(v);
    }
    assert_eq!(out.len(), 3, "the manifest's RBAC objects: {out:?}");
    out
}

/// [`shipped_rbac`] under another name: ServiceAccount `kube-system/<name>`, ClusterRole
/// `<name>` and a ClusterRoleBinding `<name>` binding exactly those two, as the manifest binds
/// its own.
pub fn shipped_rbac_named(name: &str, edit: Option<&dyn Fn(&mut Value)>) -> Vec<Value> {
    let mut objs = shipped_rbac(edit);
    for o in &mut objs {
        o["metadata"]["name"] = json!(name);
        if o["kind"] == "ClusterRoleBinding" {
            assert_eq!(o["roleRef"]["kind"], "ClusterRole", "{o}");
            o["roleRef"]["name"] = json!(name);
            let subjects = o["subjects"].as_array_mut().expect("subjects");
            assert_eq!(
                subjects.len(),
                1,
                "the manifest binds one ServiceAccount: {subjects:?}"
            );
            assert_eq!(subjects[0]["kind"], "ServiceAccount");
            assert_eq!(subjects[0]["namespace"], "kube-system");
            subjects[0]["name"] = json!(name);
        }
        if o["kind"] == "ServiceAccount" {
            assert_eq!(o["metadata"]["namespace"], "kube-system", "{o}");
        }
    }
    objs
}

/// Removes `verb` on `resource` in API group `group` from a ClusterRole's rules (an edit for
/// [`shipped_rbac`]): a rule that names other resources or groups too is split, so only
/// that one permission goes.
pub fn without_verb(role: &mut Value, group: &str, resource: &str, verb: &str) {
    let rules = role["rules"].as_array().expect("rules").clone();
    let mut out = Vec::new();
    let mut removed = false;
    for rule in rules {
        let strs = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (groups, resources, verbs) = (strs("apiGroups"), strs("resources"), strs("verbs"));
        let hit = groups.iter().any(|g| g == group)
            && resources.iter().any(|r| r == resource)
            && verbs.iter().any(|v| v == verb);
        if !hit {
            out.push(rule);
            continue;
        }
        removed = true;
        // The rule for every other (group, resource) pair, unchanged...
        for g in &groups {
            for r in &resources {
                let mut v = verbs.clone();
                if g == group && r == resource {
                    // ...and this pair without the verb.
                    v.retain(|x| x != verb);
                }
                if !v.is_empty() {
                    out.push(json!({"apiGroups": [g], "resources": [r], "verbs": v}));
                }
            }
        }
    }
    assert!(
        removed,
        "no rule grants {verb} on {resource} in group {group:?}: {role}"
    );
    role["rules"] = json!(out);
}

/// The agent run with in-cluster configuration, as a DaemonSet pod has it, without touching
/// the host: `KUBERNETES_SERVICE_HOST=127.0.0.1`, `KUBERNETES_SERVICE_PORT`, and the
/// ServiceAccount's `token`, `ca.crt` and `namespace` at
/// `/var/run/secrets/kubernetes.io/serviceaccount/`. A wrapper script (give it to
/// `IamletBuilder::binary`, or run `iamlet doctor` through it) enters a mount namespace of
/// its own (`unshare --mount --propagation private`), mounts a tmpfs over `/run` (where
/// `/var/run` points) and binds this rig's directory at that path, then execs the real
/// binary (same PID: killing the child kills iamlet). The directory stays writable from the
/// test: [`InCluster::set_token`] rotates the token the way the kubelet does. Needs root.
pub struct InCluster {
    dir: crate::util::TempDir,
    wrapper: PathBuf,
}

impl InCluster {
    /// True when this machine can run it (root, `unshare`, `mount`); otherwise a loud
    /// `SKIPPED:` and false, or a panic in CI (`CI=true`), where it must run.
    pub fn available(test: &str) -> bool {
        let why = if !nix::unistd::geteuid().is_root() {
            Some("needs root (a mount namespace for the in-cluster service-account files)")
        } else if crate::util::find_on_path("unshare").is_none()
            || crate::util::find_on_path("mount").is_none()
        {
            Some("needs unshare and mount (util-linux, mount)")
        } else {
            None
        };
        match why {
            None => true,
            Some(why) if crate::is_ci() => panic!("{test}: must run in CI: {why}"),
            Some(why) => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
                false
            }
        }
    }

    /// The files and the wrapper for `token` (a ServiceAccount's, namespace `kube-system`) on
    /// `api`.
    pub fn new(api: &RealApiServer, token: &str) -> InCluster {
        let dir = crate::util::TempDir::new("incluster");
        let sa = dir.path().join("serviceaccount");
        std::fs::create_dir_all(&sa).expect("mkdir serviceaccount");
        std::fs::copy(&api.ca, sa.join("ca.crt")).expect("copy ca.crt");
        std::fs::write(sa.join("namespace"), "kube-system").expect("write namespace");
        std::fs::write(sa.join("token"), token).expect("write token");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("mkdir home");
        let quote = |p: &Path| {
            let s = p.display().to_string();
            assert!(!s.contains('\''), "{s}");
            format!("'{s}'")
        };
        // kube::Config::infer tries $KUBECONFIG and ~/.kube/config before the in-cluster
        // configuration: neither exists here.
        let script = format!(
            "#!/bin/sh\n\
             # iamlet with a DaemonSet pod's in-cluster configuration, in a mount namespace of its own.\n\
             export KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT={port}\n\
             unset KUBECONFIG\n\
             export HOME={home}\n\
             exec unshare --mount --propagation private sh -c '\n\
               run=\"$(readlink -f /var/run)\" &&\n\
               mount -t tmpfs tmpfs \"$run\" &&\n\
               mkdir -p /var/run/secrets/kubernetes.io/serviceaccount &&\n\
               mount --bind \"$0\" /var/run/secrets/kubernetes.io/serviceaccount &&\n\
               exec \"$@\"' {sa} {bin} \"$@\"\n",
            port = api.port(),
            home = quote(&home),
            sa = quote(&sa),
            bin = quote(&crate::iamlet::binary()),
        );
        let wrapper = dir.path().join("iamlet-in-cluster");
        std::fs::write(&wrapper, script).expect("write wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .expect("chmod wrapper");
        InCluster { dir, wrapper }
    }

    /// The script to run instead of the binary (same arguments).
    pub fn wrapper(&self) -> &Path {
        &self.wrapper
    }

    /// Replaces the token file's content (atomically: written beside it, then renamed).
    pub fn set_token(&self, token: &str) {
        let sa = self.dir.path().join("serviceaccount");
        let tmp = sa.join(".token.new");
        std::fs::write(&tmp, token).expect("write token");
        std::fs::rename(&tmp, sa.join("token")).expect("rename token");
    }
}

/// A TCP relay in front of the API server, for the agent only (the tests' own calls go
/// straight to the server): [`Gate::cut`] breaks the agent's connections (its watch ends as
/// when the network path drops), [`Gate::close`] also refuses new ones until [`Gate::open`]
/// — a partition of one node from the control plane while everything else goes on. TLS
/// passes through untouched (the serving certificate is for 127.0.0.1).
pub struct Gate {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<GateState>,
}

#[derive(Default)]
struct GateState {
    closed: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    conns: std::sync::Mutex<Vec<std::net::TcpStream>>,
    /// Connections accepted while open (relayed).
    relayed: AtomicU32,
}

impl Gate {
    /// A relay on a free loopback port to `api`'s port.
    pub fn new(api: &RealApiServer) -> Gate {
        use std::net::{Shutdown, TcpListener, TcpStream};
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], api.port()));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let state = std::sync::Arc::new(GateState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(down) = conn else { continue };
                if st.closed.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) =
                    TcpStream::connect_timeout(&upstream, std::time::Duration::from_secs(5))
                else {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                };
                st.relayed.fetch_add(1, Ordering::SeqCst);
                let (Ok(d2), Ok(u2), Ok(d3), Ok(u3)) = (
                    down.try_clone(),
                    up.try_clone(),
                    down.try_clone(),
                    up.try_clone(),
                ) else {
                    continue;
                };
                st.conns.lock().unwrap().extend([d3, u3]);
                for (mut from, mut to) in [(down, u2), (up, d2)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Gate { addr, state }
    }

    /// `https://127.0.0.1:PORT` of the gate.
    pub fn server(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Breaks every connection relayed so far; new ones are still relayed.
    pub fn cut(&self) {
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Cuts every connection and refuses new ones (accepted and closed at once).
    pub fn close(&self) {
        self.state.closed.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Relays new connections again.
    pub fn open(&self) {
        self.state.closed.store(false, Ordering::SeqCst);
    }

    /// How many connections were relayed so far.
    pub fn relayed(&self) -> u32 {
        self.state.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = std::net::TcpStream::connect(self.addr);
        self.cut();
    }
}

impl RealApiServer {
    /// Applies one object (server-side apply, as `kubectl apply --server-side`).
    pub fn apply_object(&self, obj: &Value) {
        let tm: kube::api::TypeMeta =
            serde_json::from_value(obj.clone()).expect("apiVersion and kind");
        let gvk = kube::api::GroupVersionKind::try_from(&tm).expect("group/version/kind");
        let (ar, caps) = self
            .block_on(kube::discovery::pinned_kind(&self.client(), &gvk))
            .unwrap_or_else(|e| panic!("discover {gvk:?}: {e}"));
        let name = obj["metadata"]["name"].as_str().expect("name");
        let api: Api<kube::api::DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced
        {
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
            Api::namespaced_with(self.client(), ns, &ar)
        } else {
            Api::all_with(self.client(), &ar)
        };
        self.block_on(api.patch(
            name,
            &PatchParams::apply("iamlet-tests").force(),
            &Patch::Apply(obj),
        ))
        .unwrap_or_else(|e| panic!("apply {gvk:?} {name}: {e}"));
    }
}

impl RealApiServer {
    /// Deletes a ClusterRoleBinding (e.g. one of the server's defaults).
    pub fn delete_cluster_role_binding(&self, name: &str) {
        let api: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(self.client());
        self.block_on(api.delete(name, &DeleteParams::default()))
            .unwrap_or_else(|e| panic!("delete ClusterRoleBinding {name}: {e}"));
    }
}

/// Signing-key rotation, as a cluster operator does it: publish the new key beside the old,
/// then sign with the new one, then retire the old one (each step a kube-apiserver restart
/// with the changed flags, same etcd and port).
impl RealApiServer {
    /// Makes a second signing key (once) and restarts the server with `signing` ("sa" or
    /// "sa2") as the signing key and `published` as the verifying keys.
    pub fn set_signing_keys(&self, signing: &str, published: &[&str]) {
        let pki = self.dir.join("pki");
        if !pki.join("sa2.key").exists() {
            let ok = Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(pki.join("sa2.key"))
                .arg("2048")
                .output()
                .expect("openssl genrsa")
                .status
                .success()
                && Command::new("openssl")
                    .args(["rsa", "-pubout", "-in"])
                    .arg(pki.join("sa2.key"))
                    .arg("-out")
                    .arg(pki.join("sa2.pub"))
                    .output()
                    .expect("openssl rsa")
                    .status
                    .success();
            assert!(ok, "cannot make a second signing key");
        }
        let script = self.dir.join("apiserver.sh");
        let text = std::fs::read_to_string(&script).expect("apiserver.sh");
        let p = pki.display().to_string();
        // Every --service-account-key-file / --service-account-signing-key-file pair is
        // replaced by the wanted ones.
        let mut words: Vec<String> = Vec::new();
        let mut it = text.split(' ').peekable();
        while let Some(w) = it.next() {
            if w == "--service-account-key-file" || w == "--service-account-signing-key-file" {
                it.next();
                continue;
            }
            words.push(w.to_owned());
        }
        let mut text = words.join(" ");
        let mut keys = format!(" --service-account-signing-key-file {p}/{signing}.key");
        for k in published {
            keys.push_str(&format!(" --service-account-key-file {p}/{k}.pub"));
        }
        let at = text.find(" --authorization-mode").expect("the flags");
        text.insert_str(at, &keys);
        std::fs::write(&script, text).expect("rewrite apiserver.sh");
        self.restart();
    }
}
