//! `pcache inspect --changes`: the change monitor ([`Inspector::check_changes`]) run by hand over
//! a time range of the table's stream, on the local stack or a deployed one.
//!
//! Every shard is read from its oldest record (`TRIM_HORIZON`: the stream keeps 24 hours) page
//! by page through the empty pages `GetRecords` may answer (see [`crate::pages`]), until the
//! shard's end, a record stamped past the range, or a bounded run of empty pages (an open
//! shard's newest record). The records stamped within the range (`ApproximateCreationDateTime`)
//! go to the monitor in batches of up to [`BATCH_RECORDS`], each from one shard: the monitor
//! tells how far the invalidator has got by the keys of one shard's batch, which the
//! invalidator applies in order. Shards are read one after the other, in `DescribeStream`'s
//! order.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use product_cache::inspect::Inspector;
use product_cache::monitor::{ChangeReport, ChangeRow, ChangeVerdict};
use product_cache::store::ProductStore;
use serde_json::Value;

use local_stack::stream::{Position, ShardInfo, StreamError, StreamReader};

use crate::pages::{is_trimmed, PagesEnd, ShardPages};

/// Records judged together at most: a Lambda batch's size for the inspector's event source
/// mapping.
pub const BATCH_RECORDS: usize = 1000;

/// How far back a range starts unless told.
pub const DEFAULT_SINCE: Duration = Duration::from_secs(3600);

/// A point in time as an operator gives it: an RFC 3339 time (`2026-12-03T10:00:00Z`, or with
/// an offset), a duration ago (`15m`, `2h`, `1h30m`), or `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    At(SystemTime),
    Ago(Duration),
}

impl When {
    pub fn at(self, now: SystemTime) -> SystemTime {
        match self {
            When::At(t) => t,
            When::Ago(d) => now.checked_sub(d).unwrap_or(UNIX_EPOCH),
        }
    }
}

impl FromStr for When {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "now" {
            return Ok(When::Ago(Duration::ZERO));
        }
        if let Ok(ago) = humantime::parse_duration(s) {
            return Ok(When::Ago(ago));
        }
        rfc3339(s).map(When::At).ok_or_else(|| {
            format!("{s:?}: neither an RFC 3339 time (2026-12-03T10:00:00Z) nor a duration ago (15m, 2h)")
        })
    }
}

/// An RFC 3339 time. humantime reads UTC only (`Z` or `+00:00`); another offset is applied here.
fn rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let offset = (b.len() > 6 && matches!(b[b.len() - 6], b'+' | b'-') && b[b.len() - 3] == b':')
        .then(|| {
            let hours: u64 = s[b.len() - 5..b.len() - 3].parse().ok()?;
            let minutes: u64 = s[b.len() - 2..].parse().ok()?;
            Some((
                b[b.len() - 6] == b'+',
                Duration::from_secs(hours * 3600 + minutes * 60),
            ))
        });
    match offset {
        None => humantime::parse_rfc3339(s).ok(),
        Some(None) => None,
        Some(Some((east, offset))) => {
            let local = humantime::parse_rfc3339(&format!("{}Z", &s[..b.len() - 6])).ok()?;
            // East of UTC, the local time is ahead of UTC by the offset.
            if east {
                local.checked_sub(offset)
            } else {
                local.checked_add(offset)
            }
        }
    }
}

/// The records to check: those stamped from `since` to `until`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub since: SystemTime,
    pub until: SystemTime,
}

impl Range {
    /// From what the operator gave, read against one `now`: by default the last hour up to now.
    pub fn new(since: Option<When>, until: Option<When>, now: SystemTime) -> Result<Self, String> {
        let range = Range {
            since: since.unwrap_or(When::Ago(DEFAULT_SINCE)).at(now),
            until: until.unwrap_or(When::Ago(Duration::ZERO)).at(now),
        };
        if range.since > range.until {
            return Err(format!(
                "--since ({}) is after --until ({})",
                humantime::format_rfc3339_seconds(range.since),
                humantime::format_rfc3339_seconds(range.until)
            ));
        }
        Ok(range)
    }

    /// Whether a record stamped `secs` after the epoch is in the range.
    fn holds(&self, secs: f64) -> bool {
        (secs_of(self.since)..=secs_of(self.until)).contains(&secs)
    }

    fn is_past(&self, secs: f64) -> bool {
        secs > secs_of(self.until)
    }
}

