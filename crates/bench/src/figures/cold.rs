//! Cold starts: the release function binaries under a local Lambda Runtime API, with the
//! environment Lambda sets. Init is spawn until the runtime and every extension it registered
//! (the read function's fill extension) wait for their first event, where Lambda's init ends;
//! the first event is from handing the event out until the answer is posted; peak RSS is
//! `VmHWM` after the first event.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_stack::runtime_api::{Event, Logged, RuntimeApi};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::env::Env;
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::median;
use crate::{Error, Sizes};

const READ_EVENT: &str = include_str!("../../../../tests/fixtures/apigw-get-product.json");
const BATCH_EVENT: &str = include_str!("../../../../tests/fixtures/batch-mixed.json");
const WITHIN: Duration = Duration::from_secs(15);

/// Beside this binary: `scripts/bench.sh` builds both functions in the same profile.
fn binary(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p functions` (scripts/bench.sh does)",
            path.display()
        )
        .into())
    }
}

fn collect(pipe: impl AsyncRead + Unpin + Send + 'static, into: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut out = into.lock().unwrap();
            out.push_str(&line);
            out.push('\n');
        }
    });
}

/// `VmHWM` of a process, in MiB.
fn peak_rss(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

struct Start {
    init: Duration,
    first_event: Duration,
    rss_mib: f64,
}

async fn one(env: &Env, net: Net, name: &str, table: &str) -> Result<Start, Error> {
    let path = binary(name)?;
    // The read event misses (an empty cache); the batch is not an ordered replay.
    env.flushall().await?;
    let event: Value = serde_json::from_str(if name == "read-function" {
        READ_EVENT
    } else {
        BATCH_EVENT
    })?;
    let api = RuntimeApi::start(name).await;
    let mut cmd = Command::new(&path);
    cmd.env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", api.host_port())
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/26/[$LATEST]bench")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_ENDPOINT_URL_DYNAMODB", env.moto_endpoint()?)
        .env("REDIS_URL", env.url(net))
        .env("TABLE_NAME", table)
        .env("INVALIDATION_MODE", "delete")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let spawned = Instant::now();
    let mut child = cmd.spawn()?;
    let output = Arc::new(Mutex::new(String::new()));
    collect(child.stdout.take().expect("piped"), output.clone());
    collect(child.stderr.take().expect("piped"), output.clone());
    let pid = child.id().ok_or("the function exited at once")?;
    let log = |what: &str| format!("{name} {what}; its output:\n{}", output.lock().unwrap());

    let init_over = |log: &[Logged]| {
        log.iter()
            .any(|l| l.event == Event::Settled { request_id: None })
    };
    if !api.wait_for(WITHIN, init_over).await {
        let _ = child.kill().await;
        return Err(log("never asked for an event").into());
    }
    let init = api
        .events()
        .iter()
        .find(|l| l.event == Event::Settled { request_id: None })
        .ok_or("no end of init recorded")?
        .at
        .saturating_duration_since(spawned);
    // `invoke` panics when there is no answer in time; a task turns that into an error.
    let answer = tokio::spawn(api.invoke(event, WITHIN)).await;
    let rss_mib = peak_rss(pid).unwrap_or(f64::NAN);
    let _ = child.kill().await;
    match answer {
        Ok(Ok(response)) => {
            let ok = match name {
                "read-function" => response["statusCode"] == 200,
                _ => response["batchItemFailures"]
                    .as_array()
                    .is_some_and(Vec::is_empty),
            };
            if !ok {
                return Err(log(&format!("answered {response}")).into());
            }
        }
        Ok(Err(error)) => return Err(log(&format!("reported an error {error}")).into()),
        Err(_) => return Err(log("did not answer").into()),
    }
    let first_event = api
        .timings()
        .first()
        .map(|t| t.duration())
        .ok_or("no invocation timing recorded")?;
    Ok(Start {
        init,
        first_event,
        rss_mib,
    })
}

pub async fn cold_start(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    table: &str,
) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    for name in ["read-function", "invalidator-function"] {
        let mut starts = Vec::new();
        for _ in 0..sizes.cold_runs {
            starts.push(one(env, net, name, table).await?);
        }
        let ms = |f: fn(&Start) -> Duration| {
            let v: Vec<f64> = starts.iter().map(|s| f(s).as_secs_f64() * 1e3).collect();
            (median(&v), v.iter().copied().fold(f64::NAN, f64::max))
        };
        let init = ms(|s| s.init);
        let first = ms(|s| s.first_event);
        let rss = starts.iter().map(|s| s.rss_mib).fold(f64::NAN, f64::max);
        let runs = sizes.cold_runs;
        let first_what = match name {
            "read-function" => "first event (a miss)",
            _ => "first event (3-record batch)",
        };
        let redis = match net {
            Net::Loopback => "",
            Net::Proxy => "; Redis through the proxy",
        };
        let moto = match name {
            "read-function" => "; DynamoDB is moto",
            _ => "",
        };
        rows.push(Row {
            figure: "cold-start",
            what: format!("{name} init"),
            net,
            judged_on: "wall, median",
            unit: Unit::Millis,
            measured: init.0,
            baseline: None,
            baseline_label: "-".into(),
            budget: Budget::AtMost(20.0),
            note: format!("{runs} cold starts, max {:.1} ms{redis}", init.1),
            failure: None,
        });
        rows.push(Row {
            figure: "cold-start",
            what: format!("{name} {first_what}"),
            net,
            judged_on: "wall, median",
            unit: Unit::Millis,
            measured: first.0,
            baseline: None,
            baseline_label: "-".into(),
            budget: Budget::AtMost(50.0),
            note: format!("max {:.1} ms{moto}{redis}", first.1),
            failure: None,
        });
        rows.push(Row {
            figure: "cold-start",
            what: format!("{name} peak RSS"),
            net,
            judged_on: "VmHWM, max",
            unit: Unit::MiB,
            measured: rss,
            baseline: None,
            baseline_label: "-".into(),
            budget: Budget::AtMost(32.0),
            note: "after the first event".into(),
            failure: None,
        });
    }
    Ok(rows)
}
