//! The two children that clients connect to: the proxy (electrum-lb as a
//! library, in front of the parent's mock upstream) and the bare writer
//! (the floor). Each says `LISTEN addr...` first and ends when its stdin
//! closes.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const PROXY_ENV: &str = "FANOUT_PROXY_UPSTREAM";
pub const BARE_ENV: &str = "FANOUT_BARE";

/// The child: the proxy in front of `upstream`, until stdin closes.
pub fn run_proxy(upstream: &str) {
    let text = format!(
        r#"
[metrics]
listen = "127.0.0.1:0"

[coins.bench]
listen = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0"]
upstreams = ["{upstream}"]
"#
    );
    let config = electrum_lb::Config::parse(&text, "fanout.toml").expect("config");
    // The binary's automatic runtime (src/cli.rs): one thread on 2 CPUs
    // or fewer, one per CPU above.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = if cpus <= 2 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .expect("runtime");
    runtime.block_on(async {
        let server = electrum_lb::start(config).await.expect("proxy starts");
        let pool = server.coins["bench"].router.pool.clone();
        while !pool.any_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let addr = server
            .addr("bench", electrum_lb::config::Scheme::Tcp)
            .expect("tcp listener");
        let ws = server
            .addr("bench", electrum_lb::config::Scheme::Ws)
            .expect("ws listener");
        println!("LISTEN {addr} {ws}");
        std::io::stdout().flush().expect("stdout");
        // The parent closes our stdin when it is done.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        })
        .await;
        server.shutdown().await;
    });
}

/// The bare writer: accepts connections; each stdin line `N LINE` writes
/// LINE to the first N connections, one `write` each, then answers `done`.
pub fn run_bare() {
    use std::io::Read;
    // A backlog as long as the proxy's (std's 128 overflows when hundreds
    // of clients connect at once: their connections look established but
    // are never accepted).
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&any.into()).expect("bind");
    socket.listen(1024).expect("listen");
    let listener: std::net::TcpListener = socket.into();
    println!("LISTEN {}", listener.local_addr().expect("addr"));
    std::io::stdout().flush().expect("stdout");
    let conns = Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
    {
        let conns = conns.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        conns.lock().expect("conns").push(s);
                    }
                    // A connection aborted before it was accepted, or no
                    // descriptor left for a moment: go on accepting.
                    Err(e) => {
                        eprintln!("bare writer: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
    }
    let stdin = std::io::stdin();
    let mut input = std::io::BufReader::new(stdin.lock());
    let mut command = String::new();
    while input.read_line(&mut command).unwrap_or(0) > 0 {
        let (n, line) = command.trim_end().split_once(' ').expect("N LINE");
        let n: usize = n.parse().expect("N");
        let bytes = format!("{line}\n").into_bytes();
        loop {
            let conns = conns.lock().expect("conns");
            if conns.len() >= n {
                for mut s in conns.iter().take(n) {
                    s.write_all(&bytes).expect("write");
                }
                break;
            }
            drop(conns);
            std::thread::sleep(Duration::from_millis(1));
        }
        println!("done");
        std::io::stdout().flush().expect("stdout");
        command.clear();
    }
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}
