//! Socket operations that neither socket2 nor nix expose safely: `TCP_DEFER_ACCEPT`, and
//! taking ownership of descriptors received with `SCM_RIGHTS`.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of a descriptor the kernel just installed in this process from an
/// `SCM_RIGHTS` message (nix hands them over as raw numbers).
pub fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `recvmsg` created this descriptor for us; nothing else in the process knows
    // its number, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `TCP_DEFER_ACCEPT`: the kernel completes an accept only once the client's first data has
/// arrived (or after about `secs`, when a connection that sent nothing is accepted anyway).
/// An IMDS client always speaks first, so the accepted connection's first read completes at
/// once instead of being parked and woken, which saves CPU on every new connection (the
/// figures are in loadtest/RESULTS.md). Linux only; elsewhere a no-op.
pub fn defer_accept(socket: &impl AsRawFd, secs: u32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let v = nix::libc::c_int::try_from(secs).unwrap_or(nix::libc::c_int::MAX);
        // SAFETY: a valid fd, a pointer to a live c_int and its exact size.
        let rc = unsafe {
            nix::libc::setsockopt(
                socket.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_DEFER_ACCEPT,
                (&v as *const nix::libc::c_int).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (socket, secs);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn the_listener_option_is_set() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        super::defer_accept(&l, 1).unwrap();
        let mut v: nix::libc::c_int = 0;
        let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
        // SAFETY: a valid fd and a buffer of the stated size.
        let rc = unsafe {
            nix::libc::getsockopt(
                l.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_DEFER_ACCEPT,
                (&mut v as *mut nix::libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        // The kernel reports it in seconds rounded to its retransmission schedule: at least
        // what was asked; 0 means off.
        assert!(v >= 1, "{v}");
    }
}
