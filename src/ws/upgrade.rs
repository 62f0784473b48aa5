//! The HTTP/1.1 request that opens a WebSocket: upgraded on the configured
//! path from an allowed `Origin`, refused with a 4xx status and a line of
//! text otherwise.
//!
//! Owns: the answer to that one request. hyper reads it (bounded headers;
//! a request that is not HTTP gets hyper's `400`), tungstenite checks the
//! WebSocket headers and computes `Sec-WebSocket-Accept`. Refusals carry
//! `Connection: close`, so one connection gets one answer. Timeouts are the
//! caller's.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::create_response;
use tokio_tungstenite::tungstenite::Error as WsError;

/// Longest request head accepted (browsers send a few hundred bytes, more
/// with cookies of the page's site).
const MAX_HEAD: usize = 16 * 1024;

/// What a `ws://` or `wss://` listener accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRules {
    /// The only path upgraded.
    pub path: String,
    /// `Origin` values accepted, lower-cased; `None`: any. A request
    /// without `Origin` (not from a browser) is accepted either way.
    pub origins: Option<Vec<String>>,
}

/// Why a request was not upgraded (the status it was answered with says it
/// to the client; this says it to the log).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}: {1}")]
    Answered(StatusCode, String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
}

/// Serve the one HTTP request of a new connection; on an accepted upgrade,
/// the connection, ready for WebSocket frames.
pub async fn accept<S>(stream: S, rules: &UpgradeRules) -> Result<TokioIo<Upgraded>, Refused>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let outcome: Arc<Mutex<Option<Result<OnUpgrade, Refused>>>> = Arc::default();
    let service = {
        let outcome = outcome.clone();
        let rules = rules.clone();
        hyper::service::service_fn(move |request| {
            let (response, result) = answer(request, &rules);
            *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD.max(8192))
        .max_header_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await?;
    let result = outcome.lock().unwrap_or_else(|p| p.into_inner()).take();
    match result {
        Some(Ok(upgrade)) => Ok(TokioIo::new(upgrade.await?)),
        Some(Err(refused)) => Err(refused),
        None => Err(Refused::Answered(
            StatusCode::BAD_REQUEST,
            "no request".into(),
        )),
    }
}

/// The response to one request, and either the upgrade to wait for or why
/// there is none.
fn answer(
    mut request: Request<Incoming>,
    rules: &UpgradeRules,
) -> (Response<Full<Bytes>>, Result<OnUpgrade, Refused>) {
    if request.uri().path() != rules.path {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "not found: the Electrum WebSocket endpoint is {}",
                rules.path
            ),
        );
    }
    if request.method() != Method::GET {
        let (mut response, refused) = refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET opens a WebSocket".into(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return (response, refused);
    }
    if let (Some(allowed), Some(origin)) = (&rules.origins, request.headers().get(header::ORIGIN)) {
        let origin = String::from_utf8_lossy(origin.as_bytes()).to_ascii_lowercase();
        if !allowed.contains(&origin) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("origin {origin} is not allowed"),
            );
        }
    }
    // tungstenite checks the WebSocket headers on a copy of the head.
    let mut head = tokio_tungstenite::tungstenite::handshake::server::Request::new(());
    *head.method_mut() = request.method().clone();
    *head.version_mut() = request.version();
    *head.headers_mut() = request.headers().clone();
    match create_response(&head) {
        Ok(switching) => {
            let upgrade = hyper::upgrade::on(&mut request);
            (switching.map(|()| Full::new(Bytes::new())), Ok(upgrade))
        }
        Err(WsError::Protocol(
            ProtocolError::MissingConnectionUpgradeHeader
            | ProtocolError::MissingUpgradeWebSocketHeader,
        )) => {
            let (mut response, refused) = refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this is an Electrum server's WebSocket endpoint: connect with a WebSocket client"
                    .into(),
            );
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            (response, refused)
        }
        Err(WsError::Protocol(ProtocolError::MissingSecWebSocketVersionHeader)) => {
            let (mut response, refused) = refuse(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported WebSocket version: use 13".into(),
            );
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            (response, refused)
        }
        Err(e) => refuse(
            StatusCode::BAD_REQUEST,
            format!("bad WebSocket request: {e}"),
        ),
    }
}

fn refuse(status: StatusCode, text: String) -> (Response<Full<Bytes>>, Result<OnUpgrade, Refused>) {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    (response, Err(Refused::Answered(status, text)))
}
