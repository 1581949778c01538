//! Answers one parsed request: admin paths, IMDSv2 tokens, the role listing, credentials and
//! `iam/info` from the snapshot; everything else through the pass-through (or 404 by policy).

use crate::args::{Imdsv2Mode, MetadataPolicy};
use crate::downstream::DownstreamError;
use crate::passthrough;
use crate::respond::{self, Persist, Reply, Status};
use crate::route::RouteLabel;
use crate::route::{Route, canonicalize, route};
use crate::token::{self, TokenCheck};
use crate::worker::Worker;
use iamlet_resolver::render::imds_timestamp;
use iamlet_resolver::{CredAnswer, Identity, RoleEntry};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const WRONG_ROLE: &[u8] = b"Forbidden: the requested role is not this pod's role\n";
const NOT_READY: &str = "credentials for this role are still being fetched from STS; retry shortly";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const UNAUTHORIZED: Status = Status(401, "Unauthorized");

/// What a request was answered with: its route and status, for the latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub route: RouteLabel,
    pub status: u16,
}

/// One request's context.
struct Req<'a, 'r> {
    w: &'a Worker,
    peer: IpAddr,
    /// When the request was taken up: the one clock read of a request, for the credentials'
    /// freshness and the IMDSv2 token's expiry alike.
    now: Instant,
    reply: Reply<'a>,
    headers: &'r [httparse::Header<'r>],
    answered: Answered,
}

impl Req<'_, '_> {
    /// Counts the answer (route and status class) and keeps them for the caller.
    fn count(&mut self, label: RouteLabel, status: u16) {
        self.w.metrics.request(label, status);
        self.answered = Answered {
            route: label,
            status,
        };
    }

    fn answer(&mut self, label: RouteLabel, status: Status, ctype: &str, body: &[u8]) {
        self.count(label, status.0);
        self.reply.full(status, ctype, body);
    }

    /// [`Req::answer`] with the body in pieces, copied into the answer (not joined first).
    fn answer_parts(&mut self, label: RouteLabel, status: Status, ctype: &str, body: &[&[u8]]) {
        self.count(label, status.0);
        self.reply.parts(status, ctype, body);
    }

    fn text(&mut self, label: RouteLabel, status: Status, body: &[u8]) {
        self.answer(label, status, respond::TEXT, body);
    }

    /// Refuses the request: counted as `e`, answered with `e`'s status.
    fn refuse(&mut self, e: DownstreamError, label: RouteLabel, body: &[u8]) {
        self.w.metrics.downstream_error(e);
        let status = e.status().unwrap_or(respond::BAD_REQUEST);
        self.text(label, status, body);
    }

    fn not_found(&mut self, label: RouteLabel) {
        self.answer(
            label,
            respond::NOT_FOUND,
            respond::HTML,
            respond::NOT_FOUND_BODY,
        );
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// A request as the handler took it up, for the paths that answer it elsewhere (the
/// container door, the pass-through).
pub struct Asked<'r, 'h, T> {
    pub peer: IpAddr,
    pub method: &'r str,
    pub headers: &'r [httparse::Header<'h>],
    /// The request's clock reading (the pass-through's: none if it waited for its pod).
    pub now: T,
}

/// Unix time at `now`, from the one clock read a request makes: the wall clock is read once
/// per process and followed monotonically from there. IMDSv2 tokens are minted and verified
/// on this clock alike (seconds matter to them, and a stepped wall clock does not stretch or
/// cut a token's life).
fn unix_time(now: Instant) -> std::time::Duration {
    static BASE: std::sync::OnceLock<(Instant, std::time::Duration)> = std::sync::OnceLock::new();
    let (at, unix) = BASE.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (Instant::now(), unix)
    });
    *unix + now.saturating_duration_since(*at)
}

/// Writes the response for `req`, taken up at `now`, into `out`; returns what it answered.
pub async fn handle(
    w: &Worker,
    peer: IpAddr,
    req: &httparse::Request<'_, '_>,
    persist: Persist,
    now: Instant,
    out: &mut Vec<u8>,
) -> Answered {
    let method = req.method.unwrap_or("");
    let mut r = Req {
        w,
        peer,
        now,
        reply: Reply::new(out, persist, method),
        headers: req.headers,
        answered: Answered {
            route: RouteLabel::Invalid,
            status: 0,
        },
    };
    answer(&mut r, req, method).await;
    r.answered
}

