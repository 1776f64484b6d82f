//! The invalidator's event source mapping as the SAM template declares it, so the local poller
//! batches, retries and bisects with the settings that will be deployed.
//!
//! Reads the first `Type: DynamoDB` event of an `AWS::Serverless::Function` (preferring a
//! function whose logical id names the invalidator) and maps its standard properties onto
//! [`EsmConfig`]. A value may be a literal or a reference to a template parameter (`!Ref Name`
//! or `{"Ref": "Name"}`), which resolves to the parameter's `Default`, as `sam deploy` would
//! without overrides. Any other intrinsic function is an error naming the property: guessing a
//! value would make local runs differ silently from the deployment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use crate::poller::{EsmConfig, StartingPosition};

/// What was found in the template.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateEsm {
    /// Logical id of the function the event belongs to.
    pub function: String,
    /// Name of the event under the function's `Events`.
    pub event: String,
    /// The mapping's settings. `on_failure` is left `None` and `poll_interval` at its default:
    /// both are local choices, not template settings.
    pub config: EsmConfig,
    /// `DestinationConfig.OnFailure.Destination` as written (an ARN or an intrinsic), if any.
    pub on_failure_destination: Option<String>,
    /// Properties that are present but that the local poller does not emulate.
    pub not_emulated: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML")]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{function}.Events.{event}.Properties.{property}: {reason}")]
    Property {
        function: String,
        event: String,
        property: &'static str,
        reason: String,
    },
}

/// Properties the poller implements; anything else present is reported in `not_emulated`.
const EMULATED: &[&str] = &[
    "Stream",
    "StartingPosition",
    "BatchSize",
    "MaximumBatchingWindowInSeconds",
    "BisectBatchOnFunctionError",
    "MaximumRetryAttempts",
    "MaximumRecordAgeInSeconds",
    "FunctionResponseTypes",
    "DestinationConfig",
];

/// Reads the template at `path`. `Ok(None)` when the file does not exist or declares no
/// DynamoDB event, so callers can fall back to [`EsmConfig::default`].
pub fn load(path: &Path) -> Result<Option<TemplateEsm>, TemplateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TemplateError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    parse(&text).map_err(|e| match e {
        ParseError::Yaml(source) => TemplateError::Yaml {
            path: path.to_owned(),
            source,
        },
        ParseError::Template(e) => e,
    })
}

/// The mapping a local run uses: the template's, or Lambda's defaults when `path` is missing or
/// declares no DynamoDB event.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalEsm {
    pub config: EsmConfig,
    /// Where `config` came from, for the start-up message.
    pub source: String,
    /// See [`TemplateEsm::not_emulated`].
    pub not_emulated: Vec<String>,
}

/// [`load`], with the fallback to [`EsmConfig::default`] the local stack runs with.
pub fn local(path: &Path) -> Result<LocalEsm, TemplateError> {
    let shown = path.display();
    Ok(match load(path)? {
        Some(found) => LocalEsm {
            source: format!("{shown} ({}.Events.{})", found.function, found.event),
            config: found.config,
            not_emulated: found.not_emulated,
        },
        None => LocalEsm {
            config: EsmConfig::default(),
            source: if path.exists() {
                format!("Lambda's defaults ({shown} has no DynamoDB event)")
            } else {
                format!("Lambda's defaults (no {shown})")
            },
            not_emulated: Vec::new(),
        },
    })
}

/// Parses template text; see [`load`].
pub fn from_str(text: &str) -> Result<Option<TemplateEsm>, TemplateError> {
    parse(text).map_err(|e| match e {
        ParseError::Yaml(source) => TemplateError::Yaml {
            path: PathBuf::from("<template>"),
            source,
        },
        ParseError::Template(e) => e,
    })
}

enum ParseError {
    Yaml(serde_yaml_ng::Error),
    Template(TemplateError),
}

fn parse(text: &str) -> Result<Option<TemplateEsm>, ParseError> {
    // Parsed into `Value`, not a typed struct: CloudFormation tags such as `!GetAtt` elsewhere in
    // the template must not make it unreadable, and `Value` keeps them as tagged values.
    let doc: Value = serde_yaml_ng::from_str(text).map_err(ParseError::Yaml)?;
    let empty = Mapping::new();
    let params = doc
        .get("Parameters")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let Some(resources) = doc.get("Resources").and_then(Value::as_mapping) else {
        return Ok(None);
    };

    let mut candidates = Vec::new();
    for (logical_id, resource) in resources {
        let (Some(logical_id), Some(resource)) = (logical_id.as_str(), resource.as_mapping())
        else {
            continue;
        };
        if resource.get("Type").and_then(Value::as_str) != Some("AWS::Serverless::Function") {
            continue;
        }
        let events = resource
            .get("Properties")
            .and_then(|p| p.get("Events"))
            .and_then(Value::as_mapping);
        for (name, event) in events.into_iter().flatten() {
            if event.get("Type").and_then(Value::as_str) == Some("DynamoDB") {
                candidates.push((logical_id, name.as_str().unwrap_or_default(), event));
            }
        }
    }
    let chosen = candidates
        .iter()
        .find(|(id, _, _)| id.to_ascii_lowercase().contains("invalidator"))
        .or(candidates.first());
    let Some(&(function, event, declaration)) = chosen else {
        return Ok(None);
    };
    let properties = declaration
        .get("Properties")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let reader = Properties {
        function,
        event,
        properties,
        params,
    };
    reader.esm().map(Some).map_err(ParseError::Template)
}

