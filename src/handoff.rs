//! Upgrading in place: one process hands its listening sockets to the next.
//!
//! Owns: the handoff socket (`[server] handoff_socket`, a Unix socket only
//! the same user may use) and its small protocol; the sockets themselves
//! come from and go to [`Sockets`]. It does not decide when to stop
//! accepting or how sessions end (`app` and `session` do).
//!
//! ```text
//! new process (electrum-lb --takeover)          running process
//!   upstreams connected, ready
//!   connect ------------------------------------> (peer has our uid?)
//!   "TAKEOVER 1 <pid>\n"  ------------------------>
//!                         <------------------------ "LISTENERS <n>\n" + n descriptors (SCM_RIGHTS)
//!   accepts on the same sockets                     still accepting too: one queue, two acceptors
//!   "SERVING\n"           ------------------------>
//!                                                   stops accepting, keeps its sessions
//!                         <------------------------ "DRAINING\n"
//!   puts its own handoff socket in place            sessions end once answered; exits
//! ```
//!
//! The descriptors are the same sockets, not copies bound again: both
//! processes accept from one accept queue, so the old one can stop at any
//! moment and no waiting connection is reset (see `listener::bind`). If the
//! new process dies before "SERVING", the old one never stopped accepting
//! and goes on as before.
//!
//! Descriptors travel with `rustix` (`sendmsg`/`recvmsg` with `SCM_RIGHTS`),
//! whose safe API hands received descriptors over as `OwnedFd`: the crate
//! forbids `unsafe`, and turning a raw descriptor number into a socket is
//! exactly what needs it.

use crate::listener::bind::Sockets;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The protocol version in the first line.
const VERSION: u32 = 1;
/// At most this many descriptors in one hand-over (the kernel takes 253
/// per message).
const MAX_SOCKETS: usize = 250;
/// How long either side waits for the other's next line.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The handoff socket of a running process, offering its listeners.
#[derive(Debug)]
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
    /// The inode we bound: the path is ours to remove only while it is.
    inode: u64,
}

impl Offer {
    /// Bind the handoff socket at `path`. A path left by a process that no
    /// longer runs is replaced; one that answers belongs to a running
    /// instance, which only `--takeover` may replace.
    pub fn bind(path: &Path) -> Result<Offer, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "server.handoff_socket: another electrum-lb answers on {}: start this one with --takeover to replace it",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(|e| {
                format!(
                    "server.handoff_socket: cannot remove the stale {}: {e}",
                    path.display()
                )
            })?;
        }
        Offer::bind_fresh(path)
    }

    /// Bind at a temporary name and move it over `path` in one step, so the
    /// path never lacks a socket while the old process may still be asked.
    fn replace(path: &Path) -> Result<Offer, String> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let offer = Offer::bind_fresh(&tmp)?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("server.handoff_socket: {}: {e}", path.display()))?;
        Ok(Offer {
            path: path.to_path_buf(),
            ..offer
        })
    }

    fn bind_fresh(path: &Path) -> Result<Offer, String> {
        use std::os::unix::fs::PermissionsExt;
        let err = |e: io::Error| format!("server.handoff_socket: {}: {e}", path.display());
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let inode = std::fs::metadata(path).map_err(err)?.ino();
        Ok(Offer {
            listener,
            path: path.to_path_buf(),
            inode,
        })
    }

    /// Remove the socket file if it is still the one this process bound
    /// (after a hand-over it is the successor's).
    fn remove_if_ours(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Answer successors until one takes the listeners over (then run
    /// `hand_over`, which must stop this process accepting) or `stop`
    /// fires. Returns true after a hand-over.
    pub async fn serve(
        self,
        sockets: Arc<Sockets>,
        hand_over: impl FnOnce(),
        stop: CancellationToken,
    ) -> bool {
        let listener = match self
            .listener
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .and_then(tokio::net::UnixListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "handoff socket unusable: in-place upgrades are off");
                return false;
            }
        };
        tracing::info!(path = %self.path.display(), "handoff socket ready for an in-place upgrade");
        let mut hand_over = Some(hand_over);
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "handoff socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let own = rustix::process::getuid().as_raw();
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == own => {}
                Ok(cred) => {
                    tracing::warn!(
                        uid = cred.uid(),
                        "handoff socket: a process of another user was refused"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "handoff socket: peer unknown, refused");
                    continue;
                }
            }
            let stream = match stream.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(_) => continue,
            };
            let sockets = sockets.clone();
            // Blocking exchanges, each step bounded by STEP_TIMEOUT.
            let offered = tokio::task::spawn_blocking(move || offer_to(stream, &sockets)).await;
            match offered {
                Ok(Ok(stream)) => {
                    (hand_over.take().expect("one hand-over"))();
                    // Told after we stopped accepting; if the successor is
                    // already gone, we drain all the same.
                    let _ = tokio::task::spawn_blocking(move || (&stream).write_all(b"DRAINING\n"))
                        .await;
                    tracing::info!("listeners handed over: draining");
                    return true;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "in-place upgrade abandoned: still serving");
                }
                Err(e) => tracing::warn!(error = %e, "handoff task failed"),
            }
        }
        self.remove_if_ours();
        false
    }
}

