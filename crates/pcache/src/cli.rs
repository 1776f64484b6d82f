//! The command line's shape: every subcommand and option, as clap reads them. What the
//! subcommands do is in `commands`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use pcache::changes::When;
use product_cache::config::{CacheType, InvalidationMode};

pub const DEFAULT_STATE_DIR: &str = "target/local-stack";

#[derive(Parser)]
#[command(
    name = "pcache",
    about = "Operates the product cache: runs the whole system locally, and inspects, purges, \
             redrives and warms a cache, local or on AWS",
    after_help = "scripts/run.sh with no subcommand (or only options) runs `pcache dev`.",
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Start the whole system locally and keep it running until Ctrl-C
    ///
    /// redis-server, moto (DynamoDB + Streams) with the seeded table, the read path over HTTP and
    /// the stream invalidator behind the local event source mapping. With --cache serverless,
    /// a local ElastiCache Serverless stand-in in place of the redis-server.
    ///
    /// The functions read the variables they read on Lambda (LEASE_MS, REDIS_TIMEOUT_MS,
    /// DYNAMODB_TIMEOUT_MS, INSPECT_GRACE_MS, ...), each its own, in this order: the environment
    /// pcache dev runs in; then the function's Environment in --template (a !Ref to a
    /// parameter read as its Default; values computed at deploy time count as unset); then the
    /// code's defaults. The cache's connection (REDIS_URL, REDIS_CLUSTER, ...) and TABLE_NAME are
    /// the local stack's own. The banner lists every variable whose value differs from the
    /// template's. Every variable: docs/configuration.md.
    // `run` was this subcommand's name before the command was called pcache.
    #[command(alias = "run")]
    Dev(DevArgs),
    /// A one-shot walk of a price change through the system, step by step
    Demo {
        /// What the invalidator does with a change
        #[arg(long, default_value = "delete")]
        mode: InvalidationMode,
    },
    /// Change a product's price in the running stack's table, as any writer would
    SetPrice(SetPriceArgs),
    /// Pre-load products into the cache through the read path
    Warm(WarmArgs),
    /// Compare cached products with the table, side by side
    ///
    /// By default a sample of cached keys (or the ids given); with --changes, the keys the
    /// table's stream says changed in a time range, each judged on its newest change (the
    /// change monitor). Exits 1 when something inconsistent is left in place.
    Inspect(InspectArgs),
    /// Delete products' cached copies the safe way (their leases too)
    Purge(PurgeArgs),
    /// Apply again the stream batches the invalidator gave up on
    Redrive(RedriveArgs),
}

#[derive(Args)]
pub struct DevArgs {
    /// Address of the HTTP API (port 0: any free port)
    #[arg(long, default_value = local_stack::stack::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// The DynamoDB table, created if missing and seeded if empty
    #[arg(long, default_value = local_stack::stack::DEFAULT_TABLE)]
    pub table: String,
    /// A running Redis to use instead of starting redis-server
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// The kind of cache to start: `nodes`, one redis-server (a node-based cache); or
    /// `serverless`, a local stand-in for ElastiCache Serverless (a TLS endpoint answering as a
    /// one-shard cluster, a reader endpoint, IAM authentication, the commands serverless lacks
    /// refused, volatile-lru) over a redis-server and its replica, the functions configured as
    /// on serverless (REDIS_CACHE_TYPE=serverless, REDIS_CA_FILE, REDIS_IAM_USER,
    /// REDIS_IAM_CACHE_NAME, REDIS_CONFIRM_REPLICAS=0)
    #[arg(long, value_name = "nodes|serverless", default_value = "nodes")]
    pub cache: CacheType,
    /// A running DynamoDB with Streams to use instead of starting moto
    #[arg(long, env = "AWS_ENDPOINT_URL_DYNAMODB")]
    pub endpoint: Option<String>,
    /// The SAM template whose invalidator event source configures the stream poller, and whose
    /// functions' Environment gives the variables the environment does not set
    #[arg(long, default_value = "infra/template.yaml")]
    pub template: PathBuf,
    /// Where records the poller gives up on are written [default: <state-dir>/on-failure.jsonl]
    #[arg(long)]
    pub on_failure: Option<PathBuf>,
    /// Where both functions' metrics are appended, as CloudWatch EMF lines
    /// [default: <state-dir>/metrics.jsonl]
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Where the running stack's state file goes, for set-price and warm
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// What the invalidator does with a change [default: the template's INVALIDATION_MODE, or
    /// delete]
    #[arg(long, env = "INVALIDATION_MODE")]
    pub mode: Option<InvalidationMode>,
    /// Products written to an empty table
    #[arg(long, default_value_t = local_stack::seed::DEFAULT_PRODUCTS)]
    pub seed: usize,
    /// Run without the change monitor (the inspector as the stream's second reader, judging
    /// each change a grace period after it; its metrics go with the others)
    #[arg(long)]
    pub no_change_monitor: bool,
}

