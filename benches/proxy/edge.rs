//! The edge of the hop, beside the throughput runs: TLS handshakes per
//! second (full and resumed), latency at a fixed moderate rate, and idle
//! sessions (TCP and TLS) opened from addresses spread over 127.0.0.0/8.
//!
//! HAProxy terminates TLS with the same certificate (`certs/server.crt`,
//! RSA 2048) as electrum-lb; both run with their defaults (HAProxy: one
//! thread per CPU, OpenSSL session tickets; electrum-lb: the automatic
//! runtime, rustls tickets).

use super::*;
use crate::spread::{connect_from, open_files_limit};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Mutex;
use std::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The certificate both proxies serve.
pub(crate) fn cert_paths() -> (std::path::PathBuf, std::path::PathBuf) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    (root.join("certs/server.crt"), root.join("certs/server.key"))
}

/// HAProxy in TCP mode terminating TLS: one `ssl` bind, same backends.
pub(crate) async fn start_haproxy_tls(upstreams: &[SocketAddr], dir: &std::path::Path) -> Proc {
    let (crt, key) = cert_paths();
    let pem = dir.join("haproxy.pem");
    let both =
        std::fs::read_to_string(&crt).expect("cert") + &std::fs::read_to_string(&key).expect("key");
    std::fs::write(&pem, both).expect("write haproxy.pem");
    let port = free_port();
    // A plain bind beside it (part `storm`: established sessions while
    // the same threads make handshakes).
    let plain_port = free_port();
    let servers: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, a)| format!("    server u{i} {a}\n"))
        .collect();
    let maxconn = open_files_limit().saturating_sub(200) / 2;
    let cfg = format!(
        "global\n    maxconn {maxconn}\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 600s\n    timeout server 600s\n\nfrontend electrum\n    bind 127.0.0.1:{port} ssl crt {}\n    bind 127.0.0.1:{plain_port}\n    default_backend upstreams\n\nbackend upstreams\n    balance leastconn\n{servers}",
        pem.display()
    );
    let path = dir.join("haproxy-tls.cfg");
    std::fs::write(&path, cfg).expect("write haproxy-tls.cfg");
    let child = std::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let plain: SocketAddr = format!("127.0.0.1:{plain_port}").parse().expect("addr");
    Proc {
        child,
        addrs: vec![addr, plain],
        ws: None,
        ssl: None,
        metrics: None,
    }
}

/// A wallet's TLS client: no certificate check (the handshake signature is
/// still verified), tickets kept when `resume`.
pub(crate) fn connector(resume: bool) -> TlsConnector {
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(provider)))
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    TlsConnector::from(Arc::new(config))
}

const IDLE_REQUESTS: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"server.version\",\"params\":[\"bench\",\"1.4\"]}\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"blockchain.headers.subscribe\",\"params\":[]}\n";

/// Send the two requests of an idle wallet and read both answers.
async fn settle<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S) {
    s.write_all(IDLE_REQUESTS).await.expect("write");
    let mut lines = 0;
    let mut chunk = [0u8; 4096];
    while lines < 2 {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "session closed before its answers");
        lines += chunk[..n].iter().filter(|&&b| b == b'\n').count();
    }
}

/// `n` idle TLS sessions (full handshakes), from spread addresses
/// (`first` on, see [`crate::spread::connect_from`]).
pub(crate) async fn open_idle_tls_sessions(
    addr: SocketAddr,
    n: usize,
    first: usize,
) -> Vec<TlsStream<TcpStream>> {
    let gate = Arc::new(Semaphore::new(64));
    let tls = connector(false);
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let (gate, tls) = (gate.clone(), tls.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            let tcp = connect_from(first + i, addr).await;
            let mut s = tls
                .connect("localhost".try_into().expect("name"), tcp)
                .await
                .expect("TLS handshake");
            settle(&mut s).await;
            s
        });
    }
    let mut sessions = Vec::with_capacity(n);
    while let Some(s) = tasks.join_next().await {
        sessions.push(s.expect("session"));
    }
    sessions
}

/// `n` idle TCP sessions, from spread addresses (`first` on).
pub(crate) async fn open_idle_tcp_sessions(
    addr: SocketAddr,
    n: usize,
    first: usize,
) -> Vec<TcpStream> {
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            let mut s = connect_from(first + i, addr).await;
            settle(&mut s).await;
            s
        });
    }
    let mut sessions = Vec::with_capacity(n);
    while let Some(s) = tasks.join_next().await {
        sessions.push(s.expect("session"));
    }
    sessions
}