fn secs_of(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to {}",
            humantime::format_rfc3339_seconds(self.since),
            humantime::format_rfc3339_seconds(self.until)
        )
    }
}

/// The stream of `table` (its latest, as `DescribeTable` names it).
pub async fn stream_arn(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let described = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| {
            format!(
                "DynamoDB DescribeTable on {table} failed: {}",
                local_stack::error::chain(&e)
            )
        })?;
    described
        .table
        .and_then(|t| t.latest_stream_arn)
        .ok_or_else(|| format!("table {table} has no stream").into())
}

/// How reading one shard ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardRead {
    /// Read to its end (a closed shard).
    End,
    /// Read up to a record stamped past the range.
    PastRange,
    /// `n` empty pages in a row on an open shard: its newest record, as far as a read can tell.
    Newest(u32),
    /// `n` empty pages in a row before a closed shard's end: the rest was not read.
    Stalled(u32),
    /// Its records are gone (past the stream's retention) or the shard is.
    Gone,
    /// The stream failed; what was read before was checked.
    Failed(String),
}

impl ShardRead {
    /// Whether the shard's records in the range may not all have been checked.
    pub fn is_short(&self) -> bool {
        matches!(self, ShardRead::Stalled(_) | ShardRead::Failed(_))
    }
}

/// What a check of a range came to.
#[derive(Debug, Clone)]
pub struct ChangeCheck {
    pub range: Range,
    /// `--share`: of the changed keys, the share judged.
    pub share: f64,
    /// Each shard read, and how its read ended.
    pub shards: Vec<(String, ShardRead)>,
    /// Records read from the stream, and of them those stamped within the range.
    pub records_read: usize,
    pub in_range: usize,
    /// Batches given to the monitor.
    pub batches: usize,
    pub consistent: usize,
    pub superseded: usize,
    pub pending: usize,
    /// The oldest pending change's age when judged.
    pub oldest_pending: Option<Duration>,
    pub inconsistent: Vec<ChangeRow>,
    pub unchecked: usize,
    /// Why the first unchecked changes could not be judged.
    pub unchecked_why: Option<String>,
    pub skipped: usize,
    pub repaired: usize,
}

impl ChangeCheck {
    fn new(range: Range, share: f64) -> Self {
        Self {
            range,
            share,
            shards: Vec::new(),
            records_read: 0,
            in_range: 0,
            batches: 0,
            consistent: 0,
            superseded: 0,
            pending: 0,
            oldest_pending: None,
            inconsistent: Vec::new(),
            unchecked: 0,
            unchecked_why: None,
            skipped: 0,
            repaired: 0,
        }
    }

    /// Changes judged: each changed key once per batch, on its newest change in it.
    pub fn judged(&self) -> usize {
        self.consistent + self.superseded + self.pending + self.inconsistent.len()
    }

    fn add(&mut self, report: ChangeReport) {
        self.batches += 1;
        for row in report.rows {
            match row.verdict {
                ChangeVerdict::Consistent => self.consistent += 1,
                ChangeVerdict::Superseded => self.superseded += 1,
                ChangeVerdict::Pending(age) => {
                    self.pending += 1;
                    self.oldest_pending = self.oldest_pending.max(Some(age));
                }
                ChangeVerdict::Inconsistent => self.inconsistent.push(row),
            }
        }
        self.unchecked += report.unchecked;
        self.unchecked_why = self.unchecked_why.take().or(report.error);
        self.skipped += report.skipped;
        self.repaired += report.repaired;
    }
}

