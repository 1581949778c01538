//! A fake instance metadata service for pass-through load: IMDSv2 token PUT (TTL header
//! required and echoed), `instance-id`, the `meta-data/` listing, 404 otherwise. Tokens are
//! optional (IMDSv1 allowed), so nginx's plain proxy_pass and iamlet's token-adding
//! pass-through both get 200.

use crate::args::Args;
use crate::server::{self, Request, Response};
use std::sync::Arc;

pub const INSTANCE_ID: &str = "i-0123456789abcdef0";
const TOKEN: &str = "AQAEAFakeImdsLoadTestToken0000000000000000000000000000==";
const LISTING: &str =
    "ami-id\nhostname\niam/\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/\nservices/";

pub fn main(a: &Args) -> Result<(), String> {
    server::run(a.addr("addr")?, "fake imds", Arc::new(answer))
}

fn text(status: &'static str, body: &str) -> Response {
    Response {
        status,
        content_type: "text/plain",
        headers: vec![("Server", "EC2ws".into())],
        body: body.as_bytes().to_vec(),
    }
}

fn answer(r: &Request<'_>) -> Response {
    match (r.method, r.path) {
        (b"PUT", b"/latest/api/token") => match r.header(b"x-aws-ec2-metadata-token-ttl-seconds") {
            Some(ttl) if !ttl.is_empty() => {
                let mut resp = text("200 OK", TOKEN);
                resp.headers.push((
                    "X-Aws-Ec2-Metadata-Token-Ttl-Seconds",
                    String::from_utf8_lossy(ttl).into_owned(),
                ));
                resp
            }
            _ => text("400 Bad Request", ""),
        },
        (b"GET", b"/latest/meta-data/instance-id") => text("200 OK", INSTANCE_ID),
        (b"GET", b"/latest/meta-data/") => text("200 OK", LISTING),
        _ => text("404 Not Found", "Not Found"),
    }
}
