//! What a run found: the tallies, the text printed at the end of every run, and the assertions
//! the tests make on it. Invariant 1 and the staleness distribution are computed here, over the
//! history, because their details go into the text.

use std::fmt::Write as _;
use std::time::Duration;

use local_stack::services::Counters;
use product_cache::read::CacheStatus;

use super::chaos::{data_loss_fault, Chaos, Window};
use super::config::{Cluster, Config, Deployment};
use super::feeder::FeedOutcome;
use super::history::{
    ms, percentile, Batch, Clock, History, Nanos, Read, Seen, StaleReads, Tally, Write, WriteKind,
};
use super::invariants::Replay;

/// What a run found.
pub struct Report {
    pub text: String,
    pub writes: Tally,
    pub reads: Tally,
    /// The reads made in batch requests: `reads`, `requests`, by cache status and what they
    /// saw, `answered first` (requests answered before their fills) and `stale` (violations of
    /// invariant 1 among them).
    pub batch_reads: Tally,
    pub faults: Tally,
    /// Violations of invariants 1 to 4.
    pub violations: [usize; 4],
    /// Reads of a version that was never written, or not yet: a checker or system bug.
    pub phantoms: usize,
    /// On a cluster: how many readers (each with its own long-lived client) had a hit after the
    /// last failover was over, of how many.
    pub readers_hitting_after_failovers: Option<(usize, usize)>,
    /// Faults the run's config asks for, with how many of each it must have injected.
    required: Vec<(&'static str, u64)>,
    /// The run has batch readers: they must have read, hit and missed.
    pub batch_readers: bool,
    /// The cache inspector's findings over the run.
    pub inspected: super::inspector::Tally,
    /// The change monitor's findings over the run.
    pub monitored: super::monitor::Tally,
    /// On a cluster: the GETs each node served during the run.
    pub served_gets: super::run::NodeGets,
    /// On serverless: what the stand-in's primary and reader endpoints saw (every request of
    /// the functions went through them; the checker's own looks did not).
    pub serverless: Option<[Counters; 2]>,
    /// The keys invariant 3 found stale at the end.
    pub stale_at_end: std::collections::BTreeSet<String>,
    /// On a game day: batches that failed for want of a replica's confirmation while their
    /// shard was served by a primary with no replica (from a second after the promotion, when
    /// every client has the new topology, to the killed node's return).
    pub unconfirmed_while_short: Option<usize>,
    /// On a game day: batches acknowledged under-replicated in that stretch (the promoted
    /// replica, alone, confirmed by the replicas it had).
    pub under_replicated_while_short: Option<usize>,
}

impl Report {
    /// A game day: the four invariants hold ([`Report::assert_clean`]), every record was
    /// acknowledged (nothing given up: the stream drained, or invariant 3 counts it), every
    /// read answered, every reader hit again after the stall, and no batch failed while its
    /// shard simply had fewer replicas than configured.
    pub fn assert_game_day(&self) {
        self.assert_clean();
        self.assert_served_through_failovers();
        assert_eq!(
            self.unconfirmed_while_short,
            Some(0),
            "batches failed unconfirmed while a shard had no replica:\n{}",
            self.text
        );
        assert!(
            self.under_replicated_while_short.unwrap_or(0) > 0,
            "no batch was acknowledged under-replicated while a shard had no replica:\n{}",
            self.text
        );
    }

