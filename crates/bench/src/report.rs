//! Rows of the results table, their budgets, and the three ways they are written out: a text
//! table on stdout, JSON, and the Markdown of `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Where Redis is, as seen by the code under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// Straight to the server on 127.0.0.1.
    Loopback,
    /// Through a [`local_stack::proxy::DelayProxy`] adding a round-trip delay.
    Proxy,
}

impl Net {
    pub fn label(self) -> &'static str {
        match self {
            Net::Loopback => "loopback",
            Net::Proxy => "proxy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Micros,
    Millis,
    Secs,
    RoundTrips,
    Percent,
    Count,
    MiB,
    Bytes,
    /// A count per something (commands per change): up to 4 decimals, trailing zeros dropped.
    Mean,
}

impl Unit {
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Micros => format!("{v:.2} us"),
            Unit::Millis => format!("{v:.2} ms"),
            Unit::Secs => format!("{v:.2} s"),
            Unit::RoundTrips => {
                if v.fract() == 0.0 {
                    format!("{v:.0} RT")
                } else {
                    format!("{v:.2} RT")
                }
            }
            Unit::Percent => format!("{v:.2} %"),
            Unit::Count => format!("{v:.0}"),
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::Bytes => format!("{v:.0} B"),
            Unit::Mean => {
                let text = format!("{v:.4}");
                text.trim_end_matches('0').trim_end_matches('.').to_owned()
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Micros => "us",
            Unit::Millis => "ms",
            Unit::Secs => "s",
            Unit::RoundTrips => "round trips",
            Unit::Percent => "percent",
            Unit::Count => "count",
            Unit::MiB => "MiB",
            Unit::Bytes => "bytes",
            Unit::Mean => "mean count",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// measured / baseline <= x.
    RatioAtMost(f64),
    /// baseline / measured >= x: "x times faster than the baseline".
    FasterAtLeast(f64),
    /// measured <= x, in the row's unit (baseline, if any, is for information).
    AtMost(f64),
    /// measured > x, in the row's unit.
    Above(f64),
}

#[derive(Debug, Clone)]
pub struct Row {
    /// The figure, as named in `--only` and the table.
    pub figure: &'static str,
    /// What was measured, in a few words.
    pub what: String,
    pub net: Net,
    /// The measurement the verdict rests on: wall time, round trips, INFO commandstats, ...
    pub judged_on: &'static str,
    pub unit: Unit,
    pub measured: f64,
    pub baseline: Option<f64>,
    pub baseline_label: String,
    pub budget: Budget,
    pub note: String,
    /// A failure the numbers do not show (the batch reported failures, a run errored).
    pub failure: Option<String>,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        let baseline = self.baseline?;
        let ratio = match self.budget {
            Budget::FasterAtLeast(_) => baseline / self.measured,
            _ => self.measured / baseline,
        };
        ratio.is_finite().then_some(ratio)
    }

    pub fn pass(&self) -> bool {
        if self.failure.is_some() || !self.measured.is_finite() {
            return false;
        }
        match self.budget {
            Budget::RatioAtMost(x) => self.ratio().is_some_and(|r| r <= x),
            Budget::FasterAtLeast(x) => self.ratio().is_some_and(|r| r >= x),
            Budget::AtMost(x) => self.measured <= x,
            Budget::Above(x) => self.measured > x,
        }
    }

    pub fn budget_text(&self) -> String {
        match self.budget {
            Budget::RatioAtMost(x) => format!("<= {x}x"),
            Budget::FasterAtLeast(x) => format!(">= {x}x faster"),
            Budget::AtMost(x) => format!("<= {}", self.unit.format(x)),
            Budget::Above(x) => format!("> {}", self.unit.format(x)),
        }
    }

