//! The cache inspector, run alongside the actors as it runs on a schedule in production: one
//! inspection after another over every item, until the run is done. In a run that must be clean
//! it must find nothing (a key that differs from the table past the grace period is a stale
//! value that stuck); in a run with a guard off, what it found is reported beside the checker's
//! own violations.

use std::time::Duration;

use product_cache::inspect::{InspectSettings, Inspector, Target, Verdict};
use tokio::task::JoinHandle;

use super::actors::{Phase, Shared};
use super::system::Sut;

/// The functions' default. Longer than the invalidator's lag under the checker's faults: a
/// failover holds a shard's batches back for up to about 3 s (the staleness maximum of the
/// cluster runs), and with a 2 s grace the inspector rightly counted a key whose invalidation
/// waited out the failover.
pub const GRACE: Duration = Duration::from_secs(5);

/// What the inspections found, over the run.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub runs: u64,
    pub checked: u64,
    pub settled: u64,
    /// `<key> (run n)` for every inconsistency found.
    pub inconsistent: Vec<String>,
    /// Inspections that failed (Redis down during a data loss or a failover).
    pub errors: u64,
    /// The first and the last reason an inspection failed.
    pub first_error: Option<String>,
    pub last_error: Option<String>,
    /// The metrics lines of every inspection, as the inspector function writes them.
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The inspection once the stream was drained: the keys it found inconsistent. Invariant 3
    /// looks at the same state, so the two must agree.
    pub at_rest: Vec<String>,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "inspector: {} runs, {} keys checked, {} settled within {GRACE:?}, {} inconsistent, {} failed runs",
            self.runs,
            self.checked,
            self.settled,
            self.inconsistent.len(),
            self.errors
        )?;
        if !self.inconsistent.is_empty() {
            write!(f, " (first: {})", self.inconsistent[0])?;
        }
        if let (Some(first), Some(last)) = (&self.first_error, &self.last_error) {
            write!(f, " (first: {first}; last: {last})")?;
        }
        write!(f, "; at rest: {} inconsistent", self.at_rest.len())
    }
}

async fn inspector(sut: &Sut, items: usize) -> Inspector<product_cache::store::DynamoStore> {
    let inspect = InspectSettings {
        sample: items,
        grace: GRACE,
        repair: false,
        ..InspectSettings::default()
    };
    Inspector::new(
        sut.cache(&sut.settings).await,
        sut.store(),
        sut.settings.clone(),
        inspect,
    )
}

fn inconsistent(report: &product_cache::inspect::Report) -> impl Iterator<Item = &str> {
    report
        .rows
        .iter()
        .filter(|r| r.verdict == Verdict::Inconsistent)
        .map(|r| r.key.as_str())
}

/// One inspection of every item once the stream is drained and nothing changes any more. Its
/// metrics line joins the others: in a short run it may be the only one that checked a key.
pub async fn at_rest(sut: &Sut, items: &[String], tally: &mut Tally) {
    let report = inspector(sut, items.len())
        .await
        .with_metrics(
            product_cache::metrics::MetricsSettings::default(),
            product_cache::metrics::Sink::Memory(tally.lines.clone()),
        )
        .run(Target::Ids(items.to_vec()))
        .await
        .expect("the inspection at rest");
    tally.at_rest = inconsistent(&report).map(str::to_owned).collect();
    tally.checked += report.checked() as u64;
}

pub async fn spawn(sut: &Sut, shared: &std::sync::Arc<Shared>) -> JoinHandle<Tally> {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let inspector = inspector(sut, shared.items.len()).await.with_metrics(
        product_cache::metrics::MetricsSettings::default(),
        product_cache::metrics::Sink::Memory(lines.clone()),
    );
    let ids = shared.items.clone();
    let mut phase = shared.phase.subscribe();
    tokio::spawn(async move {
        let mut tally = Tally {
            lines,
            ..Tally::default()
        };
        while *phase.borrow_and_update() != Phase::Done {
            tally.runs += 1;
            // A run going on when the actors stop is finished (at most a grace period more):
            // with runs of a grace period each, cutting it would leave a short run unjudged.
            match inspector.run(Target::Ids(ids.clone())).await {
                Ok(report) => {
                    tally.checked += report.checked() as u64;
                    tally.settled += report.count(Verdict::Settled) as u64;
                    let run = tally.runs;
                    tally
                        .inconsistent
                        .extend(inconsistent(&report).map(|key| format!("{key} (run {run})")));
                }
                Err(error) => {
                    tally.errors += 1;
                    let mut error: &dyn std::error::Error = &error;
                    let mut text = error.to_string();
                    while let Some(cause) = error.source() {
                        text = format!("{text}: {cause}");
                        error = cause;
                    }
                    let error = text;
                    tally.first_error.get_or_insert_with(|| error.clone());
                    tally.last_error = Some(error);
                }
            }
        }
        tally
    })
}
