//! Redis's own accounting (`INFO commandstats`, `INFO cpu`), a `MONITOR` sample that tells
//! top-level commands from the ones scripts ran, percentiles, and a sustained-load driver.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Commands the benchmark itself sends on its control connection while stats are collected.
const OWN_COMMANDS: [&str; 3] = ["info", "config", "echo"];

/// One `cmdstat_<name>` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CmdStat {
    pub calls: u64,
    pub usec: u64,
}

/// `INFO commandstats` by command name (`get`, `evalsha`, `script|load`, ...).
pub fn parse_commandstats(info: &str) -> BTreeMap<String, CmdStat> {
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let mut stat = CmdStat::default();
        for field in fields.split(',') {
            match field.split_once('=') {
                Some(("calls", v)) => stat.calls = v.trim().parse().unwrap_or(0),
                Some(("usec", v)) => stat.usec = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        out.insert(name.to_ascii_lowercase(), stat);
    }
    out
}

/// The numeric field `name` of an `INFO` reply, 0 when it has none.
pub fn info_field(info: &str, name: &str) -> f64 {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// `used_cpu_sys + used_cpu_user` of `INFO cpu`: the server process's CPU time, in seconds.
pub fn parse_cpu(info: &str) -> f64 {
    info_field(info, "used_cpu_sys") + info_field(info, "used_cpu_user")
}

/// Which commands a workload sends itself and which its scripts run, from a `MONITOR` sample.
///
/// `INFO commandstats` counts a command a script runs twice: under the script (whose time
/// includes it) and under its own name. The sample says, per command name, what share of the
/// calls were top-level; [`redis_time`] counts only that share, so a script's nested commands
/// are counted once, inside the script.
#[derive(Debug, Clone, Default)]
pub struct Mix {
    pub top: BTreeMap<String, u64>,
    pub nested: BTreeMap<String, u64>,
}

impl Mix {
    /// The share of `name`'s calls that clients sent (1 for a name the sample did not see).
    pub fn top_share(&self, name: &str) -> f64 {
        let base = name.split('|').next().unwrap_or(name);
        let top = self.top.get(base).copied().unwrap_or(0) as f64;
        let nested = self.nested.get(base).copied().unwrap_or(0) as f64;
        if top + nested == 0.0 {
            1.0
        } else {
            top / (top + nested)
        }
    }

    /// e.g. `evalsha (get in scripts)`.
    pub fn describe(&self) -> String {
        let top: Vec<&str> = self.top.keys().map(String::as_str).collect();
        let nested: Vec<&str> = self.nested.keys().map(String::as_str).collect();
        if nested.is_empty() {
            top.join("+")
        } else {
            format!("{} (in scripts: {})", top.join("+"), nested.join("+"))
        }
    }
}

/// Total top-level command time in microseconds: every command's `usec` weighted by its
/// top-level share, leaving out the benchmark's own commands.
pub fn redis_time(stats: &BTreeMap<String, CmdStat>, mix: &Mix) -> f64 {
    stats
        .iter()
        .filter(|(name, _)| {
            let base = name.split('|').next().unwrap_or(name);
            !OWN_COMMANDS.contains(&base)
        })
        .map(|(name, s)| s.usec as f64 * mix.top_share(name))
        .sum()
}

/// Top-level commands, counted the same way.
pub fn top_level_calls(stats: &BTreeMap<String, CmdStat>, mix: &Mix) -> f64 {
    stats
        .iter()
        .filter(|(name, _)| {
            let base = name.split('|').next().unwrap_or(name);
            !OWN_COMMANDS.contains(&base)
        })
        .map(|(name, s)| s.calls as f64 * mix.top_share(name))
        .sum()
}

/// Runs `work` while a `MONITOR` connection to the server on `port` records what reaches it.
/// `control` sends the end marker once `work` is done, so the sample holds everything `work`
/// caused and nothing after it. MONITOR slows the server down: sample, then measure separately.
pub async fn sample_mix<F: Future>(
    port: u16,
    control: &mut redis::aio::MultiplexedConnection,
    work: F,
) -> Result<(F::Output, Mix), crate::Error> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    stream.write_all(b"MONITOR\r\n").await?;
    let mut lines = BufReader::new(stream).lines();
    match lines.next_line().await? {
        Some(ok) if ok.starts_with("+OK") => {}
        other => return Err(format!("MONITOR answered {other:?}").into()),
    }
    let marker = format!("bench-monitor-end-{}", fastrand::u64(..));
    let reader = {
        let marker = marker.clone();
        tokio::spawn(async move {
            let mut mix = Mix::default();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(&marker) {
                    break;
                }
                let Some((client, command)) = parse_monitor_line(&line) else {
                    continue;
                };
                if OWN_COMMANDS.contains(&command.as_str()) {
                    continue;
                }
                let counts = if client == "lua" {
                    &mut mix.nested
                } else {
                    &mut mix.top
                };
                *counts.entry(command).or_default() += 1;
            }
            mix
        })
    };
    let out = work.await;
    redis::cmd("ECHO")
        .arg(&marker)
        .query_async::<String>(control)
        .await?;
    let mix = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .map_err(|_| "the MONITOR sample never saw its end marker")??;
    Ok((out, mix))
}

