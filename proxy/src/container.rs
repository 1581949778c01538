//! The container-credentials door: `GET /v1/credentials` with a projected service-account
//! token in `Authorization`, what `AWS_CONTAINER_CREDENTIALS_FULL_URI` (169.254.170.23) and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` make every current AWS SDK send. The token is
//! verified here, locally, against the API server's published keys (no API server on the
//! request path); a token seen before is a hash lookup. A verified token is only as good as
//! its binding: its pod must be the live pod of this node that owns the request's source
//! address, with the same namespace, name and ServiceAccount. The role is the pod's, from the
//! same policy engine as the IMDS door.
//!
//! Answers: 200 with the credentials as JSON; `{"Code","Message"}` errors — 400 no or
//! malformed token, 401 a token that does not verify, 403 a valid token that does not belong
//! here, 405 a method other than GET, and 503 with `Retry-After` for what is transient (the
//! only status every SDK retries).

use crate::handler::Asked;
use crate::respond::{self, Reply, Status};
use crate::worker::Worker;
use iamlet_resolver::CredAnswer;
use iamlet_resolver::tokens::{KeySet, Verdict, VerifyKey};
use jsonwebtoken::{Validation, decode, decode_header};
use serde::Deserialize;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The path SDKs are pointed at (the AWS pod-identity webhook's default FULL_URI).
pub const PATH: &str = "/v1/credentials";

/// Clock skew allowed on `exp`, `nbf` and `iat`.
const LEEWAY: u64 = 60;
/// Failed verifications one source may cost a worker per second; past it, tokens from that
/// source are refused unverified until the second is over.
const FAILURES_PER_SECOND: u32 = 10;
/// Verified tokens (and sources' failure counts) a worker remembers; past it, it forgets
/// them all (they are re-verified on next sight).
const MAX_REMEMBERED: usize = 4096;
/// How long a request waits for a key set that names its token's key, after asking for a
/// fresh one.
const KEY_WAIT: Duration = Duration::from_secs(2);

const UNAUTHORIZED: Status = Status(401, "Unauthorized");

/// What a pod-bound service-account token says about itself (the `kubernetes.io` claim).
#[derive(Debug, Clone, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    iat: Option<u64>,
    exp: u64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubeClaims>,
}

#[derive(Debug, Clone, Deserialize)]
struct KubeClaims {
    namespace: String,
    serviceaccount: Named,
    pod: Option<Named>,
    node: Option<Named>,
}

#[derive(Debug, Clone, Deserialize)]
struct Named {
    name: String,
    uid: String,
}

/// A token that verified: who it is for, until when, and the key that signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    kid: String,
    /// Vouched for by the API server's TokenReview (its key was not known here): remembered
    /// for at most [`REVIEWED_FOR`], whatever the key set says.
    reviewed: bool,
    namespace: String,
    service_account: String,
    pod: Named,
    node: Option<String>,
    exp: u64,
    /// The token's SHA-256 prefix in hex (how logs and Events name it).
    token: String,
}

/// Per-worker memory of verified tokens (by SHA-256) and of sources' failed verifications.
#[derive(Debug, Default)]
pub struct TokenMemory {
    /// Shared with the requests that use them: a remembered token costs no copy of its claims.
    verified: ahash::AHashMap<[u8; 32], Rc<Verified>>,
    failures: ahash::AHashMap<IpAddr, (Instant, u32)>,
}

impl TokenMemory {
    /// The token with digest `hash`, if verified before, not expired at `now` and (unless
    /// the API server vouched for it) its key still `published`: a retired key's tokens are
    /// verified again, and refused.
    pub fn remembered(
        &self,
        hash: &[u8; 32],
        now: u64,
        published: impl Fn(&str) -> bool,
    ) -> Option<Rc<Verified>> {
        self.verified
            .get(hash)
            .filter(|v| now < v.exp + if v.reviewed { 0 } else { LEEWAY })
            .filter(|v| v.reviewed || published(&v.kid))
            .cloned()
    }