/// Handshakes per second and the proxy's CPU per handshake.
pub(crate) struct Handshakes {
    pub(crate) rate: f64,
    pub(crate) cpu_us: Option<f64>,
}

/// `clients` loops of connect, handshake, one `server.ping` answered (so
/// that the tickets sent after the handshake are read), close; for `secs`.
/// With `resume`, every client keeps its tickets: all but its first
/// handshake are resumptions.
pub(crate) async fn handshakes(
    addr: SocketAddr,
    pid: u32,
    resume: bool,
    clients: usize,
    secs: f64,
) -> Handshakes {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let cpu0 = cpu_us(pid);
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let tls = connector(resume);
        tasks.spawn(async move {
            let mut done = 0u64;
            let mut resumed = 0u64;
            while Instant::now() < stop {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let mut s = tls
                    .connect("localhost".try_into().expect("name"), tcp)
                    .await
                    .expect("TLS handshake");
                if s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    resumed += 1;
                }
                s.write_all(
                    b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"server.ping\",\"params\":[]}\n",
                )
                .await
                .expect("write");
                let mut chunk = [0u8; 1024];
                let mut got = 0;
                while !chunk[..got].contains(&b'\n') {
                    let n = s.read(&mut chunk[got..]).await.expect("read");
                    assert!(n > 0, "closed before the answer");
                    got += n;
                }
                done += 1;
            }
            (done, resumed)
        });
    }
    let started = Instant::now();
    let (mut done, mut resumed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (d, r) = r.expect("client");
        done += d;
        resumed += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_us(pid)
        .zip(cpu0)
        .map(|(a, b)| (a - b) as f64 / done.max(1) as f64);
    if resume {
        assert!(
            resumed * 10 >= done * 9,
            "only {resumed} of {done} handshakes resumed"
        );
    } else {
        assert_eq!(resumed, 0, "resumption was disabled");
    }
    Handshakes {
        rate: done as f64 / elapsed,
        cpu_us: cpu,
    }
}

/// Latency at a fixed rate: `connections` connections, each sending
/// `rate / connections` requests per second on a schedule (open loop: a
/// late answer does not delay the next request), for `secs`. p50 and p99
/// from each request's write to its answer, the first 0.5 s not counted.
pub(crate) async fn fixed_rate(
    addr: SocketAddr,
    bodies: Arc<Vec<Vec<u8>>>,
    rate: f64,
    connections: usize,
    secs: f64,
) -> Run {
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let warm = start + WARM_UP;
    let stop = start + Duration::from_secs_f64(secs);
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        let bodies = bodies.clone();
        // Connections spread evenly over one interval.
        let first = start + interval.mul_f64(c as f64 / connections as f64);
        tasks.spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut rd, mut wr) = stream.into_split();
            let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; 4096]));
            let writer = {
                let sent = sent.clone();
                tokio::spawn(async move {
                    let mut rng = Rng(0x1234_5678 ^ c as u64);
                    let mut id = 0u64;
                    let mut line = Vec::with_capacity(256);
                    let mut interval = tokio::time::interval_at(first.into(), interval);
                    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    loop {
                        interval.tick().await;
                        if Instant::now() >= stop {
                            break;
                        }
                        line.clear();
                        line.extend_from_slice(&bodies[rng.below(bodies.len())]);
                        line.extend_from_slice(id.to_string().as_bytes());
                        line.extend_from_slice(b"}\n");
                        sent.lock().expect("sent")[(id % 4096) as usize] = Some(Instant::now());
                        if wr.write_all(&line).await.is_err() {
                            break;
                        }
                        id += 1;
                    }
                    id
                })
            };
            let mut latencies = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            let mut answers = 0u64;
            let mut errors = 0u64;
            let deadline = stop + Duration::from_millis(200);
            while let Ok(Ok(n)) =
                tokio::time::timeout_at(deadline.into(), rd.read(&mut chunk)).await
            {
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                pending.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some(end) = pending[at..].iter().position(|&b| b == b'\n') {
                    let line = &pending[at..at + end];
                    at += end + 1;
                    let Some(id) = reply_id(line) else { continue };
                    answers += 1;
                    if line.starts_with(b"{\"jsonrpc\":\"2.0\",\"error\"") {
                        errors += 1;
                    }
                    let at_send = sent.lock().expect("sent")[(id % 4096) as usize].take();
                    if let Some(t) = at_send.filter(|t| *t >= warm) {
                        latencies
                            .push(now.duration_since(t).as_micros().min(u32::MAX as u128) as u32);
                    }
                }
                pending.drain(..at);
            }
            let requests = writer.await.expect("writer");
            (latencies, answers, errors, requests)
        });
    }
    let mut latencies = Vec::new();
    let (mut answers, mut errors, mut requests) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (l, a, e, q) = r.expect("connection");
        latencies.extend(l);
        answers += a;
        errors += e;
        requests += q;
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Run {
        rate: latencies.len() as f64 / (stop - warm).as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        // Requests never answered count as errors.
        errors: errors + requests.saturating_sub(answers),
        answers,
        ..Run::default()
    }
}