/// `+1700000000.123456 [0 127.0.0.1:5555] "GET" "k"` -> (`127.0.0.1:5555`, `get`); a command
/// run by a script shows `[0 lua]`.
fn parse_monitor_line(line: &str) -> Option<(String, String)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let client = line[open + 1..close].split_whitespace().nth(1)?.to_owned();
    let rest = &line[close + 1..];
    let start = rest.find('"')? + 1;
    let end = start + rest[start..].find('"')?;
    Some((client, rest[start..end].to_ascii_lowercase()))
}

/// The `p`-th percentile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 0.5)
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// What a sustained-load run did.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub ok: u64,
    pub bad: u64,
    pub elapsed: Duration,
}

/// `concurrency` tasks calling `op` back to back for `duration`; `op` says whether the call did
/// what was expected (a hit, for the hit benchmark).
pub async fn sustained<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Load
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (op, ok, bad) = (op.clone(), ok.clone(), bad.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                if op().await {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Load {
        ok: ok.load(Ordering::Relaxed),
        bad: bad.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_and_cpu_parse() {
        let info = "# Commandstats\r\n\
            cmdstat_get:calls=10,usec=15,usec_per_call=1.50,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_evalsha:calls=10,usec=60,usec_per_call=6.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_config|resetstat:calls=1,usec=9,usec_per_call=9.00,rejected_calls=0,failed_calls=0\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(
            stats["get"],
            CmdStat {
                calls: 10,
                usec: 15
            }
        );
        assert_eq!(stats["config|resetstat"].calls, 1);
        let cpu = parse_cpu(
            "used_cpu_sys:1.250000\r\nused_cpu_user:0.750000\r\nused_cpu_sys_children:9\r\n",
        );
        assert!((cpu - 2.0).abs() < 1e-9);
    }

    #[test]
    fn nested_commands_are_counted_once() {
        let info = "cmdstat_get:calls=10,usec=15\r\ncmdstat_evalsha:calls=10,usec=60\r\ncmdstat_info:calls=1,usec=100\r\n";
        let stats = parse_commandstats(info);
        let mut mix = Mix::default();
        mix.top.insert("evalsha".into(), 5);
        mix.nested.insert("get".into(), 5);
        assert_eq!(redis_time(&stats, &mix), 60.0);
        assert_eq!(top_level_calls(&stats, &mix), 10.0);
        // A plain GET workload: all of it counts.
        let mut plain = Mix::default();
        plain.top.insert("get".into(), 5);
        assert_eq!(redis_time(&stats, &plain), 75.0);
    }

    #[test]
    fn monitor_lines_tell_scripts_from_clients() {
        assert_eq!(
            parse_monitor_line(r#"+1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" "ab" "2""#),
            Some(("127.0.0.1:5555".into(), "evalsha".into()))
        );
        assert_eq!(
            parse_monitor_line(r#"+1700000000.123457 [0 lua] "GET" "product:1""#),
            Some(("lua".into(), "get".into()))
        );
        assert_eq!(parse_monitor_line("+OK"), None);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
