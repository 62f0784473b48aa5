//! Dialing one upstream: TCP, then TLS for `ssl://` upstreams (SNI sent).
//!
//! Owns: producing a byte stream to an upstream address, with a timeout and
//! errors that name the endpoint. It does not speak the protocol.

use crate::config::{Scheme, UpstreamEntry};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Any duplex byte stream, boxed so TCP and TLS share the connection code.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// How to reach one upstream.
#[derive(Clone)]
pub struct Dialer {
    pub entry: UpstreamEntry,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    pub fn new(entry: UpstreamEntry) -> Result<Dialer, String> {
        let tls = match entry.url.scheme {
            Scheme::Tcp => None,
            Scheme::Ssl => {
                let config = crate::tls::client_config(&entry)?;
                let name = ServerName::try_from(entry.url.host.clone())
                    .map_err(|e| format!("{}: invalid server name: {e}", entry.url))?;
                Some((tokio_rustls::TlsConnector::from(Arc::clone(&config)), name))
            }
            // Refused by `Config::validate` already; kept for `Dialer` users
            // that skip it.
            Scheme::Ws | Scheme::Wss => {
                return Err(format!(
                    "{}: WebSocket upstreams are not supported: use tcp:// or ssl://",
                    entry.url
                ))
            }
        };
        Ok(Dialer { entry, tls })
    }

    /// Open a connection, TLS included, within `timeout`.
    pub async fn dial(&self, timeout: Duration) -> Result<BoxStream, String> {
        let url = &self.entry.url;
        let connect = async {
            let tcp = TcpStream::connect((url.host.as_str(), url.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(Box::new(tcp) as BoxStream),
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    Ok(Box::new(tls) as BoxStream)
                }
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(format!("no connection within {}s", timeout.as_secs())),
        }
    }
}
