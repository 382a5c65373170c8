//! The command line: parsing and dispatch, with SPEC section 1's exit codes
//! (0 clean, 2 configuration error, 1 anything else), each failure one
//! line on stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::app::init::InitError;
use crate::app::{Application, StartError};
use crate::config::{self, Config, ConfigError, Overrides, Sources};
use crate::fake_klavi::{
    Chaos, DEMO_ACCESS_KEY, DEMO_SECRET_KEY, FakeKlavi, FakeKlaviConfig, Outcome,
};
use crate::ops::memory::{self, Release};
use crate::ops::{healthcheck, telemetry};
use crate::{demo, shutdown};

/// Keeps a valid Klavi payment API token and serves it to apps in the same
/// pod over loopback HTTP.
#[derive(Debug, Parser)]
#[command(name = "klavi-token-sidecar", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file (also KLAVI_SIDECAR_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub flags: ServiceFlags,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags that override configuration keys (the top layer).
#[derive(Debug, Clone, Default, Args)]
pub struct ServiceFlags {
    /// Token API address (server.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Ops listener address, "" to turn it off (server.ops_listen).
    #[arg(long, value_name = "ADDR")]
    pub ops_listen: Option<String>,
    /// "text" or "json" (log.format).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

impl ServiceFlags {
    fn or(self, outer: Self) -> Overrides {
        Overrides {
            listen: self.listen.or(outer.listen),
            ops_listen: self.ops_listen.or(outer.ops_listen),
            log_format: self.log_format.or(outer.log_format),
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Run(ServiceFlags),
    /// Run the service against an embedded fake Klavi (30-second tokens, no
    /// credentials, no network).
    Demo(ServiceFlags),
    /// Run the fake Klavi alone.
    FakeKlavi(FakeKlaviArgs),
    /// Validate the configuration and print it, secrets redacted.
    CheckConfig(ServiceFlags),
    /// GET the ops listener's /readyz: exit 0 if 200, else 1.
    Healthcheck(HealthcheckArgs),
    /// For init containers and Jobs: fetch a token for every profile with a
    /// token_file, write the files, exit 0 (1 if not done in time).
    Init(InitArgs),
}

/// `init` options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Seconds to get every file written, 1–3600.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub timeout: u64,
}

/// `fake-klavi` options.
#[derive(Debug, Args)]
pub struct FakeKlaviArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8088", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Lifetime of issued tokens, seconds.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub token_ttl: u64,
    /// The accepted access key.
    #[arg(long, default_value = DEMO_ACCESS_KEY, value_name = "K")]
    pub access_key: String,
    /// The accepted secret key.
    #[arg(long, default_value = DEMO_SECRET_KEY, value_name = "S")]
    pub secret_key: String,
    /// Faults to mix into the answers, comma-separated: ok, ttl:SECS,
    /// same, expired, status:CODE, status:CODE:RETRY_AFTER, delay:MS, hang, reset,
    /// garbage, empty-token, huge, skew:SECS.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub faults: Vec<Outcome>,
    /// Fraction of requests, 0 to 1, that get one of --faults (picked at
    /// random).
    #[arg(long, default_value_t = 0.2, value_name = "R")]
    pub fault_rate: f64,
    /// A token is good for one API call: its second use is answered 401
    /// (for trying a single_use profile).
    #[arg(long)]
    pub single_use: bool,
}

/// `healthcheck` options.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// URL to probe; default: the ops listener's /readyz from the
    /// configuration (loopback when it listens on all interfaces).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// Exit status for a configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for any other fatal error.
pub const EXIT_FAILURE: u8 = 1;

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("klavi-token-sidecar: {message}");
    ExitCode::from(code)
}

fn config_failure(error: &ConfigError) -> ExitCode {
    fail(EXIT_CONFIG, format!("configuration error: {error}"))
}

/// How long an idle blocking thread (key-file reads, building HTTP
/// clients at start) stays: not tokio's 10 s, since a sidecar that idles
/// should not keep a thread's memory for nothing.
const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_millis(200);

/// The runtime: one thread for `workers == 1` (see `runtime.worker_threads`
/// in config/default.toml), else a multi-threaded one (0: one per CPU).
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
            .build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE);
    if workers > 1 {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()
}

/// Runs `future` on a runtime of `workers` threads.
fn block_on(workers: usize, future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match runtime(workers) {
        Ok(runtime) => runtime.block_on(future),
        Err(error) => fail(EXIT_FAILURE, format!("cannot start the runtime: {error}")),
    }
}

/// Parses the command line and runs the command. Configuration is read
/// before the runtime starts, since it says how many threads to run.
/// `release_memory`, if given, is called every second while the sidecar
/// serves (see [`crate::ops::memory`]).
pub fn main(release_memory: Option<Release>) -> ExitCode {
    let cli = Cli::parse();
    let outer = cli.flags;
    match cli.command {
        None => run(
            &Sources::from_process(cli.config, outer.or(ServiceFlags::default())),
            release_memory,
        ),
        Some(Command::Run(flags)) => run(
            &Sources::from_process(cli.config, flags.or(outer)),
            release_memory,
        ),
        Some(Command::Demo(flags)) => {
            let sources = Sources::from_process(cli.config, flags.or(outer));
            let raw = match config::load_raw(&sources) {
                Ok(raw) => raw,
                Err(error) => return config_failure(&error),
            };
            match config::worker_threads(&raw.runtime) {
                Ok(workers) => block_on(workers, run_demo(raw, release_memory)),
                Err(error) => config_failure(&error),
            }
        }
        Some(Command::FakeKlavi(args)) => block_on(1, run_fake(args)),
        Some(Command::CheckConfig(flags)) => {
            check_config(&Sources::from_process(cli.config, flags.or(outer)))
        }
        Some(Command::Init(args)) => {
            let sources = Sources::from_process(cli.config, outer.or(ServiceFlags::default()));
            run_init(&sources, args.timeout)
        }
        Some(Command::Healthcheck(args)) => {
            let sources = Sources::from_process(cli.config, Overrides::default());
            block_on(1, healthcheck::run(args.url, &sources))
        }
    }
}

