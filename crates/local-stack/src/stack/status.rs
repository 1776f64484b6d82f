//! What the running stack shows: the start-up banner, the status line of counters, and the
//! one-line summary of the event source mapping's settings.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use product_cache::config::InvalidationMode;

use super::Stack;
use crate::poller::{EsmConfig, StartingPosition};

/// The counters shown on the status line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub bypasses: u64,
    /// Stream records the invalidator handled successfully.
    pub invalidations: u64,
    pub records_given_up: u64,
    pub function_errors: u64,
    /// Age of the newest record of the last batch when it was handed over.
    pub iterator_age_ms: u64,
    /// Stream records the change monitor has judged.
    pub changes_monitored: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hits {} · misses {} · bypasses {} · invalidations {} · iterator age {} ms",
            self.hits, self.misses, self.bypasses, self.invalidations, self.iterator_age_ms
        )?;
        if self.changes_monitored > 0 {
            write!(f, " · changes monitored {}", self.changes_monitored)?;
        }
        if self.function_errors > 0 {
            write!(f, " · invalidator errors {}", self.function_errors)?;
        }
        if self.records_given_up > 0 {
            write!(f, " · records given up {}", self.records_given_up)?;
        }
        Ok(())
    }
}

/// How the status line is written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusStyle {
    /// Rewritten in place once a second (stderr is a terminal).
    Terminal,
    /// A plain line when a counter changed, looked at once a second (stderr is a file or pipe:
    /// no control characters, and a log that grows only when something happened, not by the
    /// same line again while the stack sits idle).
    Lines,
    /// Nothing.
    Quiet,
}

impl StatusStyle {
    pub fn for_stderr() -> Self {
        use std::io::IsTerminal as _;
        if io::stderr().is_terminal() {
            Self::Terminal
        } else {
            Self::Lines
        }
    }

    pub(super) fn every(self) -> Duration {
        match self {
            Self::Terminal | Self::Lines => Duration::from_secs(1),
            Self::Quiet => Duration::from_secs(10),
        }
    }

    /// Shows `stats` if this style shows them now: a terminal's line is redrawn every time (in
    /// place, so nothing accumulates), a plain line only when it differs from `last` (the one
    /// shown before, `None` at first). Returns what is on show afterwards.
    pub(super) fn show(self, stats: Stats, last: Option<Stats>) -> Option<Stats> {
        match self {
            // Clear to the end of the line: the new text can be shorter than the old.
            Self::Terminal => eprint!("\r{stats}\x1b[K"),
            Self::Lines if last != Some(stats) => eprintln!("{stats}"),
            Self::Lines | Self::Quiet => return last,
        }
        Some(stats)
    }

    /// The last status at the stop: the terminal's line is ended, a plain line written if it
    /// changed since the last one.
    pub(super) fn finish(self, stats: Stats, last: Option<Stats>) {
        match self {
            Self::Terminal => eprintln!("\r{stats}\x1b[K"),
            Self::Lines | Self::Quiet => {
                self.show(stats, last);
            }
        }
    }
}

