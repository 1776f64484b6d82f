//! Measure and compare: a figure takes turns between what it measures and its baseline
//! ([`alternate`]), times both the same way ([`timed`], the round trips counted by the proxies
//! meanwhile), keeps each side's [`Samples`], and turns the pair into its row with [`Compare`]:
//! judged on wall time on loopback, and through the proxy on round trips or on wall time, as the
//! figure says.

use std::future::Future;
use std::time::{Duration, Instant};

use local_stack::services::RedisCluster;

use crate::env::Env;
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, percentile};
use crate::Error;

/// Where round trips are counted: the proxy (or proxies, one per node) in front of Redis. A
/// connection that bypasses the proxies (loopback to the single node) counts none.
pub trait Counted {
    /// Round trips so far, per node.
    fn counts(&self) -> Vec<u64>;
}

impl Counted for Env {
    fn counts(&self) -> Vec<u64> {
        vec![self.round_trips()]
    }
}

impl Counted for RedisCluster {
    fn counts(&self) -> Vec<u64> {
        self.proxies().iter().map(|p| p.round_trips()).collect()
    }
}

/// What one timed run cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub wall: Duration,
    /// Round trips, all nodes together.
    pub round_trips: u64,
    /// Round trips to the node that took the most.
    pub busiest: u64,
}

/// The round trips `counted` took since `before` (from [`Counted::counts`]): all, and the
/// busiest node's.
pub fn trips_since(counted: &impl Counted, before: &[u64]) -> (u64, u64) {
    let per_node: Vec<u64> = counted
        .counts()
        .iter()
        .zip(before)
        .map(|(now, then)| now.saturating_sub(*then))
        .collect();
    (
        per_node.iter().sum(),
        per_node.iter().copied().max().unwrap_or(0),
    )
}

/// Runs `work` and returns what it gave and what it cost.
pub async fn timed<F: Future>(counted: &impl Counted, work: F) -> (F::Output, Cost) {
    let before = counted.counts();
    let started = Instant::now();
    let out = work.await;
    let wall = started.elapsed();
    let (round_trips, busiest) = trips_since(counted, &before);
    (
        out,
        Cost {
            wall,
            round_trips,
            busiest,
        },
    )
}

/// The product's side in [`alternate`]: the first; its baselines follow.
pub const PRODUCT: usize = 0;

/// Who goes first in a round of [`alternate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The sides in their order every round: the product's block, then the baseline's.
    Fixed,
    /// Round `r` starts with side `r % N`, then the next, and so on: no side always runs
    /// right after another (after its fills, say, or its cache warming).
    Rotate,
}