/// Clients of the handshake runs, and seconds per run.
const HANDSHAKE_CLIENTS: usize = 8;
const HANDSHAKE_SECS: f64 = 2.0;
/// The fixed-rate runs spread their rate (`--rate`, 20,000 requests per
/// second unless told) over this many connections.
const FIXED_RATE_CONNECTIONS: usize = 16;

/// The TLS handshake and fixed-rate rows (parts `tls` and `rate`), best of
/// `--rounds` interleaved rounds each, as lines to print after the table.
pub(crate) async fn rows(bench: &Bench, opts: &Options, paths: &[Path]) -> Vec<String> {
    let mut out = Vec::new();
    if opts.wants("tls") {
        let mut tls_paths = vec![Path::LbTls];
        if bench.haproxy {
            tls_paths.insert(0, Path::HaproxyTls);
        }
        out.push(String::new());
        out.push(format!(
            "TLS handshakes per second ({HANDSHAKE_CLIENTS} clients, each: connect, handshake, server.ping answered, close; {HANDSHAKE_SECS} s, best of {} rounds; certificate RSA 2048):",
            opts.rounds
        ));
        out.push(
            "| handshake | path        | per second | vs HAProxy | proxy CPU us/handshake |".into(),
        );
        out.push(
            "|-----------|-------------|-----------:|-----------:|-----------------------:|".into(),
        );
        for resume in [false, true] {
            let mut best: Vec<(Path, Handshakes)> = Vec::new();
            for _ in 0..opts.rounds {
                for &p in &tls_paths {
                    let (front, targets) = bench.front(p).await;
                    let front = front.expect("a proxy process");
                    let addr = match p {
                        Path::HaproxyTls => targets[0],
                        _ => front.ssl.expect("electrum-lb's ssl:// listener"),
                    };
                    let h =
                        handshakes(addr, front.pid(), resume, HANDSHAKE_CLIENTS, HANDSHAKE_SECS)
                            .await;
                    match best.iter_mut().find(|(bp, _)| *bp == p) {
                        Some((_, b)) if b.rate >= h.rate => {}
                        Some(b) => b.1 = h,
                        None => best.push((p, h)),
                    }
                }
            }
            let haproxy = best
                .iter()
                .find(|(p, _)| *p == Path::HaproxyTls)
                .map(|(_, h)| h.rate);
            for (p, h) in &best {
                out.push(format!(
                    "| {:<9} | {:<11} | {:>10.0} | {:>10} | {:>22} |",
                    if resume { "resumed" } else { "full" },
                    p.name(),
                    h.rate,
                    haproxy.map_or("-".into(), |r| format!("{:.2}x", h.rate / r)),
                    h.cpu_us.map_or("-".into(), |c| format!("{c:.0}")),
                ));
            }
        }
    }
    if opts.wants("rate") {
        let data = Data::new();
        let bodies = Arc::new(Workload::Uncached.bodies(&data));
        for &rate in &opts.rates {
            out.extend(rate_rows(bench, opts, paths, bodies.clone(), rate).await);
        }
    }
    out
}

