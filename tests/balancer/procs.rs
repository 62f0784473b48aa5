//! Real processes for the balancer tests: electrum-lb instances (the binary
//! cargo built for the test) and HAProxy, on loopback ports reserved for
//! the whole test so a restarted instance gets its ports back.

use crate::support::WAIT;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port held for the test: a bound socket that does not listen. Nothing
/// else on the machine can be given the port, yet a listener with
/// `SO_REUSEADDR` (electrum-lb's, HAProxy's) can bind it, again after a
/// restart.
pub struct Reserved {
    _socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

pub fn reserve() -> Reserved {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    Reserved {
        _socket: socket,
        addr,
    }
}

/// An electrum-lb process; killed when dropped (a test that fails leaves
/// nothing running).
pub struct Instance {
    pub name: String,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    pub metrics: SocketAddr,
}

impl Instance {
    /// Start the binary on `config` (written to `dir`), logging to a file.
    pub fn spawn(name: &str, dir: &Path, config: &str, metrics: SocketAddr) -> Instance {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut instance = Instance {
            name: name.to_string(),
            child: None,
            config: path,
            log: dir.join(format!("{name}.log")),
            metrics,
        };
        instance.start(&[]);
        instance
    }

    /// Start (again) on the same configuration, with extra arguments.
    pub fn start(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_electrum-lb"))
            .arg("--config")
            .arg(&self.config)
            .args(["--threads", "1"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// A second process on the same configuration (an upgrade's successor).
    pub fn successor(&self, name: &str, args: &[&str]) -> Instance {
        let mut next = Instance {
            name: name.to_string(),
            child: None,
            config: self.config.clone(),
            log: self.log.with_file_name(format!("{name}.log")),
            metrics: self.metrics,
        };
        next.start(args);
        next
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM: the drain begins.
    pub fn term(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {}", self.name);
    }

    /// Wait for the process to exit by itself (within `within`).
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit in {within:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while readyz(self.metrics).await != Some(200) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("{} exited ({status}):\n{}", self.name, self.log_text());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not ready; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The status `/readyz` answers, if the port answers at all.
pub async fn readyz(addr: SocketAddr) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// HAProxy running the shipped configuration's `global` and `defaults`
/// (deploy/haproxy/haproxy.cfg) with faster health checks and a stats
/// socket, in front of the `listen` sections the test gives.
pub struct HaProxy {
    child: Child,
    stats: PathBuf,
    log: PathBuf,
}

impl HaProxy {
    pub async fn start(haproxy: &Path, dir: &Path, sections: &str, front: SocketAddr) -> HaProxy {
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/haproxy/haproxy.cfg"
        ))
        .unwrap();
        let stats = dir.join("haproxy.sock");
        let text = test_config(&shipped, &stats, sections);
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, text).unwrap();
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let ha = HaProxy { child, stats, log };
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(front).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "haproxy did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ha
    }

    /// A server's status as HAProxy sees it ("UP", "DOWN", "UP 1/2", ...).
    pub fn status(&self, proxy: &str, server: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.stats).unwrap();
        s.write_all(b"show stat\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let mut lines = out.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (px, sv, st) = (col("pxname"), col("svname"), col("status"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > st && f[px] == proxy && f[sv] == server)
            .map(|f| f[st].to_string())
            .unwrap_or_else(|| panic!("no {proxy}/{server} in:\n{out}"))
    }

    /// Wait until every `(proxy, server)` has exactly `status`.
    pub async fn wait_status(&self, servers: &[(&str, &str)], status: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !servers.iter().all(|(p, s)| self.status(p, s) == status) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{servers:?} not {status}; haproxy log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped configuration up to its first `listen` section, with
/// checks every 100 ms instead of 2 s, the stats socket in the test's
/// directory and a `maxconn` the test's file descriptor limit allows, then
/// the test's own sections.
fn test_config(shipped: &str, stats: &Path, sections: &str) -> String {
    let head = &shipped[..shipped.find("\nlisten ").expect("listen sections")];
    let timing = "inter 2s fall 2 rise 3";
    assert!(head.contains(timing), "the shipped check timing changed");
    assert!(
        head.contains("send-proxy-v2"),
        "PROXY v2 toward electrum-lb"
    );
    let mut text = String::new();
    for line in head.lines() {
        if line.trim_start().starts_with("maxconn ") {
            text.push_str("    maxconn 2000\n");
        } else if line.contains("stats socket") {
            text.push_str(&format!(
                "    stats socket {} level admin\n",
                stats.display()
            ));
        } else {
            text.push_str(&line.replace(timing, "inter 100ms fall 2 rise 2"));
            text.push('\n');
        }
    }
    text.push_str(sections);
    text
}

/// `haproxy -c` on a configuration file: its exit status and output.
pub fn check_config(haproxy: &Path, path: &Path) -> (bool, String) {
    let out = Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