    /// Zero violations, and proof that the run exercised what it claims to.
    pub fn assert_clean(&self) {
        assert_eq!(
            (self.violations, self.phantoms),
            ([0; 4], 0),
            "violations of invariants 1-4 (and phantom reads); the report is above:\n{}",
            self.text
                .lines()
                .find(|l| l.starts_with("violations"))
                .unwrap_or_default()
        );
        // The inspector ran throughout and stayed silent: nothing differed from the table past
        // its grace period.
        assert!(
            self.inspected.checked > 0,
            "the inspector checked nothing:\n{}",
            self.text
        );
        assert_eq!(
            (&self.inspected.inconsistent, &self.inspected.at_rest),
            (&Vec::new(), &Vec::new()),
            "the inspector found inconsistent keys:\n{}",
            self.text
        );
        // The change monitor judged changes and found nothing either.
        assert!(
            self.monitored.checked > 0 && self.monitored.found().is_empty(),
            "the change monitor judged nothing, or found inconsistent keys:\n{}",
            self.text
        );
        // Its metrics, as CloudWatch would read them, keep the template's alarm quiet.
        let emf = crate::metrics::emf_of(&self.inspected.lines);
        assert!(
            crate::metrics::total(&emf, "KeysChecked") > 0.0
                && !crate::metrics::alarm_fires("InconsistentKeysAlarm", &emf, "product-cache"),
            "InconsistentKeysAlarm would fire:\n{}",
            self.text
        );
        // On serverless, every request of the functions' went through the endpoint, which
        // refused none: no unavailable command, no keyless script, no keys of one request in
        // two slots, no request over 3,999 arguments, no failed AUTH.
        if let Some(endpoints) = &self.serverless {
            assert!(
                endpoints[0].forwarded_total() > 0
                    && endpoints.iter().all(|e| e.refused_total() == 0),
                "the serverless endpoints forwarded nothing, or refused requests:\n{}",
                self.text
            );
        }
        self.assert_exercised();
    }

    /// With replica reads: the nodes that were replicas throughout the run served GETs.
    pub fn assert_replicas_served_reads(&self) {
        assert!(
            self.served_gets.by_replicas() > 0,
            "no replica served a read:\n{}",
            self.text
        );
    }

    /// On a cluster: no read failed (a read whose Redis failed over bypasses the cache and
    /// answers from the table), and every reader's client, built before the failovers, had hits
    /// after them: it followed the new topology without a restart.
    pub fn assert_served_through_failovers(&self) {
        assert_eq!(self.reads.get("error"), 0, "reads failed:\n{}", self.text);
        let (hitting, readers) = self
            .readers_hitting_after_failovers
            .expect("a run on a cluster");
        assert_eq!(
            hitting, readers,
            "not every reader's client hit after the failovers:\n{}",
            self.text
        );
    }

    /// A guard-off run: the change monitor (online, or in its final look at every change of the
    /// run) found every key invariant 3 found stale at the end.
    pub fn assert_monitor_found_the_stale_keys(&self) {
        let found = self.monitored.found();
        let missed: Vec<&String> = self.stale_at_end.difference(&found).collect();
        assert!(
            missed.is_empty(),
            "the change monitor missed stale keys invariant 3 found ({missed:?}):\n{}",
            self.text
        );
    }

