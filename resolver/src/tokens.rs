//! What the data plane needs to verify service-account tokens locally: the API server's
//! signing keys (its JWKS) and issuer, published like the pod snapshot. In a cluster they come
//! from the API server (`/.well-known/openid-configuration` and `/openid/v1/jwks`, through
//! the agent's own kube client), refreshed periodically and when a token names a key not in
//! the set (one fetch at a time, at most one per [`MIN_REFETCH`]); the last good set is
//! written to `--token-keys-cache`, so an agent restarted while the API server is down
//! still verifies. In local mode they come from `--token-jwks-file` and `--token-issuer`,
//! re-read when the file changes. No verification happens here.

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use thiserror::Error;
use tokio::sync::Notify;

/// How often the key set is fetched again in a cluster (signing keys rotate rarely; an
/// unknown `kid` fetches at once).
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// The least time between two fetches asked for by unknown `kid`s: forged tokens naming
/// random keys must not turn into a stream of requests to the API server.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);

/// A key a token may be signed with.
pub struct VerifyKey {
    pub key: DecodingKey,
    /// The one algorithm this key verifies (from its JWK): RS256 or ES256, never `none` or
    /// an HMAC, whatever a token's header says.
    pub alg: Algorithm,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The issuer and its signing keys, by `kid`.
#[derive(Debug)]
pub struct KeySet {
    pub issuer: String,
    keys: HashMap<String, VerifyKey>,
    /// When this set was read from its source (for the key-set age metric).
    pub fetched: SystemTime,
}

/// Why a JWKS document was refused.
#[derive(Debug, Error)]
pub enum KeySetError {
    #[error("the key set is not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the key set holds no RS256 or ES256 signing key with a kid")]
    Empty,
}

impl KeySet {
    /// Parses a JWKS document. Keys other than RSA and P-256 EC signing keys with a `kid`
    /// are left out (an API server publishes exactly those).
    pub fn from_jwks(issuer: &str, jwks: &[u8], fetched: SystemTime) -> Result<Self, KeySetError> {
        let set: JwkSet = serde_json::from_slice(jwks)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, VerifyKey { key, alg });
            }
        }
        if keys.is_empty() {
            return Err(KeySetError::Empty);
        }
        Ok(KeySet {
            issuer: issuer.to_owned(),
            keys,
            fetched,
        })
    }

    pub fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// `iamlet_token_key_fetches_total{outcome}` and `iamlet_token_keys_age_seconds`.
#[derive(Clone, Debug)]
pub(crate) struct KeyMetrics {
    fetches: Family<OutcomeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The key set's age, read at scrape time.
#[derive(Debug)]
struct KeyAge(Arc<Keys>);

impl Collector for KeyAge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(set) = self.0.current.load_full() else {
            return Ok(());
        };
        let age = SystemTime::now()
            .duration_since(set.fetched)
            .unwrap_or_default()
            .as_secs_f64();
        let g = ConstGauge::new(age);
        let e = encoder.encode_descriptor(
            "token_keys_age_seconds",
            "Seconds since the service-account key set in use was read from its source",
            None,
            MetricType::Gauge,
        )?;
        g.encode(e)
    }
}

impl KeyMetrics {
    pub(crate) fn register(registry: &mut Registry, keys: Arc<Keys>) -> Self {
        let m = KeyMetrics {
            fetches: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("iamlet");
        r.register(
            "token_key_fetches",
            "Fetches of the API server's service-account keys by outcome (ok, failed, unusable)",
            m.fetches.clone(),
        );
        r.register_collector(Box::new(KeyAge(keys)));
        m
    }

    fn fetched(&self, outcome: &'static str) {
        self.fetches.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// Where the key set comes from.
#[derive(Debug, Clone, Default)]
pub struct TokenConfig {
    /// `--token-review`: ask the API server (TokenReview) about a token whose key is not in
    /// the set, with this audience.
    pub review_audience: Option<String>,
    /// Local mode: a JWKS file and the issuer its tokens name.
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    /// Where the last good set from the API server is kept across restarts.
    pub keys_cache: Option<PathBuf>,
}

/// The published key set, and the way workers ask for a refetch.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    pub(crate) current: ArcSwapOption<KeySet>,
    /// Notified by a worker that met an unknown `kid`.
    pub(crate) refetch: Notify,
    /// Notified after every attempt to fetch (whatever its outcome), for waiting workers.
    pub(crate) fetched: Notify,
    /// With `--token-review`: where workers send tokens whose key is unknown even after a
    /// refetch, for the API server to say whose they are.
    pub(crate) reviews: std::sync::OnceLock<tokio::sync::mpsc::Sender<Review>>,
}

/// What the API server's TokenReview said of a token: the pod it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub node: Option<String>,
}

/// The API server's answer to a TokenReview, kept apart from not getting one: a refusal is
/// final (the token is not, or no longer, good: its pod may be gone), a missing answer is
/// transient (the server unreachable or slow, the queue full) and must not refuse a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Authenticated and bound to this pod.
    Bound(Reviewed),
    /// Not authenticated, or not a pod-bound service-account token.
    Refused,
    /// No answer: reviews off, the queue full, the request failed or timed out.
    Unknown,
}