/// Which system a command acts on: the running local stack (its state file), endpoints given
/// here, or real AWS (`--region`/`--profile`, or `--table` with no local stack running).
#[derive(Args)]
pub struct Target {
    /// The state directory of the running stack
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// AWS endpoint (DynamoDB, its stream, SQS), instead of the running stack's
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The table [default: the running stack's, or TABLE_NAME]
    #[arg(long)]
    pub table: Option<String>,
    /// Redis, instead of the running stack's [env: REDIS_URL; with REDIS_CLUSTER, REDIS_AUTH_SECRET_ARN, ... as the functions read them]
    #[arg(long)]
    pub redis_url: Option<String>,
    /// AWS region: act on real AWS, through the standard SDK configuration
    #[arg(long)]
    pub region: Option<String>,
    /// AWS profile: act on real AWS, through the standard SDK configuration
    #[arg(long)]
    pub profile: Option<String>,
    /// Bound on one attempt of an AWS call (DynamoDB, its stream, SQS): a hung connection costs
    /// this, then the SDK retries
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub aws_attempt_timeout_ms: u64,
    /// Bound on one AWS call with all its retries
    #[arg(long, value_name = "MS", default_value_t = 30000, value_parser = clap::value_parser!(u64).range(1..))]
    pub aws_timeout_ms: u64,
}

#[derive(Args)]
pub struct SetPriceArgs {
    /// Product id, e.g. kb-001
    pub id: String,
    /// New price, e.g. 99.99
    pub price: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["ids", "first"]))]
pub struct WarmArgs {
    /// A file of product ids, one per line
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// The first N ids a Scan of the table returns
    #[arg(long)]
    pub first: Option<usize>,
    /// Batch reads (of up to 100 ids each) in flight at once
    #[arg(long, default_value_t = pcache::warm::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Product ids to look at [default: a random sample of cached keys]
    pub ids: Vec<String>,
    /// How many cached keys to sample (from every primary of a cluster)
    #[arg(long, default_value_t = 200)]
    pub sample: usize,
    /// How long a difference must last to count (changes in flight settle within it); with
    /// --changes, how old a batch's newest change must be (plus 1 s) before it is judged
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub grace_ms: u64,
    /// Purge what is found inconsistent (the key and its lease)
    #[arg(long)]
    pub repair: bool,
    /// Check the changes the table's stream holds for a time range (every shard, from its
    /// oldest record), instead of cached keys; set INVALIDATOR_PARALLELIZATION_FACTOR as the
    /// inspector function has it if the invalidator's mapping runs several batches a shard
    #[arg(long, conflicts_with_all = ["ids", "sample"])]
    pub changes: bool,
    /// Start of the range: an RFC 3339 time (2026-12-03T10:00:00Z) or a duration ago (15m, 2h);
    /// the stream keeps 24 h [default: 1h]
    #[arg(long, value_name = "WHEN", requires = "changes")]
    pub since: Option<When>,
    /// End of the range, as --since [default: now]
    #[arg(long, value_name = "WHEN", requires = "changes")]
    pub until: Option<When>,
    /// The share of changed keys to judge, above 0 and at most 1 (the same keys every run)
    #[arg(long, default_value_t = 1.0, value_parser = share, requires = "changes")]
    pub share: f64,
    /// Empty stream pages in a row after which a shard's read stops (a shard can answer empty
    /// pages before the records it holds; an open one answers them after its newest)
    #[arg(long, default_value_t = pcache::pages::DEFAULT_MAX_EMPTY_PAGES, value_parser = clap::value_parser!(u32).range(1..), requires = "changes")]
    pub max_empty_pages: u32,
    #[command(flatten)]
    pub target: Target,
}

fn share(s: &str) -> Result<f64, String> {
    s.parse()
        .ok()
        .filter(|share: &f64| *share > 0.0 && *share <= 1.0)
        .ok_or_else(|| format!("{s:?}: a share above 0 and at most 1"))
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["ids", "from_file"]))]
pub struct PurgeArgs {
    /// Product ids whose cached copies to delete
    pub ids: Vec<String>,
    /// A file of product ids, one per line
    #[arg(long)]
    pub from_file: Option<PathBuf>,
    /// Say what would be deleted, delete nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args)]
pub struct RedriveArgs {
    /// The on-failure SQS queue [default: the local stack's on-failure file]
    #[arg(long, conflicts_with = "from_file")]
    pub queue_url: Option<String>,
    /// An on-failure file (one record per line) [default: <state-dir>/on-failure.jsonl]
    #[arg(long)]
    pub from_file: Option<PathBuf>,
    /// What the invalidator does with a change, as the function is configured
    #[arg(long, env = "INVALIDATION_MODE", default_value = "delete")]
    pub mode: InvalidationMode,
    /// Say what would be applied or purged, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Empty stream pages in a row after which a range is left for the next redrive (a shard
    /// can answer empty pages before the records it holds)
    #[arg(long, default_value_t = pcache::pages::DEFAULT_MAX_EMPTY_PAGES, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_empty_pages: u32,
    /// How long each receive from the queue waits for messages (SQS long polling); the queue is
    /// drained when a receive answers nothing
    #[arg(long, value_name = "SECONDS", default_value_t = pcache::redrive::DEFAULT_RECEIVE_WAIT_SECONDS, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub wait_seconds: u32,
    #[command(flatten)]
    pub target: Target,
}
