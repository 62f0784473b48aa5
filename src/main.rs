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
    let mut builder = if threads == 1 {
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
    tracing::info!(config = %args.config.display(), threads, coins = ?config.coins.keys().collect::<Vec<_>>(), "starting");
    tracing::debug!(?config, "effective configuration");
    let listen = if args.takeover {
        electrum_lb::Listen::Takeover {
            wait: std::time::Duration::from_secs(args.takeover_wait),
        }
    } else {
        electrum_lb::Listen::Fresh
    };
    match runtime.block_on(serve(config, &args.config, listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("electrum-lb: {e:#}");
            ExitCode::FAILURE
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
