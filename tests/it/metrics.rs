//! What the functions tell CloudWatch: the compiled binaries under the local Runtime API with
//! Lambda's JSON log format, their standard output parsed back line by line. Metrics are EMF
//! lines, checked against the format's rules (what CloudWatch would extract) and summed; every
//! other line is a JSON log record, and none carries an item body.

use std::time::{SystemTime, UNIX_EPOCH};

use product_cache::config::InvalidationMode::{Delete, Refresh};
use serde_json::{json, Value};

use crate::lambda_binaries::{get_product_event, http_parts, Function};
use crate::support::{fixture, TestEnv};

/// One EMF line, validated: the metrics it declares, with their values.
#[derive(Debug)]
pub(crate) struct Emf {
    namespace: String,
    pub(crate) dimensions: Vec<(String, String)>,
    values: Vec<(String, String, Vec<f64>)>,
}

impl Emf {
    /// The metrics the record carries.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.values.iter().map(|(name, _, _)| name.as_str())
    }
}

/// Parses `line` as CloudWatch reads an EMF record, panicking on anything it would reject:
/// `_aws.Timestamp` in epoch ms, each directive's namespace, dimension sets naming top-level
/// string members, and metrics naming top-level numbers (or arrays of at most 100 numbers)
/// with a unit CloudWatch knows.
pub(crate) fn parse_emf(line: &str) -> Option<Emf> {
    let record: Value = serde_json::from_str(line).ok()?;
    let aws = record.get("_aws")?;
    let ts = aws["Timestamp"].as_u64().expect("Timestamp is epoch ms");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Epoch milliseconds of this run (seconds or microseconds would be far off): no later than
    // now, no earlier than an hour ago (a long checker run parses its first lines at its end;
    // CloudWatch itself takes up to two weeks back).
    assert!(
        ts <= now + 1_000 && now - ts < 3_600_000,
        "timestamp {ts} is not of this run: {line}"
    );
    let directives = aws["CloudWatchMetrics"].as_array().expect("directives");
    assert_eq!(directives.len(), 1, "{line}");
    let d = &directives[0];
    let namespace = d["Namespace"].as_str().expect("Namespace").to_owned();
    let mut dimensions = Vec::new();
    for set in d["Dimensions"].as_array().expect("Dimensions") {
        for name in set.as_array().expect("a dimension set") {
            let name = name.as_str().expect("a dimension name");
            let value = record[name]
                .as_str()
                .unwrap_or_else(|| panic!("dimension {name} is not a string member: {line}"));
            dimensions.push((name.to_owned(), value.to_owned()));
        }
    }
    let mut values = Vec::new();
    for metric in d["Metrics"].as_array().expect("Metrics") {
        let name = metric["Name"].as_str().expect("Name");
        let unit = metric["Unit"].as_str().expect("Unit");
        assert!(["Count", "Milliseconds"].contains(&unit), "{line}");
        let v = match &record[name] {
            Value::Number(n) => vec![n.as_f64().unwrap()],
            Value::Array(a) => {
                assert!(!a.is_empty() && a.len() <= 100, "{line}");
                a.iter().map(|x| x.as_f64().expect("a number")).collect()
            }
            other => panic!("metric {name} is {other}, not a number: {line}"),
        };
        values.push((name.to_owned(), unit.to_owned(), v));
    }
    Some(Emf {
        namespace,
        dimensions,
        values,
    })
}

/// Lines that must all be EMF records (a sink's), parsed.
pub(crate) fn emf_of(lines: &std::sync::Mutex<Vec<String>>) -> Vec<Emf> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| parse_emf(l).unwrap_or_else(|| panic!("not an EMF line: {l}")))
        .collect()
}

/// Every line of a function's output: its EMF records, and its log records (each of which
/// must be a JSON object, as Lambda's JSON log format wants).
fn split(output: &str) -> (Vec<Emf>, Vec<Value>) {
    let (mut emf, mut logs) = (Vec::new(), Vec::new());
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        match parse_emf(line) {
            Some(e) => emf.push(e),
            None => logs.push(
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}")),
            ),
        }
    }
    (emf, logs)
}

/// A metric summed over every record (array values summed too).
pub(crate) fn total<E: std::borrow::Borrow<Emf>>(emf: &[E], name: &str) -> f64 {
    emf.iter()
        .flat_map(|e| e.borrow().values.iter())
        .filter(|(n, _, _)| n == name)
        .flat_map(|(_, _, v)| v.iter())
        .sum()
}