    /// Whether `peer` has spent this second's budget of failed verifications.
    fn spent(&self, peer: IpAddr) -> bool {
        self.failures.get(&peer).is_some_and(|(since, n)| {
            since.elapsed() < Duration::from_secs(1) && *n >= FAILURES_PER_SECOND
        })
    }

    /// Counts a failed verification (or a review the API server refused) against `peer`.
    fn failed(&mut self, peer: IpAddr) {
        if self.failures.len() >= MAX_REMEMBERED {
            self.failures.clear();
        }
        let t = Instant::now();
        let e = self.failures.entry(peer).or_insert((t, 0));
        if t.duration_since(e.0) >= Duration::from_secs(1) {
            *e = (t, 0);
        }
        e.1 += 1;
    }

    /// Remembers a verified token (forgetting them all when full: they verify again).
    pub fn remember(&mut self, hash: [u8; 32], v: Rc<Verified>) {
        if self.verified.len() >= MAX_REMEMBERED {
            self.verified.clear();
        }
        self.verified.insert(hash, v);
    }
}

/// A token's SHA-256: what a worker remembers it by.
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// Why a request gets no credentials: its status, `Code`, `Message`, and whether to say
/// `Retry-After`.
#[derive(Debug)]
pub struct Refusal {
    status: Status,
    code: &'static str,
    message: String,
    outcome: &'static str,
}

fn refuse(
    status: Status,
    code: &'static str,
    outcome: &'static str,
    message: impl Into<String>,
) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
        outcome,
    }
}

fn unauthorized(outcome: &'static str, message: &str) -> Refusal {
    refuse(UNAUTHORIZED, "InvalidToken", outcome, message)
}

fn forbidden(outcome: &'static str, message: impl Into<String>) -> Refusal {
    refuse(respond::FORBIDDEN, "AccessDenied", outcome, message)
}

fn unavailable(outcome: &'static str, message: &str) -> Refusal {
    refuse(respond::UNAVAILABLE, "ServiceUnavailable", outcome, message)
}

/// Whether `host` (the request's `Host`) names the container-credentials address, or the
/// agent itself on loopback (local mode). Anything else is refused: a page that rebinds a
/// name of its own to the agent's address must not be able to ask.
pub fn host_allowed(host: Option<&[u8]>) -> bool {
    let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
        return false;
    };
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4 == std::net::Ipv4Addr::new(169, 254, 170, 23) || v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23) || v6.is_loopback()
        }
        Err(_) => false,
    }
}

/// The token in an `Authorization` value: the raw JWT the SDKs send, or `Bearer <jwt>`.
fn token_of(value: &[u8]) -> Option<&str> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let v = match v.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("bearer ") => v[7..].trim(),
        _ => v,
    };
    (!v.is_empty() && v.split('.').count() == 3).then_some(v)
}

/// The first 8 bytes of a digest in hex: enough to tell tokens apart in logs.
fn hex_prefix(hash: &[u8; 32]) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The wall clock as the door judges tokens by it: a token's `exp` is the API server's
/// wall-clock time, and the node's clock may be stepped while iamlet runs, so it is followed;
/// but it is read again only once a second has passed on the monotonic clock since the last
/// reading, so a request reads one clock, its own `now`, not two. Not `handler::unix_time`:
/// that one is anchored once per process on purpose (IMDSv2 tokens are iamlet's own, minted
/// and checked on one clock), and would judge the API server's tokens by a node clock as it
/// was at start-up.
#[derive(Clone, Copy)]
struct WallClock {
    at: Instant,
    unix: Duration,
}

impl WallClock {
    /// Seconds since the epoch at `now`; `read` reads the wall clock when the last reading is
    /// a second old or more (or there is none).
    fn secs(this: &mut Option<Self>, now: Instant, read: impl FnOnce() -> Duration) -> u64 {
        let c = match *this {
            Some(c) if now.saturating_duration_since(c.at) < Duration::from_secs(1) => c,
            _ => {
                let c = Self {
                    at: now,
                    unix: read(),
                };
                *this = Some(c);
                c
            }
        };
        (c.unix + now.saturating_duration_since(c.at)).as_secs()
    }
}

