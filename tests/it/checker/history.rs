//! What the actors record, and the checks run over it once the run is over.
//!
//! Every time is nanoseconds since the run's start, on one monotonic clock shared by all actors.
//! An item's history index is the `version` its writer gave it: writes are 1, 2, 3, ...; a delete
//! takes the next index and writes nothing, so the write after it skips one (`version` keeps
//! increasing across deletes).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Instant;

use product_cache::read::CacheStatus;

pub type Nanos = u64;

/// The clock every actor reads.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Self(Instant::now())
    }
    pub fn now(&self) -> Nanos {
        self.0.elapsed().as_nanos() as Nanos
    }
    /// `t` on this clock.
    pub fn at(&self, t: Instant) -> Nanos {
        t.saturating_duration_since(self.0).as_nanos() as Nanos
    }
}

pub fn ms(t: Nanos) -> f64 {
    t as f64 / 1e6
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteKind {
    Put,
    Update,
    Delete,
}

/// One table write, from the writer that owns the item.
#[derive(Debug, Clone)]
pub struct Write {
    pub item: u16,
    pub index: u32,
    pub kind: WriteKind,
    /// When the call was sent, and when it returned (the commit time).
    pub start: Nanos,
    pub end: Nanos,
}

/// What a read returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A document with this `version`.
    Found(u32),
    NotFound,
    /// The read path failed (the table did); such a read says nothing.
    Error,
}

/// One product as a reader saw it. A batch request is one read per product it answered, all
/// with the request's start and end, so the invariants judge each as they judge a single read.
#[derive(Debug, Clone)]
pub struct Read {
    /// Which reader (each has a Redis client of its own).
    pub reader: u16,
    pub item: u16,
    pub seen: Seen,
    pub status: CacheStatus,
    pub start: Nanos,
    /// When the reader had its answer: a single read's `get` returns after its fill; a batch
    /// answered first (`answer_many`) ends before its fills, one filled first (`get_many`)
    /// after them.
    pub end: Nanos,
    /// The batch request it was part of; `None` for a single read.
    pub batch: Option<Batch>,
}

/// A batch request, as each of its reads records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Distinct products asked for (and answered).
    pub size: u16,
    /// Answered before its fills (`answer_many`), or filled first (`get_many`).
    pub answered_first: bool,
}

/// Invariant 1's findings (and reads of versions that were never written, or not yet).
pub struct StaleReads {
    pub count: usize,
    /// Of `count`, reads made in batch requests.
    pub in_batches: usize,
    /// The first few in time order, and the first read made in a batch if none of those was.
    pub first: Vec<StaleRead>,
    pub phantoms: usize,
    pub phantom_detail: Vec<String>,
}

/// The first acknowledgement of a stream record: the invalidator answered a batch holding it
/// with no failure at or before it.
#[derive(Debug, Clone)]
pub struct Ack {
    pub item: u16,
    pub index: u32,
    pub delete: bool,
    pub sequence_number: String,
    pub at: Nanos,
    /// How many times the record was handed to the invalidator (retries, bisection, duplicates).
    pub deliveries: u32,
}

/// A violation of invariant 1, with what was needed to judge it.
#[derive(Debug, Clone)]
pub struct StaleRead {
    pub read: Read,
    /// The newest record of the item acknowledged before the read started.
    pub acked: Ack,
    /// When the acknowledged write returned to its writer.
    pub acked_commit: Nanos,
    pub why: &'static str,
}

/// Everything recorded about a run, by item.
pub struct History {
    pub items: Vec<String>,
    /// `writes[item][index - 1]`.
    pub writes: Vec<Vec<Write>>,
    /// Per item, in order of acknowledgement.
    pub acks: Vec<Vec<Ack>>,
    /// Per item, in order of start.
    pub reads: Vec<Vec<Read>>,
}

