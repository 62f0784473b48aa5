//! The PROXY protocol (versions 1 and 2), as an L4 load balancer in front of
//! the proxy sends it at the start of each connection.
//!
//! Owns: parsing one header ([`parse`], pure and incremental) and reading
//! exactly one header off a stream ([`read_header`]), never a byte more, so
//! what follows (a TLS ClientHello, the first JSON line) is left for the next
//! stage. It does not decide what to do with a bad header (the listener
//! closes the connection) nor apply a timeout (the listener's handshake
//! timeout covers it).
//!
//! Reference: the HAProxy "PROXY protocol" specification. Version 1 is one
//! text line of at most 107 bytes; version 2 a 16-byte binary preamble and at
//! most 65,535 bytes of addresses and TLVs (TLVs are skipped).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a header said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The load balancer relays a client: `source` is the real client.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client address (v2 LOCAL, as in the balancer's own health checks;
    /// v1 UNKNOWN; v2 with an unspecified or UNIX family): use the socket's
    /// peer address.
    Local,
}

impl ProxyHeader {
    /// The client address to use, given the socket's peer.
    pub fn client(&self, socket_peer: SocketAddr) -> SocketAddr {
        match self {
            ProxyHeader::Proxied { source, .. } => *source,
            ProxyHeader::Local => socket_peer,
        }
    }
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("PROXY protocol v1 header longer than 107 bytes")]
    TooLong,
    #[error("connection closed inside the PROXY protocol header")]
    Eof,
    #[error("read failed in the PROXY protocol header: {0}")]
    Io(String),
}

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header, `len` bytes long.
    Done { header: ProxyHeader, len: usize },
    /// Not enough bytes: at least this many more are needed (reading exactly
    /// that many never reads past the header).
    Need(usize),
}

/// The 12-byte signature of version 2.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The shortest v1 header, `PROXY UNKNOWN\r\n`.
const V1_MIN: usize = 15;
/// The longest v1 header, CRLF included.
pub const V1_MAX: usize = 107;
const V2_PREAMBLE: usize = 16;