/// [`WallClock::secs`] on this worker's reading.
fn wall_secs(now: Instant) -> u64 {
    thread_local! {
        static WALL: std::cell::Cell<Option<WallClock>> = const { std::cell::Cell::new(None) };
    }
    WALL.with(|cell| {
        let mut c = cell.get();
        let secs = WallClock::secs(&mut c, now, || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
        });
        cell.set(c);
        secs
    })
}

/// Answers one request on the door; returns its status.
pub async fn answer(w: &Worker, asked: Asked<'_, '_, Instant>, reply: &mut Reply<'_>) -> u16 {
    let Asked {
        peer,
        method,
        headers,
        now,
    } = asked;
    match credentials(w, peer, method, headers, now).await {
        Ok(body) => {
            reply.full(respond::OK, respond::JSON, &body);
            200
        }
        Err(r) => {
            w.metrics.container_outcome(r.outcome);
            let body = serde_json::json!({"Code": r.code, "Message": r.message}).to_string();
            let retry: &[(&[u8], &[u8])] = if r.status.0 == 503 {
                &[(b"Retry-After", b"1")]
            } else {
                &[]
            };
            reply.head(r.status, respond::JSON, body.len(), retry);
            reply.body(body.as_bytes());
            r.status.0
        }
    }
}

