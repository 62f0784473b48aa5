//! Listening sockets: where every TCP listener of the process comes from.
//!
//! Owns: opening a listening socket with the options we rely on
//! (`SO_REUSEADDR`, so a restart can bind while old connections sit in
//! TIME_WAIT; a 1024-connection accept queue; non-blocking), adopting the
//! sockets a predecessor handed over (see `handoff`), and keeping a
//! duplicate of every socket in use, so that a successor can be handed the
//! very same sockets.
//!
//! Why hand over the socket rather than bind a second one with
//! `SO_REUSEPORT`: every `SO_REUSEPORT` socket has its own accept queue, and
//! when one is closed the kernel resets the connections waiting in it
//! (unless `net.ipv4.tcp_migrate_req` is set); a socket passed to another
//! process is one socket with one queue, so the old process can stop
//! accepting at any moment and nothing waiting is lost.
//!
//! It does not accept connections (that is `listener`) and does not talk to
//! other processes (that is `handoff`).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// Connections the kernel queues on a listener before we accept them.
const BACKLOG: i32 = 1024;

/// The listening sockets of this process.
#[derive(Debug, Default)]
pub struct Sockets {
    /// Handed over by a predecessor and not claimed yet.
    inherited: Mutex<Vec<TcpListener>>,
    /// A duplicate of every listener in use, for a successor. Emptied when
    /// the process stops accepting, so that closing the listeners really
    /// closes the sockets.
    held: Mutex<Vec<TcpListener>>,
}

impl Sockets {
    /// No inherited sockets: every listener is bound afresh.
    pub fn fresh() -> Sockets {
        Sockets::default()
    }

    /// Sockets handed over by the process this one replaces.
    pub fn inherited(sockets: Vec<TcpListener>) -> Sockets {
        Sockets {
            inherited: Mutex::new(sockets),
            held: Mutex::default(),
        }
    }

    /// A listener on `addr`: the inherited socket bound to exactly that
    /// address when there is one (port 0 never matches: it asks for a new
    /// port), else a new socket. Must be called inside a tokio runtime.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let std = match self.take_inherited(addr) {
            Some(socket) => socket,
            None => bind(addr)?,
        };
        std.set_nonblocking(true)?;
        self.lock_held().push(std.try_clone()?);
        tokio::net::TcpListener::from_std(std)
    }

    fn take_inherited(&self, addr: SocketAddr) -> Option<TcpListener> {
        if addr.port() == 0 {
            return None;
        }
        let mut inherited = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
        let i = inherited
            .iter()
            .position(|s| s.local_addr().is_ok_and(|a| a == addr))?;
        Some(inherited.swap_remove(i))
    }

    /// Addresses handed over that no listener of this configuration claimed
    /// (they are closed by [`Sockets::drop_unclaimed`]).
    pub fn unclaimed(&self) -> Vec<SocketAddr> {
        self.inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Close inherited sockets nobody claimed.
    pub fn drop_unclaimed(&self) {
        self.inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Duplicates of every listener in use (to hand to a successor).
    pub fn duplicates(&self) -> io::Result<Vec<TcpListener>> {
        self.lock_held()
            .iter()
            .map(TcpListener::try_clone)
            .collect()
    }

    /// Forget the duplicates: once the listeners themselves are dropped,
    /// their sockets close (unless a successor holds them).
    pub fn release(&self) {
        self.lock_held().clear();
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Vec<TcpListener>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A new listening socket on `addr`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std and tokio do on Unix: a restarted process can bind while the
    // old one's connections are in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_inherited_socket_is_claimed_by_its_address_and_shares_its_queue() {
        let original = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = original.local_addr().unwrap();
        // A connection waiting in the queue before the hand-over.
        let waiting = std::net::TcpStream::connect(addr).unwrap();
        let sockets = Sockets::inherited(vec![original.try_clone().unwrap()]);
        drop(original);
        assert_eq!(sockets.unclaimed(), vec![addr]);
        let listener = sockets.listen(addr).unwrap();
        assert!(sockets.unclaimed().is_empty());
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
        // A duplicate is held for a successor until released.
        assert_eq!(sockets.duplicates().unwrap().len(), 1);
        sockets.release();
        assert!(sockets.duplicates().unwrap().is_empty());
    }

    #[tokio::test]
    async fn port_zero_or_another_address_binds_a_new_socket() {
        let original = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = original.local_addr().unwrap();
        let sockets = Sockets::inherited(vec![original]);
        let fresh = sockets.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(fresh.local_addr().unwrap(), addr);
        assert_eq!(sockets.unclaimed(), vec![addr]);
        sockets.drop_unclaimed();
        assert!(sockets.unclaimed().is_empty());
        // Closed: the port refuses connections now.
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
