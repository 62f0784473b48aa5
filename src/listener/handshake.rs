//! The server side of a TLS handshake, its costly step off the event loop.
//!
//! Most of a full handshake's cost is one step: answering the ClientHello
//! (the key exchange and, unless the session is resumed, signing with the
//! certificate's key: about a millisecond for RSA 2048). Done in the task
//! that reads the socket, that step would stall every session served by
//! the same thread for as long, and where the default runtime is one
//! thread (two CPUs or fewer) the handshakes of a reconnecting crowd would
//! use one core of several.
//!
//! So the handshake runs in three steps:
//!
//! 1. the ClientHello is read on the event loop (`LazyConfigAcceptor`:
//!    waiting on the network costs no thread);
//! 2. it is answered by one of [`workers`] threads of the process
//!    ([`StartHandshake::into_stream`] builds the connection and its first
//!    flight; nothing is read or written there). A flood of ClientHellos
//!    waits in their queue instead of spawning threads, and one whose
//!    handshake timed out meanwhile is skipped. A worker's panic fails
//!    that handshake only; if no worker could be started, the step runs
//!    in the connection's task as before. The workers' nice value is
//!    [`WORKER_NICE`] above the process's: when the CPU is short, the sessions already served
//!    go first and the handshakes take what is left (slower, never
//!    starved: the kernel still gives them a share);
//! 3. the rest (the flight written, the client's Finished read) back on the
//!    event loop.
//!
//! Two costs stay on the event loop: a client whose ClientHello offered no
//! usable key share gets a HelloRetryRequest from the worker, and its
//! second ClientHello (signature included) is answered in step 3; and a
//! TLS 1.2 client's key exchange message is processed there too.
//!
//! The configuration is the one the listener read for this connection
//! (a reload applies to the next handshakes), resumption and tickets
//! included.

use crate::metrics::{GaugeGuard, TLS_HANDSHAKES_WAITING};
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_rustls::server::{StartHandshake, TlsStream};
use tokio_rustls::LazyConfigAcceptor;

/// How many ClientHellos are answered at once, process-wide: one per CPU.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How much lower the workers' priority is than the process's (nice
/// +10): sessions already served run first, the handshakes take what CPU
/// is left.
const WORKER_NICE: i32 = 10;

/// A worker's nice value, from the one it started with.
#[cfg(target_os = "linux")]
fn lowered(nice: i32) -> i32 {
    (nice + WORKER_NICE).min(19)
}

type Job = Box<dyn FnOnce() + Send>;

/// The workers' queue; they start with the first handshake.
static JOBS: LazyLock<mpsc::Sender<Job>> = LazyLock::new(|| {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..workers() {
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("electrum-lb-tls-{i}"))
            .spawn(move || {
                // Linux only: there nice is per thread (elsewhere this
                // would lower the whole process).
                #[cfg(target_os = "linux")]
                {
                    let nice = rustix::process::getpriority_process(None).unwrap_or(0);
                    let _ = rustix::process::setpriority_process(None, lowered(nice));
                }
                loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else { return };
                    // A panic fails that one handshake (its answer is
                    // dropped), not the worker.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a TLS handshake panicked in its worker");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a TLS handshake worker");
        }
    }
    tx
});