fn samples(emf: &[Emf], name: &str) -> Vec<f64> {
    emf.iter()
        .flat_map(|e| e.values.iter())
        .filter(|(n, _, _)| n == name)
        .flat_map(|(_, _, v)| v.iter().copied())
        .collect()
}

#[tokio::test]
async fn the_read_function_emits_one_metrics_line_per_invocation_and_json_logs() {
    let mut env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let redis_url = env.redis.url();
    let mut function = Function::spawn(
        "read-function",
        &[
            ("REDIS_URL", &redis_url),
            ("TABLE_NAME", &env.table),
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("METRICS_SERVICE", "shop-test"),
        ],
    )
    .await;
    let status = |answer: &Value| http_parts(answer).1;
    let first = function.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(status(&first), "miss");
    let second = function.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(status(&second), "hit");
    let bad = function
        .respond(get_product_event("{bad}", "%7Bbad%7D"))
        .await;
    assert_eq!(http_parts(&bad).0, 400);
    let missing = function.respond(get_product_event("nope", "nope")).await;
    assert_eq!(status(&missing), "miss");
    // The miss's fill runs after its response: stop Redis only once the invocation is over.
    function.settled().await;
    // A cache fault: the answer bypasses Redis and a warning is logged inside the invocation.
    env.redis.stop().await;
    let bypass = function.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(status(&bypass), "bypass");
    // Each line is written after its response, before the invocation is over.
    function.settled().await;

    let output = function.output().await;
    let (emf, logs) = split(&output);
    assert_eq!(emf.len(), 5, "one line per invocation:\n{output}");
    for e in &emf {
        assert_eq!(e.namespace, "ProductCache");
        assert_eq!(
            e.dimensions,
            [
                ("Service".to_owned(), "shop-test".to_owned()),
                ("Function".to_owned(), "read".to_owned())
            ]
        );
    }
    assert_eq!(total(&emf, "Hits"), 1.0, "{output}");
    assert_eq!(total(&emf, "Misses"), 2.0, "{output}");
    assert_eq!(total(&emf, "InvalidRequests"), 1.0, "{output}");
    assert_eq!(total(&emf, "Bypasses"), 1.0, "{output}");
    assert_eq!(total(&emf, "RefusedFills"), 0.0, "{output}");

    // The warning about the stopped Redis names the invocation it happened in.
    let warning = logs
        .iter()
        .find(|l| l["level"] == "WARN")
        .unwrap_or_else(|| panic!("no warning logged:\n{output}"));
    assert!(
        warning.to_string().contains("requestId"),
        "a log line inside an invocation carries its request id: {warning}"
    );
    // No item body in any line: the price and name are only in the HTTP answers.
    for needle in ["129.99", "Product kb-001"] {
        assert!(!output.contains(needle), "{needle} logged:\n{output}");
    }
}

/// Both modes: a single node's delete-mode batches run plain commands, refresh mode the apply
/// script, and each must say what it refused.
#[tokio::test]
async fn the_invalidator_counts_its_records_and_how_late_they_were() {
    for mode in [Delete, Refresh] {
        invalidator_metrics(mode).await;
    }
}

