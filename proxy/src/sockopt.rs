//! Socket operations that neither socket2 nor nix expose safely: `TCP_DEFER_ACCEPT`, and
//! receiving descriptors sent with `SCM_RIGHTS` as owned ones.
#![allow(unsafe_code)]

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One message received on a unix stream socket with any descriptors passed along
/// (`SCM_RIGHTS`), each owned as it is taken from the message.
#[derive(Debug)]
pub struct Received {
    /// Bytes written into the caller's buffer.
    pub bytes: usize,
    pub fds: Vec<OwnedFd>,
    /// More descriptors were sent than `max_fds` had room for (the kernel closed the rest).
    pub truncated: bool,
}

/// `recvmsg` on `socket` into `buf`, with room for `max_fds` descriptors, retried on EINTR.
/// The descriptors come back owned (close-on-exec): the kernel created them in this process
/// for this call, so ownership cannot be claimed twice, which a function taking a raw number
/// could not promise.
pub fn recv_with_fds(
    socket: &impl AsRawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> std::io::Result<Received> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = vec![0u8; nix::sys::socket::cmsg_space::<RawFd>() * max_fds.max(1)];
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: `recvmsg` installed these descriptors in this process just now and
            // handed over their numbers only here; each is wrapped once, so it has exactly
            // one owner.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(Received {
        bytes: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    })
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
