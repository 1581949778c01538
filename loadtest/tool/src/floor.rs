//! `floor`: the least work any epoll server can do for the cached-credentials load, as a
//! yardstick beside iamlet and nginx. One thread, edge-triggered epoll, no parsing beyond
//! finding each request's blank line, and a fixed answer (`--answer-file`: iamlet's own
//! answer, headers and body, byte for byte). A short read is taken to mean the socket is
//! drained, so a keep-alive request costs one `recv` and one `send`. What it cannot beat,
//! no server answering those bytes over TCP on this kernel can: the ratio floor / nginx is
//! the ceiling of server / nginx on the epoll driver.
//!
//! Not a server for anything else: it answers every complete request head (requests with a
//! body are not expected) and closes on EOF, an error, or 64 KiB of unanswerable bytes.

use crate::args::Args;
use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const LISTENER: u64 = u64::MAX;
const MAX_HELD: usize = 64 * 1024;

struct Conn {
    fd: OwnedFd,
    buf: Vec<u8>,
}

pub fn main(a: &Args) -> Result<(), String> {
    let addr = a.addr("addr")?;
    let answer_file = a.req("answer-file")?;
    let answer = std::fs::read(answer_file).map_err(|e| format!("{answer_file}: {e}"))?;
    // Bounded like every helper: it exits after --seconds (default one hour).
    let until = Instant::now() + Duration::from_secs(a.num("seconds", 3600u64)?);
    let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    println!("floor listening on {}", l.local_addr().unwrap());
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
    }
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    add(
        ep.as_raw_fd(),
        l.as_raw_fd(),
        LISTENER,
        libc::EPOLLIN as u32,
    )?;
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_id = 0u64;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut out = Vec::with_capacity(MAX_HELD);
    while Instant::now() < until {
        let n = unsafe {
            libc::epoll_wait(
                ep.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                1000,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("epoll_wait: {e}"));
        }
        for ev in &events[..n as usize] {
            let id = ev.u64;
            if id == LISTENER {
                accept_all(&l, ep.as_raw_fd(), &mut conns, &mut next_id)?;
                continue;
            }
            let Some(c) = conns.get_mut(&id) else {
                continue;
            };
            if !serve(c, &answer, &mut out) {
                conns.remove(&id); // closing the fd removes it from the epoll set
            }
        }
    }
    Ok(())
}

fn add(ep: RawFd, fd: RawFd, id: u64, events: u32) -> Result<(), String> {
    let mut ev = libc::epoll_event { events, u64: id };
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(format!("epoll_ctl: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn accept_all(
    l: &TcpListener,
    ep: RawFd,
    conns: &mut HashMap<u64, Conn>,
    next_id: &mut u64,
) -> Result<(), String> {
    loop {
        let fd = unsafe {
            libc::accept4(
                l.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Ok(()); // EAGAIN (drained) or a connection that went before it was taken
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = socket2::SockRef::from(&fd).set_tcp_nodelay(true);
        let id = *next_id;
        *next_id += 1;
        add(
            ep,
            fd.as_raw_fd(),
            id,
            (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLRDHUP) as u32,
        )?;
        // Data that came before the registration is reported by it: epoll_ctl checks the
        // socket's state when it adds it.
        conns.insert(
            id,
            Conn {
                fd,
                buf: Vec::with_capacity(4096),
            },
        );
    }
}

/// A readiness edge: reads until drained, answers every complete request in one send.
/// False when the connection is to be closed.
fn serve(c: &mut Conn, answer: &[u8], out: &mut Vec<u8>) -> bool {
    loop {
        let len = c.buf.len();
        c.buf.reserve(4096);
        let room = c.buf.capacity() - len;
        let n = unsafe {
            libc::recv(
                c.fd.as_raw_fd(),
                c.buf.as_mut_ptr().add(len).cast(),
                room,
                0,
            )
        };
        if n == 0 {
            return false;
        }
        if n < 0 {
            return io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        }
        unsafe { c.buf.set_len(len + n as usize) };
        let mut start = 0;
        while let Some(end) = find_blank_line(&c.buf[start..]) {
            out.extend_from_slice(answer);
            start += end;
        }
        c.buf.drain(..start);
        if c.buf.len() > MAX_HELD {
            return false;
        }
        if !out.is_empty() {
            let sent = unsafe {
                libc::send(
                    c.fd.as_raw_fd(),
                    out.as_ptr().cast(),
                    out.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            // The answers fit the socket buffer of a client that reads them; one that does
            // not read is not this yardstick's load.
            let whole = sent == out.len() as isize;
            out.clear();
            if !whole {
                return false;
            }
        }
        if (n as usize) < room {
            return true; // a short read: drained until the next edge
        }
    }
}

fn find_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}
