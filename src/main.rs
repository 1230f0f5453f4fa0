//! The `credproxy` command: `run`, `check-config`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "credproxy",
    version,
    about = "A local HTTP proxy that adds API credentials to requests"
)]
struct Cli {
    /// Log format on stderr. The level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        #[arg(long, short, env = "CREDPROXY_CONFIG", default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Check a config file and report every problem; exit 2 if there is one.
    CheckConfig {
        #[arg(env = "CREDPROXY_CONFIG", default_value = "config.yaml")]
        file: PathBuf,
    },
    /// Run the proxy with built-in fake providers on loopback, and print commands to try.
    Demo {
        /// Port of the forward proxy; the local endpoint takes the next one. 0 picks free ports.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
}

const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("credproxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::CheckConfig { file } => check_config(file),
            Command::Demo { port } => demo(port).await,
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check_config(file: PathBuf) -> ExitCode {
    match credproxy::config::load(&file) {
        Ok(config) => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: OK ({} routes)",
                file.display(),
                config.routes.iter().count()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn run(file: PathBuf) -> ExitCode {
    let config = match credproxy::config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "credproxy: not started: {} has {} problem(s)",
                file.display(),
                e.problems.len()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let running = match credproxy::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("credproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    running.shutdown(Duration::from_secs(10)).await;
    ExitCode::SUCCESS
}

async fn demo(port: u16) -> ExitCode {
    let demo = match credproxy::demo::start(port).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("credproxy demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", demo.instructions().await);
    shutdown_signal().await;
    demo.stop().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return,
                _ = term.recv() => return,
                // Without a handler SIGHUP would kill the process, and systemd counts that as a
                // clean exit (no restart). Live reload is not implemented yet: keep running.
                _ = hup.recv() => tracing::warn!("SIGHUP received: live reload is not supported yet; restart credproxy to apply a new config"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