fn header<'h>(headers: &'h [httparse::Header<'_>], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

async fn credentials(
    w: &Worker,
    peer: IpAddr,
    method: &str,
    headers: &[httparse::Header<'_>],
    now: Instant,
) -> Result<bytes::Bytes, Refusal> {
    if !host_allowed(header(headers, "host")) {
        return Err(forbidden(
            "host",
            "the Host header must name 169.254.170.23 (the container credentials address)",
        ));
    }
    if method != "GET" {
        return Err(refuse(
            respond::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method",
            "only GET is answered here",
        ));
    }
    let Some(token) = header(headers, "authorization").and_then(token_of) else {
        return Err(refuse(
            respond::BAD_REQUEST,
            "InvalidToken",
            "malformed",
            "no service-account token in the Authorization header",
        ));
    };
    let claims = verified(w, peer, token, wall_secs(now)).await?;
    bind(w, peer, &claims, token, now).await
}

/// The token's claims, from this worker's memory or verified now (`now`: the wall clock's
/// seconds).
async fn verified(
    w: &Worker,
    peer: IpAddr,
    token: &str,
    now: u64,
) -> Result<Rc<Verified>, Refusal> {
    let hash = token_hash(token);
    let handle = &w.shared.handle;
    if let Some(v) = w
        .tokens
        .borrow()
        .remembered(&hash, now, |kid| handle.has_token_key(kid))
    {
        return Ok(v);
    }
    // A source that keeps sending tokens that fail costs a bounded amount of verification.
    if w.tokens.borrow().spent(peer) {
        return Err(unauthorized(
            "rate_limited",
            "too many tokens that failed verification from this address; retry later",
        ));
    }
    // Boxed, like the review in `bind`: a token's first sight is rare, and its state would
    // otherwise be moved with every request's future.
    match Box::pin(verify(w, token, now)).await {
        Ok(mut v) => {
            v.token = hex_prefix(&hash);
            let v = Rc::new(v);
            w.tokens.borrow_mut().remember(hash, v.clone());
            w.metrics.container_outcome("verified");
            // The audit trail of this door: which pod's token, once per token and worker
            // (named by a hash prefix: the token itself is a credential).
            tracing::info!(
                door = "container",
                namespace = %v.namespace,
                pod = %v.pod.name,
                service_account = %v.service_account,
                token_sha256 = %v.token,
                expires = v.exp,
                "service-account token verified"
            );
            Ok(v)
        }
        Err(r) => {
            if r.status == UNAUTHORIZED || r.status == respond::BAD_REQUEST {
                w.tokens.borrow_mut().failed(peer);
            }
            Err(r)
        }
    }
}

/// How long a token the API server vouched for is remembered (at most; less when the token
/// expires sooner).
const REVIEWED_FOR: u64 = 60;
/// Bound on waiting for a TokenReview.
const REVIEW_WAIT: Duration = Duration::from_secs(5);

/// `--token-review`: the API server's TokenReview decides about a token signed with a key
/// not known here; a token it authenticates as bound to a pod is then bound like any other.
async fn review(w: &Worker, token: &str, kid: String, now: u64) -> Result<Verified, Refusal> {
    let r = match ask_api_server(w, token).await {
        Verdict::Bound(r) => r,
        Verdict::Refused => {
            return Err(unauthorized(
                "unknown_key",
                "the token's signing key is unknown and the API server does not vouch for it",
            ));
        }
        Verdict::Unknown => {
            return Err(unavailable(
                "review",
                "the token's signing key is unknown and the API server could not be asked; retry shortly",
            ));
        }
    };
    // The token's own expiry (not verified here: the review was) only shortens the memory.
    let mut v = Validation::new(jsonwebtoken::Algorithm::RS256);
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims = Default::default();
    let claimed_exp =
        decode::<serde_json::Value>(token, &jsonwebtoken::DecodingKey::from_secret(&[]), &v)
            .ok()
            .and_then(|d| d.claims["exp"].as_u64());
    let exp = claimed_exp.map_or(now + REVIEWED_FOR, |e| e.min(now + REVIEWED_FOR));
    Ok(Verified {
        kid,
        reviewed: true,
        namespace: r.namespace,
        service_account: r.service_account,
        pod: Named {
            name: r.pod_name,
            uid: r.pod_uid,
        },
        node: r.node,
        exp,
        token: String::new(),
    })
}

/// The API server's TokenReview of `token`, waited for at most [`REVIEW_WAIT`].
async fn ask_api_server(w: &Worker, token: &str) -> Verdict {
    monoio::time::timeout(REVIEW_WAIT, w.shared.handle.review_token(token))
        .await
        .unwrap_or(Verdict::Unknown)
}

/// The token's JOSE header; a token that has none is malformed (400).
fn head_of(token: &str) -> Result<jsonwebtoken::Header, Refusal> {
    decode_header(token).map_err(|_| {
        refuse(
            respond::BAD_REQUEST,
            "InvalidToken",
            "malformed",
            "the token is not a JWT",
        )
    })
}

/// Verifies the token's signature with the key its `kid` names (with that key's one
/// algorithm), its issuer, audience and times, and that it is a pod-bound service-account
/// token whose subject agrees with its `kubernetes.io` claim.
async fn verify(w: &Worker, token: &str, now: u64) -> Result<Verified, Refusal> {
    let head = head_of(token)?;
    let Some(kid) = head.kid.clone() else {
        return Err(unauthorized(
            "unknown_key",
            "the token names no signing key (kid)",
        ));
    };
    let handle = &w.shared.handle;
    let mut keys = handle.token_keys();
    if keys.as_ref().is_none_or(|k| k.get(&kid).is_none()) {
        // A key we have not seen: the API server may have rotated; ask for the set again.
        let _ = monoio::time::timeout(KEY_WAIT, handle.refetch_token_keys()).await;
        keys = handle.token_keys();
    }
    let key = keys.as_ref().and_then(|k| k.get(&kid).map(|key| (k, key)));
    let Some((keys, key)) = key else {
        // Still unknown after a refetch: the API server itself may vouch for it.
        if handle.reviews_tokens() {
            return review(w, token, kid, now).await;
        }
        if keys.is_none() {
            return Err(unavailable(
                "no_keys",
                "the service-account signing keys are not known yet; retry shortly",
            ));
        }
        return Err(unauthorized(
            "unknown_key",
            "the token's signing key is not one of the API server's",
        ));
    };
    check_with(
        keys,
        key,
        &head,
        kid,
        w.shared.settings.token_audience.as_str(),
        token,
        now,
    )
}

/// The first-sight check of `token` against `keys` (no refetch, no review): the door's own
/// verification once it holds a key set naming the token's key, and what the bench measures.
pub fn check(keys: &KeySet, audience: &str, token: &str, now: u64) -> Result<Verified, Refusal> {
    let head = head_of(token)?;
    let kid = head.kid.clone().unwrap_or_default();
    let Some(key) = keys.get(&kid) else {
        return Err(unauthorized(
            "unknown_key",
            "the token's signing key is not one of the API server's",
        ));
    };
    check_with(keys, key, &head, kid, audience, token, now)
}

/// The signature with `key` (its own algorithm only), issuer, audience, times, and the
/// `kubernetes.io` claim of a pod-bound service-account token.
fn check_with(
    keys: &KeySet,
    key: &VerifyKey,
    head: &jsonwebtoken::Header,
    kid: String,
    audience: &str,
    token: &str,
    now: u64,
) -> Result<Verified, Refusal> {
    if head.alg != key.alg {
        return Err(unauthorized(
            "algorithm",
            "the token's algorithm is not its key's",
        ));
    }
    let mut v = Validation::new(key.alg);
    v.leeway = LEEWAY;
    v.validate_nbf = true;
    v.set_issuer(&[keys.issuer.as_str()]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = decode::<Claims>(token, &key.key, &v)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => unauthorized("expired", "the token has expired"),
                K::ImmatureSignature => unauthorized("not_yet_valid", "the token is not valid yet"),
                K::InvalidIssuer => {
                    unauthorized("issuer", "the token's issuer is not the cluster's")
                }
                K::InvalidAudience => {
                    unauthorized("audience", "the token's audience is not this endpoint's")
                }
                K::InvalidSignature => {
                    unauthorized("signature", "the token's signature does not verify")
                }
                _ => unauthorized(
                    "claims",
                    "the token's claims are not a service-account token's",
                ),
            }
        })?
        .claims;
    if claims.iat.is_some_and(|iat| iat > now + LEEWAY) {
        return Err(unauthorized(
            "not_yet_valid",
            "the token was issued in the future",
        ));
    }
    let Some(k) = claims.kubernetes else {
        return Err(unauthorized(
            "claims",
            "the token is not a Kubernetes service-account token",
        ));
    };
    if claims.sub
        != format!(
            "system:serviceaccount:{}:{}",
            k.namespace, k.serviceaccount.name
        )
    {
        return Err(unauthorized(
            "claims",
            "the token's subject does not match its service account",
        ));
    }
    let Some(pod) = k.pod else {
        return Err(forbidden(
            "not_pod_bound",
            "only a token bound to a pod (a projected service-account token) is accepted",
        ));
    };
    Ok(Verified {
        kid,
        reviewed: false,
        namespace: k.namespace,
        service_account: k.serviceaccount.name,
        pod,
        node: k.node.map(|n| n.name),
        exp: claims.exp,
        token: String::new(),
    })
}

