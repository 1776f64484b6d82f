//! The settings of a checker run: sizes, the read/write mix, fault rates and the guards under
//! test, with their defaults and the `CHECKER_*` overrides.

use std::time::Duration;

use product_cache::cache::Guards;
use product_cache::config::InvalidationMode;

/// What to run. [`Config::new`] has the defaults; `CHECKER_OPS`, `CHECKER_SEED` and
/// `CHECKER_MAX_SECS` override the size, the seed and the time bound, and
/// `CHECKER_READS_PER_WRITE` the mix.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: &'static str,
    pub mode: InvalidationMode,
    pub guards: Guards,
    pub version_attribute: Option<String>,
    /// Operations (reads and writes) to issue; the run stops after them (or at `max_duration`).
    pub ops: u64,
    pub seed: u64,
    pub items: usize,
    pub writers: usize,
    pub readers: usize,
    /// The readers' pace while writers run (`CHECKER_READS_PER_WRITE`).
    pub reads_per_write: u64,
    /// Of the writes to an existing item.
    pub delete_probability: f64,
    pub lease: Duration,
    pub lease_wait: Duration,
    /// Of the readers' `GetItem`s: pause after the table answered, before the fill.
    pub slow_read_probability: f64,
    pub slow_read_pause: (Duration, Duration),
    pub max_batch: usize,
    /// Per delivered batch: first re-deliver an earlier, acknowledged batch.
    pub duplicate_probability: f64,
    /// Per delivered batch: apply a prefix of its ops, then fail.
    pub partial_failure_probability: f64,
    /// Per failed batch: retry it as two halves.
    pub bisect_probability: f64,
    pub herds: usize,
    pub herd_size: usize,
    pub max_duration: Duration,
    /// Right after the Redis restart, re-deliver every pooled acknowledged batch from before it,
    /// in order (an event source mapping resuming from an older checkpoint). The restart forgot
    /// `{key}:ver`, so this is what the cache's restart rule must survive
    /// (`old_records_replayed_after_a_restart`). Single duplicates are drawn from all
    /// acknowledged batches, before or after the restart, either way.
    pub replay_after_restart: bool,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
    )
}

impl Config {
    pub fn new(name: &'static str, mode: InvalidationMode) -> Self {
        let ops = env_u64("CHECKER_OPS").unwrap_or(5_000);
        let lease = Duration::from_millis(150);
        Self {
            name,
            mode,
            guards: Guards::default(),
            version_attribute: None,
            ops,
            seed: env_u64("CHECKER_SEED").unwrap_or(0x5EED_C0DE),
            items: 16,
            writers: 4,
            readers: 8,
            reads_per_write: env_u64("CHECKER_READS_PER_WRITE").unwrap_or(4),
            delete_probability: 0.08,
            lease,
            lease_wait: lease * 3,
            // Refresh mode misses rarely: make its few table reads slow more often.
            slow_read_probability: if mode == InvalidationMode::Delete {
                0.08
            } else {
                0.2
            },
            slow_read_pause: (lease + lease / 5, lease * 3),
            max_batch: 40,
            duplicate_probability: 0.08,
            partial_failure_probability: 0.08,
            bisect_probability: 0.5,
            herds: (ops / 100_000).clamp(3, 10) as usize,
            herd_size: 200,
            replay_after_restart: false,
            max_duration: Duration::from_secs(
                env_u64("CHECKER_MAX_SECS").unwrap_or_else(|| (ops / 2_000).max(90)),
            ),
        }
    }
}