/// Routes the request and answers it.
async fn answer(r: &mut Req<'_, '_>, req: &httparse::Request<'_, '_>, method: &str) {
    let w = r.w;
    let peer = r.peer;
    let Ok(path) = canonicalize(req.path.unwrap_or("")) else {
        return r.refuse(
            DownstreamError::InvalidPath,
            RouteLabel::Invalid,
            b"Bad Request: invalid path\n",
        );
    };
    // The container-credentials door: service-account tokens, not IMDS (no IMDSv2 token).
    if path == crate::container::PATH && !w.admin_only {
        let asked = Asked {
            peer,
            method,
            headers: req.headers,
            now: r.now,
        };
        let status = crate::container::answer(w, asked, &mut r.reply).await;
        return r.count(RouteLabel::Container, status);
    }
    let rt = route(&path);
    let admin_allowed = w.admin_only || w.shared.settings.admin_on_app_port;
    match rt {
        Route::Healthz => return r.text(RouteLabel::Admin, respond::OK, b"ok\n"),
        Route::Ready => {
            return match w.shared.admin.readiness.missing() {
                None => r.text(RouteLabel::Admin, respond::OK, b"ready\n"),
                Some(missing) => {
                    let body = format!("not ready: {missing}\n");
                    r.text(RouteLabel::Admin, respond::UNAVAILABLE, body.as_bytes())
                }
            };
        }
        Route::Metrics if admin_allowed => {
            let m = w.shared.admin.rendered_metrics();
            // OpenMetrics for scrapers that ask for it (Prometheus does); the classic text
            // format otherwise (curl, promtool, older scrapers).
            let openmetrics = r.header("accept").is_some_and(|a| {
                a.windows(b"openmetrics".len())
                    .any(|x| x.eq_ignore_ascii_case(b"openmetrics"))
            });
            return if openmetrics {
                r.answer(
                    RouteLabel::Admin,
                    respond::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    m.openmetrics.as_bytes(),
                )
            } else {
                r.answer(
                    RouteLabel::Admin,
                    respond::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &m.classic,
                )
            };
        }
        Route::DebugStore if admin_allowed && w.shared.settings.debug => {
            let json = w.shared.handle.store_json();
            return r.answer(
                RouteLabel::Admin,
                respond::OK,
                respond::JSON,
                json.as_bytes(),
            );
        }
        _ if w.admin_only => return r.not_found(RouteLabel::Admin),
        Route::Metrics | Route::DebugStore => return r.not_found(RouteLabel::Denied),
        // Only a known pod gets a token: an unknown source waits like a credential
        // request, then gets the 404 (and nothing that would open the node's metadata).
        Route::Token => {
            if method == "PUT" && !w.wait_known(peer).await {
                return r.not_found(RouteLabel::Token);
            }
            return mint_token(r, method);
        }
        Route::VersionedToken => {
            return r.text(RouteLabel::Token, respond::FORBIDDEN, b"Forbidden\n");
        }
        _ => {}
    }
    // Everything below is metadata: tokens are checked first.
    if !token_ok(r) {
        return r.answer(RouteLabel::Token, UNAUTHORIZED, respond::HTML, b"");
    }
    if method != "GET" && method != "HEAD" {
        return r.refuse(
            DownstreamError::Method,
            RouteLabel::Invalid,
            b"Method Not Allowed\n",
        );
    }
    match rt {
        Route::RoleList
        | Route::Credentials(_)
        | Route::ExtendedCredentials(_)
        | Route::IamInfo => credentials(r, rt).await,
        Route::Denied => r.not_found(RouteLabel::Denied),
        Route::UserData if !w.shared.settings.forward_user_data => r.not_found(RouteLabel::Denied),
        Route::IdentitySignature if !w.shared.settings.forward_identity_signature => {
            r.not_found(RouteLabel::Denied)
        }
        _ => {
            if w.shared.settings.policy == MetadataPolicy::Allowlist
                && !w.allow_paths.iter().any(|re| re.is_match(&path))
            {
                return r.not_found(RouteLabel::Denied);
            }
            // The node's metadata is for its pods only: an unknown source (not a pod of
            // this node, or not yet known) waits like a credential request, then gets 404.
            // The exchange's deadlines count from the request's clock reading unless it
            // waited here.
            let since = if w.is_known(&peer) {
                Some(r.now)
            } else if w.wait_for(peer).await.is_some() {
                None
            } else {
                return r.not_found(RouteLabel::Denied);
            };
            let asked = Asked {
                peer,
                method,
                headers: req.headers,
                now: since,
            };
            // Boxed: the exchange with IMDS is the largest state a request can hold, and
            // inline it would be moved with every request's future, answered at once or not.
            let status = Box::pin(passthrough::forward(w, asked, &path, &mut r.reply)).await;
            r.count(RouteLabel::Passthrough, status);
        }
    }
}