impl fmt::Display for ChangeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "range         {}", self.range)?;
        write!(f, "shards        {}", self.shards.len())?;
        let open = self
            .shards
            .iter()
            .filter(|(_, r)| matches!(r, ShardRead::Newest(_)))
            .count();
        if open > 0 {
            write!(
                f,
                " ({open} open: read until --max-empty-pages empty pages in a row)"
            )?;
        }
        writeln!(f)?;
        for (shard, read) in &self.shards {
            let note = match read {
                ShardRead::Stalled(n) => {
                    format!("NOT READ to its end: {n} empty pages in a row (see --max-empty-pages)")
                }
                ShardRead::Failed(why) => format!("NOT READ to its end: {why}"),
                ShardRead::Gone => "past the stream's retention, nothing to read".into(),
                ShardRead::End | ShardRead::PastRange | ShardRead::Newest(_) => continue,
            };
            writeln!(f, "  {shard}: {note}")?;
        }
        writeln!(
            f,
            "records       {} read, {} in the range",
            self.records_read, self.in_range
        )?;
        writeln!(
            f,
            "changes       {} judged, each changed key on its newest change in its batch \
             ({} batch{} of up to {BATCH_RECORDS} records)",
            self.judged(),
            self.batches,
            if self.batches == 1 { "" } else { "es" }
        )?;
        writeln!(f, "  consistent    {}", self.consistent)?;
        writeln!(f, "  superseded    {}", self.superseded)?;
        write!(f, "  pending       {}", self.pending)?;
        if let Some(age) = self.oldest_pending {
            let age = Duration::from_millis(age.as_millis() as u64);
            write!(
                f,
                " (the oldest {} old: the invalidator lags)",
                humantime::format_duration(age)
            )?;
        }
        writeln!(f)?;
        writeln!(f, "  INCONSISTENT  {}", self.inconsistent.len())?;
        for row in &self.inconsistent {
            writeln!(
                f,
                "    {}  sequence {}  cached position {}",
                row.key,
                row.sequence_number.as_deref().unwrap_or("-"),
                row.cached_position.as_deref().unwrap_or("-")
            )?;
        }
        write!(f, "unchecked     {}", self.unchecked)?;
        if let Some(why) = &self.unchecked_why {
            write!(f, " (the first: {why})")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "skipped       {} changed keys (--share {})",
            self.skipped, self.share
        )?;
        write!(f, "repaired      {}", self.repaired)
    }
}

/// What [`check`] reports as it goes, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Tick {
    /// The stream has this many shards.
    Shards(usize),
    /// This many more records read.
    Records(usize),
    /// A shard's read ended.
    ShardDone,
}

/// Checks the changes of `range`: every shard of `reader`'s stream read from its oldest record,
/// its records in the range judged by `inspector` a batch at a time. `Err` only when the
/// stream's shards cannot be listed; a shard that fails part way is reported in the result,
/// with what was read of it checked.
pub async fn check<S: ProductStore>(
    inspector: &Inspector<S>,
    reader: &StreamReader,
    range: Range,
    share: f64,
    max_empty_pages: u32,
    tick: impl Fn(Tick),
) -> Result<ChangeCheck, StreamError> {
    let shards = parents_first(reader.shards().await?);
    tick(Tick::Shards(shards.len()));
    let mut check = ChangeCheck::new(range, share);
    for shard in shards {
        let read = check_shard(
            inspector,
            reader,
            &shard,
            &mut check,
            max_empty_pages,
            &tick,
        )
        .await;
        check.shards.push((shard.shard_id, read));
        tick(Tick::ShardDone);
    }
    Ok(check)
}

/// Shards with each parent before its children: after a shard rolls over (every few hours),
/// an item's older changes are in the parent, its newer ones in the child, and the monitor
/// judges a key on the newest change it has seen.
fn parents_first(mut shards: Vec<ShardInfo>) -> Vec<ShardInfo> {
    let mut ordered: Vec<ShardInfo> = Vec::with_capacity(shards.len());
    while !shards.is_empty() {
        let ready = |s: &ShardInfo| {
            s.parent_shard_id
                .as_ref()
                .is_none_or(|parent| !shards.iter().any(|other| &other.shard_id == parent))
        };
        // A cycle cannot happen in a stream; if the listing had one, take the rest as listed.
        let next = shards.iter().position(ready).unwrap_or(0);
        ordered.push(shards.remove(next));
    }
    ordered
}

