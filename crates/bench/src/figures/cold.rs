//! Cold starts: the release function binaries under a local Lambda Runtime API, with the
//! environment Lambda sets. Init is spawn until the runtime and every extension it registered
//! (the read function's fill extension) wait for their first event, where Lambda's init ends;
//! the first event is from handing the event out until the answer is posted; peak RSS is
//! `VmHWM` after the first event.

use std::path::PathBuf;
use std::time::Duration;

use local_stack::function::{FunctionProcess, Launch};
use local_stack::runtime_api::{Event, Options};
use serde_json::Value;

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

/// Stops a function that failed, and says how, with what it printed.
async fn give_up(function: &mut FunctionProcess, what: String) -> Error {
    function.kill().await;
    let output = function.output().await;
    format!("{} {what}; its output:\n{output}", function.name()).into()
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
    let (moto, redis) = (env.moto_endpoint()?, env.url(net));
    let vars = [
        ("AWS_ENDPOINT_URL_DYNAMODB", moto.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("TABLE_NAME", table),
        ("INVALIDATION_MODE", "delete"),
    ];
    let mut function = FunctionProcess::spawn(Launch {
        name,
        binary: &path,
        api: Options::default(),
        vars: &vars,
        echo: false,
    })
    .await?;

    if !function.initialised(WITHIN).await {
        return Err(give_up(&mut function, "never asked for an event".into()).await);
    }
    let init = function
        .api()
        .events()
        .iter()
        .find(|l| l.event == Event::Settled { request_id: None })
        .ok_or("no end of init recorded")?
        .at
        .saturating_duration_since(function.started_at());
    let answer = function.invoke(event, WITHIN).await;
    let rss_mib = function.peak_rss_mib().unwrap_or(f64::NAN);
    let ok = match &answer {
        Ok(Ok(response)) => match name {
            "read-function" => response["statusCode"] == 200,
            _ => response["batchItemFailures"]
                .as_array()
                .is_some_and(Vec::is_empty),
        },
        _ => false,
    };
    if !ok {
        let what = match answer {
            Ok(Ok(response)) => format!("answered {response}"),
            Ok(Err(error)) => format!("reported an error {error}"),
            Err(e) => e.to_string(),
        };
        return Err(give_up(&mut function, what).await);
    }
    function.kill().await;
    let first_event = function
        .api()
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
        // No baseline: each is judged against its absolute budget.
        let row = |what: String, judged_on, unit, measured, limit, note| Row {
            figure: "cold-start",
            what,
            net,
            judged_on,
            unit,
            measured,
            baseline: None,
            baseline_label: "-".into(),
            budget: Budget::AtMost(limit),
            note,
            failure: None,
        };
        rows.push(row(
            format!("{name} init"),
            "wall, median",
            Unit::Millis,
            init.0,
            20.0,
            format!("{runs} cold starts, max {:.1} ms{redis}", init.1),
        ));
        rows.push(row(
            format!("{name} {first_what}"),
            "wall, median",
            Unit::Millis,
            first.0,
            50.0,
            format!("max {:.1} ms{moto}{redis}", first.1),
        ));
        rows.push(row(
            format!("{name} peak RSS"),
            "VmHWM, max",
            Unit::MiB,
            rss,
            32.0,
            "after the first event".into(),
        ));
    }
    Ok(rows)
}
