//! What each subcommand does, on top of the local-stack library: `dev` runs a stack in the
//! foreground until a signal (over a serverless stand-in with `--cache serverless`: see
//! `serverless`); `set-price` and `warm` find the running stack through its state file and act
//! on it.

use std::path::Path;

use local_stack::stack::{FunctionVariables, Stack, StackOptions, StackState, StatusStyle};
use product_cache::config::{CacheSettings, CacheType, Env, Function, InvalidationMode};

use crate::cli::{DevArgs, SetPriceArgs, Target, WarmArgs, DEFAULT_STATE_DIR};
use crate::serverless::{with_redis_lines, LocalServerless};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub async fn dev(args: DevArgs) -> Result<(), Error> {
    let mut stop = std::pin::pin!(stop_signal()?);
    eprintln!("pcache: starting (moto takes a few seconds)...");
    let esm = local_stack::esm_template::local(&args.template)?;
    for property in &esm.not_emulated {
        eprintln!(
            "pcache: {property} in {} is not emulated locally",
            args.template.display()
        );
    }
    // The variables the functions read, each function's own: the environment, then the
    // template's values, then the defaults (docs/configuration.md).
    let variables = FunctionVariables::resolve(&Env, &args.template)?;
    let mode = match args.mode {
        Some(mode) => mode,
        None => variables
            .get(Function::Invalidator, "INVALIDATION_MODE")
            .map(|m| m.parse::<InvalidationMode>())
            .transpose()
            .map_err(|e| format!("INVALIDATION_MODE in {}: {e}", args.template.display()))?
            .unwrap_or(InvalidationMode::Delete),
    };
    let settings = CacheSettings::from_source(variables.of(Function::Read))?;
    let serverless = match args.cache {
        CacheType::Nodes => None,
        CacheType::Serverless => {
            if args.redis_url.is_some() {
                return Err(
                    "--cache serverless starts a serverless stand-in; --redis-url (or \
                            REDIS_URL) names a Redis to use instead: give one of them"
                        .into(),
                );
            }
            tokio::select! {
                started = LocalServerless::start(&settings) => Some(started?),
                () = &mut stop => return Ok(()),
            }
        }
    };
    let options = StackOptions {
        listen: args.listen,
        table: args.table,
        redis_url: args.redis_url,
        redis_settings: serverless.as_ref().map(|s| s.redis.clone()),
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
        mode,
        variables,
        metrics: Some(
            args.metrics
                .unwrap_or_else(|| args.state_dir.join("metrics.jsonl")),
        ),
        change_monitor: (!args.no_change_monitor).then(local_stack::stack::change_monitor_esm),
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
    let banner = stack.banner(&set_price);
    match &serverless {
        Some(serverless) => println!("{}", with_redis_lines(&banner, &serverless.banner_lines())),
        None => println!("{banner}"),
    }
    let result = stack.run_until(&mut stop, StatusStyle::for_stderr()).await;
    stack.shutdown().await;
    StackState::remove_if_ours(&args.state_dir);
    // After the functions: the stand-in's front and its servers.
    drop(serverless);
    result?;
    eprintln!("pcache: stopped");
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

/// Where `set-price` acts: the endpoint and table given, the rest from the running stack's
/// state file. Never real AWS: it is the local stack's stand-in for a writer.
struct Resolved {
    endpoint: String,
    table: String,
    key_attribute: String,
}

impl Target {
    fn resolve(&self) -> Result<Resolved, Error> {
        let state = match self.endpoint {
            Some(_) => None,
            None => Some(StackState::read(&self.state_dir)?),
        };
        let from_state = |f: fn(&StackState) -> &String| state.as_ref().map(|s| f(s).clone());
        let settings = CacheSettings::from_source(&Env)?;
        Ok(Resolved {
            endpoint: self
                .endpoint
                .clone()
                .or_else(|| from_state(|s| &s.dynamodb_endpoint))
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

pub async fn set_price(args: SetPriceArgs) -> Result<(), Error> {
    let at = args.target.resolve()?;
    let client = dynamodb(&at.endpoint).await;
    let change =
        local_stack::seed::set_price(&client, &at.table, &at.key_attribute, &args.id, &args.price)
            .await?;
    println!("{change}");
    Ok(())
}

pub async fn warm(args: WarmArgs) -> Result<(), Error> {
    let place = args.target.place().await?;
    let sdk = place.sdk.clone();
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let settings = place.settings.clone();
    let ids = match (&args.ids, args.first) {
        (Some(path), _) => pcache::warm::ids_from_file(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?,
        (None, Some(n)) => {
            pcache::warm::first_ids(&client, &place.table, &settings.key_attribute, n).await?
        }
        (None, None) => unreachable!("clap requires --ids or --first"),
    };
    let read = product_cache::read::ReadPath::build(place.read_settings(), &sdk).await?;
    // A one-shot process: wait for the cache's connections (TLS, IAM, the slot map) before the
    // first batch, or it would bypass while they form.
    if let Err(e) = read.cache().ready(place.redis.connect_timeout).await {
        eprintln!("pcache: the cache is not reachable yet ({e}); reads will bypass it");
    }
    let progress = indicatif::ProgressBar::new(ids.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("warming {bar:40} {pos}/{len} ids ({per_sec})")
            .expect("a valid template"),
    );
    let summary = pcache::warm::warm(&read, ids, args.concurrency, || progress.inc(1)).await;
    progress.finish_and_clear();
    println!("{summary}");
    if summary.errors > 0 {
        return Err(format!("{} ids could not be warmed", summary.errors).into());
    }
    Ok(())
}
