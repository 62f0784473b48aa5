//! The status page: one self-contained HTML document (inline style and
//! script, no external asset: the metrics port often runs on a host without
//! internet) that fetches `status.json` every few seconds and draws it.
//!
//! Owns: how the snapshot looks. The page draws whatever `/status.json`
//! holds: optional fields it knows (`draining`, `sessions.by_protocol`,
//! upstream states beyond up/down/lagging) appear once the snapshot has
//! them. It marks `<body data-ready="1">` after its first drawing, which
//! tests (and headless browsers) wait for.

/// The page served at `/`.
pub const PAGE: &str = include_str!("page.html");
