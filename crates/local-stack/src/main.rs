//! `local-stack`: runs the system on this machine with no AWS account and no Docker.
//!
//! `local-stack [run]` brings everything up and keeps it running until Ctrl-C; `set-price` and
//! `warm` act on the running stack; `demo` is the one-shot walk-through. Everything they do
//! lives in the library; this file is the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use local_stack::stack::{chain, Stack, StackOptions, StackState, StatusStyle};
use product_cache::config::{CacheSettings, Env, InvalidationMode, ReadSettings, RedisSettings};

const DEFAULT_STATE_DIR: &str = "target/local-stack";

#[derive(Parser)]
#[command(
    name = "local-stack",
    about = "Runs the product cache locally: redis-server, moto (DynamoDB + Streams), the read \
             path over HTTP and the stream invalidator",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `run` with these options.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Bring the system up and keep it running until Ctrl-C (the default)
    Run(RunArgs),
    /// Change a product's price in the running stack's table, as any writer would
    SetPrice(SetPriceArgs),
    /// Pre-load products into the cache through the read path
    Warm(WarmArgs),
    /// A one-shot walk of a price change through the system, step by step
    Demo {
        /// What the invalidator does with a change
        #[arg(long, default_value = "delete")]
        mode: InvalidationMode,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Address of the HTTP API (port 0: any free port)
    #[arg(long, default_value = local_stack::stack::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The DynamoDB table, created if missing and seeded if empty
    #[arg(long, default_value = local_stack::stack::DEFAULT_TABLE)]
    table: String,
    /// A running Redis to use instead of starting redis-server
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// A running DynamoDB with Streams to use instead of starting moto
    #[arg(long, env = "AWS_ENDPOINT_URL_DYNAMODB")]
    endpoint: Option<String>,
    /// The SAM template whose invalidator event source configures the stream poller
    #[arg(long, default_value = "infra/template.yaml")]
    template: PathBuf,
    /// Where records the poller gives up on are written [default: <state-dir>/on-failure.jsonl]
    #[arg(long)]
    on_failure: Option<PathBuf>,
    /// Where the running stack's state file goes, for set-price and warm
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// What the invalidator does with a change
    #[arg(long, env = "INVALIDATION_MODE", default_value = "delete")]
    mode: InvalidationMode,
    /// Products written to an empty table
    #[arg(long, default_value_t = local_stack::seed::DEFAULT_PRODUCTS)]
    seed: usize,
}

/// Which stack a command acts on: the running one (its state file), or explicit endpoints.
#[derive(Args)]
struct Target {
    /// The state directory of the running stack
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// DynamoDB endpoint, instead of the running stack's
    #[arg(long)]
    endpoint: Option<String>,
    /// The table [default: the running stack's, or Products]
    #[arg(long)]
    table: Option<String>,
}

#[derive(Args)]
struct SetPriceArgs {
    /// Product id, e.g. kb-001
    id: String,
    /// New price, e.g. 99.99
    price: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["ids", "first"]))]
