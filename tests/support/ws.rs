//! WebSocket clients for tests, from tokio-tungstenite's client side (not
//! the proxy's adapter): raw connections for framing tests, and the line
//! [`Client`] of `support` over a WebSocket, so that every helper written
//! for TCP (`call`, `notification`, `fence`, ...) drives a WebSocket
//! session as well.

use super::{tls_connector, Client, Io, WAIT};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

pub type Raw = WebSocketStream<Box<dyn Io>>;

/// How the proxy closed a line client's WebSocket: `None` while open (or
/// when the connection ended without a close frame), else the frame.
pub type CloseSeen = Arc<Mutex<Option<Option<CloseFrame>>>>;

/// Open a WebSocket to `url` (`ws://` or `wss://`; TLS is not verified)
/// over a fresh connection, with extra request `headers`.
pub async fn open(url: &str, headers: &[(&str, &str)]) -> Result<Raw, tungstenite::Error> {
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let host = request.uri().host().unwrap().to_string();
    let port = request.uri().port_u16().unwrap();
    let tcp = TcpStream::connect((host.as_str(), port)).await.unwrap();
    open_on(tcp, request).await
}

/// The upgrade over a connection the test made itself (a PROXY header
/// written first, a small receive buffer, ...).
pub async fn open_on(
    tcp: TcpStream,
    request: tungstenite::handshake::client::Request,
) -> Result<Raw, tungstenite::Error> {
    let stream: Box<dyn Io> = if request.uri().scheme_str() == Some("wss") {
        Box::new(
            tls_connector()
                .connect("localhost".try_into().unwrap(), tcp)
                .await?,
        )
    } else {
        Box::new(tcp)
    };
    let (ws, _response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
            .await
            .expect("no upgrade answer in time")?;
    Ok(ws)
}

pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/")
}

pub fn wss_url(addr: SocketAddr) -> String {
    format!("wss://{addr}/")
}

/// The next message that is not a ping or a pong, within WAIT; `None` when
/// the stream ended.
pub async fn next_message(ws: &mut Raw) -> Option<Message> {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no message from the proxy in time");
        match m {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Some(m),
            Some(Err(_)) | None => return None,
        }
    }
}

/// The next text message, parsed: it must be exactly one JSON value.
pub async fn next_json(ws: &mut Raw) -> serde_json::Value {
    match next_message(ws).await {
        Some(Message::Text(t)) => {
            assert!(!t.contains('\n'), "a newline inside a message: {t}");
            serde_json::from_str(&t).unwrap_or_else(|e| panic!("not one JSON value ({e}): {t}"))
        }
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Read until the proxy's close frame; returns it (`None`: the connection
/// ended without one).
pub async fn close_frame(ws: &mut Raw) -> Option<CloseFrame> {
    loop {
        match next_message(ws).await {
            Some(Message::Close(frame)) => return frame,
            Some(_) => continue,
            None => return None,
        }
    }
}

/// A line [`Client`] over the WebSocket at `url`: each line it sends goes
/// out as one text message, each message the proxy sends comes in as one
/// line (a message holding a newline would arrive as two broken lines, and
/// fail the test). The second value fills when the proxy closes.
pub async fn line_client(url: &str) -> (Client, CloseSeen) {
    let ws = open(url, &[]).await.expect("WebSocket upgrade");
    line_client_on(ws)
}

pub fn line_client_on(ws: Raw) -> (Client, CloseSeen) {
    let (mine, theirs) = tokio::io::duplex(1 << 20);
    let seen: CloseSeen = Arc::default();
    tokio::spawn(pump(ws, theirs, seen.clone()));
    (Client::from_stream(Box::new(mine)), seen)
}

async fn pump(ws: Raw, lines: tokio::io::DuplexStream, seen: CloseSeen) {
    let (mut sink, mut stream) = ws.split();
    let (rd, mut wr) = tokio::io::split(lines);
    let mut rd = BufReader::new(rd).lines();
    loop {
        tokio::select! {
            line = rd.next_line() => match line {
                Ok(Some(line)) => {
                    if sink.send(Message::text(line)).await.is_err() {
                        break;
                    }
                }
                // The test dropped its client: close like a browser does.
                _ => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
            },
            message = stream.next() => match message {
                Some(Ok(Message::Text(t))) => {
                    if wr.write_all(format!("{t}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    let mut line = b.to_vec();
                    line.push(b'\n');
                    if wr.write_all(&line).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    *seen.lock().unwrap() = Some(frame);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let _ = wr.shutdown().await;
}