async fn check_shard<S: ProductStore>(
    inspector: &Inspector<S>,
    reader: &StreamReader,
    shard: &local_stack::stream::ShardInfo,
    check: &mut ChangeCheck,
    max_empty_pages: u32,
    tick: &impl Fn(Tick),
) -> ShardRead {
    let failed = |e: StreamError| ShardRead::Failed(local_stack::error::chain(&e));
    let iterator = match reader
        .iterator(&shard.shard_id, &Position::TrimHorizon)
        .await
    {
        Ok(iterator) => iterator,
        // A shard past retention is deleted from the stream's listing in time; until then
        // asking for its records says they are gone.
        Err(e) if is_trimmed(&e) => return ShardRead::Gone,
        Err(e) => return failed(e),
    };
    let mut pages = ShardPages::new(reader, iterator, max_empty_pages);
    let mut batch: Vec<Value> = Vec::with_capacity(BATCH_RECORDS);
    let read = loop {
        let page = match pages.next().await {
            Ok(Some(page)) => page,
            Ok(None) => {
                break match pages.end() {
                    Some(PagesEnd::EmptyPages(n)) if shard.closed => ShardRead::Stalled(n),
                    Some(PagesEnd::EmptyPages(n)) => ShardRead::Newest(n),
                    _ => ShardRead::End,
                }
            }
            Err(e) => break failed(e),
        };
        check.records_read += page.len();
        tick(Tick::Records(page.len()));
        let mut past = false;
        for record in page {
            // Unstamped records cannot be placed in the range; DynamoDB stamps every one.
            let Some(stamp) = stamp_of(&record) else {
                continue;
            };
            if check.range.is_past(stamp) {
                past = true;
                break;
            }
            if check.range.holds(stamp) {
                check.in_range += 1;
                batch.push(record);
                if batch.len() == BATCH_RECORDS {
                    check.add(inspector.check_changes(&batch).await);
                    batch.clear();
                }
            }
        }
        if past {
            break ShardRead::PastRange;
        }
    };
    if !batch.is_empty() {
        check.add(inspector.check_changes(&batch).await);
    }
    read
}

fn stamp_of(record: &Value) -> Option<f64> {
    record
        .pointer("/dynamodb/ApproximateCreationDateTime")
        .and_then(Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_before_their_children() {
        let shard = |id: &str, parent: Option<&str>| ShardInfo {
            shard_id: id.into(),
            parent_shard_id: parent.map(Into::into),
            closed: false,
        };
        // As a listing may give them: children first, a parent trimmed away (absent).
        let listed = vec![
            shard("c2", Some("c1")),
            shard("c1", Some("root")),
            shard("root", Some("trimmed")),
            shard("other", None),
        ];
        let order: Vec<String> = parents_first(listed)
            .into_iter()
            .map(|s| s.shard_id)
            .collect();
        assert_eq!(order, ["root", "c1", "c2", "other"]);
    }

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn a_time_is_rfc3339_with_any_offset_or_a_duration_ago() {
        let now = at("2026-12-03T12:00:00Z");
        let when = |s: &str| s.parse::<When>().map(|w| w.at(now));
        assert_eq!(when("15m"), Ok(at("2026-12-03T11:45:00Z")));
        assert_eq!(when("2h"), Ok(at("2026-12-03T10:00:00Z")));
        assert_eq!(when("1h 30m"), Ok(at("2026-12-03T10:30:00Z")));
        assert_eq!(when("now"), Ok(now));
        assert_eq!(when("2026-12-03T10:00:00Z"), Ok(at("2026-12-03T10:00:00Z")));
        assert_eq!(
            when("2026-12-03T10:00:00.250Z"),
            Ok(at("2026-12-03T10:00:00.250Z"))
        );
        assert_eq!(
            when("2026-12-03T11:00:00+01:00"),
            Ok(at("2026-12-03T10:00:00Z"))
        );
        assert_eq!(
            when("2026-12-03T05:30:00-04:30"),
            Ok(at("2026-12-03T10:00:00Z"))
        );
        assert_eq!(
            when("2026-12-03T10:00:00+00:00"),
            Ok(at("2026-12-03T10:00:00Z"))
        );
        for bad in ["yesterday", "2026-12-03", "2026-12-03T10:00:00+1:00", ""] {
            assert!(bad.parse::<When>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_range_defaults_to_the_last_hour_and_holds_both_ends() {
        let now = at("2026-12-03T12:00:00Z");
        let range = Range::new(None, None, now).unwrap();
        assert_eq!(
            (range.since, range.until),
            (at("2026-12-03T11:00:00Z"), now)
        );
        let secs = |s: &str| secs_of(at(s));
        assert!(range.holds(secs("2026-12-03T11:00:00Z")));
        assert!(range.holds(secs("2026-12-03T12:00:00Z")));
        assert!(!range.holds(secs("2026-12-03T10:59:59Z")));
        assert!(range.is_past(secs("2026-12-03T12:00:01Z")));
        assert!(!range.is_past(secs("2026-12-03T12:00:00Z")));
        assert!(Range::new(
            Some(When::Ago(Duration::ZERO)),
            Some(When::Ago(DEFAULT_SINCE)),
            now
        )
        .is_err());
    }
}
