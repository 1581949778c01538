//! Self-tests of the e2e support code that need no iamlet binary: the fake IMDS's contract
//! through the raw loopback client, keep-alive/pipelining, moto startup, the Python runner.

use iamlet_e2e::imds::{TOKEN_HEADER, TTL_HEADER};
use iamlet_e2e::{Conn, FakeImds, Moto, NODE_MARKER, get_from, is_ci, request_from, run_python};
use std::net::Ipv4Addr;
use std::time::Duration;

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn put_token(ttl: &str, extra: &str) -> Vec<u8> {
    format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n{TTL_HEADER}: {ttl}\r\n\
         {extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

fn get_with_token(path: &str, token: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\n{TOKEN_HEADER}: {token}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn fake_imds_token_flow_echoes_ttl_and_accepts_the_token() {
    let imds = FakeImds::start();
    let r = request_from(LO, imds.addr(), &put_token("60", ""));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(r.header(TTL_HEADER), Some("60"));
    assert_eq!(r.header("server"), Some("EC2ws"));
    let token = r.body_str();
    assert!(token.len() > 20, "{token}");

    let r = request_from(
        LO,
        imds.addr(),
        &get_with_token("/latest/meta-data/instance-id", &token),
    );
    assert_eq!(
        (r.status, r.body_str().as_str()),
        (200, "i-0fake00000000001")
    );
    assert_eq!(r.header("content-length"), Some("18"));

    for bad in ["0", "21601", "abc"] {
        assert_eq!(
            request_from(LO, imds.addr(), &put_token(bad, "")).status,
            400,
            "ttl {bad}"
        );
    }
    let reqs = imds.requests();
    assert_eq!(reqs.len(), 5);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("PUT", "/latest/api/token")
    );
    assert_eq!(reqs[1].header(TOKEN_HEADER), Some(token.as_str()));
}

#[test]
fn fake_imds_require_token_answers_401_without_a_minted_token() {
    let imds = FakeImds::builder().require_token(true).start();
    let path = "/latest/meta-data/iam/security-credentials/";
    assert_eq!(get_from(LO, imds.addr(), path).status, 401);
    assert_eq!(
        request_from(LO, imds.addr(), &get_with_token(path, "forged")).status,
        401
    );
    let token = request_from(LO, imds.addr(), &put_token("5", "")).body_str();
    let r = request_from(LO, imds.addr(), &get_with_token(path, &token));
    assert_eq!((r.status, r.body_str().as_str()), (200, "node-role"));
    imds.set_require_token(false);
    assert_eq!(get_from(LO, imds.addr(), path).status, 200);
}

#[test]
fn fake_imds_refuses_token_put_with_x_forwarded_for() {
    let imds = FakeImds::start();
    let r = request_from(
        LO,
        imds.addr(),
        &put_token("60", "X-Forwarded-For: 10.0.0.1\r\n"),
    );
    assert_eq!(r.status, 403);
    assert!(r.body_str().contains("403 - Forbidden"));
    assert_eq!(
        imds.requests()[0].header("x-forwarded-for"),
        Some("10.0.0.1")
    );
}

#[test]
fn fake_imds_serves_node_secrets_with_the_marker_and_404_elsewhere() {
    let imds = FakeImds::start();
    let creds = get_from(
        LO,
        imds.addr(),
        "/2016-09-02/meta-data/iam/security-credentials/node-role",
    );
    assert_eq!(creds.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&creds.body).unwrap();
    assert_eq!(v["Code"], "Success");
    assert!(v["Token"].as_str().unwrap().contains(NODE_MARKER));
    assert!(
        get_from(LO, imds.addr(), "/latest/user-data")
            .body_str()
            .contains(NODE_MARKER)
    );
    let doc = get_from(
        LO,
        imds.addr(),
        "/latest/dynamic/instance-identity/document",
    );
    let doc: serde_json::Value = serde_json::from_slice(&doc.body).unwrap();
    assert_eq!(
        (doc["region"].as_str(), doc["accountId"].as_str()),
        (Some("us-east-1"), Some("123456789012"))
    );
    let info = get_from(LO, imds.addr(), "/latest/meta-data/iam/info").body_str();
    assert!(info.contains("instance-profile/node-profile"));
    let r = get_from(LO, imds.addr(), "/latest/meta-data/no-such-thing");
    assert_eq!(
        (r.status, r.header("content-type")),
        (404, Some("text/html"))
    );
}

#[test]
fn client_binds_the_chosen_loopback_source() {
    let imds = FakeImds::start();
    let src = Ipv4Addr::new(127, 0, 0, 42);
    assert_eq!(
        get_from(src, imds.addr(), "/latest/meta-data/placement/region").body_str(),
        "us-east-1"
    );
    assert_eq!(imds.requests()[0].peer.ip(), src);
}

#[test]
fn keep_alive_conn_reuses_one_socket_and_pipelines() {
    let imds = FakeImds::start();
    let mut c = Conn::open(LO, imds.addr());
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
    assert_eq!(c.send(&get("/latest/meta-data/instance-id")).status, 200);
    assert_eq!(c.send(&get("/latest/meta-data/nope")).status, 404);
    let mut batch = get("/latest/meta-data/placement/region");
    batch.extend(get("/latest/meta-data/iam/security-credentials"));
    c.write_all(&batch).unwrap();
    assert_eq!(c.read_response().unwrap().body_str(), "us-east-1");
    assert_eq!(c.read_response().unwrap().body_str(), "node-role");
    assert!(!c.is_closed_by_peer(Duration::from_millis(50)));
    let reqs = imds.requests();
    assert_eq!(reqs.len(), 4);
    assert!(
        reqs.iter().all(|r| r.peer == c.local_addr()),
        "all on one connection"
    );
    let r = c.send(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed_by_peer(Duration::from_secs(2)));
}

#[test]
fn moto_starts_and_answers_its_api() {
    if Moto::find_executable().is_none() && !is_ci() {
        eprintln!(
            "SKIPPED: moto_server not installed (run .ci/run or `pip install 'moto[server]'`)"
        );
        return;
    }
    let moto = Moto::start();
    assert!(moto.endpoint().starts_with("http://127.0.0.1:"));
    let r = get_from(LO, moto.addr(), "/moto-api/");
    assert_eq!(r.status, 200, "{}", moto.log());
}

#[test]
fn run_python_clears_inherited_aws_env_when_asked() {
    // The test process's own environment is not modified (tests run in parallel); the
    // inherited-AWS removal is checked on whatever AWS_* the environment has, plus an
    // explicit one set through `envs`.
    let script = "import os; print(sorted(k for k in os.environ if k.startswith('AWS_')))";
    let o = run_python(script, &[("AWS_REGION", "us-east-1")], true);
    assert!(o.success(), "{o:?}");
    assert_eq!(o.stdout, "['AWS_REGION']");
}

/// A shell script standing in for iamlet: prints its args and env, then the listening line
/// with `port` (or exits 7 when `port` is None), then sleeps until killed.
fn fake_iamlet(dir: &std::path::Path, port: Option<u16>) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tail = match port {
        Some(p) => format!(
            "printf 'INFO iamlet: admin listening addr=0.0.0.0:1234\\n' >&2\nprintf '\\033[2m2026-11-28T22:00:00Z\\033[0m  INFO iamlet: listening \\033[3maddr\\033[0m=0.0.0.0:{p} workers=2\\n' >&2\nprintf 'INFO iamlet: ready: the first pod list is published\\n' >&2\nexec sleep 30"
        ),
        None => "echo 'error: bad flag' >&2; exit 7".to_string(),
    };
    let script = format!(
        "#!/bin/sh\necho \"args: $*\"\necho \"env: $AWS_EC2_METADATA_DISABLED $AWS_REGION $AWS_ENDPOINT_URL_STS RUST_LOG=$RUST_LOG\"\n{tail}\n"
    );
    let p = dir.join(if port.is_some() { "ok.sh" } else { "fail.sh" });
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn iamlet_launcher_passes_flags_and_parses_the_listening_line() {
    let dir = iamlet_e2e::util::TempDir::new("selftest");
    let imds = FakeImds::start();
    let port = iamlet_e2e::free_port();
    let mut ia = iamlet_e2e::Iamlet::builder()
        .binary(fake_iamlet(dir.path(), Some(port)))
        .pods_yaml("apiVersion: v1\nkind: List\nitems: []\n")
        .imds(&imds)
        .driver("epoll")
        .env("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:1")
        .arg("--default-role=r")
        .start();
    assert_eq!(
        ia.addr(),
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    );
    assert!(ia.wait_for_log(
        "env: true us-east-1 http://127.0.0.1:1 RUST_LOG=",
        Duration::from_secs(5)
    ));
    let log = ia.log();
    let pods = ia.pods_file_path().display().to_string();
    for want in [
        format!("--pods-from={pods}"),
        format!("--metadata-addr=127.0.0.1:{}", imds.addr().port()),
        "--io-driver=epoll".into(),
        "--app-port=0".into(),
        "--default-role=r".into(),
    ] {
        assert!(log.contains(&want), "missing {want} in:\n{log}");
    }
    assert!(!log.contains('\x1b'), "colours are stripped");
    assert!(ia.try_exit_status().is_none());
    ia.kill_9();
    assert!(ia.try_exit_status().is_some());
}

#[test]
fn iamlet_launcher_reports_an_early_exit_with_its_log() {
    let dir = iamlet_e2e::util::TempDir::new("selftest");
    let bin = fake_iamlet(dir.path(), None);
    let err = std::panic::catch_unwind(|| iamlet_e2e::Iamlet::builder().binary(bin).start())
        .expect_err("start must panic");
    let msg = err.downcast_ref::<String>().expect("panic message");
    assert!(msg.contains("iamlet exited before listening"), "{msg}");
    assert!(
        msg.contains("exit status: 7") && msg.contains("error: bad flag"),
        "{msg}"
    );
}

#[test]
fn drivers_always_include_epoll() {
    let d = iamlet_e2e::drivers();
    assert_eq!(d[0], "epoll");
    assert!(d.len() <= 2);
}