    pub fn assert_exercised(&self) {
        for &(fault, n) in &self.required {
            assert!(
                self.faults.get(fault) >= n,
                "fewer than {n} {fault} were injected:\n{}",
                self.text
            );
        }
        assert!(self.reads.get("total") > 0, "no reads:\n{}", self.text);
        if self.batch_readers {
            // Batch requests answered from the cache and from the table, which fills.
            for what in ["hit", "miss", "answered first"] {
                assert!(
                    self.batch_reads.get(what) > 0,
                    "no batch reads ({what}):\n{}",
                    self.text
                );
            }
        }
        assert!(self.writes.get("delete") > 0, "no deletes:\n{}", self.text);
    }
}

/// What the actors recorded and the checks found, for [`Report::new`].
pub struct Findings {
    pub writes: Vec<Write>,
    pub reads: Vec<Read>,
    pub feed: FeedOutcome,
    pub chaos: Chaos,
    pub replay: Replay,
    /// Violations of invariant 3.
    pub mismatches: Vec<String>,
    /// Products read from the table by the readers, how many table reads were slowed, and how
    /// many were batch requests' `BatchGetItem`s.
    pub table_reads: u64,
    pub slowed: u64,
    pub batch_table_reads: u64,
    /// Reads made with the flipped version attribute setting.
    pub flipped_reads: u64,
    /// When the stream was drained, and when the writers stopped.
    pub run_time: Nanos,
    pub writers_done: Nanos,
    /// The lease invariant 4 is judged against.
    pub herd_lease: Duration,
    /// What the cache inspector found while the run went on.
    pub inspected: super::inspector::Tally,
    /// What the change monitor found.
    pub monitored: super::monitor::Tally,
    /// On a cluster: the GETs each node served during the run.
    pub served_gets: super::run::NodeGets,
    /// On serverless: what its primary and reader endpoints saw.
    pub serverless: Option<[Counters; 2]>,
}

impl Report {
    /// Checks invariant 1 over the history, then prints the report and returns it.
    pub fn new(cfg: &Config, clock: Clock, items: Vec<String>, found: Findings) -> Self {
        let Findings {
            writes,
            reads,
            feed,
            chaos,
            replay,
            mismatches: inv3,
            table_reads,
            slowed,
            batch_table_reads,
            flipped_reads,
            run_time,
            writers_done,
            herd_lease,
            inspected,
            monitored,
            served_gets,
            serverless,
        } = found;
        let stale_at_end: std::collections::BTreeSet<String> = inv3
            .iter()
            .filter_map(|v| v.split_once(": cached ").map(|(key, _)| key.to_owned()))
            .collect();
        let Replay {
            violations: inv2,
            replayed,
            expired,
            deleted,
        } = replay;
        let Chaos {
            faults: chaos_faults,
            herd_violations,
            events: chaos_events,
            windows,
        } = chaos;
        let (writes_tally, reads_tally) = tallies(&writes, &reads);
        let mut batch_reads = batch_tally(&reads);
        let mut faults = feed.stats;
        for (k, v) in chaos_faults.0 {
            faults.add(k, v);
        }
        faults.add("slow reads", slowed);
        if cfg.flip_version_attribute.is_some() {
            faults.add("reads with the flipped version attribute", flipped_reads);
        }
        let ops = (writes.len() + reads.len()) as u64;
        let latencies = latencies(&writes, &reads);
        let (around, readers_hitting_after_failovers) = match cfg.deployment {
            Deployment::Single | Deployment::Serverless => (None, None),
            Deployment::Cluster(_) => {
                let (line, hitting) = around_failovers(&reads, &windows, cfg.readers);
                (Some(line), Some(hitting))
            }
        };
        let history = History::new(items, writes, feed.acks, reads);
        let StaleReads {
            count: stale,
            in_batches: stale_in_batches,
            first: stale_detail,
            phantoms,
            phantom_detail,
        } = history.stale_reads();
        batch_reads.add("stale", stale_in_batches as u64);
        let (staleness, unseen) = history.staleness();

        let violations = [stale, inv2.len(), inv3.len(), herd_violations.len()];
        let game_day = matches!(
            cfg.deployment,
            Deployment::Cluster(Cluster {
                game_day: Some(_),
                ..
            })
        );
        let mut required = vec![
            ("duplicate batches", 1),
            ("partial failures", 1),
            ("bisections", 1),
            ("slow reads", 1),
        ];
        if !game_day {
            required.push((data_loss_fault(cfg.data_loss), 1));
            required.push(("herds", 1));
        }
        if cfg.memory_pressure.is_some() {
            required.push(("keys evicted", 1));
            // Not only ballast: the product's documents went too.
            if cfg.deployment == Deployment::Serverless {
                required.push(("documents evicted", 1));
            }
        }
        if cfg.replay_after_data_loss {
            required.push(("batches replayed after the data loss", 1));
        }
        if game_day {
            required.push(("primaries killed", 1));
            required.push(("nodes stalled", 1));
        } else if let Deployment::Cluster(_) = cfg.deployment {
            required.push(("failovers", 1));
            required.push(("primaries killed", 1));
        }
        let short = windows.iter().find(|w| w.what == "under-replicated");
        let in_short = |times: &[Nanos]| {
            let short = short.expect("the game day's under-replicated window");
            let settled = short.from + Duration::from_secs(1).as_nanos() as Nanos;
            times
                .iter()
                .filter(|&&t| t > settled && t < short.to)
                .count()
        };
        let unconfirmed_while_short = game_day.then(|| in_short(&feed.unconfirmed));
        let under_replicated_while_short = game_day.then(|| in_short(&feed.under_replicated));
        if cfg.flip_version_attribute.is_some() {
            required.push(("version attribute flips", 2));
            required.push(("batches with the flipped version attribute", 1));
            required.push(("reads with the flipped version attribute", 1));
        }
        let mut text = String::new();
        let _ = writeln!(
            text,
            "== consistency checker: {} ==\nredis {}, mode {:?}, guards {:?}, version attribute \
             {:?}{}, data loss {:?}{}, seed {:#x} (CHECKER_SEED), \
             {} items, {} writers, {} readers, lease {:?}, lease wait {:?}",
            cfg.name,
            match cfg.deployment {
                Deployment::Single => "one node".to_owned(),
                Deployment::Serverless => "ElastiCache Serverless stand-in (TLS, IAM, one \
                                           virtual shard over a primary and its replica, \
                                           volatile-lru)"
                    .to_owned(),
                Deployment::Cluster(c) => format!(
                    "cluster of 3 primaries with 1 replica each (confirm replicas {}, reads \
                     from {}, {})",
                    c.confirm_replicas,
                    if c.read_from_replicas {
                        "replicas"
                    } else {
                        "primaries"
                    },
                    match (c.game_day, c.cut_before_kill) {
                        (Some(g), _) => format!(
                            "game day: {:?} healthy, a primary down {:?}, another stalled {:?}; \
                             least-privilege user {}",
                            g.healthy, g.down, g.stall, c.least_privilege
                        ),
                        (None, Some(cut)) => format!("replication cut {cut:?} before the kill"),
                        (None, None) => "the kill with replication up".to_owned(),
                    }
                ),
            },
            cfg.mode,
            cfg.guards,
            cfg.version_attribute,
            match cfg.flip_version_attribute {
                Some(at) => format!(
                    " (flipped: the invalidator at {:.0}% of the ops, the readers at {:.0}%)",
                    at.invalidator * 100.0,
                    at.readers * 100.0
                ),
                None => String::new(),
            },
            cfg.data_loss,
            if cfg.replay_after_data_loss {
                " then the acknowledged batches again"
            } else {
                ""
            },
            cfg.seed,
            cfg.items,
            cfg.writers,
            cfg.readers,
            cfg.lease,
            cfg.lease_wait,
        );
        let _ = writeln!(
            text,
            "operations: {ops} in {:.1} s ({:.0}/s; writes stopped at {:.1} s, drained and checked \
             by {:.1} s)",
            ms(run_time) / 1e3,
            ops as f64 / (ms(run_time) / 1e3),
            ms(writers_done) / 1e3,
            ms(clock.now()) / 1e3,
        );
        let _ = writeln!(text, "  writes: {}", writes_tally.line());
        let _ = writeln!(
            text,
            "  reads:  {}; products read from the table by readers {table_reads} ({} \
             BatchGetItems)",
            reads_tally.line(),
            batch_table_reads
        );
        let _ = writeln!(
            text,
            "  batch reads (of the {} reads; {} readers of {}, {}..={} ids drawn per request): {}",
            reads_tally.get("total"),
            cfg.batch_readers,
            cfg.readers,
            cfg.batch_ids.0,
            cfg.batch_ids.1,
            batch_reads.line()
        );
        let _ = writeln!(text, "  {latencies}");
        let _ = writeln!(text, "faults and feeder: {}", faults.line());
        let _ = writeln!(text, "  chaos: {}", chaos_events.join(", "));
        if let (Some(n), Some(m)) = (unconfirmed_while_short, under_replicated_while_short) {
            let _ = writeln!(
                text,
                "  batches failed unconfirmed: {} in all, {n} while a shard had no replica; \
                 acknowledged under-replicated: {} in all, {m} then",
                feed.unconfirmed.len(),
                feed.under_replicated.len()
            );
        }
        if let Some(around) = around {
            let _ = writeln!(text, "  {around}");
        }
        let _ = writeln!(
            text,
            "  TRIM_HORIZON replay: {replayed} records ({expired} keys timed out meanwhile, \
             {deleted} deleted on a node that had evicted)"
        );
        let _ = writeln!(
            text,
            "violations: invariant 1 (stale reads) {stale} ({stale_in_batches} by batch reads), \
             2 (replay changed the cache) {}, 3 (cache differs from the table) {}, 4 (a herd read \
             the table more than once per {:?} lease) {}; phantom reads {phantoms}",
            inv2.len(),
            inv3.len(),
            herd_lease,
            herd_violations.len()
        );
        for s in &stale_detail {
            let _ = writeln!(text, "  [1] {}", history.describe_stale(s));
        }
        for (n, list) in [(2, &inv2), (3, &inv3), (4, &herd_violations)] {
            for v in list.iter().take(5) {
                let _ = writeln!(text, "  [{n}] {v}");
            }
        }
        for p in &phantom_detail {
            let _ = writeln!(text, "  [phantom] {p}");
        }
        let _ = writeln!(text, "{inspected}");
        if !served_gets.0.is_empty() {
            let _ = writeln!(text, "{served_gets}");
        }
        if let Some(endpoints) = &serverless {
            for (name, seen) in ["primary", "reader"].iter().zip(endpoints) {
                let _ = writeln!(
                    text,
                    "serverless {name} endpoint: {} connections, {} requests forwarded {:?}, {} \
                     answered by the front, {} MOVED, refused {:?}",
                    seen.connections,
                    seen.forwarded_total(),
                    seen.forwarded,
                    seen.answered.values().sum::<u64>(),
                    seen.moved_total(),
                    seen.refused
                );
            }
        }
        let _ = writeln!(
            text,
            "{monitored}; of the {} keys invariant 3 found stale at the end, it found {}",
            stale_at_end.len(),
            stale_at_end.intersection(&monitored.found()).count()
        );
        let _ = writeln!(
            text,
            "staleness (commit -> end of the first later-starting read that saw it or newer), \
             {} writes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {unseen} writes never seen \
             (overwritten before any read)",
            staleness.len(),
            ms(percentile(&staleness, 50.0)),
            ms(percentile(&staleness, 99.0)),
            ms(staleness.last().copied().unwrap_or(0)),
        );
        println!("{text}");
        Report {
            text,
            writes: writes_tally,
            reads: reads_tally,
            batch_reads,
            faults,
            violations,
            phantoms,
            readers_hitting_after_failovers,
            required,
            batch_readers: cfg.batch_readers > 0,
            inspected,
            monitored,
            served_gets,
            serverless,
            stale_at_end,
            unconfirmed_while_short,
            under_replicated_while_short,
        }
    }
}

/// Writes by kind, and reads by cache status and by what they saw.
fn tallies(writes: &[Write], reads: &[Read]) -> (Tally, Tally) {
    let mut writes_tally = Tally::default();
    for w in writes {
        writes_tally.add(
            match w.kind {
                WriteKind::Put => "put",
                WriteKind::Update => "update",
                WriteKind::Delete => "delete",
            },
            1,
        );
    }
    writes_tally.add("total", writes.len() as u64);
    let mut reads_tally = Tally::default();
    for r in reads {
        reads_tally.add(r.status.as_str(), 1);
        reads_tally.add(seen_name(r.seen), 1);
    }
    reads_tally.add("total", reads.len() as u64);
    (writes_tally, reads_tally)
}

/// The batch requests: the first read of each (a reader's reads of one request share its
/// start), and the request.
fn batch_requests(reads: &[Read]) -> impl Iterator<Item = (&Read, Batch)> + '_ {
    let mut seen = std::collections::HashSet::new();
    reads.iter().filter_map(move |r| {
        let batch = r.batch?;
        seen.insert((r.reader, r.start)).then_some((r, batch))
    })
}

