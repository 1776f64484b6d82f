//! The benchmark: every figure of the performance budget against its baseline, measured in the
//! same run, on loopback and again through a proxy adding ElastiCache's cross-AZ round trip.
//! Starts its own `redis-server`, Redis Cluster and `moto_server` like the tests do.
//!
//! Run it with `scripts/bench.sh` (docs/benchmarks.md); it is not part of the tests.

mod compare;
mod counting;
mod env;
mod figures;
mod records;
mod report;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use product_cache::config::InvalidationMode;

use crate::env::Env;
use crate::report::{Budget, Machine, Net, Row, Unit};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs the performance budget's figures against their baselines; prints a table, writes
/// JSON and BENCHMARKS.md, and exits 1 if a budget is missed.
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Args {
    /// Smaller sizes, for trying it out (the figures are not the reference ones).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Do not rewrite BENCHMARKS.md (it is not rewritten with --only either, unless --merge).
    #[arg(long)]
    no_write: bool,
    /// With --only: put these figures' rows into BENCHMARKS.md in place of the ones it has,
    /// keeping every other row of the full run it was written by, and note the run they come
    /// from (for a figure added or changed since that run).
    #[arg(long, requires = "only")]
    merge: bool,
    /// Run only these figures (comma-separated or repeated).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    only: Vec<Figure>,
    /// The round-trip delay the proxy adds, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0.5)]
    delay_ms: f64,
    /// The invalidation mode of the flash sale.
    #[arg(long, value_name = "MODE", default_value = "refresh")]
    flash_sale_mode: InvalidationMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Figure {
    HitRedisTime,
    HitLatency,
    MissLatency,
    BatchRead,
    BatchReadMiss,
    Batch,
    Refresh,
    EvictionGuard,
    ClusterHotKey,
    ColdStart,
    FlashSale,
    Degraded,
    GameDay,
    Memory,
    ChangeMonitor,
    Ecpu,
}

impl Figure {
    const ALL: [Figure; 16] = [
        Figure::HitRedisTime,
        Figure::HitLatency,
        Figure::MissLatency,
        Figure::BatchRead,
        Figure::BatchReadMiss,
        Figure::Batch,
        Figure::Refresh,
        Figure::EvictionGuard,
        Figure::ClusterHotKey,
        Figure::ColdStart,
        Figure::FlashSale,
        Figure::Degraded,
        Figure::GameDay,
        Figure::Memory,
        Figure::ChangeMonitor,
        Figure::Ecpu,
    ];

    fn name(self) -> &'static str {
        match self {
            Figure::HitRedisTime => "hit-redis-time",
            Figure::HitLatency => "hit-latency",
            Figure::MissLatency => "miss-latency",
            Figure::BatchRead => "batch-read",
            Figure::BatchReadMiss => "batch-read-miss",
            Figure::Batch => "batch",
            Figure::Refresh => "refresh",
            Figure::EvictionGuard => "eviction-guard",
            Figure::ClusterHotKey => "cluster-hot-key",
            Figure::ColdStart => "cold-start",
            Figure::FlashSale => "flash-sale",
            Figure::Degraded => "degraded",
            Figure::GameDay => "game-day",
            Figure::Memory => "memory",
            Figure::ChangeMonitor => "change-monitor",
            Figure::Ecpu => "ecpu",
        }
    }

    fn needs_moto(self) -> bool {
        matches!(
            self,
            Figure::MissLatency
                | Figure::BatchReadMiss
                | Figure::ColdStart
                | Figure::FlashSale
                | Figure::Degraded
                | Figure::GameDay
                | Figure::ChangeMonitor
                | Figure::Ecpu
        )
    }
}