    fn cells(&self) -> [String; 9] {
        let baseline = match self.baseline {
            Some(b) => format!("{} ({})", self.unit.format(b), self.baseline_label),
            None => self.baseline_label.clone(),
        };
        let ratio = self.ratio().map(|r| format!("{r:.2}x")).unwrap_or_default();
        let mut note = self.note.clone();
        if let Some(f) = &self.failure {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(f);
        }
        [
            format!("{}: {}", self.figure, self.what),
            self.net.label().to_owned(),
            self.judged_on.to_owned(),
            if self.measured.is_finite() {
                self.unit.format(self.measured)
            } else {
                "-".into()
            },
            baseline,
            ratio,
            self.budget_text(),
            if self.pass() { "pass" } else { "FAIL" }.to_owned(),
            note,
        ]
    }

    pub fn json(&self) -> Value {
        json!({
            "figure": self.figure,
            "what": self.what,
            "net": self.net.label(),
            "judged_on": self.judged_on,
            "unit": self.unit.name(),
            "measured": finite(self.measured),
            "baseline": self.baseline.and_then(finite),
            "baseline_label": self.baseline_label,
            "ratio": self.ratio(),
            "budget": self.budget_text(),
            "pass": self.pass(),
            "note": self.note,
            "failure": self.failure,
        })
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

const HEADERS: [&str; 9] = [
    "figure",
    "net",
    "judged on",
    "measured",
    "baseline (same run)",
    "ratio",
    "budget",
    "result",
    "note",
];

/// The table for a terminal: aligned columns, one row per check.
pub fn text_table(rows: &[Row]) -> String {
    let cells: Vec<[String; 9]> = rows.iter().map(Row::cells).collect();
    let mut widths = HEADERS.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    // The note is last and left ragged.
    widths[8] = 0;
    let line = |cols: &[String]| {
        let mut out = String::new();
        for (i, c) in cols.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            out.push_str(c);
            if i + 1 < cols.len() {
                out.push_str(&" ".repeat(pad));
                out.push_str("  ");
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(&HEADERS.map(str::to_owned));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// The table as Markdown.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n", HEADERS.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(HEADERS.len())));
    for row in rows {
        let cells = row.cells().map(|c| c.replace('|', "\\|"));
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

/// What the numbers were measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub memory: String,
    pub kernel: String,
    pub redis: String,
    pub rustc: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let redis = local_stack::services::find_redis_server()
            .ok()
            .and_then(|path| command_line(&path.to_string_lossy(), &["--version"]))
            .unwrap_or_else(|| "unknown".into());
        let rustc = command_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory,
            kernel,
            redis,
            rustc,
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "nproc": self.nproc,
            "cpu": self.cpu,
            "memory": self.memory,
            "kernel": self.kernel,
            "redis_server": self.redis,
            "rustc": self.rustc,
        })
    }

    pub fn markdown(&self) -> String {
        format!(
            "- CPU: {} x {} (`nproc` {})\n- memory: {}\n- OS: {}\n- {}\n- {}\n",
            self.nproc, self.cpu, self.nproc, self.memory, self.kernel, self.redis, self.rustc
        )
    }
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Everything about one run that goes into the JSON and BENCHMARKS.md.
pub struct Run<'a> {
    pub date: String,
    pub command: String,
    pub quick: bool,
    pub machine: &'a Machine,
    pub delay: Duration,
    /// Median PING round trip, direct and through the proxy, in ms.
    pub ping_direct_ms: f64,
    pub ping_proxy_ms: f64,
    pub rows: &'a [Row],
    pub notes: &'a [String],
    pub elapsed: Duration,
}

impl Run<'_> {
    pub fn json(&self) -> Value {
        json!({
            "date": self.date,
            "command": self.command,
            "quick": self.quick,
            "machine": self.machine.json(),
            "proxy": {
                "delay_ms": self.delay.as_secs_f64() * 1e3,
                "ping_direct_ms": self.ping_direct_ms,
                "ping_proxy_ms": self.ping_proxy_ms,
            },
            "elapsed_s": self.elapsed.as_secs_f64(),
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "failed": self.rows.iter().filter(|r| !r.pass()).map(|r| format!("{}: {} ({})", r.figure, r.what, r.net.label())).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let failed = self.rows.iter().filter(|r| !r.pass()).count();
        let _ = write!(
            out,
            "# Benchmarks\n\n\
             Written by `{command}` on {date}{quick}; do not edit by hand. \
             docs/benchmarks.md says what each figure measures and how to read the table.\n\n\
             ## Machine\n\n{machine}\n\
             ## Network\n\n\
             Each figure runs on loopback and again through a proxy adding {delay:.2} ms per round \
             trip (ElastiCache in another AZ). Median PING: {direct:.3} ms direct, {proxy:.3} ms \
             through the proxy.\n\n\
             ## Results\n\n\
             {passed} of {total} checks within budget, {failed} over; the run took {elapsed:.0} s.\n\n\
             {table}\n",
            command = self.command,
            date = self.date,
            quick = if self.quick {
                " (quick mode: smaller sizes, not the reference figures)"
            } else {
                ""
            },
            machine = self.machine.markdown(),
            delay = self.delay.as_secs_f64() * 1e3,
            direct = self.ping_direct_ms,
            proxy = self.ping_proxy_ms,
            passed = self.rows.len() - failed,
            total = self.rows.len(),
            elapsed = self.elapsed.as_secs_f64(),
            table = markdown_table(self.rows),
        );
        if !self.notes.is_empty() {
            out.push_str("## Notes from this run\n\n");
            for note in self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

/// `existing` (a BENCHMARKS.md of a full run) with the rows of `figures` replaced by `run`'s,
/// in the place of the rows they replace (at the table's end for a figure it did not have), the
/// summary's counts recounted, and a note naming the run the rows come from. Everything else,
/// the header's run, machine and network included, stays as the full run wrote it.
pub fn merge_markdown(existing: &str, run: &Run, figures: &[&str]) -> Result<String, String> {
    let lines: Vec<&str> = existing.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("| figure |"))
        .ok_or("BENCHMARKS.md has no results table to merge into")?;
    let first_row = header + 2;
    let end = first_row
        + lines[first_row..]
            .iter()
            .take_while(|l| l.starts_with("| "))
            .count();
    let ours = |line: &str| {
        figures
            .iter()
            .any(|f| line.starts_with(&format!("| {f}: ")))
    };
    let new_rows = markdown_table(run.rows);
    let new_rows: Vec<&str> = new_rows.lines().skip(2).collect();
    let mut table: Vec<&str> = Vec::new();
    let mut placed = false;
    for line in &lines[first_row..end] {
        if ours(line) {
            if !placed {
                table.extend(&new_rows);
                placed = true;
            }
        } else {
            table.push(line);
        }
    }
    if !placed {
        table.extend(&new_rows);
    }
    let passed = table.iter().filter(|l| l.contains(" | pass | ")).count();
    let failed = table.len() - passed;

    let note_start = |f: &str| format!("- {f}: rows from a separate run");
    let mut out: Vec<String> = Vec::with_capacity(lines.len() + table.len());
    for line in &lines[..first_row] {
        out.push(match line.split_once(" checks within budget, ") {
            Some((_, rest)) if line.starts_with(|c: char| c.is_ascii_digit()) => {
                let rest = rest.split_once(';').map_or(".", |(_, r)| r);
                format!(
                    "{passed} of {} checks within budget, {failed} over;{rest}",
                    table.len()
                )
            }
            _ => (*line).to_owned(),
        });
    }
    out.extend(table.iter().map(|l| (*l).to_owned()));
    out.extend(
        lines[end..]
            .iter()
            .filter(|l| !figures.iter().any(|f| l.starts_with(&note_start(f))))
            .map(|l| (*l).to_owned()),
    );
    if !out.iter().any(|l| l == "## Notes from this run") {
        while out.last().is_some_and(|l| l.is_empty()) {
            out.pop();
        }
        out.push(String::new());
        out.push("## Notes from this run".into());
        out.push(String::new());
    }
    while out.last().is_some_and(|l| l.is_empty()) {
        out.pop();
    }
    let mut note = format!(
        "{}, `{}` on {}{} ({:.0} s; median PING {:.3} ms direct), merged into this file \
         with --merge: the summary above counts them",
        note_start(&figures.join(", ")),
        run.command,
        run.date,
        if run.quick {
            " (quick mode: smaller sizes, not the reference figures)"
        } else {
            ""
        },
        run.elapsed.as_secs_f64(),
        run.ping_direct_ms,
    );
    for extra in run.notes {
        if !out
            .iter()
            .any(|l| l.strip_prefix("- ") == Some(extra.as_str()))
        {
            let _ = write!(note, "; {extra}");
        }
    }
    out.push(note);
    let mut text = out.join("\n");
    text.push('\n');
    Ok(text)
}

pub fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(measured: f64, baseline: Option<f64>, budget: Budget) -> Row {
        Row {
            figure: "f",
            what: "w".into(),
            net: Net::Loopback,
            judged_on: "wall",
            unit: Unit::Millis,
            measured,
            baseline,
            baseline_label: "b".into(),
            budget,
            note: String::new(),
            failure: None,
        }
    }

    #[test]
    fn budgets_judge_the_right_direction() {
        assert!(row(1.2, Some(1.0), Budget::RatioAtMost(1.3)).pass());
        assert!(!row(1.4, Some(1.0), Budget::RatioAtMost(1.3)).pass());
        assert!(row(1.0, Some(10.0), Budget::FasterAtLeast(10.0)).pass());
        assert!(!row(2.0, Some(10.0), Budget::FasterAtLeast(10.0)).pass());
        assert!(row(20.0, None, Budget::AtMost(20.0)).pass());
        assert!(!row(99.0, None, Budget::Above(99.0)).pass());
        assert!(!row(f64::NAN, Some(1.0), Budget::RatioAtMost(10.0)).pass());
        let mut failed = row(1.0, Some(1.0), Budget::RatioAtMost(3.0));
        failed.failure = Some("batch reported failures".into());
        assert!(!failed.pass());
    }

    #[test]
    fn a_merge_replaces_one_figures_rows_and_recounts() {
        let mut old = row(1.0, Some(1.0), Budget::RatioAtMost(3.0));
        old.figure = "a";
        let mut replaced = row(9.0, None, Budget::AtMost(1.0));
        replaced.figure = "b";
        let existing = format!(
            "# Benchmarks\n\n## Results\n\n1 of 2 checks within budget, 1 over; the run took \
             9 s.\n\n{}\n## Notes from this run\n\n- a note\n",
            markdown_table(&[old, replaced])
        );
        let mut new = row(0.5, None, Budget::AtMost(1.0));
        new.figure = "b";
        let machine = Machine::probe();
        let run = Run {
            date: "today".into(),
            command: "scripts/bench.sh --only b --merge".into(),
            quick: false,
            machine: &machine,
            delay: Duration::ZERO,
            ping_direct_ms: 0.05,
            ping_proxy_ms: 0.5,
            rows: &[new.clone(), new],
            notes: &["a note".into()],
            elapsed: Duration::from_secs(3),
        };
        let merged = merge_markdown(&existing, &run, &["b"]).unwrap();
        assert!(merged.contains("3 of 3 checks within budget, 0 over; the run took 9 s."));
        assert_eq!(merged.matches("| b: w |").count(), 2);
        assert!(!merged.contains("FAIL"));
        assert!(merged.contains("| a: w |"));
        assert!(merged.contains("- b: rows from a separate run, `scripts/bench.sh --only b"));
        // Merged again: the rows and the note are replaced, not added.
        let again = merge_markdown(&merged, &run, &["b"]).unwrap();
        assert_eq!(again, merged);
    }

    #[test]
    fn means_keep_four_decimals_without_trailing_zeros() {
        assert_eq!(Unit::Mean.format(2.0), "2");
        assert_eq!(Unit::Mean.format(0.01), "0.01");
        assert_eq!(Unit::Mean.format(1.0 / 533.0), "0.0019");
        assert_eq!(Unit::Mean.format(0.0), "0");
    }

    #[test]
    fn tables_have_one_line_per_row() {
        let rows = [row(1.0, Some(1.0), Budget::RatioAtMost(3.0))];
        assert_eq!(text_table(&rows).lines().count(), 2);
        assert_eq!(markdown_table(&rows).lines().count(), 3);
        assert!(markdown_table(&rows).contains("| pass |"));
    }
}
