//! Child processes seen from the parent: electrum-lb, HAProxy, the mocks; their CPU and memory.

use crate::spread::open_files_limit;
use serde_json::Value;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A child process killed when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) addrs: Vec<SocketAddr>,
    /// electrum-lb's `ws://` listener (idle WebSocket sessions).
    pub(crate) ws: Option<SocketAddr>,
    /// A TLS listener (idle TLS sessions, handshakes).
    pub(crate) ssl: Option<SocketAddr>,
    /// electrum-lb's metrics port.
    pub(crate) metrics: Option<SocketAddr>,
}

impl Proc {
    /// Re-execute this binary with `env` set; it prints `LISTEN addr...`.
    pub(crate) fn spawn_self(env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a child process");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("child address");
        let addrs = line
            .trim()
            .strip_prefix("LISTEN ")
            .unwrap_or_else(|| panic!("unexpected line from a child: {line:?}"))
            .split(' ')
            .map(|a| a.parse().expect("address"))
            .collect();
        Proc {
            child,
            addrs,
            ws: None,
            ssl: None,
            metrics: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release binary (`cargo bench` builds it), as an operator runs it:
/// default runtime and logging, a config naming the two upstreams. Ready
/// once it listens and both upstreams are connected.
pub(crate) fn start_electrum_lb(
    upstreams: &[SocketAddr],
    dir: &std::path::Path,
    args: Vec<String>,
) -> Proc {
    let urls: Vec<String> = upstreams.iter().map(|a| format!("\"tcp://{a}\"")).collect();
    let (crt, key) = crate::edge::cert_paths();
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ncert = {:?}\nkey = {:?}\n\n[coins.bench]\nlisten = [\"tcp://127.0.0.1:0\", \"ws://127.0.0.1:0\", \"ssl://127.0.0.1:0\"]\nupstreams = [{}]\n",
        crt.display().to_string(),
        key.display().to_string(),
        urls.join(", ")
    );
    let path = dir.join("electrum-lb.toml");
    std::fs::write(&path, text).expect("write electrum-lb.toml");
    launch_electrum_lb(&path, upstreams.len(), args)
}

/// Names another electrum-lb binary to run instead of this build's.
pub(crate) const BINARY_ENV: &str = "PROXY_BENCH_BINARY";

/// glibc's settings the shipped units and image give electrum-lb.
pub(crate) const ELECTRUM_LB_TUNABLES: &str = "glibc.malloc.tcache_count=256";

/// Start the release binary with the config at `path` and wait until it
/// listens (TCP and `ws://`) and `upstreams` upstreams are connected;
/// `args` are the runtime's options (`--threads`, `--per-core`).
pub(crate) fn launch_electrum_lb(
    path: &std::path::Path,
    upstreams: usize,
    args: Vec<String>,
) -> Proc {
    // `PROXY_BENCH_BINARY=/path` runs another build (A/B comparisons).
    let binary =
        std::env::var_os(BINARY_ENV).unwrap_or_else(|| env!("CARGO_BIN_EXE_electrum-lb").into());
    let mut cmd = Command::new(binary);
    cmd.arg("--config").arg(path).args(args);
    // As the shipped units and image run it (glibc's thread cache of freed
    // blocks, see `Dockerfile`), unless this bench's caller set its own
    // (`GLIBC_TUNABLES= cargo bench ...` measures glibc's defaults).
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        cmd.env("GLIBC_TUNABLES", ELECTRUM_LB_TUNABLES);
    }
    let mut child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start electrum-lb");
    // Its log tells where it listens and when its upstreams are up; the
    // rest of the log is drained for as long as it runs.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let value = |line: &str, key: &str| {
        let at = line.find(key)? + key.len();
        line[at..].split_whitespace().next().map(str::to_string)
    };
    let mut listen = None;
    let mut ws = None;
    let mut ssl = None;
    let mut metrics = None;
    let mut up = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // An `ssl://` listener is waited for too when the config has one: with
    // `--per-core` the upstream connections may be up before it is logged
    // (a TLS client sent to the plain listener instead reads JSON).
    let wants_ssl = std::fs::read_to_string(path).is_ok_and(|t| t.contains("\"ssl://"));
    while listen.is_none()
        || ws.is_none()
        || (wants_ssl && ssl.is_none())
        || metrics.is_none()
        || up.len() < upstreams
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("electrum-lb did not get ready in time");
        let line = strip_ansi(&line);
        if line.contains("listening") {
            let addr = |scheme| value(&line, scheme).and_then(|a| a.parse::<SocketAddr>().ok());
            listen = listen.or(addr("listen=tcp://"));
            ws = ws.or(addr("listen=ws://"));
            ssl = ssl.or(addr("listen=ssl://"));
        }
        if line.contains("/metrics") {
            metrics = value(&line, "listen=").and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if line.contains("upstream connection up") {
            up.extend(value(&line, "upstream="));
        }
    }
    // The hub subscribes to the tip as soon as a connection is up.
    std::thread::sleep(Duration::from_millis(200));
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Proc {
        child,
        addrs: vec![listen.expect("listen address")],
        ws,
        ssl,
        metrics,
    }
}

pub(crate) fn strip_ansi(line: &str) -> String {
    let mut clean = String::with_capacity(line.len());
    let mut skip = false;
    for ch in line.chars() {
        match (skip, ch) {
            (_, '\u{1b}') => skip = true,
            (true, 'm') => skip = false,
            (true, _) => {}
            (false, c) => clean.push(c),
        }
    }
    clean
}

pub(crate) fn haproxy_installed() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port the OS says is free now, for a process that binds it itself
/// (HAProxy's configuration names its ports).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// HAProxy in TCP mode in front of the upstreams, on a port from the OS;
/// `nbthread` as its `global` section's (`None`: HAProxy's default, one
/// thread per CPU).
pub(crate) async fn start_haproxy(
    upstreams: &[SocketAddr],
    dir: &std::path::Path,
    nbthread: Option<usize>,
) -> Proc {
    let port = free_port();
    let servers: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, a)| format!("    server u{i} {a}\n"))
        .collect();
    // Two descriptors per session (client and server side).
    let maxconn = open_files_limit().saturating_sub(200) / 2;
    let threads = nbthread.map_or(String::new(), |n| format!("    nbthread {n}\n"));
    let cfg = format!(
        "global\n    maxconn {maxconn}\n{threads}\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 600s\n    timeout server 600s\n\nfrontend electrum\n    bind 127.0.0.1:{port}\n    default_backend upstreams\n\nbackend upstreams\n    balance leastconn\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy.cfg");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Proc {
        child,
        addrs: vec![addr],
        ws: None,
        ssl: None,
        metrics: None,
    }
}