/// How much of everything: the default sizes keep each figure to a minute or two on a 2-core
/// machine; `--quick` to seconds.
pub struct Sizes {
    pub load_callers: usize,
    pub load_time: Duration,
    pub latency_requests: usize,
    pub latency_requests_proxy: usize,
    pub misses: usize,
    pub batch_read_requests: usize,
    pub batch_read_requests_proxy: usize,
    pub batch_read_misses: usize,
    pub batch_records: usize,
    pub batch_keys: usize,
    pub batch_reps: usize,
    pub refresh_records: usize,
    pub refresh_bytes: usize,
    pub refresh_reps: usize,
    pub guard_rounds: usize,
    pub memory_keys: usize,
    pub hot_key_records: usize,
    pub cold_runs: usize,
    pub sale_products: usize,
    pub sale_reads: usize,
    pub sale_readers: usize,
    pub sale_write_share: f64,
    pub sale_zipf_s: f64,
    pub stall_rounds: usize,
    pub stall_reads: usize,
    pub game_day_products: usize,
    pub game_day_healthy: Duration,
    pub game_day_down: Duration,
    pub game_day_stall: Duration,
    pub monitor_products: usize,
    pub monitor_change_every: Duration,
    pub monitor_min_sample_runs: usize,
    pub ecpu_ops: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        let pick = |full: usize, small: usize| if quick { small } else { full };
        Sizes {
            load_callers: 16,
            load_time: Duration::from_millis(if quick { 1500 } else { 5000 }),
            latency_requests: pick(5000, 1000),
            latency_requests_proxy: pick(2000, 500),
            misses: pick(200, 50),
            batch_read_requests: pick(2000, 400),
            batch_read_requests_proxy: pick(600, 200),
            batch_read_misses: pick(30, 6),
            batch_records: 10_000,
            batch_keys: 5_000,
            // Alternating samples, each side's median compared: with 5, two runs of one commit
            // differed by up to 2.4x (1.3x to 3.2x), mostly in the baseline's; 21 keep them
            // within 15% of each other.
            batch_reps: pick(21, 3),
            refresh_records: 1000,
            refresh_bytes: 5000,
            refresh_reps: pick(21, 3),
            guard_rounds: pick(15, 4),
            // 0.75 of a power of two: the dicts' bucket arrays as full as a big node's are on
            // average (they double when full).
            memory_keys: pick(24_576, 6_144),
            hot_key_records: 1000,
            cold_runs: pick(5, 2),
            sale_products: pick(100_000, 10_000),
            sale_reads: pick(400_000, 40_000),
            sale_readers: 64,
            sale_write_share: 0.01,
            sale_zipf_s: 1.1,
            stall_rounds: pick(5, 2),
            stall_reads: pick(200, 50),
            game_day_products: pick(300, 60),
            game_day_healthy: Duration::from_secs(if quick { 5 } else { 10 }),
            game_day_down: Duration::from_secs(if quick { 15 } else { 60 }),
            game_day_stall: Duration::from_secs(10),
            monitor_products: pick(100_000, 10_000),
            // 25 changes a second: some 250 a 10 s window, a quarter of the mapping's BatchSize.
            monitor_change_every: Duration::from_millis(40),
            monitor_min_sample_runs: pick(20, 10),
            ecpu_ops: pick(500, 100),
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the selected figures; `Ok(false)` when a budget was missed.
async fn run(args: Args) -> Result<bool, Error> {
    let started = Instant::now();
    let sizes = Sizes::new(args.quick);
    let figures: Vec<Figure> = if args.only.is_empty() {
        Figure::ALL.to_vec()
    } else {
        Figure::ALL
            .into_iter()
            .filter(|f| args.only.contains(f))
            .collect()
    };
    let delay = Duration::from_secs_f64(args.delay_ms / 1e3);
    let machine = Machine::probe();
    eprintln!(
        "bench: {} x {}, {}; {}; proxy delay {} ms{}",
        machine.nproc,
        machine.cpu,
        machine.memory,
        machine.redis,
        args.delay_ms,
        if args.quick { "; quick sizes" } else { "" }
    );
    let env = Env::start(delay, figures.iter().any(|f| f.needs_moto())).await?;
    let (ping_direct, ping_proxy) = env.ping_times().await?;
    eprintln!(
        "bench: median PING {ping_direct:.3} ms direct, {ping_proxy:.3} ms through the proxy"
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    if env.moto_gc_off {
        notes.push(
            "moto (the local DynamoDB) ran with Python's cyclic garbage collector off: with it on, \
             its collections over the flash sale's 100,000-item table stalled requests for \
             seconds (crates/bench/src/env.rs)"
                .into(),
        );
    }
    let mut miss_table: Option<(String, Vec<String>)> = None;
    if figures.contains(&Figure::MissLatency)
        || figures.contains(&Figure::BatchReadMiss)
        || figures.contains(&Figure::ColdStart)
        || figures.contains(&Figure::Degraded)
    {
        // Each network's misses (three contenders) need products nobody has read, plus the
        // warm-ups'.
        let n = (6 * sizes.misses + 40).max(100);
        miss_table = Some(figures::miss::prepare_table(&env, n).await?);
    }
    for &figure in &figures {
        let figure_started = Instant::now();
        let mut cluster = None;
        let mut sale = None;
        if matches!(
            figure,
            Figure::ClusterHotKey
                | Figure::EvictionGuard
                | Figure::BatchRead
                | Figure::BatchReadMiss
        ) {
            cluster = Some(local_stack::services::RedisCluster::start_with_delay(3, delay).await?);
        }
        if figure == Figure::FlashSale {
            eprintln!(
                "bench: flash-sale: seeding {} products into moto ...",
                sizes.sale_products
            );
            let (prepared, took) = figures::flash_sale::prepare(&env, &sizes).await?;
            let note = format!(
                "flash-sale: seeding {} products into moto took {:.0} s (not part of any figure)",
                sizes.sale_products,
                took.as_secs_f64()
            );
            eprintln!("bench: {note}");
            notes.push(note);
            sale = Some(prepared);
        }
        // ECPUs are counted at the server: the proxy would change nothing.
        let nets: &[Net] = if figure == Figure::Ecpu {
            &[Net::Loopback]
        } else {
            &[Net::Loopback, Net::Proxy]
        };
        for &net in nets {
            eprintln!("bench: {} ({}) ...", figure.name(), net.label());
            let result = match figure {
                Figure::HitRedisTime => figures::hit::redis_time(&env, &sizes, net).await,
                Figure::HitLatency => figures::hit::latency(&env, &sizes, net).await,
                Figure::MissLatency => {
                    let (table, ids) = miss_table.as_ref().expect("prepared above");
                    // Half of the products for each network, none read before.
                    let half = ids.len() / 2;
                    let ids = match net {
                        Net::Loopback => &ids[..half],
                        Net::Proxy => &ids[half..],
                    };
                    figures::miss::latency(&env, &sizes, net, table, ids).await
                }
                Figure::BatchRead => {
                    let cluster = cluster.as_ref().expect("started above");
                    figures::batch_read::hits(&env, &sizes, net, cluster).await
                }
                Figure::BatchReadMiss => {
                    let cluster = cluster.as_ref().expect("started above");
                    let (table, ids) = miss_table.as_ref().expect("prepared above");
                    figures::batch_read::misses(&env, &sizes, net, cluster, table, ids).await
                }
                Figure::Batch => figures::batch::mixed(&env, &sizes, net).await,
                Figure::Refresh => figures::batch::refresh(&env, &sizes, net).await,
                Figure::EvictionGuard => {
                    let cluster = cluster.as_ref().expect("started above");
                    figures::eviction_guard::run(&env, &sizes, net, cluster).await
                }
                Figure::ClusterHotKey => {
                    let cluster = cluster.as_ref().expect("started above");
                    figures::cluster::hot_key(&env, &sizes, net, cluster, delay).await
                }
                Figure::ColdStart => {
                    let (table, _) = miss_table.as_ref().expect("prepared above");
                    figures::cold::cold_start(&env, &sizes, net, table).await
                }
                Figure::FlashSale => {
                    let sale = sale.as_ref().expect("prepared above");
                    figures::flash_sale::run(&env, &sizes, net, sale, args.flash_sale_mode).await
                }
                Figure::Degraded => {
                    // Products the misses do not use (they were read by the cold starts at
                    // most): these reads fill them first anyway.
                    let (table, ids) = miss_table.as_ref().expect("prepared above");
                    figures::degraded::stall(&env, &sizes, net, table, ids).await
                }
                Figure::GameDay => figures::game_day::run(&env, &sizes, net).await,
                Figure::Memory => figures::memory::run(&env, &sizes, net).await,
                Figure::ChangeMonitor => figures::change_monitor::run(&env, &sizes, net).await,
                Figure::Ecpu => figures::ecpu::on_serverless(&env, &sizes).await,
            };
            let new_rows = result.unwrap_or_else(|e| vec![failed_row(figure, net, &e)]);
            for row in &new_rows {
                eprintln!(
                    "bench:   {} {}: {} ({})",
                    row.what,
                    if row.pass() { "pass" } else { "FAIL" },
                    if row.measured.is_finite() {
                        row.unit.format(row.measured)
                    } else {
                        "-".into()
                    },
                    row.failure.as_deref().unwrap_or(&row.note),
                );
            }
            rows.extend(new_rows);
        }
        eprintln!(
            "bench: {} took {:.0} s",
            figure.name(),
            figure_started.elapsed().as_secs_f64()
        );
    }

    let command = std::iter::once("scripts/bench.sh".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let run = report::Run {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        command,
        quick: args.quick,
        machine: &machine,
        delay,
        ping_direct_ms: ping_direct,
        ping_proxy_ms: ping_proxy,
        rows: &rows,
        notes: &notes,
        elapsed: started.elapsed(),
    };
    println!("{}", report::text_table(&rows));
    for note in &notes {
        println!("note: {note}");
    }
    if let Some(path) = &args.json {
        report::write_file(path, &serde_json::to_string_pretty(&run.json())?)?;
        eprintln!("bench: wrote {}", path.display());
    }
    if args.no_write {
        eprintln!("bench: BENCHMARKS.md left as it was (--no-write)");
    } else if args.merge {
        let path = workspace_root().join("BENCHMARKS.md");
        let names: Vec<&str> = figures.iter().map(|f| f.name()).collect();
        let merged = report::merge_markdown(&std::fs::read_to_string(&path)?, &run, &names)?;
        report::write_file(&path, &merged)?;
        eprintln!("bench: merged {} into {}", names.join(", "), path.display());
    } else if !args.only.is_empty() {
        eprintln!("bench: BENCHMARKS.md left as it was (--only ran part of the figures)");
    } else {
        let path = workspace_root().join("BENCHMARKS.md");
        report::write_file(&path, &run.markdown())?;
        eprintln!("bench: wrote {}", path.display());
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.pass()).collect();
    println!(
        "{} of {} checks within budget; took {:.0} s",
        rows.len() - failed.len(),
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        println!("over budget:");
        for row in &failed {
            println!(
                "  {}: {} ({}): {} {}",
                row.figure,
                row.what,
                row.net.label(),
                row.ratio().map(|r| format!("{r:.2}x")).unwrap_or_else(|| {
                    if row.measured.is_finite() {
                        row.unit.format(row.measured)
                    } else {
                        "-".into()
                    }
                }),
                match &row.failure {
                    Some(f) => format!("({f}); budget {}", row.budget_text()),
                    None => format!("budget {}", row.budget_text()),
                }
            );
        }
    }
    Ok(failed.is_empty())
}

/// A figure that could not be measured is a missed budget, with the reason.
fn failed_row(figure: Figure, net: Net, error: &Error) -> Row {
    Row {
        figure: figure.name(),
        what: "could not be measured".into(),
        net,
        judged_on: "-",
        unit: Unit::Count,
        measured: f64::NAN,
        baseline: None,
        baseline_label: "-".into(),
        budget: Budget::AtMost(0.0),
        note: String::new(),
        failure: Some(error.to_string()),
    }
}