struct WarmArgs {
    /// A file of product ids, one per line
    #[arg(long)]
    ids: Option<PathBuf>,
    /// The first N ids a Scan of the table returns
    #[arg(long)]
    first: Option<usize>,
    /// Reads in flight at once
    #[arg(long, default_value_t = local_stack::warm::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Redis, instead of the running stack's
    #[arg(long)]
    redis_url: Option<String>,
    #[command(flatten)]
    target: Target,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(args).await,
        Some(Command::SetPrice(args)) => set_price(args).await,
        Some(Command::Warm(args)) => warm(args).await,
        Some(Command::Demo { mode }) => local_stack::demo::run(mode)
            .await
            .map(|transcript| println!("{transcript}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("local-stack: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<(), Error> {
    let mut stop = std::pin::pin!(stop_signal()?);
    eprintln!("local-stack: starting (moto takes a few seconds)...");
    let esm = local_stack::esm_template::local(&args.template)?;
    for property in &esm.not_emulated {
        eprintln!(
            "local-stack: {property} in {} is not emulated locally",
            args.template.display()
        );
    }
    let options = StackOptions {
        listen: args.listen,
        table: args.table,
        redis_url: args.redis_url,
        dynamodb_endpoint: args.endpoint,
        seed_products: args.seed,
        esm: local_stack::poller::EsmConfig {
            poll_interval: local_stack::stack::LOCAL_POLL_INTERVAL,
            on_failure: Some(
                args.on_failure
                    .unwrap_or_else(|| args.state_dir.join("on-failure.jsonl")),
            ),
            ..esm.config
        },
        esm_source: esm.source,
        mode: args.mode,
        settings: CacheSettings::from_source(&Env)?,
    };
    let mut stack = tokio::select! {
        stack = Stack::start(options) => stack?,
        // Dropping the half-started stack kills any child already running.
        () = &mut stop => return Ok(()),
    };
    let mut set_price = "scripts/run.sh set-price kb-001 99.99".to_owned();
    if args.state_dir != Path::new(DEFAULT_STATE_DIR) {
        set_price += &format!(" --state-dir {}", args.state_dir.display());
    }
    // Written before the banner: whoever acts on the printed address finds the state file.
    StackState::of(&stack).write(&args.state_dir)?;
    println!("{}", stack.banner(&set_price));
    let result = stack.run_until(&mut stop, StatusStyle::for_stderr()).await;
    stack.shutdown().await;
    StackState::remove_if_ours(&args.state_dir);
    result?;
    eprintln!("local-stack: stopped");
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. Registered before anything starts, so a signal
/// during start-up also goes through the orderly stop.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Where a command acts: what was given on the command line, the rest from the running stack's
/// state file (read only when something is missing).
struct Resolved {
    endpoint: String,
    redis_url: String,
    table: String,
    key_attribute: String,
}

impl Target {
    /// `redis_url`: the command's `--redis-url`, if it needs Redis at all.
    fn resolve(&self, redis_url: Option<Option<&str>>) -> Result<Resolved, Error> {
        let complete = self.endpoint.is_some() && redis_url.is_none_or(|r| r.is_some());
        let state = if complete {
            None
        } else {
            Some(StackState::read(&self.state_dir)?)
        };
        let from_state = |f: fn(&StackState) -> &String| state.as_ref().map(|s| f(s).clone());
        let settings = CacheSettings::from_source(&Env)?;
        Ok(Resolved {
            endpoint: self
                .endpoint
                .clone()
                .or_else(|| from_state(|s| &s.dynamodb_endpoint))
                .unwrap_or_default(),
            redis_url: redis_url
                .flatten()
                .map(str::to_owned)
                .or_else(|| from_state(|s| &s.redis_url))
                .unwrap_or_default(),
            table: self
                .table
                .clone()
                .or_else(|| from_state(|s| &s.table))
                .unwrap_or_else(|| local_stack::stack::DEFAULT_TABLE.into()),
            key_attribute: from_state(|s| &s.key_attribute).unwrap_or(settings.key_attribute),
        })
    }
}

async fn dynamodb(endpoint: &str) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&local_stack::table::local_sdk_config(endpoint).await)
}

async fn set_price(args: SetPriceArgs) -> Result<(), Error> {
    let at = args.target.resolve(None)?;
    let client = dynamodb(&at.endpoint).await;
    let change =
        local_stack::seed::set_price(&client, &at.table, &at.key_attribute, &args.id, &args.price)
            .await?;
    println!("{change}");
    Ok(())
}

async fn warm(args: WarmArgs) -> Result<(), Error> {
    let at = args.target.resolve(Some(args.redis_url.as_deref()))?;
    let settings = CacheSettings {
        key_attribute: at.key_attribute,
        ..CacheSettings::from_source(&Env)?
    };
    let sdk = local_stack::table::local_sdk_config(&at.endpoint).await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let ids = match (&args.ids, args.first) {
        (Some(path), _) => local_stack::warm::ids_from_file(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?,
        (None, Some(n)) => {
            local_stack::warm::first_ids(&client, &at.table, &settings.key_attribute, n).await?
        }
        (None, None) => unreachable!("clap requires --ids or --first"),
    };
    let read = ReadSettings::new(RedisSettings::new(&at.redis_url), &at.table, settings);
    let read = product_cache::read::ReadPath::build(read, &sdk).await?;
    let progress = indicatif::ProgressBar::new(ids.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("warming {bar:40} {pos}/{len} ids ({per_sec})")
            .expect("a valid template"),
    );
    let summary = local_stack::warm::warm(&read, ids, args.concurrency, || progress.inc(1)).await;
    progress.finish_and_clear();
    println!("{summary}");
    if summary.errors > 0 {
        return Err(format!("{} ids could not be warmed", summary.errors).into());
    }
    Ok(())
}
