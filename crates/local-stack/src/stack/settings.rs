//! The variables the stack's functions run with: each function's own, taken as it would be on
//! Lambda from the environment, then from the SAM template's values, then left to the code's
//! defaults. `docs/configuration.md` ("Where `pcache dev` takes them from") describes the order;
//! the names are `product_cache::config::VARIABLES`, less the cache's connection and the table's
//! name, which the stack sets for what it runs.

use std::path::{Path, PathBuf};

use product_cache::config::variables::Concern;
use product_cache::config::{Function, Source, Variable, VARIABLES};
use serde_yaml_ng::Value;

/// What each function is configured with, and how that differs from the template.
#[derive(Debug, Clone, Default)]
pub struct FunctionVariables {
    /// Per function, in [`Function::ALL`]'s order: the variables set for it.
    by_function: [Vec<(String, String)>; 3],
    /// Variables set in the environment to a value other than the template's.
    pub differing: Vec<Difference>,
    /// Where the values came from, for the banner.
    pub source: String,
}

/// A variable whose value here is not the template's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub name: &'static str,
    pub value: String,
    /// The template's value; `None` when the template does not set it (or computes it at deploy
    /// time), when the default applies there.
    pub template: Option<String>,
    pub default: Option<&'static str>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={} (template: ", self.name, self.value)?;
        match (&self.template, self.default) {
            (Some(value), _) => write!(f, "{value})"),
            (None, Some(default)) => write!(f, "unset, default {default})"),
            (None, None) => f.write_str("unset)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
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
}

/// Whether the stack takes `v` from the environment and the template: not the cache's
/// connection (the stack's own cache), not the table's name (`--table`).
fn taken(v: &Variable) -> bool {
    v.concern != Concern::Connection && v.name != "TABLE_NAME"
}

impl FunctionVariables {
    /// `env`'s values, then those of the template at `template` (a missing file sets nothing).
    pub fn resolve(env: &(impl Source + ?Sized), template: &Path) -> Result<Self, SettingsError> {
        let (from_template, source) = match std::fs::read_to_string(template) {
            Ok(text) => {
                let doc: Value =
                    serde_yaml_ng::from_str(&text).map_err(|source| SettingsError::Yaml {
                        path: template.to_owned(),
                        source,
                    })?;
                let shown = template.display();
                (
                    template_values(&doc),
                    format!("the environment, then {shown}, then the defaults"),
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Default::default(),
                format!(
                    "the environment, then the defaults (no {})",
                    template.display()
                ),
            ),
            Err(source) => {
                return Err(SettingsError::Read {
                    path: template.to_owned(),
                    source,
                })
            }
        };
        Ok(Self::from_layers(env, &from_template, source))
    }

    /// `env` over `template` (per function, in [`Function::ALL`]'s order).
    fn from_layers(
        env: &(impl Source + ?Sized),
        template: &[Vec<(String, String)>; 3],
        source: String,
    ) -> Self {
        let mut by_function: [Vec<(String, String)>; 3] = Default::default();
        let mut differing = Vec::new();
        for v in VARIABLES.iter().filter(|v| taken(v)) {
            let in_template = |f: Function| template[f as usize].get(v.name);
            let from_env = env.get(v.name);
            for &f in v.functions {
                if let Some(value) = from_env.clone().or_else(|| in_template(f)) {
                    by_function[f as usize].push((v.name.to_owned(), value));
                }
            }
            if let Some(value) = from_env {
                // The functions that read it are configured alike in the template; the first
                // one's value stands for them.
                let template = v.functions.iter().find_map(|&f| in_template(f));
                let deployed = template.as_deref().or(v.default_value());
                if deployed != Some(value.as_str()) {
                    differing.push(Difference {
                        name: v.name,
                        value,
                        template,
                        default: v.default_value(),
                    });
                }
            }
        }
        Self {
            by_function,
            differing,
            source,
        }
    }

    /// The variables set for `function`, as a settings source.
    pub fn of(&self, function: Function) -> &Vec<(String, String)> {
        &self.by_function[function as usize]
    }

    /// `name` as set for `function`, if it is.
    pub fn get(&self, function: Function, name: &str) -> Option<String> {
        self.of(function).get(name)
    }
}

/// Each function's `Environment.Variables` in the template, with what is known before a deploy:
/// literals, and `!Ref`s to parameters as their `Default`. A value computed at deploy time
/// (`!If`, `!Sub`, `!GetAtt`, `!Ref AWS::StackName`) is left out: unset here, the code's
/// default applies, which is the nearest a local run can come.
fn template_values(doc: &Value) -> [Vec<(String, String)>; 3] {
    let mut out: [Vec<(String, String)>; 3] = Default::default();
    let params = doc.get("Parameters");
    let Some(resources) = doc.get("Resources").and_then(Value::as_mapping) else {
        return out;
    };
    for (logical_id, resource) in resources {
        if resource.get("Type").and_then(Value::as_str) != Some("AWS::Serverless::Function") {
            continue;
        }
        // The template's functions are ReadFunction, InvalidatorFunction, InspectorFunction.
        let id = logical_id.as_str().unwrap_or_default().to_ascii_lowercase();
        let Some(function) = Function::ALL.into_iter().find(|f| id.starts_with(f.name())) else {
            continue;
        };
        let variables = resource
            .get("Properties")
            .and_then(|p| p.get("Environment"))
            .and_then(|e| e.get("Variables"))
            .and_then(Value::as_mapping);
        for (name, value) in variables.into_iter().flatten() {
            if let (Some(name), Some(value)) = (name.as_str(), known(value, params)) {
                out[function as usize].push((name.to_owned(), value));
            }
        }
    }
    out
}

/// `value` as a string when it is known before a deploy.
fn known(value: &Value, params: Option<&Value>) -> Option<String> {
    let reference = match value {
        Value::Tagged(t) if t.tag == "Ref" => t.value.as_str(),
        Value::Mapping(m) if m.len() == 1 => m.get("Ref").and_then(Value::as_str),
        Value::Tagged(_) | Value::Mapping(_) => return None,
        literal => return scalar(literal),
    };
    // `AWS::StackName` and the like are not parameters: the lookup finds nothing.
    scalar(params?.get(reference?)?.get("Default")?)
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
Parameters:
  LeaseMs:
    Type: Number
    Default: 4000
  InvalidationMode:
    Type: String
    Default: delete
Resources:
  ReadFunction:
    Type: AWS::Serverless::Function
    Properties:
      Environment:
        Variables:
          REDIS_URL: !Sub 'rediss://${Cache.Address}:6379'
          TABLE_NAME: !Ref ProductTable
          LEASE_MS: !Ref LeaseMs
          CONSISTENT_READ: 'true'
          NEGATIVE_TTL_SECONDS: 40
          METRICS_SERVICE: !Ref AWS::StackName
  InvalidatorFunction:
    Type: AWS::Serverless::Function
    Properties:
      Environment:
        Variables:
          INVALIDATION_MODE: {"Ref": "InvalidationMode"}
          REDIS_CONFIRM_REPLICAS: !If [Serverless, '0', !Ref Replicas]
"#;

    fn resolve(env: &[(&str, &str)]) -> FunctionVariables {
        let doc: Value = serde_yaml_ng::from_str(TEMPLATE).unwrap();
        FunctionVariables::from_layers(env, &template_values(&doc), String::new())
    }

    #[test]
    fn each_function_gets_its_own_template_values_under_the_environment() {
        let v = resolve(&[("LEASE_MS", "5000"), ("REDIS_URL", "redis://elsewhere")]);
        // The environment wins, for every function that reads the variable.
        for f in Function::ALL {
            assert_eq!(v.get(f, "LEASE_MS").as_deref(), Some("5000"), "{f:?}");
            // The connection is the stack's, whatever the environment says.
            assert_eq!(v.get(f, "REDIS_URL"), None);
        }
        assert_eq!(
            v.get(Function::Read, "NEGATIVE_TTL_SECONDS").as_deref(),
            Some("40")
        );
        // Only the read function's template sets it; the invalidator runs on its default.
        assert_eq!(v.get(Function::Invalidator, "NEGATIVE_TTL_SECONDS"), None);
        assert_eq!(
            v.get(Function::Invalidator, "INVALIDATION_MODE").as_deref(),
            Some("delete")
        );
        // Computed at deploy time: not known here.
        assert_eq!(v.get(Function::Read, "METRICS_SERVICE"), None);
        assert_eq!(v.get(Function::Read, "TABLE_NAME"), None);
    }

    #[test]
    fn what_differs_from_the_template_is_listed() {
        let v = resolve(&[
            ("LEASE_MS", "5000"),
            ("REDIS_BREAKER_FAILURES", "5"),
            // The template's value and the default: no difference.
            ("NEGATIVE_TTL_SECONDS", "40"),
            ("CACHE_TTL_SECONDS", "3600"),
        ]);
        let shown: Vec<String> = v.differing.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "REDIS_BREAKER_FAILURES=5 (template: unset, default 3)",
                "LEASE_MS=5000 (template: 4000)",
            ]
        );
    }
}