struct Properties<'a> {
    function: &'a str,
    event: &'a str,
    properties: &'a Mapping,
    params: &'a Mapping,
}

impl Properties<'_> {
    fn error(&self, property: &'static str, reason: impl Into<String>) -> TemplateError {
        TemplateError::Property {
            function: self.function.to_owned(),
            event: self.event.to_owned(),
            property,
            reason: reason.into(),
        }
    }

    fn esm(&self) -> Result<TemplateEsm, TemplateError> {
        let defaults = EsmConfig::default();
        let starting_position = match self.string("StartingPosition")? {
            Some(s) => s
                .parse::<StartingPosition>()
                .map_err(|e| self.error("StartingPosition", e))?,
            None => return Err(self.error("StartingPosition", "required for a DynamoDB event")),
        };
        let batch_size = self
            .integer("BatchSize", 1, 10_000)?
            .map_or(defaults.batch_size, |n| n as usize);
        let batching_window = self
            .integer("MaximumBatchingWindowInSeconds", 0, 300)?
            .map_or(defaults.batching_window, |s| Duration::from_secs(s as u64));
        let bisect_on_error = self
            .boolean("BisectBatchOnFunctionError")?
            .unwrap_or(defaults.bisect_on_error);
        // -1 (the default) means "until the record expires".
        let max_retry_attempts = match self.integer("MaximumRetryAttempts", -1, 10_000)? {
            None | Some(-1) => None,
            Some(n) => Some(n as u32),
        };
        let max_record_age = match self.integer("MaximumRecordAgeInSeconds", -1, 604_800)? {
            None | Some(-1) => None,
            Some(s) if s < 60 => {
                return Err(self.error(
                    "MaximumRecordAgeInSeconds",
                    format!("must be -1 or between 60 and 604800, got {s}"),
                ))
            }
            Some(s) => Some(Duration::from_secs(s as u64)),
        };
        // Without `ReportBatchItemFailures` Lambda ignores the function's response: a partial
        // failure then counts as success, so the default here is `false`, not the poller's.
        let report_batch_item_failures = match self.string_list("FunctionResponseTypes")? {
            None => false,
            Some(types) => {
                if let Some(other) = types.iter().find(|t| *t != "ReportBatchItemFailures") {
                    return Err(self.error(
                        "FunctionResponseTypes",
                        format!("only ReportBatchItemFailures exists, got {other}"),
                    ));
                }
                !types.is_empty()
            }
        };
        let on_failure_destination = self
            .properties
            .get("DestinationConfig")
            .and_then(|d| d.get("OnFailure"))
            .and_then(|d| d.get("Destination"))
            .map(describe);
        let mut not_emulated: Vec<String> = self
            .properties
            .keys()
            .filter_map(Value::as_str)
            .filter(|k| !EMULATED.contains(k))
            .map(str::to_owned)
            .collect();
        not_emulated.sort();
        Ok(TemplateEsm {
            function: self.function.to_owned(),
            event: self.event.to_owned(),
            config: EsmConfig {
                batch_size,
                batching_window,
                bisect_on_error,
                max_retry_attempts,
                max_record_age,
                starting_position,
                report_batch_item_failures,
                on_failure: None,
                poll_interval: defaults.poll_interval,
            },
            on_failure_destination,
            not_emulated,
        })
    }

    /// The property's value with a parameter reference replaced by the parameter's default.
    /// `None` when absent or `!Ref AWS::NoValue`.
    fn value(&self, property: &'static str) -> Result<Option<&Value>, TemplateError> {
        match self.properties.get(property) {
            None => Ok(None),
            Some(v) => self.resolve(property, v),
        }
    }

    fn resolve<'v>(
        &'v self,
        property: &'static str,
        value: &'v Value,
    ) -> Result<Option<&'v Value>, TemplateError> {
        let reference = match value {
            Value::Tagged(t) if t.tag == "Ref" => Some(&t.value),
            Value::Tagged(t) => {
                return Err(self.error(
                    property,
                    format!("the intrinsic {} is not supported here", t.tag),
                ))
            }
            Value::Mapping(m) if m.len() == 1 => match m.iter().next() {
                Some((Value::String(k), v)) if k == "Ref" => Some(v),
                Some((Value::String(k), _)) if k.starts_with("Fn::") => {
                    return Err(
                        self.error(property, format!("the intrinsic {k} is not supported here"))
                    )
                }
                _ => None,
            },
            _ => None,
        };
        let Some(reference) = reference else {
            return Ok(Some(value));
        };
        let Some(name) = reference.as_str() else {
            return Err(self.error(property, "Ref needs a parameter name"));
        };
        if name == "AWS::NoValue" {
            return Ok(None);
        }
        let Some(param) = self.params.get(name) else {
            return Err(self.error(property, format!("Ref {name}: no such parameter")));
        };
        match param.get("Default") {
            Some(default) => Ok(Some(default)),
            None => Err(self.error(
                property,
                format!("Ref {name}: the parameter has no Default to run with locally"),
            )),
        }
    }

    fn string(&self, property: &'static str) -> Result<Option<String>, TemplateError> {
        match self.value(property)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.error(property, format!("expected a string, got {other:?}"))),
        }
    }

    fn integer(
        &self,
        property: &'static str,
        min: i64,
        max: i64,
    ) -> Result<Option<i64>, TemplateError> {
        let n = match self.value(property)? {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_i64(),
            // Parameters of `Type: Number` are often given quoted defaults.
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            Some(n) => Err(self.error(
                property,
                format!("must be between {min} and {max}, got {n}"),
            )),
            None => Err(self.error(property, "expected an integer")),
        }
    }

    fn boolean(&self, property: &'static str) -> Result<Option<bool>, TemplateError> {
        match self.value(property)? {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => {
                Err(self.error(property, format!("expected true or false, got {other:?}")))
            }
        }
    }

    /// A list of strings, or a comma-separated string (a `CommaDelimitedList` default).
    fn string_list(&self, property: &'static str) -> Result<Option<Vec<String>>, TemplateError> {
        match self.value(property)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect(),
            )),
            Some(Value::Sequence(items)) => {
                let mut out = Vec::new();
                for item in items {
                    match self.resolve(property, item)? {
                        None => {}
                        Some(Value::String(s)) => out.push(s.clone()),
                        Some(other) => {
                            return Err(
                                self.error(property, format!("expected strings, got {other:?}"))
                            )
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(other) => Err(self.error(property, format!("expected a list, got {other:?}"))),
        }
    }
}

/// A destination as written: `arn:...`, `!GetAtt Queue.Arn`, `{"Fn::GetAtt": [...]}`.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Tagged(t) => match &t.value {
            Value::String(s) => format!("{} {s}", t.tag),
            other => format!("{} {}", t.tag, compact(other)),
        },
        other => compact(other),
    }
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| format!("{value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Parameters:
  StreamBatchSize:
    Type: Number
    Default: 200
  RetryAttempts:
    Type: Number
    Default: "5"
  Unset:
    Type: String
Resources:
  ProductsTable:
    Type: AWS::DynamoDB::Table
    Properties:
      StreamSpecification:
        StreamViewType: NEW_AND_OLD_IMAGES
  ReadFunction:
    Type: AWS::Serverless::Function
    Properties:
      Handler: bootstrap
      Events:
        Api:
          Type: HttpApi
          Properties:
            Path: /products/{id}
            Method: GET
  InvalidatorFunction:
    Type: AWS::Serverless::Function
    Metadata:
      BuildMethod: rust-cargolambda
    Properties:
      Environment:
        Variables:
          REDIS_URL: !Sub "redis://${Cache.RedisEndpoint.Address}:6379"
      Events:
        Stream:
          Type: DynamoDB
          Properties:
            Stream: !GetAtt ProductsTable.StreamArn
            StartingPosition: TRIM_HORIZON
            BatchSize: !Ref StreamBatchSize
            MaximumBatchingWindowInSeconds: 1
            BisectBatchOnFunctionError: true
            MaximumRetryAttempts: {"Ref": "RetryAttempts"}
            MaximumRecordAgeInSeconds: 3600
            FunctionResponseTypes:
              - ReportBatchItemFailures
            DestinationConfig:
              OnFailure:
                Destination: !GetAtt InvalidationDLQ.Arn
            ParallelizationFactor: 2
"#;

    #[test]
    fn reads_the_invalidators_mapping_resolving_parameter_defaults() {
        let esm = from_str(TEMPLATE).unwrap().expect("a DynamoDB event");
        assert_eq!(
            (esm.function.as_str(), esm.event.as_str()),
            ("InvalidatorFunction", "Stream")
        );
        assert_eq!(
            esm.config,
            EsmConfig {
                batch_size: 200,
                batching_window: Duration::from_secs(1),
                bisect_on_error: true,
                max_retry_attempts: Some(5),
                max_record_age: Some(Duration::from_secs(3600)),
                starting_position: StartingPosition::TrimHorizon,
                report_batch_item_failures: true,
                on_failure: None,
                poll_interval: EsmConfig::default().poll_interval,
            }
        );
        assert_eq!(
            esm.on_failure_destination.as_deref(),
            Some("!GetAtt InvalidationDLQ.Arn")
        );
        assert_eq!(esm.not_emulated, ["ParallelizationFactor"]);
    }

    #[test]
    fn absent_properties_take_lambdas_defaults() {
        let esm = from_str(
            r#"
Resources:
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      Events:
        Changes:
          Type: DynamoDB
          Properties:
            Stream: arn:aws:dynamodb:us-east-1:1:table/T/stream/x
            StartingPosition: LATEST
            MaximumRetryAttempts: -1
"#,
        )
        .unwrap()
        .unwrap();
        let d = EsmConfig::default();
        assert_eq!(esm.config.starting_position, StartingPosition::Latest);
        assert_eq!(esm.config.batch_size, d.batch_size);
        assert_eq!(esm.config.batching_window, Duration::ZERO);
        assert!(!esm.config.bisect_on_error);
        assert_eq!(esm.config.max_retry_attempts, None);
        assert_eq!(esm.config.max_record_age, None);
        // No FunctionResponseTypes: Lambda does not read the response at all.
        assert!(!esm.config.report_batch_item_failures);
        assert_eq!(esm.on_failure_destination, None);
        assert!(esm.not_emulated.is_empty());
    }

    #[test]
    fn json_templates_and_comma_lists_work_too() {
        let esm = from_str(
            r#"{"Parameters": {"Types": {"Type": "CommaDelimitedList", "Default": "ReportBatchItemFailures"}},
                "Resources": {"Fn": {"Type": "AWS::Serverless::Function", "Properties": {"Events": {
                  "S": {"Type": "DynamoDB", "Properties": {
                    "StartingPosition": "TRIM_HORIZON", "BatchSize": "10",
                    "FunctionResponseTypes": {"Ref": "Types"},
                    "BisectBatchOnFunctionError": {"Ref": "AWS::NoValue"}}}}}}}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(esm.config.batch_size, 10);
        assert!(esm.config.report_batch_item_failures);
        assert!(!esm.config.bisect_on_error);
    }

    #[test]
    fn errors_name_the_property() {
        let with = |props: &str| {
            from_str(&format!(
                "Parameters:\n  NoDefault:\n    Type: Number\nResources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      Events:\n        E:\n          Type: DynamoDB\n          Properties:\n            StartingPosition: LATEST\n{props}"
            ))
            .expect_err(props)
            .to_string()
        };
        let cases = [
            ("            BatchSize: 0\n", "BatchSize"),
            ("            BatchSize: !Ref NoDefault\n", "no Default"),
            ("            BatchSize: !Ref Missing\n", "no such parameter"),
            ("            BatchSize: !If [C, 1, 2]\n", "!If"),
            (
                "            MaximumRecordAgeInSeconds: 30\n",
                "MaximumRecordAgeInSeconds",
            ),
            (
                "            FunctionResponseTypes: [Other]\n",
                "FunctionResponseTypes",
            ),
            (
                "            BisectBatchOnFunctionError: maybe\n",
                "BisectBatchOnFunctionError",
            ),
        ];
        for (props, want) in cases {
            let err = with(props);
            assert!(err.contains(want), "{props:?}: {err}");
            assert!(err.starts_with("F.Events.E.Properties."), "{err}");
        }
        let err = from_str("Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      Events:\n        E:\n          Type: DynamoDB\n          Properties: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("StartingPosition"), "{err}");
    }

    #[test]
    fn no_dynamodb_event_or_no_file_means_none() {
        let api_only = "Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      Events:\n        Api:\n          Type: HttpApi\n";
        assert_eq!(from_str(api_only).unwrap(), None);
        assert_eq!(load(Path::new("/nonexistent/template.yaml")).unwrap(), None);
        assert!(matches!(
            from_str("Resources: [unclosed"),
            Err(TemplateError::Yaml { .. })
        ));
    }

    /// The repository's own template, once it exists, must be one the local stack can run.
    #[test]
    fn the_repository_template_is_readable() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/template.yaml");
        if !path.exists() {
            return;
        }
        let esm = load(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .unwrap_or_else(|| panic!("{} declares no DynamoDB event", path.display()));
        assert!(esm.config.batch_size >= 1);
    }
}