/// One token to review and where the answer goes.
#[derive(Debug)]
pub(crate) struct Review {
    pub(crate) token: String,
    pub(crate) reply: tokio::sync::oneshot::Sender<Verdict>,
}

/// Reviews queued at once; more are refused (answered as unreviewed) rather than queued.
pub(crate) const REVIEW_QUEUE: usize = 64;

/// Serves reviews with the agent's kube client: `TokenReview` with `audience`, the pod read
/// from the authenticated user's `extra` (what the API server puts there for pod-bound
/// tokens). One at a time: a flood of unknown keys costs the API server one request each,
/// bounded by the queue and by the workers' failure budget per source.
pub(crate) async fn serve_reviews(
    client: kube::Client,
    audience: String,
    mut rx: tokio::sync::mpsc::Receiver<Review>,
) {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let api: kube::Api<TokenReview> = kube::Api::all(client);
    while let Some(Review { token, reply }) = rx.recv().await {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                audiences: Some(vec![audience.clone()]),
            },
            ..Default::default()
        };
        let answer = match tokio::time::timeout(
            Duration::from_secs(5),
            api.create(&kube::api::PostParams::default(), &review),
        )
        .await
        {
            Ok(Ok(r)) => r
                .status
                .and_then(reviewed)
                .map_or(Verdict::Refused, Verdict::Bound),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "TokenReview failed");
                Verdict::Unknown
            }
            Err(_) => {
                tracing::warn!("TokenReview timed out");
                Verdict::Unknown
            }
        };
        let _ = reply.send(answer);
    }
}

/// The pod a reviewed token is bound to, from `status.user`: the username names the
/// ServiceAccount, `extra` the pod (and node).
fn reviewed(status: k8s_openapi::api::authentication::v1::TokenReviewStatus) -> Option<Reviewed> {
    if status.authenticated != Some(true) {
        return None;
    }
    let user = status.user?;
    let name = user.username?;
    let rest = name.strip_prefix("system:serviceaccount:")?;
    let (namespace, service_account) = rest.split_once(':')?;
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    Some(Reviewed {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod_name: one("authentication.kubernetes.io/pod-name")?,
        pod_uid: one("authentication.kubernetes.io/pod-uid")?,
        node: one("authentication.kubernetes.io/node-name"),
    })
}

/// What the persisted copy of the last good set holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    issuer: String,
    jwks: serde_json::Value,
}

/// Loads the persisted set, if any (a restart while the API server is unreachable).
pub(crate) fn load_persisted(path: &Path) -> Option<KeySet> {
    let text = std::fs::read(path).ok()?;
    let p: Persisted = serde_json::from_slice(&text).ok()?;
    let jwks = serde_json::to_vec(&p.jwks).ok()?;
    let fetched = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    KeySet::from_jwks(&p.issuer, &jwks, fetched).ok()
}

