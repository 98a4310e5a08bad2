//! The `pgtide` binary: parse the command line, load the config, run the pooler until a
//! signal. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgtide::config::{Config, ConfigSource, Overrides};

#[derive(Parser)]
#[command(
    name = "pgtide",
    version,
    about = "A PostgreSQL connection pooler",
    after_help = "Environment:\n  DATABASE_URL  the upstream database (as --upstream)\n  PGTIDE_LOG    the log filter (an EnvFilter directive: info, debug, pgtide=debug, ...)\n  NOTIFY_SOCKET systemd's notify socket: pgtide sends READY=1 and STOPPING=1\n\nSignals:\n  SIGTERM, SIGINT  finish in-flight transactions, then exit (a second one exits at once)\n  SIGHUP           reload the configuration file, the auth files and the TLS files"
)]
struct Cli {
    /// Configuration file (TOML). Without it, --upstream or DATABASE_URL is used.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Zero-config mode: pool this one database (postgres://user:pass@host:port/db).
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    upstream: Option<String>,
    /// Zero-config mode: a streaming replica of the upstream database (repeatable); reads
    /// go to replicas, roles are discovered with pg_is_in_recovery().
    #[arg(long = "replica", value_name = "URL")]
    replicas: Vec<String>,
    /// Listen address, overriding the config (default 127.0.0.1:6432).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<SocketAddr>,
    /// Address of the metrics endpoint (/metrics, /healthz, /readyz), overriding the
    /// config; "" turns it off.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where the pooler's log goes (the container image logs to stdout).
    #[arg(long, value_enum, default_value_t = LogOutput::Stderr)]
    log_output: LogOutput,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogOutput {
    Stderr,
    Stdout,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and print every problem; exit status 1 on error.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Start a throwaway PostgreSQL primary and streaming replica, and pgtide in front
    /// of them; Ctrl-C stops everything and removes it.
    Demo {
        /// pgtide's listen address (default 127.0.0.1:6432).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<SocketAddr>,
        /// The metrics endpoint's address (default 127.0.0.1:9930); "" turns it off.
        #[arg(long, value_name = "HOST:PORT")]
        metrics_listen: Option<String>,
        /// Log format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Translate a PgBouncer configuration into a pooler.toml, printed on standard
    /// output; options pgtide has no equivalent for become comments saying what to do.
    Import {
        /// PgBouncer's configuration file (pgbouncer.ini).
        file: PathBuf,
        /// PgBouncer's auth_file (userlist.txt): its users become [users.NAME] tables
        /// with their passwords (otherwise auth_file keeps pointing at the file).
        #[arg(long, value_name = "FILE")]
        userlist: Option<PathBuf>,
    },
    /// Print where a SQL string would be routed (primary or replica) and why.
    Route {
        /// The SQL text (one or more statements); `-` reads it from standard input.
        sql: String,
        /// A function that writes, in addition to the built-in ones (repeatable).
        #[arg(long = "write-function", value_name = "NAME")]
        write_functions: Vec<String>,
        /// Ignore `/* pgtide: primary|replica */` hints.
        #[arg(long)]
        no_hints: bool,
    },
}

fn init_logging(format: LogFormat, output: LogOutput) {
    let filter = match std::env::var("PGTIDE_LOG") {
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
        Ok(v) => tracing_subscriber::EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!("pgtide: PGTIDE_LOG={v:?} is not a log filter ({e}); logging at info");
            tracing_subscriber::EnvFilter::new("info")
        }),
    };
    // Colours only on a terminal: not in files, pipes or journald.
    use std::io::IsTerminal;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let (colour, writer) = match output {
        LogOutput::Stderr => (
            std::io::stderr().is_terminal(),
            BoxMakeWriter::new(std::io::stderr),
        ),
        LogOutput::Stdout => (
            std::io::stdout().is_terminal(),
            BoxMakeWriter::new(std::io::stdout),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The `[pgtide]` keys `file` sets that only a restart applies.
fn restart_keys_set_in(file: &std::path::Path) -> Vec<&'static str> {
    let table: toml::Table = std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_default();
    let set = table.get("pgtide").and_then(|v| v.as_table());
    pgtide::config::keys::restart_keys()
        .filter(|k| set.is_some_and(|t| t.contains_key(*k)))
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::CheckConfig { file }) => match Config::from_file(file).and_then(|c| {
            // The auth_file and auth_hba_file it names must load too.
            pgtide::auth::sources::AuthFiles::load(&c).map(|_| c)
        }) {
            // The certificate, key and CA files must be usable too.
            Ok(config) => match pgtide::tls::Tls::new(std::sync::Arc::new(config)) {
                Ok(_) => {
                    println!("{}: OK", file.display());
                    let restart = restart_keys_set_in(file);
                    if !restart.is_empty() {
                        println!(
                            "a reload does not change these settings it sets (they need a restart): {}",
                            restart.join(", ")
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: 1 problem(s):\n  TLS: {e}", file.display());
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("{}: {} problem(s):", file.display(), e.problems.len());
                for p in &e.problems {
                    if p.key.is_empty() {
                        eprintln!("  {}", p.message);
                    } else {
                        eprintln!("  {}: {}", p.key, p.message);
                    }
                }
                ExitCode::FAILURE
            }
        },
        Some(Command::Route {
            sql,
            write_functions,
            no_hints,
        }) => route(sql, write_functions, *no_hints),
        Some(Command::Import { file, userlist }) => import(file, userlist.as_deref()),
        Some(Command::Demo {
            listen,
            metrics_listen,
            log_format,
        }) => {
            // The demo prints its own lines on stdout: its log stays on stderr.
            init_logging(log_format.unwrap_or(cli.log_format), LogOutput::Stderr);
            let rt = runtime(0);
            match rt.block_on(pgtide::demo::run_demo(
                listen.or(cli.listen),
                metrics_listen.clone().or(cli.metrics_listen.clone()),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgtide demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            init_logging(cli.log_format, cli.log_output);
            let loaded = match (&cli.config, &cli.upstream) {
                (Some(path), _) => Config::from_file(path),
                (None, Some(url)) => Config::from_upstream_with_replicas(url, &cli.replicas),
                (None, None) => {
                    eprintln!("pgtide: give --config FILE, or --upstream URL (or DATABASE_URL) for zero-config mode");
                    return ExitCode::from(2);
                }
            };
            let mut config = match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pgtide: invalid configuration:\n{e}");
                    return ExitCode::from(2);
                }
            };
            let overrides = Overrides {
                listen: cli.listen,
                metrics_listen: cli.metrics_listen.clone(),
            };
            overrides.apply(&mut config);
            // SIGHUP and RELOAD read the file again, with the same overrides.
            let source = cli.config.as_ref().map(|path| ConfigSource {
                path: path.clone(),
                overrides,
            });
            runtime(config.pgtide.worker_threads).block_on(serve(config, source))
        }
    }
}

/// `pgtide import pgbouncer.ini [--userlist userlist.txt]`: the pooler.toml on stdout,
/// what pgtide would refuse in it on stderr (exit 0); a file it cannot read or parse:
/// the line and the problem on stderr, exit 1.
fn import(file: &std::path::Path, userlist: Option<&std::path::Path>) -> ExitCode {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| eprintln!("pgtide import: cannot read {}: {e}", p.display()))
    };
    let Ok(ini) = read(file) else {
        return ExitCode::FAILURE;
    };
    let list = match userlist {
        Some(p) => match read(p) {
            Ok(t) => Some((t, p.display().to_string())),
            Err(()) => return ExitCode::FAILURE,
        },
        None => None,
    };
    let name = file.display().to_string();
    let input = pgtide::import::Input {
        ini: &ini,
        ini_name: &name,
        userlist: list.as_ref().map(|(t, n)| (t.as_str(), n.as_str())),
    };
    match pgtide::import::import(&input) {
        Ok(out) => {
            print!("{}", out.toml);
            if !out.warnings.is_empty() {
                eprintln!(
                    "pgtide import: the generated file needs editing before pgtide accepts it ({} problem(s)):",
                    out.warnings.len()
                );
                for w in &out.warnings {
                    eprintln!("  {w}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgtide import: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pgtide route SQL`: the classifier's decision and reason, plus what a transaction
/// statement means for the transaction it starts.
fn route(sql: &str, write_functions: &[String], no_hints: bool) -> ExitCode {
    let mut text = sql.to_string();
    if sql == "-" {
        text.clear();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            eprintln!("pgtide route: cannot read standard input: {e}");
            return ExitCode::FAILURE;
        }
        // Standard input (a script, a log): one decision per statement.
        let statements = split_statements(&text);
        let many = statements.len() > 1;
        for (i, stmt) in statements.iter().enumerate() {
            if many {
                let shown: String = stmt.split_whitespace().collect::<Vec<_>>().join(" ");
                let shown: String = shown.chars().take(72).collect();
                println!("{}{}:", if i > 0 { "\n" } else { "" }, shown);
            }
            explain_route(stmt, write_functions, no_hints);
        }
        return ExitCode::SUCCESS;
    }
    explain_route(&text, write_functions, no_hints);
    ExitCode::SUCCESS
}

/// `text` cut at its top-level semicolons (comments, strings and dollar quotes kept
/// whole), without the empty pieces.
fn split_statements(text: &str) -> Vec<&str> {
    use pgtide::router::lexer::{Lexer, Token};
    let base = text.as_ptr() as usize;
    let mut lexer = Lexer::new(text.as_bytes());
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(t) = lexer.next() {
        if t == Token::Semicolon {
            let end = lexer.token_text().as_ptr() as usize - base + 1;
            out.push(&text[from..end]);
            from = end;
        }
    }
    out.push(&text[from..]);
    out.retain(|s| !s.trim().trim_end_matches(';').trim().is_empty());
    out
}

/// Prints where the statement text `text` would run and why; the first line says where.
fn explain_route(text: &str, write_functions: &[String], no_hints: bool) {
    use pgtide::router::classify::{classify, transaction_mode, ClassifyOptions, TxKind};
    let functions: Vec<String> = write_functions.iter().map(|f| f.to_lowercase()).collect();
    let opts = ClassifyOptions {
        write_functions: &functions,
        hints: !no_hints,
    };
    let tx = transaction_mode(text.as_bytes());
    match &tx {
        // Where the work runs comes first: a read-only transaction runs on a replica,
        // although its BEGIN alone is "transaction control".
        Some(t) if t.kind == TxKind::Begin && t.replica_ok(false) => {
            println!(
                "replica: a read-only transaction starts; it and its statements run on a replica"
            )
        }
        _ => println!("{}", classify(text.as_bytes(), &opts)),
    }
    if let Some(tx) = tx {
        let access = match tx.read_only {
            Some(true) => "read-only",
            Some(false) => "read-write",
            None => "default access mode (read-write unless default_transaction_read_only is on)",
        };
        match tx.kind {
            TxKind::Begin if tx.replica_ok(false) => println!(
                "explicit transaction: {access}; its statements can go to a replica"
            ),
            TxKind::Begin if tx.read_only == Some(true) => println!(
                "explicit transaction: {access} but SERIALIZABLE, which a hot standby refuses; it goes to the primary"
            ),
            TxKind::Begin => {
                println!("explicit transaction: {access}; it goes to the primary")
            }
            TxKind::SetTransaction => println!("sets the current transaction: {access}"),
            TxKind::SetSessionDefault => {
                println!("sets the session default for later transactions: {access}")
            }
            TxKind::ResetSessionDefault => {
                println!("resets the session's transaction defaults to their values at connection start")
            }
        }
    }
    // What transaction mode does about it besides routing.
    if let Some(what) = pgtide::router::session_state::session_state(text.as_bytes()) {
        println!(
            "creates session state ({what}): in transaction mode the client is pinned to its server connection (session_state = \"pin\") or the statement fails with 0A000 (\"reject\")"
        );
    }
    let mut settings = Vec::new();
    pgtide::params::settings_named(text.as_bytes(), |n| settings.push(n.to_string()));
    if !settings.is_empty() {
        println!(
            "changes session settings ({}): kept for this client and replayed on every server connection it gets",
            settings.join(", ")
        );
    }
}

/// The runtime. `workers = 1`: one thread runs everything (tokio's current-thread
/// runtime: one event loop, like PgBouncer's; measured the cheapest per transaction on a
/// small machine shared with PostgreSQL, see benches/README.md). Otherwise the
/// multi-thread runtime with `workers` worker threads, or (0) one per CPU core.
fn runtime(workers: u32) -> tokio::runtime::Runtime {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers as usize);
        }
        b
    };
    builder
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

async fn serve(config: Config, source: Option<ConfigSource>) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let pooler = match pgtide::start_from(config, source).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pgtide: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Installed first, so that a signal during the wait below is not fatal.
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("pgtide: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    // "Ready" once the primaries answer (as /readyz says); the monitors' first checks
    // take a moment, so wait up to 2 s for them before saying what is missing.
    let mut ready = pooler.readiness().await;
    for _ in 0..10 {
        if ready.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        ready = pooler.readiness().await;
    }
    match ready {
        Ok(()) => {
            tracing::info!(listen = %pooler.local_addr(), version = env!("CARGO_PKG_VERSION"), "pgtide is ready")
        }
        Err(why) => tracing::warn!(
            listen = %pooler.local_addr(),
            version = env!("CARGO_PKG_VERSION"),
            not_ready = %why.join("; "),
            "pgtide is accepting clients, but not every primary is reachable yet: their clients wait for it (query_wait_timeout)"
        ),
    }
    // systemd (Type=notify): started, whether or not every primary answers yet.
    sd_notify("READY=1");
    let mut stopped = Box::pin(pooler.stopped());
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                // The outcome (what changed, or why nothing did) is logged by reload.
                let _ = pooler.reload().await;
            }
            _ = &mut stopped => {
                // SHUTDOWN from the admin console.
                tracing::info!("shutdown requested from the admin console");
                break;
            }
        }
    }
    drop(stopped);
    sd_notify("STOPPING=1");
    tracing::info!(
        "signal received: finishing in-flight transactions (a second signal exits at once)"
    );
    pooler.shutdown();
    let wait = pooler.wait();
    tokio::select! {
        _ = wait => {
            tracing::info!("all clients gone; bye");
            ExitCode::SUCCESS
        }
        _ = term.recv() => ExitCode::from(1),
        _ = int.recv() => ExitCode::from(1),
    }
}

/// Tells the service manager `state` (`READY=1`, `STOPPING=1`) through the datagram
/// socket `$NOTIFY_SOCKET` names (a path, or `@name` in the abstract namespace), as
/// `sd_notify(3)` does; nothing when it is not set. A failure is logged, never fatal.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, notify_socket = ?path, state, "could not notify the service manager");
    }
}
