//! Which IO drivers the e2e tests run iamlet under: always `epoll`; `uring` too when the
//! kernel allows io_uring (sysctl not disabling it, kernel >= 5.6). Missing io_uring is a
//! failure in CI and a loud skip elsewhere.

use crate::util::is_ci;

/// The drivers to test on this machine.
pub fn drivers() -> Vec<&'static str> {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match uring_blocker(disabled.as_deref(), &release) {
        None => vec!["epoll", "uring"],
        Some(why) if is_ci() => panic!("io_uring unavailable in CI: {why}"),
        Some(why) => {
            eprintln!("SKIPPED: io_uring driver not tested on this machine ({why})");
            vec!["epoll"]
        }
    }
}

/// Why io_uring cannot be used, given the `io_uring_disabled` sysctl (None when absent) and
/// the kernel release string; None when it can.
fn uring_blocker(disabled_sysctl: Option<&str>, release: &str) -> Option<String> {
    if let Some(v) = disabled_sysctl.map(str::trim).filter(|v| *v != "0") {
        return Some(format!("kernel.io_uring_disabled={v}"));
    }
    let mut nums = release.trim().split(|c: char| !c.is_ascii_digit());
    let major: u32 = nums.next()?.parse().ok()?;
    let minor: u32 = nums.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    ((major, minor) < (5, 6)).then(|| format!("kernel {} < 5.6", release.trim()))
}

#[cfg(test)]
mod tests {
    use super::uring_blocker;

    #[test]
    fn uring_needs_enabled_sysctl_and_kernel_5_6() {
        assert_eq!(uring_blocker(Some("0\n"), "6.18.44-fc-v669\n"), None);
        assert_eq!(uring_blocker(None, "5.6.0"), None);
        assert!(uring_blocker(Some("2"), "6.8.0").is_some());
        assert!(uring_blocker(Some("1"), "6.8.0").is_some());
        assert!(uring_blocker(None, "5.4.0-150-generic").is_some());
        assert!(uring_blocker(None, "4.19.1").is_some());
    }
}
