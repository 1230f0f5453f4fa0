//! The `credproxy` command: `run`, `check-config`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

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
        /// The file (also `-c FILE`, as the other commands take it).
        #[arg(env = "CREDPROXY_CONFIG", default_value = "config.yaml")]
        file: PathBuf,
        #[arg(long = "config", short = 'c', conflicts_with = "file", hide = true)]
        config: Option<PathBuf>,
    },
    /// The local CA that HTTPS interception uses: export it for your clients, find it, rotate it.
    Ca {
        #[command(subcommand)]
        action: CaAction,
        #[arg(
            long,
            short,
            env = "CREDPROXY_CONFIG",
            default_value = "config.yaml",
            global = true
        )]
        config: PathBuf,
    },
    /// Read a password on standard input and print its hash for `access.proxy_users`.
    HashPassword,
    /// Ask the running proxy (through its admin listener) to reload its config file.
    Reload {
        #[arg(long, short, env = "CREDPROXY_CONFIG", default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Ask a "what is my IP" service, through each route's egress path, which source address it
    /// sees: confirm it before registering it with an IP-bound API such as 2tCloud.
    EgressCheck {
        #[arg(long, short, env = "CREDPROXY_CONFIG", default_value = "config.yaml")]
        config: PathBuf,
        /// Check only this route.
        #[arg(long)]
        route: Option<String>,
        /// The service to ask (default: `egress_check_url` from the config).
        #[arg(long)]
        url: Option<String>,
    },
    /// Run the proxy with built-in fake providers on loopback, and print commands to try.
    Demo {
        /// Port of the forward proxy (at most 65533); the local endpoint takes the next one and
        /// the admin listener the one after. 0 picks free ports.
        #[arg(long, default_value_t = 8080, value_parser = clap::value_parser!(u16).range(..=65533))]
        port: u16,
    },
}

#[derive(Subcommand)]
enum CaAction {
    /// Print the CA certificate (PEM, or DER with --der) to stdout; creates the CA if needed.
    Export {
        #[arg(long)]
        der: bool,
    },
    /// Print where the CA certificate and key are.
    Path,
    /// Make a new CA; the old files are kept as backups.
    Rotate,
}

const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = init_logging(cli.log_format);
    // `run` reads its config first: the config says which runtime to build.
    let (threads, shape, config) = match &cli.command {
        Command::Run { config } => match load_for_run(config) {
            Ok(c) => (c.threads, c.shape, Some(c)),
            Err(code) => return code,
        },
        _ => (0, Default::default(), None),
    };
    let runtime = match credproxy::runtime(threads, shape) {
        Ok(r) => r,
        Err(e) => {
            fatal(format!("credproxy: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { .. } => match config {
                Some(config) => run(config).await,
                None => ExitCode::FAILURE,
            },
            Command::CheckConfig { file, config } => check_config(config.unwrap_or(file)),
            Command::Demo { port } => demo(port).await,
            Command::Ca { action, config } => ca(action, config),
            Command::Reload { config } => reload(config).await,
            Command::HashPassword => hash_password(),
            Command::EgressCheck { config, route, url } => egress_check(config, route, url).await,
        }
    })
}

