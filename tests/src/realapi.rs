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
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        let req: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds}
        }))
        .unwrap();
        let r = self
            .api
            .block_on(sas.create_token_request(sa, &PostParams::default(), &req))
            .unwrap_or_else(|e| panic!("token for {ns}/{sa}: {e}"));
        r.status.map(|s| s.token).unwrap_or_default()
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
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        let req: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": [audience],
                "expirationSeconds": seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}
            }
        }))
        .unwrap();
        let r = self
            .api
            .block_on(sas.create_token_request(sa, &PostParams::default(), &req))
            .unwrap_or_else(|e| panic!("pod-bound token for {ns}/{pod}: {e}"));
        r.status.map(|s| s.token).unwrap_or_default()
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
        let sas: Api<ServiceAccount> = Api::namespaced(self.api.client(), ns);
        let req: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": 3600}
        }))
        .unwrap();
        let r = self
            .api
            .block_on(sas.create_token_request(sa, &PostParams::default(), &req))
            .unwrap_or_else(|e| panic!("token for {ns}/{sa}: {e}"));
        r.status.map(|s| s.token).unwrap_or_default()
    }

    /// A kubeconfig for `token` (a ServiceAccount's), beside the admin one.
    pub fn kubeconfig_for(&self, token: &str, dir: &Path) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{}", self.id));
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: sa}}\ncurrent-context: test\n",
            self.api.server,
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