impl History {
    pub fn new(
        items: Vec<String>,
        writes: Vec<Write>,
        acks: Vec<Ack>,
        mut reads: Vec<Read>,
    ) -> Self {
        let n = items.len();
        let mut by_item: Vec<Vec<Write>> = vec![Vec::new(); n];
        for w in writes {
            by_item[w.item as usize].push(w);
        }
        for (item, ws) in by_item.iter_mut().enumerate() {
            ws.sort_by_key(|w| w.index);
            for (i, w) in ws.iter().enumerate() {
                assert_eq!(
                    w.index as usize,
                    i + 1,
                    "item {} has a gap in its history",
                    item
                );
            }
        }
        let mut ack_by_item: Vec<Vec<Ack>> = vec![Vec::new(); n];
        for a in acks {
            ack_by_item[a.item as usize].push(a);
        }
        for a in &mut ack_by_item {
            a.sort_by_key(|a| (a.at, a.index));
        }
        reads.sort_by_key(|r| r.start);
        let mut read_by_item: Vec<Vec<Read>> = vec![Vec::new(); n];
        for r in reads {
            read_by_item[r.item as usize].push(r);
        }
        Self {
            items,
            writes: by_item,
            acks: ack_by_item,
            reads: read_by_item,
        }
    }

    fn write(&self, item: u16, index: u32) -> Option<&Write> {
        index
            .checked_sub(1)
            .and_then(|i| self.writes[item as usize].get(i as usize))
    }

    /// Invariant 1 (and reads of versions that were never written, or not yet).
    pub fn stale_reads(&self) -> StaleReads {
        let mut stale = 0;
        let mut stale_detail = Vec::new();
        let mut phantom = 0;
        let mut phantom_detail = Vec::new();
        for (item, reads) in self.reads.iter().enumerate() {
            let item = item as u16;
            let acks = &self.acks[item as usize];
            // The newest acknowledged record as of each acknowledgement (acks are already in
            // history order per item, but take the running maximum so a checker bug cannot hide
            // behind an out-of-order acknowledgement).
            let mut newest: Vec<usize> = Vec::with_capacity(acks.len());
            for (i, a) in acks.iter().enumerate() {
                let best = match newest.last() {
                    Some(&b) if acks[b].index > a.index => b,
                    _ => i,
                };
                newest.push(best);
            }
            let deletes: Vec<&Write> = self.writes[item as usize]
                .iter()
                .filter(|w| w.kind == WriteKind::Delete)
                .collect();
            for r in reads {
                if let Seen::Found(v) = r.seen {
                    let ok = self
                        .write(item, v)
                        .is_some_and(|w| w.kind != WriteKind::Delete && w.start < r.end);
                    if !ok {
                        phantom += 1;
                        if phantom_detail.len() < 5 {
                            phantom_detail.push(format!(
                                "{} returned version {v}, which was not written before the read ended ({r:?})",
                                self.items[item as usize]
                            ));
                        }
                    }
                }
                // Acknowledged strictly before the read started.
                let n = acks.partition_point(|a| a.at < r.start);
                if n == 0 {
                    continue;
                }
                let acked = &acks[newest[n - 1]];
                let why = match (r.seen, acked.delete) {
                    (Seen::Error, _) => None,
                    (Seen::Found(v), false) if v < acked.index => {
                        Some("returned a version older than an acknowledged write")
                    }
                    (Seen::Found(v), true) if v <= acked.index => {
                        Some("returned a version an acknowledged delete had removed")
                    }
                    (Seen::NotFound, false) => {
                        // Fine only if a later delete could have committed before the read ended.
                        let later = deletes.iter().find(|d| d.index > acked.index);
                        match later {
                            Some(d) if d.start < r.end => None,
                            _ => Some("returned not-found although an acknowledged write exists and no later delete had started"),
                        }
                    }
                    _ => None,
                };
                if let Some(why) = why {
                    stale += 1;
                    let acked_commit = self.write(item, acked.index).map_or(0, |w| w.end);
                    stale_detail.push(StaleRead {
                        read: r.clone(),
                        acked: acked.clone(),
                        acked_commit,
                        why,
                    });
                }
            }
        }
        // The first few, in time order across items, and a batch's among them.
        stale_detail.sort_by_key(|s| s.read.start);
        let in_batches = stale_detail
            .iter()
            .filter(|s| s.read.batch.is_some())
            .count();
        let first_in_a_batch = stale_detail
            .iter()
            .position(|s| s.read.batch.is_some())
            .filter(|&i| i >= 5)
            .map(|i| stale_detail[i].clone());
        stale_detail.truncate(5);
        stale_detail.extend(first_in_a_batch);
        StaleReads {
            count: stale,
            in_batches,
            first: stale_detail,
            phantoms: phantom,
            phantom_detail,
        }
    }

