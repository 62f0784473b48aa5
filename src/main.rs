//! The `electrum-lb` binary: arguments, logging, runtime, signals.

use clap::Parser;
use electrum_lb::Config;
use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("electrum-lb: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        if let Err(e) = electrum_lb::app::preflight(&config) {
            eprintln!(
                "electrum-lb: invalid configuration: {}: {e}",
                args.config.display()
            );
            return ExitCode::from(2);
        }
        println!(
            "{}: configuration is valid ({} coin{})",
            args.config.display(),
            config.coins.len(),
            if config.coins.len() == 1 { "" } else { "s" }
        );
        return ExitCode::SUCCESS;
    }
    init_logging(args.log_format);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.runtime_threads(cpus);
    let per_core = args.per_core && threads > 1;
    let mut builder = if threads == 1 || per_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("electrum-lb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `--per-core`: the other runtimes, each on a thread of its own until
    // the main one has stopped serving (see `electrum_lb::cores`).
    let cores = if per_core {
        match PerCore::start(threads, runtime.handle().clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("electrum-lb: cannot start the runtimes: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    tracing::info!(config = %args.config.display(), threads, per_core, coins = ?config.coins.keys().collect::<Vec<_>>(), "starting");
    tracing::debug!(?config, "effective configuration");
    let listen = if args.takeover {
        electrum_lb::Listen::Takeover {
            wait: std::time::Duration::from_secs(args.takeover_wait),
        }
    } else {
        electrum_lb::Listen::Fresh
    };
    let served = runtime.block_on(serve(config, &args.config, listen));
    if let Some(cores) = cores {
        cores.stop();
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("electrum-lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtimes of `--per-core` beyond the main thread's.
struct PerCore {
    stop: tokio_util::sync::CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PerCore {
    /// Build `count - 1` single-threaded runtimes, each driven by a thread
    /// of its own, and install them with `main` (the first) in
    /// `electrum_lb::cores`.
    fn start(count: usize, main: tokio::runtime::Handle) -> std::io::Result<PerCore> {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut handles = vec![main];
        let mut threads = Vec::new();
        for core in 1..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("electrum-lb-{core}"))
                    .spawn(move || {
                        electrum_lb::cores::enter(core);
                        runtime.block_on(stop.cancelled());
                    })?,
            );
        }
        electrum_lb::cores::install(handles);
        Ok(PerCore { stop, threads })
    }

    /// Stop the other runtimes (every session has ended by now) and wait
    /// for their threads.
    fn stop(self) {
        self.stop.cancel();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Run until SIGINT/SIGTERM or until a successor took the listeners over;
/// SIGHUP re-reads the configuration file. A second SIGINT/SIGTERM during
/// the drain stops at once.
async fn serve(
    config: Config,
    path: &std::path::Path,
    listen: electrum_lb::Listen,
) -> anyhow::Result<()> {
    let server = electrum_lb::start_with(config, listen).await?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        #[cfg(unix)]
        let reload = hup.recv();
        #[cfg(not(unix))]
        let reload = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = &mut stop => {
                tracing::info!("shutting down");
                break;
            }
            _ = server.handed_over() => break,
            _ = reload => {
                tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
                match server.reload_file(path) {
                    Ok(_) => tracing::info!("configuration reloaded"),
                    Err(e) => tracing::error!(error = %e, "reload rejected: the running configuration is unchanged"),
                }
            }
        }
    }
    let hard = server.hard_stop();
    let again = tokio::spawn(async move {
        shutdown_signal().await;
        tracing::warn!("second stop signal: closing every session now");
        hard.cancel();
    });
    server.shutdown().await;
    again.abort();
    tracing::info!("stopped");
    Ok(())
}

fn init_logging(format: cli::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