async fn invalidator_metrics(mode: product_cache::config::InvalidationMode) {
    let mut env = TestEnv::new(mode).await;
    let redis_url = env.redis.url();
    let mode_name = format!("{mode:?}").to_lowercase();
    let mut function = Function::spawn(
        "invalidator-function",
        &[
            ("REDIS_URL", &redis_url),
            ("INVALIDATION_MODE", &mode_name),
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            // The test counts records, it does not time them: a clean-clone CI run on a
            // loaded machine saw the first batch miss the default 100 ms and fail a record.
            ("REDIS_TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    // The fixture's eight records and one that names no product at all (skipped, logged).
    let mut event = fixture("batch-mixed.json");
    let records = event["Records"].as_array_mut().unwrap();
    let created: Vec<f64> = records
        .iter()
        .map(|r| {
            r["dynamodb"]["ApproximateCreationDateTime"]
                .as_f64()
                .unwrap()
        })
        .collect();
    records.push(json!({
        "eventID": "no-key", "eventName": "MODIFY", "eventSource": "aws:dynamodb",
        "dynamodb": {"SequenceNumber": "111000000000000000999",
                     "NewImage": {"secretNote": {"S": "do not log me"}}}
    }));
    let before = now_ms();
    let response = function.respond(event.clone()).await;
    let after = now_ms();
    assert_eq!(response, json!({"batchItemFailures": []}));
    // Delivered again, as Lambda may: every record is older than what its key has seen.
    let again = function.respond(event.clone()).await;
    assert_eq!(again, json!({"batchItemFailures": []}));

    env.redis.stop().await;
    let failed = function.respond(fixture("batch-mixed.json")).await;
    assert_eq!(failed["batchItemFailures"].as_array().unwrap().len(), 1);

    let output = function.output().await;
    let (emf, logs) = split(&output);
    assert_eq!(emf.len(), 3, "{output}");
    assert!(emf.iter().all(|e| e
        .dimensions
        .contains(&("Function".into(), "invalidator".into()))));
    assert_eq!(total(&emf, "BatchSize"), 9.0 + 9.0 + 8.0);
    assert_eq!(total(&emf[..1], "RecordsApplied"), 8.0, "{output}");
    assert_eq!(total(&emf[1..2], "RecordsApplied"), 0.0, "{output}");
    assert_eq!(
        total(&emf[1..2], "RecordsRefusedAsOlder"),
        8.0,
        "{mode:?}: {output}"
    );
    assert_eq!(total(&emf[..1], "RecordsRefusedAsOlder"), 0.0, "{output}");
    assert_eq!(total(&emf, "RecordsSkippedMalformed"), 2.0, "{output}");
    assert_eq!(
        total(&emf, "RecordsFailed"),
        8.0,
        "the failed batch goes back whole"
    );
    // One lag per applied record (fewer than 100), each from its own creation time to now.
    let mut lags = samples(&emf, "InvalidationLag");
    lags.sort_by(f64::total_cmp);
    let mut expected: Vec<(f64, f64)> = created
        .iter()
        .map(|c| (before as f64 - c * 1e3, after as f64 - c * 1e3))
        .collect();
    expected.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(lags.len(), expected.len(), "{lags:?}");
    for (lag, (lo, hi)) in lags.iter().zip(&expected) {
        assert!(lo <= lag && lag <= hi, "lag {lag} not within [{lo}, {hi}]");
    }
    assert!(
        logs.iter()
            .any(|l| l.to_string().contains("skipping stream record")),
        "{output}"
    );
    assert!(!output.contains("do not log me"), "{output}");
    assert!(!output.contains("Mechanical Keyboard"), "{output}");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Whether the template's alarm `name` would go off on these EMF records: its namespace (the
/// `MetricsNamespace` parameter's default), metric and dimensions (`Service` is the stack name,
/// here `service`) select the values, summed, compared with its threshold. A `Sum` alarm on a
/// plain metric; anything else in its definition fails the test rather than being guessed.
pub(crate) fn alarm_fires(name: &str, emf: &[Emf], service: &str) -> bool {
    use serde_yaml_ng::Value as Y;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml");
    let template: Y = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let props = &template["Resources"][name]["Properties"];
    assert_eq!(props["Statistic"].as_str(), Some("Sum"), "{name}");
    let reference = |v: &Y| match v {
        Y::Tagged(t) if t.tag == "Ref" => t.value.as_str().map(str::to_owned),
        _ => None,
    };
    let namespace = match reference(&props["Namespace"]) {
        Some(param) => template["Parameters"][param.as_str()]["Default"]
            .as_str()
            .unwrap()
            .to_owned(),
        None => props["Namespace"].as_str().unwrap().to_owned(),
    };
    let metric = props["MetricName"].as_str().unwrap();
    let dimensions: Vec<(String, String)> = props["Dimensions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|d| {
            let value = match reference(&d["Value"]).as_deref() {
                Some("AWS::StackName") => service.to_owned(),
                Some(other) => panic!("{name}: a dimension refers to {other}"),
                None => d["Value"].as_str().unwrap().to_owned(),
            };
            (d["Name"].as_str().unwrap().to_owned(), value)
        })
        .collect();
    let sum: f64 = emf
        .iter()
        .filter(|e| e.namespace == namespace && e.dimensions == dimensions)
        .flat_map(|e| e.values.iter())
        .filter(|(n, _, _)| n == metric)
        .flat_map(|(_, _, v)| v.iter())
        .sum();
    let threshold = props["Threshold"].as_f64().unwrap();
    match props["ComparisonOperator"].as_str().unwrap() {
        "GreaterThanThreshold" => sum > threshold,
        "GreaterThanOrEqualToThreshold" => sum >= threshold,
        other => panic!("{name}: {other} is not evaluated here"),
    }
}