/// Complete a TLS handshake on `io` with `config`.
pub async fn accept<IO>(io: IO, config: Arc<rustls::ServerConfig>) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
    let waiting = GaugeGuard::enter(&TLS_HANDSHAKES_WAITING);
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        // Timed out, or the listener stopped, while it waited.
        if tx.is_closed() {
            return;
        }
        let _ = tx.send(StartHandshake::into_stream(hello, config));
    });
    if let Err(mpsc::SendError(job)) = JOBS.send(job) {
        // No worker could be started: answered here rather than not at all.
        job();
    }
    let answered = rx
        .await
        .map_err(|_| io::Error::other("the TLS worker failed on this handshake"))?;
    drop(waiting);
    answered.await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::provider;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::sign::{CertifiedKey, Signer, SigningKey};
    use rustls::{SignatureAlgorithm, SignatureScheme};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Mutex;
    use std::thread::ThreadId;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the certificate's key did.
    #[derive(Default, Debug)]
    struct Log {
        /// The threads it signed on, with their nice values.
        signed: Mutex<Vec<(ThreadId, i32)>>,
        /// How many of the next signatures panic instead.
        panics: AtomicUsize,
        /// When set, the next signature tells `entered` and waits for a
        /// message on it first.
        hold: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        entered: tokio::sync::Notify,
    }

    impl Log {
        fn signed(&self) -> Vec<(ThreadId, i32)> {
            self.signed.lock().unwrap().clone()
        }
    }

    type Signed = Arc<Log>;

    #[derive(Debug)]
    struct Recording {
        key: Arc<dyn SigningKey>,
        signed: Signed,
    }

    impl SigningKey for Recording {
        fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
            let signer = self.key.choose_scheme(offered)?;
            Some(Box::new(RecordingSigner {
                signer,
                signed: self.signed.clone(),
            }))
        }
        fn algorithm(&self) -> SignatureAlgorithm {
            self.key.algorithm()
        }
    }

    #[derive(Debug)]
    struct RecordingSigner {
        signer: Box<dyn Signer>,
        signed: Signed,
    }

    impl Signer for RecordingSigner {
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
            let panics = &self.signed.panics;
            if panics
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                panic!("a signature that panics (a test of the workers)");
            }
            let hold = self.signed.hold.lock().unwrap().take();
            if let Some(hold) = hold {
                self.signed.entered.notify_one();
                hold.recv().unwrap();
            }
            let nice = rustix::process::getpriority_process(None).unwrap();
            let here = std::thread::current().id();
            self.signed.signed.lock().unwrap().push((here, nice));
            self.signer.sign(message)
        }
        fn scheme(&self) -> SignatureScheme {
            self.signer.scheme()
        }
    }

    #[derive(Debug)]
    struct One(Arc<CertifiedKey>);

    impl rustls::server::ResolvesServerCert for One {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// A server configuration whose key records where it signs, and a
    /// client configuration that trusts its certificate.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>, Signed) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signed = Signed::default();
        let key = Arc::new(Recording {
            key: rustls::crypto::ring::sign::any_supported_type(&der).unwrap(),
            signed: signed.clone(),
        });
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(One(Arc::new(CertifiedKey::new(chain, key)))));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client), signed)
    }

    /// A client's handshake and one line echoed through `accept`.
    async fn echo(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(async move {
            let mut tls = accept(far, server).await.unwrap();
            let mut line = [0u8; 5];
            tls.read_exact(&mut line).await.unwrap();
            tls.write_all(&line).await.unwrap();
            tls.flush().await.unwrap();
        });
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, near)
            .await
            .unwrap();
        tls.write_all(b"ping\n").await.unwrap();
        let mut back = [0u8; 5];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping\n");
        served.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_signature_is_made_off_the_event_loop_at_a_lower_priority() {
        let (server, client, signed) = configs();
        echo(server, client).await;
        let signed = signed.signed();
        assert_eq!(signed.len(), 1, "one full handshake, one signature");
        assert_ne!(signed[0].0, std::thread::current().id());
        #[cfg(target_os = "linux")]
        {
            let here = rustix::process::getpriority_process(None).unwrap();
            assert_eq!(signed[0].1, lowered(here), "the worker yields to sessions");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn more_handshakes_at_once_than_workers_all_complete() {
        let (server, client, signed) = configs();
        let n = workers() * 3 + 1;
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..n {
            all.spawn(echo(server.clone(), client.clone()));
        }
        while let Some(r) = all.join_next().await {
            r.unwrap();
        }
        assert_eq!(signed.signed().len(), n);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_does_not_speak_tls_gets_an_error() {
        let (server, _, signed) = configs();
        let (mut near, far) = tokio::io::duplex(4096);
        near.write_all(b"{\"id\":1,\"method\":\"server.version\",\"params\":[]}\n")
            .await
            .unwrap();
        let Err(e) = accept(far, server).await else {
            panic!("a handshake from a JSON line")
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(signed.signed().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_fails_its_handshake_only_and_the_workers_live_on() {
        let (server, client, signed) = configs();
        // More panics than workers: without the workers catching them, the
        // last ones would find no worker left.
        let n = workers() + 1;
        signed.panics.store(n, SeqCst);
        for _ in 0..n {
            let (near, far) = tokio::io::duplex(64 * 1024);
            let served = tokio::spawn(accept(far, server.clone()));
            let name = ServerName::try_from("localhost").unwrap();
            let connected = tokio_rustls::TlsConnector::from(client.clone())
                .connect(name, near)
                .await;
            assert!(connected.is_err(), "the server's side failed");
            let Err(e) = served.await.unwrap() else {
                panic!("a handshake whose signature panicked")
            };
            assert!(e.to_string().contains("TLS worker failed"), "{e}");
        }
        assert_eq!(signed.panics.load(SeqCst), 0);
        echo(server, client).await;
        let signed = signed.signed();
        assert_eq!(signed.len(), 1);
        assert_ne!(signed[0].0, std::thread::current().id(), "on a worker");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_handshake_counts_as_waiting_until_a_worker_has_answered_it() {
        let (server, client, log) = configs();
        let (release, hold) = std::sync::mpsc::channel();
        *log.hold.lock().unwrap() = Some(hold);
        let shake = tokio::spawn(echo(server, client));
        tokio::time::timeout(std::time::Duration::from_secs(10), log.entered.notified())
            .await
            .expect("the signature started");
        // Process-wide (other tests' handshakes may count too).
        assert!(TLS_HANDSHAKES_WAITING.get() >= 1);
        let page = crate::metrics::Metrics::new().render();
        assert!(
            page.lines()
                .any(|l| l.starts_with("electrum_lb_tls_handshakes_waiting ")),
            "{page}"
        );
        release.send(()).unwrap();
        shake.await.unwrap();
    }
}
