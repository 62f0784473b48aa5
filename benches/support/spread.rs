//! What both end-to-end benches need to hold many sessions on one machine:
//! the open files limit (raised to its hard value, read back), an even
//! split of N sessions over the processes that hold them, and a client
//! address of its own for each session. Included by `#[path]` from
//! `benches/proxy` and `benches/fanout`.

use std::net::{Ipv4Addr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};

/// Raise the soft limit on open files to the hard one (children inherit it).
pub fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The soft limit on open files: the most descriptors a process may hold.
pub fn open_files_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall on a stack value.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// `n` parts, as even as can be, that add up to `total`.
pub fn shares(total: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| total / n + usize::from(i < total % n))
        .collect()
}

/// A TCP connection from the `i`th address of 127.0.0.0/8 (127.0.0.2 on):
/// many sessions from one address would run short of ephemeral ports.
pub async fn connect_from(i: usize, addr: SocketAddr) -> TcpStream {
    let n = i as u32 + 2;
    let ip = Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8);
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(ip.into(), 0))
        .expect("bind a client address");
    socket.connect(addr).await.expect("connect")
}