/// The credentials of the token's pod, if the request comes from it, on this node.
async fn bind(
    w: &Worker,
    peer: IpAddr,
    t: &Verified,
    token: &str,
    now: Instant,
) -> Result<bytes::Bytes, Refusal> {
    if let (Some(theirs), Some(ours)) = (&t.node, &w.shared.settings.node_name)
        && theirs != ours
    {
        return Err(forbidden(
            "other_node",
            "the token is bound to a pod on another node",
        ));
    }
    let Some(id) = w.wait_identity(peer).await else {
        if w.shared.handle.pod_gone(&t.pod.uid) {
            return Err(forbidden("pod_gone", "the token's pod is gone"));
        }
        // A pod this agent has not seen: one not synced yet (retry), or one deleted before
        // this agent started or longer ago than it remembers. The API server knows which
        // (a pod-bound token stops authenticating with its pod), so with `--token-review` a
        // token whose pod is gone is refused for good instead of retried. Each review costs
        // the API server a request, so a refused one counts against the source's budget.
        if !t.reviewed
            && w.shared.handle.reviews_tokens()
            && !w.tokens.borrow().spent(peer)
            && Box::pin(ask_api_server(w, token)).await == Verdict::Refused
        {
            w.tokens.borrow_mut().failed(peer);
            return Err(forbidden(
                "pod_gone",
                "the API server no longer accepts the token: its pod is gone",
            ));
        }
        return Err(unavailable(
            "unknown_pod",
            "no pod of this node is known at this address yet; retry shortly",
        ));
    };
    if id.uid != t.pod.uid {
        return Err(forbidden(
            "other_pod",
            "the token belongs to another pod than the one at this address",
        ));
    }
    if id.namespace != t.namespace
        || id.pod != t.pod.name
        || id.service_account.as_deref() != Some(t.service_account.as_str())
    {
        return Err(forbidden(
            "other_pod",
            "the token's pod does not match the pod at this address",
        ));
    }
    let via = || {
        format!(
            "container-credentials door, service-account token {}",
            t.token
        )
    };
    if let Some(reason) = &id.denied {
        w.shared.handle.report_denied_via(&id, via());
        return Err(forbidden("denied", reason.to_string()));
    }
    let Some(role) = id.role.as_ref() else {
        return Err(forbidden("no_role", "this pod has no role"));
    };
    // The request's clock reading, as on the IMDS path (a wait for the pod above is bounded
    // by the same --backoff-max-elapsed-time).
    let answer = match role.slot.current(now) {
        Some(a) => a,
        None => match w.fetch(&role.slot).await {
            Some(a) => a,
            None => {
                return Err(unavailable(
                    "sts",
                    "credentials for this role are still being fetched from STS; retry shortly",
                ));
            }
        },
    };
    match &*answer {
        CredAnswer::Ready { container, .. } => Ok(container.clone()),
        CredAnswer::Failed { .. } => {
            w.shared.handle.report_credential_error_via(&id, via());
            Err(unavailable(
                "sts",
                "STS refused or failed the role's credentials; retry shortly",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_is_read_once_a_second_and_followed_when_stepped() {
        let t0 = Instant::now();
        let mut c = None;
        let mut reads = 0;
        let mut wall = |unix: u64| {
            reads += 1;
            move || Duration::from_secs(unix)
        };
        assert_eq!(WallClock::secs(&mut c, t0, wall(10_000)), 10_000);
        // Within the second: followed on the monotonic clock, no reading.
        let half = t0 + Duration::from_millis(999);
        assert_eq!(WallClock::secs(&mut c, half, || unreachable!()), 10_000);
        // A request taken up before the reading counts from it, not before it.
        assert_eq!(WallClock::secs(&mut c, t0, || unreachable!()), 10_000);
        // A second on: read again, and a clock stepped back an hour is followed.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            WallClock::secs(&mut c, later, wall(10_001 - 3_600)),
            10_001 - 3_600
        );
        assert_eq!(
            WallClock::secs(
                &mut c,
                later + Duration::from_millis(500),
                || unreachable!()
            ),
            10_001 - 3_600
        );
        assert_eq!(reads, 2);
        // The worker's own reading agrees with the wall clock.
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(wall_secs(Instant::now()).abs_diff(sys) <= 1);
    }

    #[test]
    fn only_the_link_local_address_or_loopback_may_be_named_by_host() {
        for ok in [
            "169.254.170.23",
            "169.254.170.23:80",
            "[fd00:ec2::23]",
            "[fd00:ec2::23]:80",
            "127.0.0.1:8181",
            "localhost:8181",
            "[::1]:8181",
        ] {
            assert!(host_allowed(Some(ok.as_bytes())), "{ok}");
        }
        for bad in [
            "169.254.169.254",
            "evil.example",
            "169.254.170.23.evil.example",
            "10.0.0.1:8181",
            "",
        ] {
            assert!(!host_allowed(Some(bad.as_bytes())), "{bad}");
        }
        assert!(!host_allowed(None));
    }

    #[test]
    fn the_token_is_the_raw_value_or_after_bearer() {
        assert_eq!(token_of(b"a.b.c"), Some("a.b.c"));
        assert_eq!(token_of(b"Bearer a.b.c"), Some("a.b.c"));
        assert_eq!(token_of(b"bearer  a.b.c "), Some("a.b.c"));
        assert_eq!(token_of(b"Bearer "), None);
        assert_eq!(token_of(b"a.b"), None);
        assert_eq!(token_of(b""), None);
    }
}
