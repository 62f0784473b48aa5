//! The mock's writer when it holds replies like ElectrumX 2.0
//! (`MockOptions::reply_hold`).
//!
//! ElectrumX 2.0's padding transport pads each packet with spaces before
//! its last closing bracket, to at least 1 KiB (a power of two), and holds
//! replies while fewer than 1 KiB wait, until the hold window has passed
//! since the connection's previous packet. This writer does the same. In
//! place of ElectrumX's warm-up budget (its first 1 KiB goes out at once,
//! which covers a client's handshake), replies to the handshake methods
//! are never held. It counts packets by what sent them: the buffer reaching
//! 1 KiB, or the window running out (`Packets`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// ElectrumX 2.0's `MIN_PACKET_SIZE`.
const PACKET: usize = 1024;

/// Packets sent, by what sent them.
#[derive(Default)]
pub struct Packets {
    /// The buffer reached a packet's size.
    pub by_size: AtomicU64,
    /// A reply came after the connection had been quiet for the window.
    pub after_quiet: AtomicU64,
    /// The window ran out with less than a packet waiting: those replies
    /// were held.
    pub by_timer: AtomicU64,
    /// Handshake replies (never held).
    pub at_once: AtomicU64,
}

/// Write the lines of `rx` (held) and `now` (handshake replies, sent at
/// once with whatever waits) to `wr` until `kill` or `rx` closes.
pub async fn write_held<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<String>,
    mut now: mpsc::UnboundedReceiver<String>,
    window: Duration,
    packets: &Packets,
    kill: CancellationToken,
) {
    let mut buf = String::new();
    let mut last_send = Instant::now();
    let mut now_open = true;
    loop {
        let deadline = last_send + window;
        let counter = tokio::select! {
            _ = kill.cancelled() => break,
            _ = tokio::time::sleep_until(deadline), if !buf.is_empty() => &packets.by_timer,
            line = now.recv(), if now_open => {
                let Some(line) = line else {
                    now_open = false;
                    continue;
                };
                buf.push_str(&line);
                buf.push('\n');
                &packets.at_once
            }
            line = rx.recv() => {
                let Some(line) = line else { break };
                buf.push_str(&line);
                buf.push('\n');
                if buf.len() >= PACKET {
                    &packets.by_size
                } else if Instant::now() >= deadline {
                    &packets.after_quiet
                } else {
                    continue;
                }
            }
        };
        counter.fetch_add(1, Ordering::SeqCst);
        if wr.write_all(pad(&buf).as_bytes()).await.is_err() {
            break;
        }
        buf.clear();
        last_send = Instant::now();
    }
    let _ = wr.shutdown().await;
}

/// Pad a packet with spaces before its last closing bracket to the next
/// power of two, at least [`PACKET`].
pub fn pad(buf: &str) -> String {
    let total = buf.len().next_power_of_two().max(PACKET);
    let (body, end) = buf.split_at(buf.len() - 2);
    format!("{body}{}{end}", " ".repeat(total - buf.len()))
}
