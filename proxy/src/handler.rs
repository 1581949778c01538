//! Answers one parsed request: admin paths, the role listing and credentials from the
//! snapshot, everything else through the pass-through.

use crate::metrics::RouteLabel;
use crate::passthrough;
use crate::respond::{self, Persist, Status};
use crate::route::{Route, canonicalize, route};
use crate::worker::Worker;
use iamlet_resolver::CredAnswer;
use std::net::IpAddr;
use std::time::Instant;

const WRONG_ROLE: &[u8] = b"Forbidden: the requested role is not this pod's role\n";
const NOT_READY: &str = "credentials for this role are still being fetched from STS; retry shortly";

#[allow(clippy::too_many_arguments)] // one call shape for every answer; a struct would only rename them
fn answer(
    w: &Worker,
    out: &mut Vec<u8>,
    label: RouteLabel,
    status: Status,
    ctype: &str,
    body: &[u8],
    persist: Persist,
    head_only: bool,
) {
    w.metrics.request(label, status.0);
    respond::write(out, status, ctype, body, persist, head_only);
}

fn not_found(w: &Worker, out: &mut Vec<u8>, label: RouteLabel, persist: Persist, head_only: bool) {
    answer(
        w,
        out,
        label,
        respond::NOT_FOUND,
        respond::HTML,
        respond::NOT_FOUND_BODY,
        persist,
        head_only,
    );
}

/// Writes the response for `req` into `out`.
pub async fn handle(
    w: &Worker,
    peer: IpAddr,
    req: &httparse::Request<'_, '_>,
    body: &[u8],
    persist: Persist,
    out: &mut Vec<u8>,
) {
    let method = req.method.unwrap_or("");
    let head_only = method == "HEAD";
    let Ok(path) = canonicalize(req.path.unwrap_or("")) else {
        return answer(
            w,
            out,
            RouteLabel::Invalid,
            respond::BAD_REQUEST,
            respond::TEXT,
            b"Bad Request: invalid path\n",
            persist,
            false,
        );
    };
    let r = route(&path);
    let admin_allowed = w.admin_only || w.shared.admin_on_app_port;
    match r {
        Route::Healthz => answer(
            w,
            out,
            RouteLabel::Admin,
            respond::OK,
            respond::TEXT,
            b"ok\n",
            persist,
            head_only,
        ),
        Route::Ready => {
            if w.shared.handle.is_ready() && w.shared.node_ready.load(std::sync::atomic::Ordering::Acquire) {
                answer(
                    w,
                    out,
                    RouteLabel::Admin,
                    respond::OK,
                    respond::TEXT,
                    b"ready\n",
                    persist,
                    head_only,
                )
            } else {
                answer(
                    w,
                    out,
                    RouteLabel::Admin,
                    respond::UNAVAILABLE,
                    respond::TEXT,
                    b"not ready: waiting for the first pod list\n",
                    persist,
                    head_only,
                )
            }
        }
        Route::Metrics if admin_allowed => {
            let mut text = String::with_capacity(16 * 1024);
            let _ = prometheus_client::encoding::text::encode(&mut text, &w.shared.registry);
            answer(
                w,
                out,
                RouteLabel::Admin,
                respond::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text.as_bytes(),
                persist,
                head_only,
            )
        }
        Route::DebugStore if admin_allowed && w.shared.debug => {
            let json = w.shared.handle.store_json();
            answer(
                w,
                out,
                RouteLabel::Admin,
                respond::OK,
                respond::JSON,
                json.as_bytes(),
                persist,
                head_only,
            )
        }
        _ if w.admin_only => not_found(w, out, RouteLabel::Admin, persist, head_only),
        Route::Metrics | Route::DebugStore | Route::Denied => {
            not_found(w, out, RouteLabel::Denied, persist, head_only)
        }
        Route::RoleList | Route::Credentials(_) => {
            if method != "GET" && method != "HEAD" {
                return answer(
                    w,
                    out,
                    RouteLabel::Denied,
                    Status(405, "Method Not Allowed"),
                    respond::TEXT,
                    b"Method Not Allowed\n",
                    persist,
                    false,
                );
            }
            credentials(w, peer, r, persist, head_only, out).await
        }
        Route::Forward => {
            if !matches!(method, "GET" | "HEAD" | "PUT") {
                return answer(
                    w,
                    out,
                    RouteLabel::Passthrough,
                    Status(405, "Method Not Allowed"),
                    respond::TEXT,
                    b"Method Not Allowed\n",
                    persist,
                    false,
                );
            }
            let status =
                passthrough::forward(w, method, &path, req.headers, body, out, persist, head_only)
                    .await;
            w.metrics.request(RouteLabel::Passthrough, status);
        }
    }
}

async fn credentials(
    w: &Worker,
    peer: IpAddr,
    r: Route<'_>,
    persist: Persist,
    head_only: bool,
    out: &mut Vec<u8>,
) {
    let label = if matches!(r, Route::RoleList) {
        RouteLabel::RoleList
    } else {
        RouteLabel::Credentials
    };
    let Some(id) = w.wait_identity(peer).await else {
        return not_found(w, out, label, persist, head_only);
    };
    let Some(role) = id.role.as_ref() else {
        return not_found(w, out, label, persist, head_only);
    };
    let requested = match r {
        Route::Credentials(requested) => requested,
        _ => {
            return answer(
                w,
                out,
                label,
                respond::OK,
                respond::TEXT,
                &role.listing,
                persist,
                head_only,
            );
        }
    };
    if !w.shared.rules.names(requested, &role.arn) {
        return answer(
            w,
            out,
            label,
            respond::FORBIDDEN,
            respond::TEXT,
            WRONG_ROLE,
            persist,
            head_only,
        );
    }
    let ans = match role.slot.current(Instant::now()) {
        Some(a) => {
            w.metrics.cache_hits.inc();
            a
        }
        None => {
            w.metrics.cache_misses.inc();
            match monoio::time::timeout(w.shared.wait_ip, role.slot.get()).await {
                Ok(a) => a,
                Err(_) => {
                    let body = respond::error_json("ServiceUnavailable", NOT_READY);
                    return answer(
                        w,
                        out,
                        label,
                        respond::INTERNAL,
                        respond::JSON,
                        &body,
                        persist,
                        head_only,
                    );
                }
            }
        }
    };
    match &*ans {
        CredAnswer::Ready { body, .. } => answer(
            w,
            out,
            label,
            respond::OK,
            respond::TEXT,
            body,
            persist,
            head_only,
        ),
        CredAnswer::Failed { status, body, .. } => {
            let s = if *status == 500 {
                respond::INTERNAL
            } else {
                Status(*status, "Error")
            };
            answer(w, out, label, s, respond::JSON, body, persist, head_only)
        }
    }
}