/// `PUT /latest/api/token`: a token bound to the caller's IP.
fn mint_token(r: &mut Req<'_, '_>, method: &str) {
    if method != "PUT" {
        return r.text(
            RouteLabel::Token,
            respond::METHOD_NOT_ALLOWED,
            b"Method Not Allowed\n",
        );
    }
    if r.w.shared.settings.imdsv2 == Imdsv2Mode::Disabled {
        return r.text(
            RouteLabel::Token,
            respond::FORBIDDEN,
            b"Forbidden: IMDSv2 is disabled on this node\n",
        );
    }
    // IMDS refuses token requests that went through a proxy.
    if r.header("x-forwarded-for").is_some() {
        return r.refuse(
            DownstreamError::TokenForwarded,
            RouteLabel::Token,
            b"Forbidden\n",
        );
    }
    let Some(ttl) = r.header(TTL_HEADER).and_then(token::parse_ttl) else {
        return r.refuse(
            DownstreamError::TokenTtl,
            RouteLabel::Token,
            b"Bad Request: X-aws-ec2-metadata-token-ttl-seconds must be 1..21600\n",
        );
    };
    let expires = token::expiry(unix_time(r.now), ttl);
    let t = r.w.shared.token_key.mint_bytes(r.peer, expires);
    r.w.metrics.tokens_issued.inc();
    r.count(RouteLabel::Token, 200);
    let mut digits = [0u8; 20];
    r.reply.head(
        respond::OK,
        respond::TEXT,
        t.len(),
        &[(
            b"X-Aws-Ec2-Metadata-Token-Ttl-Seconds",
            respond::decimal(ttl, &mut digits),
        )],
    );
    r.reply.body(&t);
}

/// Checks the IMDSv2 token, if any (and requires one in `required` mode).
fn token_ok(r: &mut Req<'_, '_>) -> bool {
    match r.header(TOKEN_HEADER) {
        Some(t) => match r
            .w
            .shared
            .token_key
            .verify(t, r.peer, unix_time(r.now).as_secs())
        {
            TokenCheck::Valid => true,
            TokenCheck::Expired => {
                r.w.metrics.token_rejected("expired");
                false
            }
            TokenCheck::Invalid => {
                r.w.metrics.token_rejected("invalid");
                false
            }
        },
        None if r.w.shared.settings.imdsv2 == Imdsv2Mode::Required => {
            r.w.metrics.token_rejected("missing");
            false
        }
        None => true,
    }
}

/// A credential-path request, in one direction: who asks (the pod at the source address,
/// looked up once), what it may have (its listing, its role's info or credentials), then the
/// credentials themselves (cached nearly always, else fetched from STS within the bound).
async fn credentials(r: &mut Req<'_, '_>, rt: Route<'_>) {
    let w = r.w;
    let label = if matches!(rt, Route::RoleList) {
        RouteLabel::RoleList
    } else {
        RouteLabel::Credentials
    };
    let snapshot = w.snapshot();
    let waited;
    let id = match snapshot.get(&r.peer) {
        Some(id) => id,
        None => {
            waited = w.wait_for(r.peer).await;
            match &waited {
                Some(id) => id,
                None => return r.not_found(label),
            }
        }
    };
    if let Some(reason) = &id.denied {
        // A namespace restriction: refused at once, with the reason, and an Event on the pod.
        w.shared.handle.report_denied(id);
        let body = format!("Forbidden: {reason}\n");
        return r.text(label, respond::FORBIDDEN, body.as_bytes());
    }
    let Some(role) = id.role.as_ref() else {
        return r.not_found(label);
    };
    let requested = match rt {
        Route::RoleList => return r.text(label, respond::OK, &role.listing),
        Route::IamInfo => return r.text(label, respond::OK, iam_info(role).as_bytes()),
        Route::Credentials(requested) | Route::ExtendedCredentials(requested) => requested,
        _ => return r.not_found(label),
    };
    if !w.shared.settings.rules.names(requested, &role.arn) {
        return r.text(label, respond::FORBIDDEN, WRONG_ROLE);
    }
    if let Some(cached) = role.slot.current_ref(r.now)
        && let Some(a) = cached.as_deref()
    {
        w.metrics.cache_hits.inc();
        role.slot.hit();
        return answer_credentials(r, rt, label, id, &role.arn, a);
    }
    w.metrics.cache_misses.inc();
    match w.fetch(&role.slot).await {
        Some(a) => answer_credentials(r, rt, label, id, &role.arn, &a),
        None => {
            let body = respond::error_json("ServiceUnavailable", NOT_READY);
            r.answer(label, respond::INTERNAL, respond::JSON, &body)
        }
    }
}

