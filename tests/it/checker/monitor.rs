//! The change monitor, run alongside the actors as its event source mapping runs it in
//! production: the stream's second reader, a window's records at a time, each batch judged a
//! grace period after its newest change. In a clean run it must find nothing; with the leases
//! off it must find every stale key invariant 3 finds at the end.
//!
//! Online, a verdict depends on how the stream's records fell into batches: a change whose key
//! lost its position (a primary lost with the key's last writes) is known applied only if a
//! later change of the same batch holds its own position, and otherwise stays pending. So once
//! the run is done (the invalidator has acknowledged every record), the monitor judges every
//! change of the run once more, all in one batch: that final look is what the guard-off runs'
//! assertion counts with the online findings, and a clean run must find nothing in either.

use std::collections::BTreeSet;
use std::time::Duration;

use local_stack::stream::Position;
use product_cache::inspect::{InspectSettings, Inspector};
use product_cache::monitor::ChangeVerdict;
use tokio::task::JoinHandle;

use super::actors::{Phase, Shared};
use super::inspector::GRACE;
use super::system::Sut;

/// How often the stream is read: the mapping's batching window, shortened for a 90 s run.
const WINDOW: Duration = Duration::from_secs(1);

/// What the monitor found over the run.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub batches: u64,
    pub records: u64,
    pub checked: u64,
    pub pending: u64,
    pub superseded: u64,
    pub unchecked: u64,
    /// The first reason a batch went unchecked, and stream reads that failed.
    pub error: Option<String>,
    pub stream_errors: u64,
    pub max_pending: Duration,
    /// Every key found inconsistent, once.
    pub inconsistent: BTreeSet<String>,
    /// Every key the final look (every change of the run, judged at once after the
    /// invalidator drained) found inconsistent.
    pub final_look: BTreeSet<String>,
    /// Of the final look: changes it judged pending, and changes it could not judge (with
    /// the first reason), which would leave a stale key unfound.
    pub final_pending: usize,
    pub final_unchecked: usize,
    pub final_error: Option<String>,
}

impl Tally {
    /// Every key found inconsistent, online or by the final look.
    pub fn found(&self) -> BTreeSet<String> {
        self.inconsistent.union(&self.final_look).cloned().collect()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "change monitor: {} batches, {} records, {} changes judged after {GRACE:?}: {} \
             inconsistent keys, {} pending (oldest {:.1} s), {} superseded, {} unchecked",
            self.batches,
            self.records,
            self.checked,
            self.inconsistent.len(),
            self.pending,
            self.max_pending.as_secs_f64(),
            self.superseded,
            self.unchecked
        )?;
        if let Some(first) = self.inconsistent.first() {
            write!(f, " (first: {first})")?;
        }
        write!(
            f,
            "; the final look at every change found {} inconsistent keys ({} pending, {} \
             unchecked{})",
            self.final_look.len(),
            self.final_pending,
            self.final_unchecked,
            self.final_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )?;
        if let Some(error) = &self.error {
            write!(f, " (first unchecked: {error})")?;
        }
        if self.stream_errors > 0 {
            write!(f, ", {} failed stream reads", self.stream_errors)?;
        }
        Ok(())
    }
}

pub async fn spawn(sut: &Sut, shared: &std::sync::Arc<Shared>) -> JoinHandle<Tally> {
    let monitor = Inspector::new(
        sut.cache(&sut.settings).await,
        sut.store(),
        sut.settings.clone(),
        InspectSettings {
            grace: GRACE,
            ..InspectSettings::default()
        },
    );
    let stream = sut.stream.clone();
    let mut phase = shared.phase.subscribe();
    tokio::spawn(async move {
        let mut tally = Tally::default();
        // Each shard's iterator, kept from window to window as a mapping keeps its place. (Not
        // `read_available`: it reads until a page comes back empty, which under steady writes
        // is only once they stop.)
        let mut iterators: Vec<Option<String>> = Vec::new();
        let mut every: Vec<serde_json::Value> = Vec::new();
        loop {
            // Once the run is done (the stream drained, every record acknowledged), one last
            // read takes what is left.
            let last = *phase.borrow_and_update() == Phase::Done;
            if iterators.is_empty() {
                match stream.shards().await {
                    Ok(shards) => {
                        for shard in shards {
                            match stream
                                .iterator(&shard.shard_id, &Position::TrimHorizon)
                                .await
                            {
                                Ok(it) => iterators.push(it),
                                Err(_) => tally.stream_errors += 1,
                            }
                        }
                    }
                    Err(_) => tally.stream_errors += 1,
                }
            }
            // A page a shard a window; the last time, every page left (the writers have
            // stopped, so an empty page is the end).
            let mut pages: Vec<Vec<serde_json::Value>> = Vec::new();
            for iterator in iterators.iter_mut() {
                while let Some(it) = iterator.clone() {
                    // A read that fails (moto busy) is tried again at the next window.
                    let Ok((records, next)) = stream.read(&it, 1000).await else {
                        tally.stream_errors += 1;
                        break;
                    };
                    *iterator = next;
                    let empty = records.is_empty();
                    if !empty {
                        pages.push(records);
                    }
                    if empty || !last {
                        break;
                    }
                }
            }
            for records in pages {
                every.extend(records.iter().cloned());
                let report = monitor.check_changes(&records).await;
                tally.batches += 1;
                tally.records += records.len() as u64;
                tally.unchecked += report.unchecked as u64;
                if tally.error.is_none() {
                    tally.error = report.error.clone();
                }
                for row in &report.rows {
                    match row.verdict {
                        ChangeVerdict::Superseded => tally.superseded += 1,
                        ChangeVerdict::Pending(age) => {
                            tally.checked += 1;
                            tally.pending += 1;
                            tally.max_pending = tally.max_pending.max(age);
                        }
                        ChangeVerdict::Inconsistent => {
                            tally.checked += 1;
                            tally.inconsistent.insert(row.key.clone());
                        }
                        ChangeVerdict::Consistent => tally.checked += 1,
                    }
                }
            }
            if last {
                let report = monitor.check_changes(&every).await;
                tally.final_look = report.inconsistent().map(str::to_owned).collect();
                tally.final_pending = report.pending();
                tally.final_unchecked = report.unchecked;
                tally.final_error = report.error.clone();
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(WINDOW) => {}
                _ = phase.changed() => {}
            }
        }
        tally
    })
}