/// The batch reads: how many, in how many requests, by cache status and by what they saw.
fn batch_tally(reads: &[Read]) -> Tally {
    let mut tally = Tally::default();
    for r in reads.iter().filter(|r| r.batch.is_some()) {
        tally.add("reads", 1);
        tally.add(r.status.as_str(), 1);
        tally.add(seen_name(r.seen), 1);
    }
    for (_, batch) in batch_requests(reads) {
        tally.add("requests", 1);
        if batch.answered_first {
            tally.add("answered first", 1);
        }
    }
    tally
}

fn seen_name(seen: Seen) -> &'static str {
    match seen {
        Seen::Found(_) => "found",
        Seen::NotFound => "not found",
        Seen::Error => "error",
    }
}

fn latencies(writes: &[Write], reads: &[Read]) -> String {
    let latency = |mut d: Vec<Nanos>| {
        if d.is_empty() {
            return "(none)".to_owned();
        }
        d.sort_unstable();
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            ms(percentile(&d, 50.0)),
            ms(percentile(&d, 99.0))
        )
    };
    let single = |status| {
        reads
            .iter()
            .filter(|r| r.batch.is_none() && r.status == status)
            .map(|r| r.end - r.start)
            .collect()
    };
    format!(
        "latency: writes {}; single hits {}; single misses {}; batch requests {}",
        latency(writes.iter().map(|w| w.end - w.start).collect()),
        latency(single(CacheStatus::Hit)),
        latency(single(CacheStatus::Miss)),
        latency(
            batch_requests(reads)
                .map(|(r, _)| r.end - r.start)
                .collect()
        ),
    )
}

