//! glibc malloc tuning, applied once at start-up before any other thread exists.
//!
//! glibc raises its mmap threshold to the size of every large block it has freed (up to
//! 32 MiB), so after one big transient buffer — a pods-file read, a pod list page, a
//! `/metrics` answer with hundreds of per-role series — later blocks of that size come from
//! the heap, and the pages stay resident after they are freed. Fixing the threshold at its
//! default (128 KiB) turns that growth off: blocks of 128 KiB and more are mapped on demand
//! and unmapped when freed, which keeps a node with hundreds of roles at about half the
//! anonymous memory (loadtest/RESULTS.md). The data plane's per-connection buffers (9 KiB by
//! default) stay far below the threshold, so the request path never maps memory.
#![allow(unsafe_code)]

/// Blocks at least this large are mmap-ed and returned to the kernel when freed.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Applies the tuning; false where the C library is not glibc (nothing to tune) or it
/// refused.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters and is safe to call at any time;
        // it runs in `main` before other threads are started.
        let ok = unsafe {
            nix::libc::mallopt(
                nix::libc::M_MMAP_THRESHOLD,
                MMAP_THRESHOLD as nix::libc::c_int,
            )
        };
        ok == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_threshold() {
        assert!(super::tune());
    }
}