fn load_for_run(file: &std::path::Path) -> Result<credproxy::config::Config, ExitCode> {
    credproxy::config::load(file).map_err(|e| {
        fatal(format!(
            "{e}\ncredproxy: not started: {} has {} problem(s)",
            file.display(),
            e.problems.len()
        ));
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Why `run` could not start, on stderr: into the journal, each line as an error (`<3>`), so
/// that `journalctl -p err` shows it.
fn fatal(text: String) {
    if credproxy::logs::stderr_is_the_journal() {
        for line in text.lines() {
            eprintln!("<3>{line}");
        }
    } else {
        eprintln!("{text}");
    }
}

/// Logs go to stderr through a background writer thread that takes many lines at a time, so a
/// request never waits on the terminal or the journal (see `logs`). The returned guard
/// writes what is left when `main` returns.
fn init_logging(format: LogFormat) -> credproxy::logs::Guard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = credproxy::logs::start(std::io::stderr());
    // Colours only for a person at a terminal: not into files or the journal, which get the same
    // lines from a much cheaper formatter.
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(writer);
    match format {
        LogFormat::Human if terminal => builder.init(),
        LogFormat::Human => builder
            .event_format(credproxy::logs::Plain::for_stderr())
            .init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
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

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("credproxy: reading the password: {e}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("credproxy: the password is empty");
        return ExitCode::FAILURE;
    }
    match credproxy::access::PasswordHash::make(password) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn reload(file: PathBuf) -> ExitCode {
    use http_body_util::BodyExt;
    // Only the admin address is needed: the running proxy re-reads (and checks) the file itself.
    let admin = match credproxy::config::admin_address(&file) {
        Ok(Some(a)) => a,
        Ok(None) => {
            eprintln!(
                "credproxy: the admin listener is off (admin.enabled: false); send SIGHUP instead"
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("credproxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let call = |method: http::Method, path: &str| {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"))
            .header("host", format!("127.0.0.1:{}", admin.port()))
            .body(http_body_util::Empty::<bytes::Bytes>::new());
        let client = client.clone();
        async move {
            let resp = client
                .request(req.map_err(|e| e.to_string())?)
                .await
                .map_err(|e| {
                    format!(
                        "cannot reach the admin listener on {admin} (admin.listen in the file): {e}"
                    )
                })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            Ok::<_, String>((status, json))
        }
    };
    // The proxy re-reads the file it was started with: refuse to report a reload of another one.
    let running = match call(http::Method::GET, "/status").await {
        Ok((_, status)) => status["config_file"].as_str().map(PathBuf::from),
        Err(e) => {
            eprintln!("credproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(running), Ok(ours)) = (running, std::fs::canonicalize(&file))
        && running != ours
    {
        eprintln!(
            "credproxy: the proxy on {admin} runs {}, not {}: a reload re-reads the file it was started with; edit that one, or run `credproxy reload -c {}`",
            running.display(),
            file.display(),
            running.display()
        );
        return ExitCode::FAILURE;
    }
    match call(http::Method::POST, "/reload").await {
        Ok((status, json)) if status.is_success() => {
            println!(
                "reloaded {}",
                json["config"].as_str().unwrap_or("the config")
            );
            for w in json["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", w.as_str().unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Ok((_, json)) => {
            eprintln!(
                "credproxy: reload refused: {}",
                json["message"].as_str().unwrap_or("(no reason given)")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("credproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn egress_check(file: PathBuf, only: Option<String>, url: Option<String>) -> ExitCode {
    let config = match credproxy::config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let url = url.unwrap_or_else(|| config.egress_check_url.clone());
    let routes: Vec<_> = config
        .routes
        .iter()
        .filter(|r| only.as_deref().is_none_or(|n| n == r.name))
        .cloned()
        .collect();
    if routes.is_empty() {
        eprintln!(
            "credproxy: no route {}",
            only.as_deref()
                .map(|n| format!("named `{n}`"))
                .unwrap_or_default()
        );
        return ExitCode::FAILURE;
    }
    let mut failed = false;
    for route in routes {
        match credproxy::outbound::check_source(&config, &route.egress, &url).await {
            Ok(seen) => println!(
                "route {}: leaves {}; {url} sees {seen}",
                route.name,
                route.egress.describe()
            ),
            Err(e) => {
                failed = true;
                println!(
                    "route {}: leaves {}; {url} could not be asked: {e}",
                    route.name,
                    route.egress.describe()
                );
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn ca(action: CaAction, file: PathBuf) -> ExitCode {
    let config = match credproxy::config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let files = &config.ca.files;
    let result = match action {
        CaAction::Path => {
            println!("{}", files.cert.display());
            println!("{}", files.key.display());
            Ok(())
        }
        CaAction::Export { der } => {
            let existed = files.cert.exists();
            credproxy::ca::load_or_create(files).and_then(|ca| {
                if !existed {
                    eprintln!(
                        "note: there was no CA at {}: one was made now. A proxy that runs as another user or with another state directory (the systemd unit's is /var/lib/credproxy) has a CA of its own: give clients that one (its start-up log names the file)",
                        files.cert.display()
                    );
                }
            use std::io::Write;
            let mut out = std::io::stdout();
            let written = if der {
                out.write_all(ca.cert_der().as_ref())
            } else {
                out.write_all(ca.cert_pem().as_bytes())
            };
            // A full disk or a closed pipe is a failure (exit 1), not a silent empty file.
            written
                .and_then(|_| out.flush())
                .map_err(|e| credproxy::ca::CaError::new(format!("writing it to stdout: {e}")))
            })
        }
        CaAction::Rotate => credproxy::ca::rotate(files).map(|(cert_bak, key_bak)| {
            println!(
                "A new CA is in {} (key {}).",
                files.cert.display(),
                files.key.display()
            );
            println!(
                "The old one is kept as {} and {}.",
                cert_bak.display(),
                key_bak.display()
            );
            println!("Next: restart credproxy, then import the new CA into your clients");
            println!("(credproxy ca export > credproxy-ca.pem) and remove the old one from them.");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: credproxy::config::Config) -> ExitCode {
    let (shape, threads) = (config.shape, config.threads);
    let running = match credproxy::start(config).await {
        Ok(r) => r,
        // TLS roots and the CA are configuration: restarting will not fix them (exit 2, which
        // the systemd unit does not restart on); a port in use may be transient (exit 1).
        Err(e @ credproxy::listen::StartError::Tls(_)) => {
            fatal(format!("credproxy: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            fatal(format!("credproxy: {e}"));
            return ExitCode::FAILURE;
        }
    };
    // What the runtime really has: tokio's own count for a multi-thread runtime; under per_core,
    // `start` fails unless every asked-for thread started.
    let handle = tokio::runtime::Handle::current();
    match shape {
        credproxy::config::Shape::MultiThread => tracing::info!(
            threads = handle.metrics().num_workers(),
            flavor = %match handle.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
                _ => "multi_thread",
            },
            "runtime"
        ),
        credproxy::config::Shape::PerCore => {
            tracing::info!(threads, flavor = %"per_core", "runtime")
        }
    }
    // systemd (Type=notify): the listeners are bound, clients may come.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let workers = running.state().workers.clone();
        tokio::spawn(async move {
            // Four pings per interval: one failed check (a thread busy for a moment) leaves the
            // next ping well inside the deadline; a thread stuck for three quarters of the
            // interval gets the service restarted.
            let mut tick = tokio::time::interval(interval / 4);
            loop {
                tick.tick().await;
                // Under `per_core`, only when every thread runs tasks (`Workers::all_running`).
                if workers.all_running(interval / 8).await {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(
                        "a runtime thread ran no task within {:?}: no systemd watchdog ping",
                        interval / 8
                    );
                }
            }
        });
    }
    wait_for_signals(Some(&running)).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let drain = running.state().config.limits.drain_timeout;
    tracing::info!(
        "shutting down: no new connections; in-flight requests have {}",
        humantime::format_duration(drain)
    );
    tokio::select! {
        () = running.shutdown(drain) => {}
        // A second Ctrl-C or SIGTERM: the user (or systemd's stop timeout) will not wait.
        () = wait_for_signals(None) => {
            tracing::warn!("second signal: stopping now, without waiting for the requests in flight");
        }
    }
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
    wait_for_signals(None).await;
    demo.stop().await;
    ExitCode::SUCCESS
}

/// Returns on SIGINT or SIGTERM. SIGHUP reloads the config of `running` (without one, it is
/// ignored: an unhandled SIGHUP would kill the process, which systemd counts as a clean exit).
async fn wait_for_signals(running: Option<&credproxy::Running>) {
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
                _ = hup.recv() => match running {
                    Some(r) => {
                        let mut states = vec![sd_notify::NotifyState::Reloading];
                        states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
                        let _ = sd_notify::notify(&states);
                        // A refusal is logged by reload itself.
                        let _ = r.reload().await;
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                    }
                    None => tracing::info!("SIGHUP ignored: nothing to reload now"),
                },
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