/// Writes the set atomically (a temporary file renamed over the old one), mode 0600.
fn persist(path: &Path, issuer: &str, jwks: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let jwks: serde_json::Value = serde_json::from_slice(jwks)?;
    let body = serde_json::to_vec(&Persisted {
        issuer: issuer.to_owned(),
        jwks,
    })?;
    // A name of this process's own: during an upgrade the old and the new agent may both
    // write the file at once.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Keeps the key set from the API server: the persisted copy first, then a fetch, then
/// every [`REFRESH_EVERY`] or when a worker asks (at most every [`MIN_REFETCH`]).
pub(crate) async fn from_api_server(
    client: kube::Client,
    keys: Arc<Keys>,
    cache: Option<PathBuf>,
    metrics: KeyMetrics,
) {
    if let Some(set) = cache.as_deref().and_then(load_persisted) {
        tracing::info!(keys = set.len(), issuer = %set.issuer, "service-account keys loaded from the last run");
        keys.current.store(Some(Arc::new(set)));
    }
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = last {
            let wake = at + MIN_REFETCH;
            tokio::select! {
                _ = tokio::time::sleep_until(at + REFRESH_EVERY) => {}
                _ = keys.refetch.notified() => tokio::time::sleep_until(wake).await,
            }
        }
        last = Some(tokio::time::Instant::now());
        match fetch(&client).await {
            Ok((issuer, jwks)) => match KeySet::from_jwks(&issuer, &jwks, SystemTime::now()) {
                Ok(set) => {
                    tracing::debug!(keys = set.len(), %issuer, "service-account keys fetched");
                    if let Some(path) = &cache
                        && let Err(e) = persist(path, &issuer, &jwks)
                    {
                        tracing::warn!(path = %path.display(), error = %e, "cannot keep the service-account keys for the next start");
                    }
                    keys.current.store(Some(Arc::new(set)));
                    metrics.fetched("ok");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the API server's service-account key set is unusable; keeping the last one");
                    metrics.fetched("unusable");
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the API server's service-account keys; keeping the last ones");
                metrics.fetched("failed");
            }
        }
        keys.fetched.notify_waiters();
    }
}

/// The issuer (from the discovery document) and the JWKS, through the agent's kube client.
async fn fetch(client: &kube::Client) -> Result<(String, Vec<u8>), kube::Error> {
    let get = |path: &str| {
        http::Request::get(path)
            .body(Vec::new())
            .expect("a static request")
    };
    let discovery = client
        .request_text(get("/.well-known/openid-configuration"))
        .await?;
    let issuer = serde_json::from_str::<serde_json::Value>(&discovery)
        .ok()
        .and_then(|v| v["issuer"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let jwks = client.request_text(get("/openid/v1/jwks")).await?;
    Ok((issuer, jwks.into_bytes()))
}

/// Local mode: the set from `--token-jwks-file` with `--token-issuer`, read again when the
/// file's modification time changes.
pub(crate) async fn from_file(path: PathBuf, issuer: String, keys: Arc<Keys>) {
    let mut seen: Option<SystemTime> = None;
    loop {
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified != seen {
            seen = modified;
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    KeySet::from_jwks(&issuer, &b, SystemTime::now()).map_err(|e| e.to_string())
                }) {
                Ok(set) => {
                    tracing::info!(path = %path.display(), keys = set.len(), "service-account keys loaded");
                    keys.current.store(Some(Arc::new(set)));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read --token-jwks-file; keeping the last keys")
                }
            }
            keys.fetched.notify_waiters();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = keys.refetch.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A P-256 public key and an RSA public key as an API server publishes them, plus keys
    // the set must leave out.
    const JWKS: &str = r#"{"keys":[
      {"use":"sig","kty":"RSA","kid":"rsa-1","alg":"RS256","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
      {"use":"sig","kty":"EC","kid":"ec-1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
      {"use":"sig","kty":"RSA","alg":"RS256","n":"sXch","e":"AQAB"},
      {"kty":"oct","kid":"hmac","k":"c2VjcmV0"}
    ]}"#;

    #[test]
    fn rsa_and_p256_keys_with_a_kid_are_kept_and_each_verifies_one_algorithm() {
        let set = KeySet::from_jwks("https://issuer", JWKS.as_bytes(), SystemTime::now()).unwrap();
        assert_eq!(set.len(), 2, "no kid and symmetric keys are left out");
        assert_eq!(set.get("rsa-1").unwrap().alg, Algorithm::RS256);
        assert_eq!(set.get("ec-1").unwrap().alg, Algorithm::ES256);
        assert!(set.get("hmac").is_none());
        assert_eq!(set.issuer, "https://issuer");
    }

    #[test]
    fn a_set_without_usable_keys_or_not_json_is_refused() {
        assert!(matches!(
            KeySet::from_jwks(
                "i",
                br#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#,
                SystemTime::now()
            ),
            Err(KeySetError::Empty)
        ));
        assert!(matches!(
            KeySet::from_jwks("i", b"not json", SystemTime::now()),
            Err(KeySetError::Json(_))
        ));
    }

    #[test]
    fn a_review_names_the_pod_only_for_an_authenticated_pod_bound_token() {
        use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
        let status = |authenticated: bool, extra: &[(&str, &str)]| TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:shop:app-sa".into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = [
            ("authentication.kubernetes.io/pod-name", "app"),
            ("authentication.kubernetes.io/pod-uid", "u-1"),
            ("authentication.kubernetes.io/node-name", "node-a"),
        ];
        assert_eq!(
            reviewed(status(true, &pod)),
            Some(Reviewed {
                namespace: "shop".into(),
                service_account: "app-sa".into(),
                pod_name: "app".into(),
                pod_uid: "u-1".into(),
                node: Some("node-a".into()),
            })
        );
        assert_eq!(reviewed(status(false, &pod)), None);
        assert_eq!(
            reviewed(status(true, &pod[..0])),
            None,
            "not bound to a pod"
        );
    }

    #[test]
    fn the_persisted_set_is_read_back_with_its_issuer() {
        let dir = std::env::temp_dir().join(format!("iamlet-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        persist(&path, "https://issuer", JWKS.as_bytes()).unwrap();
        let set = load_persisted(&path).unwrap();
        assert_eq!((set.issuer.as_str(), set.len()), ("https://issuer", 2));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load_persisted(&path).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
