//! Bounded framing over a stream that hands out its bytes in pieces whose
//! sizes come from the input itself: no input may panic the reader, and
//! every line it returns respects the maximum length.
#![no_main]

use electrum_lb::codec::{Frame, LineReader};
use libfuzzer_sys::fuzz_target;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = self
            .sizes
            .get(self.next % self.sizes.len().max(1))
            .map(|s| *s as usize + 1)
            .unwrap_or(64);
        self.next += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    let max = 1 + u16::from_le_bytes([input[0], input[1]]) as usize % 4096;
    let split = 2 + (input[2] as usize % 16).min(input.len() - 2);
    let (sizes, data) = input[2..].split_at(split - 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut reader = LineReader::new(
            Pieces {
                data,
                sizes,
                next: 0,
            },
            max,
        );
        while let Ok(Frame::Line(line)) = reader.next_frame().await {
            assert!(line.len() <= max, "a line longer than the maximum");
            assert!(!line.is_empty(), "an empty line");
        }
    });
});