/// The reads during each failover's window and after the last one: by cache status, when the
/// last bypass ended, and how many readers (each a long-lived client that had to follow the new
/// topology) hit after the last window.
fn around_failovers(
    reads: &[Read],
    windows: &[Window],
    readers: usize,
) -> (String, (usize, usize)) {
    let statuses = |during: &dyn Fn(&Read) -> bool| {
        let mut tally = Tally::default();
        for r in reads.iter().filter(|r| during(r)) {
            tally.add(r.status.as_str(), 1);
        }
        tally.line()
    };
    let mut parts: Vec<String> = windows
        .iter()
        .map(|w| {
            format!(
                "{} [{:.1} .. {:.1} ms]: {}",
                w.what,
                ms(w.from),
                ms(w.to),
                statuses(&|r| r.start < w.to && r.end > w.from)
            )
        })
        .collect();
    // The game day's healthy stretches are not failovers.
    let last = windows
        .iter()
        .filter(|w| !matches!(w.what, "healthy" | "restored"))
        .map(|w| w.to)
        .max()
        .unwrap_or(0);
    let mut hitting = std::collections::BTreeSet::new();
    for r in reads.iter().filter(|r| r.start > last) {
        if r.status == CacheStatus::Hit {
            hitting.insert(r.reader);
        }
    }
    parts.push(format!(
        "after: {}, {} of {readers} readers hit",
        statuses(&|r| r.start > last),
        hitting.len()
    ));
    let last_bypass = reads
        .iter()
        .filter(|r| r.status == CacheStatus::Bypass)
        .map(|r| r.end)
        .max();
    let line = format!(
        "reads around the failovers: {}; the last bypass ended at {}",
        parts.join("; "),
        last_bypass.map_or("(none)".to_owned(), |t| format!("{:.1} ms", ms(t)))
    );
    (line, (hitting.len(), readers))
}
