//! Fault injection for the control plane: what a real API server cannot be told to do on cue —
//! a watch stream cut in the middle, a `410 Expired` delivered inside the stream at an exact
//! moment, a 500 on the relist that follows — played by the scripted stand-in
//! (`iamlet_e2e::apiserver`). Everything else about the control plane runs against the real
//! kube-apiserver (`control_plane.rs`).

use iamlet_e2e::rig::control as common;

use common::{LIST, NODE, rig};
use iamlet_e2e::apiserver::{ApiServer, PodBuilder};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[test]
fn fault_injection_updates_made_while_the_watch_is_cut_or_expired_on_cue_are_not_lost() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("shop", "a", NODE, "127.23.0.1").role("a"));
    let r = rig(api, &["--backoff-max-elapsed-time=300ms"]);
    assert_eq!(r.get("127.23.0.1", LIST).body_str(), "a");

    // A broken stream: the changes made meanwhile arrive on the resumed watch.
    r.api.drop_watches();
    r.api.delete_pod("shop", "a");
    r.api
        .create_pod(&PodBuilder::running("shop", "b", NODE, "127.23.0.1").role("b"));
    let b = r.eventually("127.23.0.1", LIST, Duration::from_secs(10), |x| {
        x.body_str() == "b"
    });
    assert_eq!(b.body_str(), "b");

    // History compacted and the stream ended with 410 inside it: a relist.
    r.api.stall_watches(Duration::from_millis(200));
    r.api.delete_pod("shop", "b");
    r.api
        .create_pod(&PodBuilder::running("shop", "c", NODE, "127.23.0.1").role("c"));
    r.api.compact();
    r.api.expire_watches();
    let c = r.eventually("127.23.0.1", LIST, Duration::from_secs(10), |x| {
        x.body_str() == "c"
    });
    assert_eq!(c.body_str(), "c");

    // A 500 on the relist, then success.
    r.api.fail_next(2, 500);
    r.api.compact();
    r.api.drop_watches();
    r.api.delete_pod("shop", "c");
    let gone = r.eventually("127.23.0.1", LIST, Duration::from_secs(10), |x| {
        x.status == 404
    });
    assert_eq!(gone.status, 404);

    let m = r.metrics();
    assert!(
        m.contains("iamlet_watch_relists_total{resource=\"pods\"}"),
        "{m}"
    );
    assert!(
        m.contains("iamlet_watch_errors_total{resource=\"pods\",kind=\"expired\"}"),
        "{m}"
    );
    assert!(r.api.stats().expired_sent.load(Ordering::Relaxed) >= 1);
}
