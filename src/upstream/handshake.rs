//! The handshake of one upstream connection: what it sends first, and
//! what it learns from the answers (software, negotiated protocol level,
//! the highest level offered, genesis hash, tip height).
//!
//! Owns: the three opening requests and reading their answers; recording
//! the negotiated level and waking the upstream's protocol slot when the
//! upstream offers more (see `pool`). The rest of the connection's life is
//! `conn`'s.

use super::shared::{ConnShared, UpstreamInfo};
use crate::codec::{Frame, LineReader};
use crate::jsonrpc::{self, UpstreamMessage};
use crate::protocol::Version;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Who says hello to whom, and what it asks for.
pub(super) struct Hello<'a> {
    pub coin: &'a str,
    pub label: &'a str,
    pub shared: &'a ConnShared,
    pub client_name: &'a str,
    /// The version asked; with `protocol_max`, the range.
    pub protocol: &'a str,
    pub protocol_max: Option<&'a str>,
}

/// Identify (`server.version`), learn the upstream (`server.features`) and
/// its tip (`blockchain.headers.subscribe`), within [`HANDSHAKE_TIMEOUT`].
pub(super) async fn handshake<R, W>(
    ctx: &Hello<'_>,
    reader: &mut LineReader<R>,
    wr: &mut W,
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let version_params = match ctx.protocol_max {
        Some(max) => serde_json::to_string(&(ctx.client_name, [ctx.protocol, max])),
        // 1.4.2 adds `blockchain.scripthash.unsubscribe` and nothing else:
        // the hub releases read-driven subscriptions with it. A server
        // without it negotiates 1.4 and is never sent one (ElectrumX
        // answers a method its level lacks with an error, and charges the
        // session 100 for every error).
        None if ctx.protocol == "1.4" => {
            serde_json::to_string(&(ctx.client_name, [ctx.protocol, "1.4.2"]))
        }
        None => serde_json::to_string(&(ctx.client_name, ctx.protocol)),
    }
    .expect("strings serialize");
    let mut buf = Vec::new();
    jsonrpc::finish_request(
        &mut buf,
        &jsonrpc::request_prefix("server.version", &version_params),
        0,
    );
    jsonrpc::finish_request(
        &mut buf,
        &jsonrpc::request_prefix("server.features", "[]"),
        1,
    );
    jsonrpc::finish_request(
        &mut buf,
        &jsonrpc::request_prefix("blockchain.headers.subscribe", "[]"),
        2,
    );
    wr.write_all(&buf)
        .await
        .map_err(|e| format!("write: {e}"))?;

    let mut info = UpstreamInfo::default();
    let mut got = [false, false, false];
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while !got.iter().all(|g| *g) {
        let frame = tokio::time::timeout_at(deadline, reader.next_frame())
            .await
            .map_err(|_| "no answer to server.version".to_string())?
            .map_err(|e| e.to_string())?;
        let line = match frame {
            Frame::Line(l) => l,
            Frame::Eof => return Err("closed during handshake".into()),
        };
        if super::hold::padded(line) {
            ctx.shared.pads.store(true, Ordering::Relaxed);
        }
        let msgs = jsonrpc::parse_upstream_line(line)
            .map_err(|_| "invalid JSON in handshake".to_string())?;
        for msg in msgs {
            match msg {
                UpstreamMessage::Response {
                    id: 0,
                    outcome: Ok(r),
                } => {
                    got[0] = true;
                    if let Ok((software, proto)) = serde_json::from_str::<(String, String)>(r.get())
                    {
                        info.server_version = Some(software);
                        info.protocol = Some(proto);
                    } else if let Ok(software) = serde_json::from_str::<String>(r.get()) {
                        info.server_version = Some(software);
                    }
                }
                UpstreamMessage::Response {
                    id: 0,
                    outcome: Err(e),
                } => {
                    return Err(format!("server.version refused: {}", e.get()));
                }
                UpstreamMessage::Response { id: 1, outcome } => {
                    got[1] = true;
                    if let Ok(features) = outcome {
                        #[derive(serde::Deserialize)]
                        struct Features {
                            genesis_hash: Option<String>,
                            protocol_max: Option<String>,
                        }
                        if let Ok(f) = serde_json::from_str::<Features>(features.get()) {
                            info.genesis_hash = f.genesis_hash;
                            info.protocol_max = f.protocol_max;
                        }
                    }
                }
                UpstreamMessage::Response { id: 2, outcome } => {
                    got[2] = true;
                    if let Some(h) = outcome.ok().and_then(|r| tip_height(r.get())) {
                        ctx.shared.tip.store(h, Ordering::Relaxed);
                    }
                }
                // Pre-identification chatter (relayfee/estimatefee) and anything else.
                _ => {}
            }
        }
    }
    learn_level(ctx, &info);
    *ctx.shared.info.lock().unwrap_or_else(|p| p.into_inner()) = info;
    Ok(())
}

/// Record the negotiated level, and wake the upstream's protocol slot
/// when the upstream offers a level that adds methods (1.6 or later)
/// above what this connection negotiated.
fn learn_level(ctx: &Hello<'_>, info: &UpstreamInfo) {
    // A server that answered without a version accepted what was asked.
    let level = info
        .protocol
        .as_deref()
        .or(Some(ctx.protocol))
        .and_then(|v| v.parse::<Version>().ok())
        .unwrap_or(Version::new(1, 0));
    ctx.shared.level.store(level.to_u32(), Ordering::Release);
    let offered = info
        .protocol_max
        .as_deref()
        .and_then(|v| v.parse::<Version>().ok());
    if let (Some(max), Some(top)) = (offered, ctx.shared.upgrade.get()) {
        if max >= Version::new(1, 6) && max > level && !top.active.swap(true, Ordering::AcqRel) {
            tracing::info!(coin = ctx.coin, upstream = ctx.label, offers = %max, negotiated = %level, "upstream offers a higher protocol: opening a connection at it");
            top.wake.notify_one();
        }
    }
}

/// The height in a `blockchain.headers.subscribe` result or notification
/// (modern `height` or pre-1.3 `block_height`).
pub(super) fn tip_height(json: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Tip {
        height: Option<u64>,
        block_height: Option<u64>,
    }
    let t: Tip = serde_json::from_str(json).ok()?;
    t.height.or(t.block_height)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tip_heights() {
        assert_eq!(tip_height(r#"{"hex":"00","height":7}"#), Some(7));
        assert_eq!(tip_height(r#"{"block_height":8,"version":1}"#), Some(8));
        assert_eq!(tip_height("[]"), None);
    }
}
