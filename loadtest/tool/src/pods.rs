//! Pods files for `iamlet --pods-from` (a `kubectl get pods -o json` List) and the matching
//! sources files for `load` (`ip path expected-substring` per line).

use crate::args::Args;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

/// One pod as written to the file.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub role: String,
}

/// The `i`-th pod address in block `net`: 127.net.hi.lo, lo in 1..=250 (no .0/.255).
pub fn pod_ip(net: u8, i: usize) -> Ipv4Addr {
    let hi = i / 250;
    assert!(hi < 256, "at most 64,000 pods per block");
    Ipv4Addr::new(127, net, hi as u8, (i % 250 + 1) as u8)
}

pub fn render(pods: &[Pod]) -> String {
    let mut s = String::with_capacity(pods.len() * 260 + 64);
    s.push_str("{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n");
    for (i, p) in pods.iter().enumerate() {
        let _ = writeln!(
            s,
            "{{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {{\"name\": \"{}\", \"namespace\": \"loadtest\", \"uid\": \"{}\", \"creationTimestamp\": \"2026-01-01T00:00:00Z\", \"annotations\": {{\"iam.amazonaws.com/role\": \"{}\"}}}}, \"spec\": {{\"containers\": [{{\"name\": \"app\", \"image\": \"x\"}}]}}, \"status\": {{\"phase\": \"Running\", \"podIP\": \"{}\", \"podIPs\": [{{\"ip\": \"{}\"}}]}}}}{}",
            p.name,
            p.uid,
            p.role,
            p.ip,
            p.ip,
            if i + 1 < pods.len() { "," } else { "" }
        );
    }
    s.push_str("]}\n");
    s
}

/// Replaces `path` atomically (write beside it, then rename), as a watcher would see an
/// edited file.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

/// The pod that oha and the single-source scenarios use: 127.0.0.1 with `role`.
pub fn local_pod(role: &str) -> Pod {
    Pod {
        name: "loadtest-local".into(),
        uid: "loadtest-local".into(),
        ip: Ipv4Addr::LOCALHOST,
        role: role.into(),
    }
}

/// `count` pods in block `net`, roles `{prefix}-role-{i % roles}`.
pub fn generate(prefix: &str, net: u8, count: usize, roles: usize) -> Vec<Pod> {
    (0..count)
        .map(|i| Pod {
            name: format!("{prefix}-{i}"),
            uid: format!("{prefix}-uid-{i}"),
            ip: pod_ip(net, i),
            role: format!("{prefix}-role-{}", i % roles.max(1)),
        })
        .collect()
}

/// `gen-pods --out FILE --count N --roles M --net 10 --prefix scale [--local-role lt-role]
///  [--sources-out FILE --sources K --kind creds|list]`
pub fn main(a: &Args) -> Result<(), String> {
    let out = a.req("out")?;
    let count: usize = a.num("count", 1)?;
    let roles: usize = a.num("roles", count)?;
    let net: u8 = a.num("net", 10)?;
    let prefix = a.opt("prefix").unwrap_or("scale");
    let mut pods = Vec::new();
    if let Some(r) = a.opt("local-role") {
        pods.push(local_pod(r));
    }
    let generated = generate(prefix, net, count, roles);
    pods.extend(generated.iter().cloned());
    write_atomic(Path::new(out), &render(&pods))?;
    if let Some(src) = a.opt("sources-out") {
        // K sources spread evenly over the generated pods.
        let k: usize = a.num("sources", 50)?;
        let k = k.min(generated.len()).max(1);
        let kind = a.opt("kind").unwrap_or("creds");
        let mut s = String::new();
        for j in 0..k {
            let p = &generated[j * generated.len() / k];
            let path = match kind {
                "list" => "/latest/meta-data/iam/security-credentials/".to_string(),
                _ => format!("/latest/meta-data/iam/security-credentials/{}", p.role),
            };
            let expect = match kind {
                "list" => p.role.clone(),
                _ => "AccessKeyId".to_string(),
            };
            let _ = writeln!(s, "{} {} {}", p.ip, path, expect);
        }
        std::fs::write(src, s).map_err(|e| format!("write {src}: {e}"))?;
    }
    println!(
        "{} pods ({} generated, {} roles) -> {out}",
        pods.len(),
        count,
        roles.min(count)
    );
    Ok(())
}