/// Parse a header at the start of `buf` (which may hold less than a header).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    let v2 = buf[..n] == V2_SIGNATURE[..n];
    let n1 = buf.len().min(V1_PREFIX.len());
    let v1 = buf[..n1] == V1_PREFIX[..n1];
    if !v1 && !v2 {
        return Err(ProxyError::Missing);
    }
    if buf.is_empty() {
        // Both versions are at least this long.
        return Ok(Parsed::Need(V1_MIN));
    }
    // The first byte tells the versions apart.
    if v2 {
        parse_v2(buf)
    } else if buf.len() < V1_MIN {
        Ok(Parsed::Need(V1_MIN - buf.len()))
    } else {
        parse_v1(buf)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::TooLong);
        }
        // A lone '\n' can never become a valid end of line.
        if window.contains(&b'\n') {
            return Err(ProxyError::Malformed("v1 line must end with CRLF"));
        }
        return Ok(Parsed::Need(1));
    };
    let len = end + 2;
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProxyError::Malformed("v1 header is not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY", checked by the caller
    let header = match parts.next() {
        // Anything may follow UNKNOWN: the receiver ignores it.
        Some("UNKNOWN") => ProxyHeader::Local,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Err(ProxyError::Malformed(
                    "v1 needs source, destination and two ports",
                ));
            };
            let (src, dst) = if proto == "TCP4" {
                (IpAddr::V4(v1_ip(src)?), IpAddr::V4(v1_ip(dst)?))
            } else {
                (IpAddr::V6(v1_ip6(src)?), IpAddr::V6(v1_ip6(dst)?))
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(src, v1_port(sport)?),
                destination: SocketAddr::new(dst, v1_port(dport)?),
            }
        }
        _ => {
            return Err(ProxyError::Malformed(
                "v1 protocol must be TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Parsed::Done { header, len })
}

fn v1_ip(s: &str) -> Result<Ipv4Addr, ProxyError> {
    s.parse()
        .map_err(|_| ProxyError::Malformed("v1 address is not an IPv4 address"))
}

fn v1_ip6(s: &str) -> Result<Ipv6Addr, ProxyError> {
    s.parse()
        .map_err(|_| ProxyError::Malformed("v1 address is not an IPv6 address"))
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    // Decimal digits only: `parse` would also take a leading '+'.
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::Malformed("v1 port is not a number"));
    }
    s.parse()
        .map_err(|_| ProxyError::Malformed("v1 port is out of range"))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < V2_PREAMBLE {
        return Ok(Parsed::Need(V2_PREAMBLE - buf.len()));
    }
    let ver_cmd = buf[12];
    let fam = buf[13];
    let body_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version must be 2"));
    }
    let command = ver_cmd & 0x0f;
    if command > 1 {
        return Err(ProxyError::Malformed("v2 command must be LOCAL or PROXY"));
    }
    let (family, transport) = (fam >> 4, fam & 0x0f);
    if family > 3 || transport > 2 {
        return Err(ProxyError::Malformed("v2 family or transport is unknown"));
    }
    let len = V2_PREAMBLE + body_len;
    if buf.len() < len {
        return Ok(Parsed::Need(len - buf.len()));
    }
    let body = &buf[V2_PREAMBLE..len];
    if command == 0 {
        // LOCAL: the balancer speaks for itself; the body is ignored.
        return Ok(Parsed::Done {
            header: ProxyHeader::Local,
            len,
        });
    }
    let header = match family {
        // AF_INET: 4 + 4 address bytes, 2 + 2 port bytes.
        1 => {
            if body.len() < 12 {
                return Err(ProxyError::Malformed("v2 IPv4 addresses are truncated"));
            }
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        // AF_INET6: 16 + 16 address bytes, 2 + 2 port bytes.
        2 => {
            if body.len() < 36 {
                return Err(ProxyError::Malformed("v2 IPv6 addresses are truncated"));
            }
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // AF_UNSPEC and AF_UNIX carry no IP address: use the socket's.
        _ => ProxyHeader::Local,
    };
    Ok(Parsed::Done { header, len })
}

/// Read exactly one header from `stream` (no timeout: the caller's).
pub async fn read_header<R: AsyncRead + Unpin>(stream: &mut R) -> Result<ProxyHeader, ProxyError> {
    let mut buf: Vec<u8> = Vec::with_capacity(V1_MAX);
    loop {
        match parse(&buf)? {
            Parsed::Done { header, .. } => return Ok(header),
            Parsed::Need(more) => {
                let start = buf.len();
                buf.resize(start + more, 0);
                match stream.read_exact(&mut buf[start..]).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(ProxyError::Eof)
                    }
                    Err(e) => return Err(ProxyError::Io(e.to_string())),
                }
            }
        }
    }
}