/// One request to a mock upstream's control methods.
pub(crate) async fn mock_call(upstream: SocketAddr, method: &str) -> Value {
    let mut s = TcpStream::connect(upstream).await.expect("mock");
    let line = format!("{{\"id\":0,\"method\":\"{method}\",\"params\":[]}}\n");
    s.write_all(line.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(b"\n") {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "mock closed");
        buf.extend_from_slice(&chunk[..n]);
    }
    let v: Value = serde_json::from_slice(&buf).expect("JSON");
    v["result"].clone()
}

/// CPU time (user and system, every thread) a process has used, in us.
pub(crate) fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000 / hz)
}

/// The scheduler's figures for a process, summed over its threads
/// (`/proc/PID/task/*/schedstat`): time on a CPU, time waiting on a run
/// queue (woken, not yet running), and how many times a thread was put on
/// a CPU (each wakeup at least once).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Sched {
    pub(crate) run_ns: u64,
    pub(crate) wait_ns: u64,
    pub(crate) runs: u64,
}

impl Sched {
    pub(crate) fn since(self, before: Sched) -> Sched {
        Sched {
            run_ns: self.run_ns.saturating_sub(before.run_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            runs: self.runs.saturating_sub(before.runs),
        }
    }
}

/// `None` where the kernel keeps no per-task schedstat.
pub(crate) fn sched(pid: u32) -> Option<Sched> {
    let mut total = Sched::default();
    let mut read = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(text) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else {
            continue; // a thread that just ended
        };
        let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
        total.run_ns += f.next()??;
        total.wait_ns += f.next()??;
        total.runs += f.next()??;
        read += 1;
    }
    (read > 0).then_some(total)
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