    /// For every write: the time from its commit to the end of the first read that started
    /// after the commit and saw it or a later index. Also the number of writes no such read saw.
    pub fn staleness(&self) -> (Vec<Nanos>, usize) {
        let mut out = Vec::new();
        let mut unseen = 0;
        for (item, reads) in self.reads.iter().enumerate() {
            let item = item as u16;
            let deletes: Vec<&Write> = self.writes[item as usize]
                .iter()
                .filter(|w| w.kind == WriteKind::Delete)
                .collect();
            // The index a read observed: its version, or for not-found the newest delete that
            // had started before it ended.
            let observed = |r: &Read| -> Option<u32> {
                match r.seen {
                    Seen::Found(v) => Some(v),
                    Seen::NotFound => {
                        let n = deletes.partition_point(|d| d.start < r.end);
                        Some(if n == 0 { 0 } else { deletes[n - 1].index })
                    }
                    Seen::Error => None,
                }
            };
            for w in &self.writes[item as usize] {
                let from = reads.partition_point(|r| r.start <= w.end);
                let seen = reads[from..]
                    .iter()
                    .find(|r| observed(r).is_some_and(|o| o >= w.index));
                match seen {
                    Some(r) => out.push(r.end - w.end),
                    None => unseen += 1,
                }
            }
        }
        out.sort_unstable();
        (out, unseen)
    }

    pub fn describe_stale(&self, s: &StaleRead) -> String {
        let item = &self.items[s.read.item as usize];
        let mut out = format!(
            "{item}: read [{:.3} ms .. {:.3} ms] ({}{}) returned {:?}; {} — record #{} ({}, seq {}) \
             committed at {:.3} ms, acknowledged at {:.3} ms after {} deliveries",
            ms(s.read.start),
            ms(s.read.end),
            s.read.status.as_str(),
            match s.read.batch {
                Some(b) => format!(
                    ", reader {} in a batch of {} {}",
                    s.read.reader,
                    b.size,
                    if b.answered_first {
                        "answered before its fills"
                    } else {
                        "filled before its answer"
                    }
                ),
                None => format!(", reader {}", s.read.reader),
            },
            s.read.seen,
            s.why,
            s.acked.index,
            if s.acked.delete { "delete" } else { "write" },
            s.acked.sequence_number,
            ms(s.acked_commit),
            ms(s.acked.at),
            s.acked.deliveries,
        );
        // The item's history around the read.
        let writes = &self.writes[s.read.item as usize];
        let lo = writes.partition_point(|w| w.end + 2_000_000_000 < s.read.start);
        let _ = write!(out, "\n      history:");
        for w in writes[lo..]
            .iter()
            .take_while(|w| w.start < s.read.end + 500_000_000)
        {
            let ack = self.acks[s.read.item as usize]
                .iter()
                .find(|a| a.index == w.index)
                .map_or("never acked".to_owned(), |a| {
                    format!("acked {:.3} ms", ms(a.at))
                });
            let _ = write!(
                out,
                "\n        #{} {:?} [{:.3} .. {:.3} ms], {ack}",
                w.index,
                w.kind,
                ms(w.start),
                ms(w.end)
            );
        }
        out
    }
}

/// p-th percentile of a sorted sample.
pub fn percentile(sorted: &[Nanos], p: f64) -> Nanos {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Counts by a key, printed in a stable order.
#[derive(Default, Debug)]
pub struct Tally(pub HashMap<String, u64>);

impl Tally {
    pub fn add(&mut self, key: impl Into<String>, n: u64) {
        *self.0.entry(key.into()).or_default() += n;
    }
    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }
    pub fn line(&self) -> String {
        let mut keys: Vec<_> = self.0.iter().collect();
        keys.sort();
        keys.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