/// The skeleton of every comparison: `rounds` rounds in which each side `s` (the product
/// first, then its baselines) takes `blocks[s]` samples in a row, in `order`. The sides take
/// turns so that whatever drifts during a figure (another process, the CPU's clock, the
/// proxy's scheduling) falls on all of them alike; one long phase of each moved a ratio by a
/// third between runs on a shared machine. `sample(side, round)` takes one sample; the
/// samples come back per side, in the order taken.
pub async fn alternate<const N: usize, T>(
    rounds: usize,
    blocks: [usize; N],
    order: Order,
    mut sample: impl AsyncFnMut(usize, usize) -> Result<T, Error>,
) -> Result<[Vec<T>; N], Error> {
    let mut taken: [Vec<T>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..rounds {
        for turn in 0..N {
            let side = match order {
                Order::Fixed => turn,
                Order::Rotate => (turn + round) % N,
            };
            for _ in 0..blocks[side] {
                taken[side].push(sample(side, round).await?);
            }
        }
    }
    Ok(taken)
}

/// The costs of one side of a comparison.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<Cost>);

impl Cost {
    /// A cost timed without counting round trips.
    pub fn wall(wall: Duration) -> Self {
        Self {
            wall,
            ..Self::default()
        }
    }
}

impl From<Vec<Cost>> for Samples {
    fn from(costs: Vec<Cost>) -> Self {
        Self(costs)
    }
}

impl Samples {
    pub fn push(&mut self, cost: Cost) {
        self.0.push(cost);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn at(&self, p: f64, of: impl Fn(&Cost) -> f64) -> f64 {
        let mut values: Vec<f64> = self.0.iter().map(of).collect();
        values.sort_by(f64::total_cmp);
        percentile(&values, p)
    }

    /// The `p`-th percentile (0..=1) of the wall times, in `unit` (ms or us).
    pub fn wall(&self, p: f64, unit: Unit) -> f64 {
        match unit {
            Unit::Micros => self.at(p, |c| stats::micros(c.wall)),
            _ => self.at(p, |c| stats::millis(c.wall)),
        }
    }

    /// The `p`-th percentile of the round trips, all nodes together.
    pub fn round_trips(&self, p: f64) -> f64 {
        self.at(p, |c| c.round_trips as f64)
    }

    /// The `p`-th percentile of the busiest node's round trips.
    pub fn busiest(&self, p: f64) -> f64 {
        self.at(p, |c| c.busiest as f64)
    }
}

/// How a row is judged through the proxy (on loopback it is always wall time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThroughProxy {
    /// Round trips: the proxy's delay and the machine's noise dominate the wall time, which
    /// goes in the note.
    RoundTrips,
    /// Wall time, as on loopback: the round trips are what the figure is about.
    Wall,
    /// Wall time, the note left as the figure wrote it: it gives the round trips its own way,
    /// or they are not counted (a server of the figure's own, behind no counting proxy).
    WallAsNoted,
}

/// A measurement against its baseline, as one row.
pub struct Compare {
    pub figure: &'static str,
    pub what: String,
    pub baseline_label: String,
    pub budget: Budget,
    /// The wall times' unit.
    pub unit: Unit,
    /// The percentile compared (0.5 for the median).
    pub p: f64,
    pub through_proxy: ThroughProxy,
    pub note: String,
    pub failure: Option<String>,
}

impl Compare {
    /// The row on `net`: judged on wall time on loopback, through the proxy as
    /// [`through_proxy`](Self::through_proxy) says, with the other measure in the note where it
    /// is not judged.
    pub fn row(self, net: Net, product: &Samples, baseline: &Samples) -> Row {
        let p = self.p;
        let wall = (product.wall(p, self.unit), baseline.wall(p, self.unit));
        let judged = match net {
            Net::Loopback => ThroughProxy::Wall,
            Net::Proxy => self.through_proxy,
        };
        let (judged_on, unit, measured, base, extra) = match judged {
            ThroughProxy::Wall => (
                "wall",
                self.unit,
                wall.0,
                wall.1,
                (net == Net::Proxy).then(|| {
                    format!(
                        "{} vs {} round trips",
                        product.round_trips(p),
                        baseline.round_trips(p)
                    )
                }),
            ),
            ThroughProxy::WallAsNoted => ("wall", self.unit, wall.0, wall.1, None),
            ThroughProxy::RoundTrips => (
                "round trips",
                Unit::RoundTrips,
                product.round_trips(p),
                baseline.round_trips(p),
                Some(format!(
                    "wall {} vs {} ({:.2}x), not judged: the proxy's delay and the machine's noise dominate",
                    self.unit.format(wall.0),
                    self.unit.format(wall.1),
                    wall.0 / wall.1
                )),
            ),
        };
        let note = match extra {
            Some(extra) if self.note.is_empty() => extra,
            Some(extra) => format!("{}; {extra}", self.note),
            None => self.note,
        };
        Row {
            figure: self.figure,
            what: self.what,
            net,
            judged_on,
            unit,
            measured,
            baseline: Some(base),
            baseline_label: self.baseline_label,
            budget: self.budget,
            note,
            failure: self.failure,
        }
    }
}