fn run_init(sources: &Sources, timeout_secs: u64) -> ExitCode {
    if !(1..=3600).contains(&timeout_secs) {
        return config_failure(&ConfigError::new(
            "--timeout",
            format!("{timeout_secs} is out of range: between 1 and 3600 seconds"),
        ));
    }
    let config = match config::load(sources) {
        Ok(config) => config,
        Err(error) => return config_failure(&error),
    };
    block_on(config.worker_threads, async move {
        telemetry::init(config.log);
        let timeout = Duration::from_secs(timeout_secs);
        match crate::app::init::init(config, timeout).await {
            Ok(written) => {
                tracing::info!(files = %written.join(","), "init: every token file is written");
                ExitCode::SUCCESS
            }
            Err(InitError::Start(StartError::Config(error))) => config_failure(&error),
            Err(error) => fail(EXIT_FAILURE, format!("init: {error}")),
        }
    })
}

fn run(sources: &Sources, release_memory: Option<Release>) -> ExitCode {
    match config::load(sources) {
        Ok(config) => block_on(config.worker_threads, serve(config, None, release_memory)),
        Err(error) => config_failure(&error),
    }
}

async fn serve(
    config: Config,
    fake: Option<FakeKlavi>,
    release_memory: Option<Release>,
) -> ExitCode {
    telemetry::init(config.log);
    if let Some(release) = release_memory {
        // Ends with the runtime.
        tokio::spawn(memory::release_periodically(release));
    }
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(StartError::Config(error)) => return config_failure(&error),
        Err(error) => return fail(EXIT_FAILURE, error),
    };
    if let Some(fake) = &fake {
        let addresses = demo::Addresses {
            token: app.token_addr().clone(),
            ops: app.ops_addr(),
            proxy: app.proxy_addr(crate::config::DEFAULT_PROFILE).cloned(),
            payments_proxy: app.proxy_addr(demo::PAYMENTS_PROFILE).cloned(),
        };
        demo::banner(addresses, &fake.base_url());
    }
    let result = app.run_until_stopped(shutdown::on_signals()).await;
    if let Some(fake) = fake {
        fake.stop().await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(EXIT_FAILURE, error),
    }
}

async fn run_demo(raw: config::RawConfig, release_memory: Option<Release>) -> ExitCode {
    let fake = match FakeKlavi::start_local(FakeKlaviConfig {
        token_ttl: demo::TOKEN_TTL,
        ..FakeKlaviConfig::default()
    })
    .await
    {
        Ok(fake) => fake,
        Err(error) => {
            return fail(
                EXIT_FAILURE,
                format!("cannot start the fake Klavi: {error}"),
            );
        }
    };
    match demo::config(raw, &fake.base_url()) {
        Ok(config) => serve(config, Some(fake), release_memory).await,
        Err(error) => config_failure(&error),
    }
}

async fn run_fake(args: FakeKlaviArgs) -> ExitCode {
    telemetry::init(config::LogFormat::Text);
    let config = FakeKlaviConfig {
        token_ttl: Duration::from_secs(args.token_ttl),
        access_key: args.access_key,
        secret_key: args.secret_key,
        single_use: args.single_use,
    };
    let fake = match FakeKlavi::start(args.listen, config).await {
        Ok(fake) => fake,
        Err(error) => {
            return fail(
                EXIT_FAILURE,
                format!("cannot listen on {}: {error}", args.listen),
            );
        }
    };
    if !(0.0..=1.0).contains(&args.fault_rate) {
        return fail(EXIT_CONFIG, "--fault-rate must be between 0 and 1");
    }
    if !args.faults.is_empty() {
        fake.set_chaos(Some(Chaos {
            rate: args.fault_rate,
            faults: args.faults.clone(),
        }));
    }
    tracing::info!(
        url = %format!("{}{}", fake.base_url(), crate::fake_klavi::AUTH_PATH),
        token_ttl_secs = args.token_ttl,
        faults = args.faults.len(),
        fault_rate = args.fault_rate,
        single_use = args.single_use,
        "fake Klavi listening"
    );
    fake.run_until(shutdown::on_signals()).await;
    ExitCode::SUCCESS
}

fn check_config(sources: &Sources) -> ExitCode {
    match config::load(sources) {
        Ok(config) => {
            let file = sources
                .config_file()
                .map_or_else(|| "none".to_string(), |p| p.display().to_string());
            println!(
                "# klavi-token-sidecar: configuration is valid (file: {file}); secrets redacted"
            );
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Err(error) => config_failure(&error),
    }
}