/// The running side of one exchange: send the listeners, wait for the
/// successor to say it serves them.
fn offer_to(stream: UnixStream, sockets: &Sockets) -> io::Result<UnixStream> {
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let hello = read_line(&mut reader)?;
    let pid = parse_hello(&hello)?;
    tracing::info!(successor = pid, "a successor asks for the listeners");
    let listeners = sockets.duplicates()?;
    if listeners.is_empty() || listeners.len() > MAX_SOCKETS {
        return Err(protocol(format!(
            "{} listeners cannot be handed over",
            listeners.len()
        )));
    }
    let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
    let head = format!("LISTENERS {}\n", fds.len());
    let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)) {
        return Err(protocol("descriptor buffer too small".into()));
    }
    let sent = rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(head.as_bytes())],
        &mut control,
        rustix::net::SendFlags::empty(),
    )?;
    if sent != head.len() {
        return Err(protocol("short write of the listener list".into()));
    }
    let reply = read_line(&mut reader)?;
    if reply != "SERVING" {
        return Err(protocol(format!("unexpected {reply:?}")));
    }
    Ok(stream)
}

/// A successor's hold on the listeners of the process it replaces, before
/// it has told that process to stop.
#[derive(Debug)]
pub struct Takeover {
    stream: UnixStream,
    listeners: Vec<TcpListener>,
}

impl Takeover {
    /// Ask the process serving `path` for its listeners. `Ok(None)` when no
    /// process answers there (nothing to take over: bind afresh).
    pub fn request(path: &Path) -> io::Result<Option<Takeover>> {
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        stream.set_write_timeout(Some(STEP_TIMEOUT))?;
        (&stream).write_all(format!("TAKEOVER {VERSION} {}\n", std::process::id()).as_bytes())?;
        let (head, fds) = receive_listeners(&stream)?;
        let n: usize = head
            .strip_prefix("LISTENERS ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| protocol(format!("unexpected {head:?}")))?;
        if n != fds.len() {
            return Err(protocol(format!(
                "{n} listeners announced, {} received",
                fds.len()
            )));
        }
        let listeners = fds.into_iter().map(TcpListener::from).collect();
        Ok(Some(Takeover { stream, listeners }))
    }

    /// The sockets received (once: they move to the caller).
    pub fn listeners(&mut self) -> Vec<TcpListener> {
        std::mem::take(&mut self.listeners)
    }

    /// Tell the old process we serve (it stops accepting), wait until it
    /// says it drains, then put our own handoff socket in place at `path`.
    pub fn finish(self, path: &Path) -> Result<Offer, String> {
        let step = || -> io::Result<()> {
            (&self.stream).write_all(b"SERVING\n")?;
            let mut reader = BufReader::new(&self.stream);
            let reply = read_line(&mut reader)?;
            if reply != "DRAINING" {
                return Err(protocol(format!("unexpected {reply:?}")));
            }
            Ok(())
        };
        if let Err(e) = step() {
            // We serve the sockets either way; the old process may still be
            // accepting too until it exits, which loses nothing.
            tracing::warn!(error = %e, "the old process did not confirm it drains");
        }
        Offer::replace(path)
    }
}

/// Read the "LISTENERS n" line and the descriptors that came with it.
fn receive_listeners(stream: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    // Room for every descriptor the sender may send: none is dropped for
    // lack of space (and a count that disagrees is refused by the caller).
    let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut fds = Vec::new();
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        if line.len() > 64 {
            return Err(protocol("line too long".into()));
        }
        let mut byte = [0u8; 64];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )?;
        for message in control.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the running process closed the handoff connection",
            ));
        }
        line.extend_from_slice(&byte[..got.bytes]);
    }
    let text = String::from_utf8_lossy(&line).trim_end().to_string();
    Ok((text, fds))
}