/// A v1 header for `source` -> `destination` (for tests and tools).
pub fn v1_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A v2 PROXY header for `source` -> `destination` (both of one family),
/// or a LOCAL one when `source` is `None` (for tests and tools).
pub fn v2_header(addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    let Some((src, dst)) = addrs else {
        out.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return out;
    };
    let mut body = Vec::new();
    let fam = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
            0x21
        }
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    out.push(0x21);
    out.push(fam);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn done(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf).unwrap() {
            Parsed::Done { header, len } => (header, len),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 50001\r\n{\"id\":1}\n";
        let (h, len) = done(line);
        assert_eq!(len, 46);
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: sa("203.0.113.7:56324"),
                destination: sa("192.0.2.1:50001")
            }
        );
        let (h, _) = done(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n");
        assert_eq!(h.client(sa("127.0.0.1:1")), sa("[2001:db8::1]:1"));
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (ProxyHeader::Local, 15));
        let (h, len) = done(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest");
        assert_eq!((h, len), (ProxyHeader::Local, 35));
        assert_eq!(h.client(sa("10.0.0.1:9")), sa("10.0.0.1:9"));
    }

    #[test]
    fn v1_malformed() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 203.0.113.7 192.0.2.1 56324\r\n",
            b"PROXY TCP4 203.0.113.777 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
            b"PROXY TCP6 203.0.113.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 1 65536\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 +1 2\r\n",
            b"PROXY TCP4  203.0.113.7 192.0.2.1 1 2\r\n",
            b"PROXY UDP4 203.0.113.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\n",
        ];
        for b in bad {
            assert!(
                matches!(parse(b), Err(ProxyError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(b),
                parse(b)
            );
        }
        let long = format!("PROXY UNKNOWN {}", "x".repeat(200));
        assert_eq!(parse(long.as_bytes()), Err(ProxyError::TooLong));
    }

    #[test]
    fn missing_header() {
        assert_eq!(
            parse(b"{\"id\":1,\"method\":\"server.ping\"}\n"),
            Err(ProxyError::Missing)
        );
        // A TLS ClientHello.
        assert_eq!(
            parse(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Err(ProxyError::Missing)
        );
        assert_eq!(parse(b"PROXX"), Err(ProxyError::Missing));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Need(12)));
        assert_eq!(parse(b""), Ok(Parsed::Need(15)));
    }

    #[test]
    fn v2_proxy_and_local() {
        let h4 = v2_header(Some((sa("203.0.113.7:40000"), sa("192.0.2.1:50002"))));
        let (h, len) = done(&h4);
        assert_eq!(len, 28);
        assert_eq!(h.client(sa("127.0.0.1:1")), sa("203.0.113.7:40000"));
        let h6 = v2_header(Some((sa("[2001:db8::7]:1"), sa("[2001:db8::1]:2"))));
        assert_eq!(done(&h6).0.client(sa("127.0.0.1:1")), sa("[2001:db8::7]:1"));
        let local = v2_header(None);
        assert_eq!(done(&local), (ProxyHeader::Local, 16));
        // TLVs after the addresses are skipped, counted in the length.
        let mut tlv = h4.clone();
        tlv[15] += 5;
        tlv.extend_from_slice(&[0x04, 0x00, 0x02, b'h', b'i']);
        assert_eq!(done(&tlv).1, 33);
        // Incomplete: exactly what is missing is asked for.
        assert_eq!(parse(&h4[..14]), Ok(Parsed::Need(2)));
        assert_eq!(parse(&h4[..20]), Ok(Parsed::Need(8)));
    }

    #[test]
    fn v2_malformed() {
        let good = v2_header(Some((sa("203.0.113.7:1"), sa("192.0.2.1:2"))));
        let mut v = good.clone();
        v[12] = 0x11; // version 1
        assert!(matches!(parse(&v), Err(ProxyError::Malformed(_))));
        let mut v = good.clone();
        v[12] = 0x22; // command 2
        assert!(matches!(parse(&v), Err(ProxyError::Malformed(_))));
        let mut v = good.clone();
        v[13] = 0x41; // family 4
        assert!(matches!(parse(&v), Err(ProxyError::Malformed(_))));
        let mut v = good.clone();
        v[15] = 4; // IPv4 body too short
        v.truncate(20);
        assert!(matches!(parse(&v), Err(ProxyError::Malformed(_))));
    }

    #[tokio::test]
    async fn reads_exactly_the_header() {
        for header in [
            b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 50001\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2_header(Some((sa("203.0.113.7:1"), sa("192.0.2.1:2")))),
            v2_header(None),
        ] {
            let mut input = header.clone();
            input.extend_from_slice(b"{\"id\":1}\n");
            let mut r = &input[..];
            read_header(&mut r).await.unwrap();
            assert_eq!(r, b"{\"id\":1}\n");
        }
        let mut r: &[u8] = b"PROXY TCP4 1.2.3.4";
        assert_eq!(read_header(&mut r).await, Err(ProxyError::Eof));
    }
}