impl Stack {
    /// The counters now.
    pub fn stats(&self) -> Stats {
        let h = &self.http_stats;
        let p = &self.poller_stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            requests: get(&h.requests),
            hits: get(&h.hits),
            misses: get(&h.misses),
            bypasses: get(&h.bypasses),
            invalidations: get(&p.records_acknowledged),
            records_given_up: get(&p.records_given_up),
            function_errors: get(&p.function_errors),
            iterator_age_ms: get(&p.iterator_age_ms),
            changes_monitored: self
                .change_monitor_stats
                .as_ref()
                .map_or(0, |m| get(&m.records_acknowledged)),
        }
    }

    /// The start-up message: where everything is, and `set_price` (the command that changes a
    /// price in this stack) among three commands to try.
    pub fn banner(&self, set_price: &str) -> String {
        let started = |owned: bool| if owned { "started here" } else { "given" };
        let url = self.http_url();
        let esm = &self.options.esm;
        let seeded = match self.seeded {
            0 => "already had items; not seeded".to_owned(),
            n => format!("seeded with {n} products"),
        };
        let on_failure = esm
            .on_failure
            .as_deref()
            .map_or("(none)".into(), |p| p.display().to_string());
        let metrics = self
            .options
            .metrics
            .as_deref()
            .map_or("(not written)".into(), |p| p.display().to_string());
        format!(
            "listening on {url}\n\
             \n\
             \x20 HTTP API    {url}/products/{{id}}, {url}/products?ids=ID1,ID2,...  (the read function's handler)\n\
             \x20 Redis       {redis}  ({redis_how})\n\
             \x20 DynamoDB    {dynamo}  ({dynamo_how}); table {table} {seeded}\n\
             \x20 stream      invalidator ({mode} mode) via {esm_desc}\n\
             \x20             settings from {source}\n\
             \x20             change monitor {monitor}\n\
             \x20 on-failure  {on_failure}\n\
             \x20 metrics     {metrics}  (CloudWatch EMF lines, one per invocation)\n\
             \x20 settings    the functions' variables from {settings}\n\
             {differing}\
             \n\
             Try:\n\
             \x20 curl -si {url}/products/kb-001\n\
             \x20 {set_price}\n\
             \x20 curl -si {url}/products/kb-001\n\
             \x20 curl -si '{url}/products?ids=kb-001,mouse-001,kb-002'\n\
             \n\
             Ctrl-C stops everything.",
            redis = self.redis_url,
            redis_how = started(self.redis.is_some()),
            dynamo = self.dynamodb_endpoint,
            dynamo_how = started(self.moto.is_some()),
            table = self.table,
            mode = match self.options.mode {
                InvalidationMode::Delete => "delete",
                InvalidationMode::Refresh => "refresh",
            },
            esm_desc = describe_esm(esm),
            source = self.options.esm_source,
            settings = match self.options.variables.source.as_str() {
                "" => "the defaults",
                given => given,
            },
            differing = match &self.options.variables.differing[..] {
                [] => "\x20             none differs from the template\n".to_owned(),
                differing => differing
                    .iter()
                    .map(|d| format!("\x20             differs from the template: {d}\n"))
                    .collect(),
            },
            monitor = match &self.options.change_monitor {
                Some(esm) => format!(
                    "(the inspector, judging each change {} after it) via {}",
                    humantime::format_duration(self.monitor_grace),
                    describe_esm(esm)
                ),
                None => "off".to_owned(),
            },
        )
    }
}

/// One line about the mapping's settings.
pub fn describe_esm(esm: &EsmConfig) -> String {
    let position = match esm.starting_position {
        StartingPosition::TrimHorizon => "TRIM_HORIZON",
        StartingPosition::Latest => "LATEST",
    };
    let unbounded = |v: Option<String>| v.unwrap_or_else(|| "unbounded".into());
    let duration = |d: Duration| humantime::format_duration(d).to_string();
    format!(
        "{position}, batch {}, window {}, retries {}, max record age {}, bisect {}, {}, poll every {}",
        esm.batch_size,
        duration(esm.batching_window),
        unbounded(esm.max_retry_attempts.map(|n| n.to_string())),
        unbounded(esm.max_record_age.map(duration)),
        if esm.bisect_on_error { "on" } else { "off" },
        if esm.report_batch_item_failures {
            "partial batch failures reported"
        } else {
            "whole-batch retries"
        },
        duration(esm.poll_interval),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_every_counter() {
        let status = Stats {
            hits: 3,
            misses: 1,
            invalidations: 1000,
            iterator_age_ms: 42,
            ..Stats::default()
        };
        assert_eq!(
            status.to_string(),
            "hits 3 · misses 1 · bypasses 0 · invalidations 1000 · iterator age 42 ms"
        );
        let failing = Stats {
            records_given_up: 2,
            ..status
        };
        assert!(failing.to_string().ends_with("records given up 2"));
    }
}