/// The answer to a credentials request (`rt`) from the answer of the pod's slot.
fn answer_credentials(
    r: &mut Req<'_, '_>,
    rt: Route<'_>,
    label: RouteLabel,
    id: &Arc<Identity>,
    arn: &str,
    ans: &CredAnswer,
) {
    match ans {
        CredAnswer::Ready { body, .. } if matches!(rt, Route::ExtendedCredentials(_)) => {
            let doc = account_id_added(body, account_of(arn));
            r.answer_parts(label, respond::OK, respond::TEXT, &doc)
        }
        CredAnswer::Ready { body, .. } => r.text(label, respond::OK, body),
        CredAnswer::Failed { status, body, .. } => {
            r.w.shared.handle.report_credential_error(id);
            let s = if *status == 500 {
                respond::INTERNAL
            } else {
                Status(*status, "Error")
            };
            r.answer(label, s, respond::JSON, body)
        }
    }
}

/// The account ID in a role ARN (`arn:aws:iam::123456789012:role/x`).
fn account_of(arn: &str) -> &str {
    arn.split(':').nth(4).unwrap_or("")
}

/// The credentials document plus `AccountId`, as IMDS's extended path answers, in pieces:
/// the document up to its closing brace, then the new member and the brace.
fn account_id_added<'a>(doc: &'a [u8], account: &'a str) -> [&'a [u8]; 4] {
    let end = doc.iter().rposition(|&b| b == b'}').unwrap_or(doc.len());
    let head = doc[..end].trim_ascii_end();
    [
        head,
        b",\n  \"AccountId\" : \"",
        account.as_bytes(),
        b"\"\n}",
    ]
}

#[cfg(test)]
fn with_account_id(doc: &[u8], account: &str) -> Vec<u8> {
    account_id_added(doc, account).concat()
}

/// `iam/info` for a pod: its role presented as an instance profile of the same name.
fn iam_info(role: &RoleEntry) -> String {
    let arn = &role.arn;
    let name = arn.rsplit('/').next().unwrap_or(arn);
    let partition = arn.split(':').nth(1).unwrap_or("aws");
    let account = account_of(arn);
    // A stable, IAM-shaped ID derived from the ARN (FNV-1a, base-32 digits).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in arn.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    const DIGITS: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let id: String = (0..17)
        .map(|i| DIGITS[((h >> ((i * 5) % 60)) & 31) as usize] as char)
        .collect();
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"InstanceProfileArn\" : \"arn:{partition}:iam::{account}:instance-profile/{name}\",\n  \"InstanceProfileId\" : \"AIPA{id}\"\n}}",
        imds_timestamp(SystemTime::now())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_document_adds_the_account_id() {
        let doc = b"{\n  \"Code\" : \"Success\",\n  \"Token\" : \"t\"\n}";
        let ext = with_account_id(doc, "123456789012");
        let v: serde_json::Value = serde_json::from_slice(&ext).unwrap();
        assert_eq!(v["AccountId"], "123456789012");
        assert_eq!(v["Token"], "t");
        assert_eq!(
            account_of("arn:aws:iam::210987654321:role/x"),
            "210987654321"
        );
    }

    #[test]
    fn the_extended_document_is_the_document_with_the_member_before_its_brace() {
        let doc = b"{\n  \"Code\" : \"Success\",\n  \"Token\" : \"t\"\n}";
        let want = "{\n  \"Code\" : \"Success\",\n  \"Token\" : \"t\",\n  \"AccountId\" : \"123456789012\"\n}";
        assert_eq!(with_account_id(doc, "123456789012"), want.as_bytes());
    }
}
