//! A fake STS: `AssumeRole` answered after a fixed `--latency-ms`, concurrently (one thread
//! per connection), as the real regional endpoint behaves — unlike moto, which answers one
//! call at a time. It isolates iamlet's own fetch behaviour in the pod-storm check and lets
//! the harness run where moto is not installed. Signatures are not checked.

use crate::args::Args;
use crate::server::{self, Request, Response};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn main(a: &Args) -> Result<(), String> {
    let latency = Duration::from_millis(a.num("latency-ms", 20)?);
    let calls = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    server::run(
        a.addr("addr")?,
        "fake sts",
        Arc::new(move |r: &Request<'_>| {
            // `GET /_answered`: AssumeRole answers given so far — how the storm check sees
            // calls complete without scraping iamlet's /metrics (megabytes with 750 roles).
            if r.method == b"GET" && r.path == b"/_answered" {
                return Response {
                    status: "200 OK",
                    content_type: "text/plain",
                    headers: vec![],
                    body: answered.load(Ordering::SeqCst).to_string().into_bytes(),
                };
            }
            let resp = answer(r, latency, &calls);
            if resp.status.starts_with("200")
                && form(r.body, "Action").as_deref() == Some("AssumeRole")
            {
                answered.fetch_add(1, Ordering::SeqCst);
            }
            resp
        }),
    )
}

fn form(body: &[u8], key: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (Howard Hinnant's civil-from-days).
pub fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn xml(body: String) -> Response {
    Response {
        status: "200 OK",
        content_type: "text/xml",
        headers: vec![(
            "x-amzn-RequestId",
            "c6104cbe-af31-11e0-8154-cbc7ccf896c7".into(),
        )],
        body: body.into_bytes(),
    }
}

fn answer(r: &Request<'_>, latency: Duration, calls: &AtomicU64) -> Response {
    let action = form(r.body, "Action").unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match action.as_str() {
        "AssumeRole" => {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(latency);
            let arn = form(r.body, "RoleArn").unwrap_or_default();
            let session = form(r.body, "RoleSessionName").unwrap_or_else(|| "s".into());
            let role = arn.rsplit('/').next().unwrap_or("role").to_string();
            let account = arn.split(':').nth(4).unwrap_or("123456789012").to_string();
            xml(format!(
                r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser>
      <AssumedRoleId>AROAFAKESTS{n:012}:{session}</AssumedRoleId>
      <Arn>arn:aws:sts::{account}:assumed-role/{role}/{session}</Arn>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAFAKE{n:012}</AccessKeyId>
      <SecretAccessKey>fakeSecretAccessKey0000000000000000000000</SecretAccessKey>
      <SessionToken>FwoGZXIvYXdzEFakeSessionToken{n:012}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA</SessionToken>
      <Expiration>{}</Expiration>
    </Credentials>
    <PackedPolicySize>6</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata>
    <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
  </ResponseMetadata>
</AssumeRoleResponse>"#,
                iso8601(now + 3600)
            ))
        }
        "GetCallerIdentity" => xml(
            r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:iam::123456789012:user/loadtest</Arn>
    <UserId>AIDAFAKESTS000000000</UserId>
    <Account>123456789012</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#
                .to_string(),
        ),
        _ => Response {
            status: "400 Bad Request",
            content_type: "text/xml",
            headers: vec![],
            body: b"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidAction</Code><Message>unsupported</Message></Error></ErrorResponse>".to_vec(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_forms() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400 + 3661), "2000-02-29T01:01:01Z");
        assert_eq!(
            form(
                b"Action=AssumeRole&RoleArn=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fx",
                "RoleArn"
            )
            .unwrap(),
            "arn:aws:iam::1:role/x"
        );
    }
}