fn read_line<R: BufRead>(reader: &mut R) -> io::Result<String> {
    let mut line = String::new();
    // Bounded: these lines are a few bytes long.
    let n = std::io::Read::take(reader, 128).read_line(&mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "handoff connection closed",
        ));
    }
    Ok(line.trim_end().to_string())
}

fn parse_hello(line: &str) -> io::Result<u32> {
    let mut words = line.split(' ');
    match (words.next(), words.next(), words.next()) {
        (Some("TAKEOVER"), Some(v), Some(pid)) if v == VERSION.to_string() => pid
            .parse()
            .map_err(|_| protocol(format!("bad pid in {line:?}"))),
        _ => Err(protocol(format!("unexpected {line:?}"))),
    }
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("handoff: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("electrum-lb-handoff-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("handoff.sock")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listeners_move_to_the_successor_with_their_queue() {
        let path = temp_path("move");
        let sockets = Arc::new(Sockets::fresh());
        let old = sockets.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = old.local_addr().unwrap();
        let offer = Offer::bind(&path).unwrap();
        // A second instance without --takeover is refused.
        assert!(Offer::bind(&path).unwrap_err().contains("--takeover"));
        let handed = CancellationToken::new();
        let served = tokio::spawn({
            let handed = handed.clone();
            offer.serve(
                sockets.clone(),
                move || handed.cancel(),
                CancellationToken::new(),
            )
        });
        // Waiting in the queue while the process changes.
        let waiting = std::net::TcpStream::connect(addr).unwrap();
        let p = path.clone();
        let mut takeover = tokio::task::spawn_blocking(move || Takeover::request(&p))
            .await
            .unwrap()
            .unwrap()
            .expect("someone to take over from");
        let received = takeover.listeners();
        assert_eq!(received.len(), 1);
        assert!(!handed.is_cancelled(), "the old process accepts until told");
        let new = Sockets::inherited(received);
        let listener = new.listen(addr).unwrap();
        drop(old);
        let p = path.clone();
        let next = tokio::task::spawn_blocking(move || takeover.finish(&p))
            .await
            .unwrap()
            .unwrap();
        assert!(served.await.unwrap(), "handed over");
        assert!(handed.is_cancelled());
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
        // The path is the successor's now.
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), next.inode);
    }

    #[test]
    fn nobody_to_take_over_from() {
        let path = temp_path("nobody");
        assert!(Takeover::request(&path).unwrap().is_none());
        // A stale socket file (its process is gone) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(Takeover::request(&path).unwrap().is_none());
        let offer = Offer::bind(&path).unwrap();
        offer.remove_if_ours();
        assert!(!path.exists());
    }

    #[test]
    fn a_bad_first_line_is_refused() {
        assert!(parse_hello("TAKEOVER 1 42").is_ok());
        assert!(parse_hello("TAKEOVER 2 42").is_err());
        assert!(parse_hello("GIVE").is_err());
    }
}