/// One fixed-rate table: `rate` requests per second over
/// [`FIXED_RATE_CONNECTIONS`], best of `--rounds` interleaved rounds.
async fn rate_rows(
    bench: &Bench,
    opts: &Options,
    paths: &[Path],
    bodies: Arc<Vec<Vec<u8>>>,
    rate: f64,
) -> Vec<String> {
    let mut out = Vec::new();
    out.push(String::new());
    out.push(format!(
        "Latency at a fixed rate ({rate:.0} requests/s, uncached, lean upstream, {FIXED_RATE_CONNECTIONS} connections, open loop; the round with the lowest p50 of {}, and the median over the rounds of each round's difference from HAProxy's):",
        opts.rounds
    ));
    out.push("| path        | answers/s |  p50 us |  p99 us | errors | proxy CPU us/req | thread runs/req | us run / waited per run | p50 / p99 vs HAProxy | median per round vs HAProxy |".into());
    out.push("|-------------|----------:|--------:|--------:|-------:|-----------------:|----------------:|------------------------:|----------------------|-----------------------------|".into());
    let mut best: Vec<(Path, Run)> = Vec::new();
    // Each round's (path, p50, p99): paths of one round ran back to back,
    // so their differences are shaken less by the machine's other load
    // than the best rounds' are.
    let mut rounds: Vec<Vec<(Path, u32, u32)>> = Vec::new();
    for _ in 0..opts.rounds {
        let mut round = Vec::new();
        for &p in paths {
            let (front, targets) = bench.front(p).await;
            let pid = front.as_ref().map(Proc::pid);
            let cpu0 = pid.and_then(cpu_us);
            let sched0 = pid.and_then(sched);
            let mut run = fixed_rate(
                targets[0],
                bodies.clone(),
                rate,
                FIXED_RATE_CONNECTIONS,
                opts.secs.min(3.0),
            )
            .await;
            run.front_cpu_us = pid
                .and_then(cpu_us)
                .zip(cpu0)
                .map(|(a, b)| (a - b) as f64 / run.answers.max(1) as f64);
            run.front_sched = pid.and_then(sched).zip(sched0).map(|(a, b)| a.since(b));
            round.push((p, run.p50_us, run.p99_us));
            match best.iter_mut().find(|(bp, _)| *bp == p) {
                Some((_, b)) if b.p50_us <= run.p50_us => {}
                Some(b) => b.1 = run,
                None => best.push((p, run)),
            }
            drop(front);
        }
        rounds.push(round);
    }
    let haproxy = best
        .iter()
        .find(|(p, _)| *p == Path::Haproxy)
        .map(|(_, r)| (r.p50_us, r.p99_us));
    for (p, r) in &best {
        let runs = r.front_sched.filter(|s| s.runs > 0);
        out.push(format!(
            "| {:<11} | {:>9.0} | {:>7} | {:>7} | {:>6} | {:>16} | {:>15} | {:>23} | {:<20} | {:<27} |",
            p.name(),
            r.rate,
            r.p50_us,
            r.p99_us,
            r.errors,
            r.front_cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
            runs.map_or("-".into(), |s| format!(
                "{:.2}",
                s.runs as f64 / r.answers.max(1) as f64
            )),
            runs.map_or("-".into(), |s| format!(
                "{:.0} / {:.0}",
                s.run_ns as f64 / s.runs as f64 / 1e3,
                s.wait_ns as f64 / s.runs as f64 / 1e3
            )),
            haproxy.map_or("-".into(), |(p50, p99)| format!(
                "{:+} / {:+} us",
                r.p50_us as i64 - p50 as i64,
                r.p99_us as i64 - p99 as i64
            )),
            paired(&rounds, *p).map_or("-".into(), |(d50, d99)| format!(
                "{d50:+} / {d99:+} us"
            )),
        ));
    }
    out
}

/// The median over `rounds` of `path`'s p50 and p99 minus HAProxy's in the
/// same round (rounds without both left out).
fn paired(rounds: &[Vec<(Path, u32, u32)>], path: Path) -> Option<(i64, i64)> {
    let (mut d50, mut d99): (Vec<i64>, Vec<i64>) = rounds
        .iter()
        .filter_map(|round| {
            let find = |p: Path| round.iter().find(|(q, _, _)| *q == p);
            let (_, h50, h99) = find(Path::Haproxy)?;
            let (_, p50, p99) = find(path)?;
            Some((*p50 as i64 - *h50 as i64, *p99 as i64 - *h99 as i64))
        })
        .unzip();
    if d50.is_empty() {
        return None;
    }
    d50.sort_unstable();
    d99.sort_unstable();
    // The middle one (the upper of two), as the storm part picks its round.
    Some((d50[d50.len() / 2], d99[d99.len() / 2]))
}
